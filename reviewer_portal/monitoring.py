"""Monitoring figures for the portal: how much is reviewed, how fast, how old the queue is, and how
often each model agreed with the dermatologists (per class, as confusion matrices in a PNG).

Computed from the live copies of ``/cases`` and ``/queue`` the session already holds (no extra
reads). Plots are matplotlib PNGs because Flet's chart extensions are not in the web client.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dermaloop import cases
from reviewer_portal import results
from reviewer_portal.queue import (
    DEMONSTRATION_TIER,
    HOUR_MS,
    RISKS,
    TIER_LIMIT_HOURS,
    TIERS,
    UNKNOWN_TIER,
    top_call,
)


@dataclass
class Figures:
    reviewed: int = 0
    review_hours_p50: float | None = None
    review_hours_p95: float | None = None
    queue_age: dict[str, dict[str, float]] = field(default_factory=dict)  # tier -> count, p50 h, max h, overdue
    agreement: dict[str, float | None] = field(default_factory=dict)  # "device"/"cloud" -> share agreeing
    pairs: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)  # model -> (truth, call)
    # model -> reviewed cases left out of its agreement because a demonstration model answered them:
    # a model trained on synthetic images says nothing about how the real one does
    demonstration_left_out: dict[str, int] = field(default_factory=dict)


def _reviewed_cases(all_cases: Any) -> list[Mapping[str, Any]]:
    out = []
    for per_patient in (all_cases or {}).values() if isinstance(all_cases, Mapping) else []:
        if not isinstance(per_patient, Mapping):
            continue
        for case in per_patient.values():
            if (isinstance(case, Mapping) and case.get("status") in (cases.Status.REVIEWED, cases.Status.LABELLED)
                    and isinstance(case.get("review"), Mapping)):
                out.append(case)
    return out


def _case(all_cases: Any, uid: Any, case_id: str) -> Mapping[str, Any]:
    per_patient = all_cases.get(uid) if isinstance(all_cases, Mapping) and isinstance(uid, str) else None
    case = per_patient.get(case_id) if isinstance(per_patient, Mapping) else None
    return case if isinstance(case, Mapping) else {}


def queue_tier(entry: Mapping[str, Any], case: Mapping[str, Any]) -> str:
    """What a waiting case is counted under: its queue entry's risk tier; without one,
    "demonstration" when a demonstration model answered (as the queue row's badge says), else "unknown"."""
    if entry.get("risk") in RISKS:
        return str(entry["risk"])
    if any(results.is_demonstration(case.get(model)) for model in ("device", "cloud")):
        return DEMONSTRATION_TIER
    return UNKNOWN_TIER


def compute(all_cases: Any, queue: Any, now_ms: int) -> Figures:
    figures = Figures()
    reviewed = _reviewed_cases(all_cases)
    figures.reviewed = len(reviewed)
    waits = [(c["review"]["at"] - c["createdAt"]) / HOUR_MS for c in reviewed
             if isinstance(c["review"].get("at"), int | float) and isinstance(c.get("createdAt"), int | float)]
    if waits:
        figures.review_hours_p50 = float(np.percentile(waits, 50))
        figures.review_hours_p95 = float(np.percentile(waits, 95))
    ages: dict[str, list[float]] = {}
    for case_id, entry in (queue or {}).items() if isinstance(queue, Mapping) else []:
        if not isinstance(entry, Mapping) or entry.get("status") in (cases.Status.REVIEWED, cases.Status.LABELLED):
            continue
        tier = queue_tier(entry, _case(all_cases, entry.get("uid"), case_id))
        created = entry.get("createdAt")
        if isinstance(created, int | float):
            ages.setdefault(tier, []).append((now_ms - created) / HOUR_MS)
    for tier, hours in ages.items():
        limit = TIER_LIMIT_HOURS.get(tier, TIER_LIMIT_HOURS[None])
        figures.queue_age[tier] = {"count": len(hours), "p50_h": float(np.percentile(hours, 50)),
                                   "max_h": float(max(hours)), "overdue": sum(h > limit for h in hours)}
    for model in ("device", "cloud"):
        truth, calls = [], []
        figures.demonstration_left_out[model] = 0
        for case in reviewed:
            label = case["review"].get("label")
            call = top_call(case.get(model))
            if call is None or label in cases.REVIEW_SPECIAL_LABELS or not isinstance(label, str):
                continue
            if results.is_demonstration(case.get(model)):
                figures.demonstration_left_out[model] += 1
                continue
            truth.append(label)
            calls.append(call.label)
        figures.pairs[model] = (truth, calls)
        figures.agreement[model] = (sum(t == c for t, c in zip(truth, calls, strict=True)) / len(truth)
                                    if truth else None)
    return figures


def agreement_lines(figures: Figures) -> list[str]:
    """The monitoring screen's line per model on how often it agreed with the dermatologists."""
    lines = []
    for model in ("device", "cloud"):
        share = figures.agreement.get(model)
        n = len(figures.pairs.get(model, ([], []))[0])
        line = (f"{model.capitalize()} model agreed with the dermatologists: "
                f"{'n/a' if share is None else f'{share:.0%} of {n} reviewed cases'}")
        left_out = figures.demonstration_left_out.get(model, 0)
        if left_out:
            line += f" ({left_out} answered by a demonstration model left out)"
        lines.append(line)
    return lines


def waiting_lines(figures: Figures) -> list[str]:
    """The monitoring screen's lines on the waiting cases, one per tier that has any."""
    lines = []
    for tier in TIERS:
        age = figures.queue_age.get(tier)
        if age:
            what = "demonstration model answers (no risk tier)" if tier == DEMONSTRATION_TIER else f"{tier} risk"
            lines.append(f"Waiting, {what}: {age['count']:.0f} cases, median {age['p50_h']:.1f} h, "
                         f"oldest {age['max_h']:.1f} h, overdue {age['overdue']:.0f}")
    return lines


def confusion_png(figures: Figures, labels: Sequence[str]) -> bytes:
    """Device and cloud calls against the dermatologists' labels, side by side, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), dpi=90)
    for ax, model in zip(axes, ("device", "cloud"), strict=True):
        truth, calls = figures.pairs.get(model, ([], []))
        matrix = (confusion_matrix(truth, calls, labels=list(labels)) if truth
                  else np.zeros((len(labels), len(labels)), dtype=int))
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(labels)), labels, rotation=45)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel(f"{model} model's call")
        ax.set_ylabel("dermatologist's label")
        share = figures.agreement.get(model)
        ax.set_title(f"{model}: {'no reviewed cases yet' if share is None else f'{share:.0%} agree'} (n={len(truth)})")
        for (i, j), n in np.ndenumerate(matrix):
            if n:
                ax.text(j, i, str(n), ha="center", va="center",
                        color="white" if n > matrix.max() / 2 else "black", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
