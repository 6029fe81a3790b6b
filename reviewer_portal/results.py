"""How one model's answer on a case is worded in the portal: its risk, or the demonstration warning.

A model trained on synthetic images (``dermaloop.model_dir.is_demonstration``, docs/ARCHITECTURE.md
"Demonstration models") answers with ``demonstration: true`` and no risk tier in the case's ``device``
or ``cloud`` record. Its probabilities stay visible (they are what the patient was shown), but a
dermatologist must never read them as a clinical finding, so wherever the portal would word a risk
(the queue row's tier badge, the case view's risk line and malignant probability) it says this
instead. Pure functions, tested without a browser.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

DEMONSTRATION = "DEMONSTRATION MODEL (synthetic training data): not a clinical result"
# The card's abstain rule (dermaloop.risk.AbstainRule, issue 20): the model is sure only when its
# calibrated prediction set is exactly its call; otherwise its record says ``unsure: true``.
UNSURE = "UNSURE"


@dataclass(frozen=True)
class Call:
    """One model's top call on a case."""

    label: str
    name: str
    p: float


@dataclass(frozen=True)
class Line:
    """One line of a model's column in the case view; ``kind`` picks its look (title, small, warning,
    call, note or plain), so the screen only renders what this module decided to say."""

    text: str
    kind: str = "plain"


def pct(p: Any) -> str:
    return f"{float(p) * 100:.0f}%" if isinstance(p, int | float) else "?"


# A case's status as the case view words it: "diagnosed" alone read as if a doctor had diagnosed it.
STATUS_TEXT = {
    "queued": "waiting for the cloud model",
    "processing": "the cloud model is analysing it",
    "diagnosed": "answered by the models, waiting for a dermatologist's review",
    "failed": "the cloud analysis failed",
    "reviewed": "reviewed by a dermatologist",
    "labelled": "reviewed by a dermatologist; its label is in a training set",
}


def status_text(status: Any) -> str:
    return STATUS_TEXT.get(str(status), str(status))


def top_call(result: Any) -> Call | None:
    """A model's call (``top[0]``) from a ``device`` or ``cloud`` record, None when it made none."""
    if not isinstance(result, Mapping):
        return None
    top = result.get("top")
    if not isinstance(top, list) or not top or not isinstance(top[0], Mapping):
        return None
    first = top[0]
    p = first.get("p")
    return Call(str(first.get("label")), str(first.get("name") or first.get("label")),
                float(p) if isinstance(p, int | float) else 0.0)


def is_demonstration(result: Any) -> bool:
    """Whether a ``device``/``cloud`` record came from a demonstration model (the rules accept only ``true``)."""
    return isinstance(result, Mapping) and result.get("demonstration") is True


def is_unsure(result: Any) -> bool:
    """Whether a model's abstain rule said "unsure" (never said of a demonstration model's answer)."""
    return isinstance(result, Mapping) and result.get("unsure") is True and not is_demonstration(result)


def unsure_line(result: Any, name: Callable[[str], str] = str) -> str | None:
    """"UNSURE (prediction set: A, B)" for a model whose abstain rule said unsure, else None."""
    if not is_unsure(result):
        return None
    labels = result.get("predictionSet")
    names = [name(str(label)) for label in labels if label] if isinstance(labels, list) else []
    return f"{UNSURE} (prediction set: {', '.join(names) if names else 'empty'})"


def risk_line(result: Mapping[str, Any]) -> str:
    """The case view's risk line under one model's probabilities."""
    if is_demonstration(result):
        return DEMONSTRATION
    line = f"Risk: {result.get('risk') or 'not classified'}"
    if isinstance(result.get("malignantP"), int | float):
        line += f" · malignant p {pct(result['malignantP'])}"
    return line


def risk_badges(risk: str | None, demonstration: Iterable[str], answered: Iterable[str],
                unsure: Iterable[str] = ()) -> list[str]:
    """A queue row's risk wording: the tier badge, or the demonstration badge in its place.

    ``demonstration`` names the models ("device", "cloud") whose answers came from a demonstration
    model, ``answered`` every model with a record on the case. The queue's tier is the cloud model's;
    a demonstration answer has none, so its row shows the warning and no "UNKNOWN risk". When only
    one of two models is a demonstration the badge names it, and the other model's tier (if any)
    stays. ``unsure`` names the models whose abstain rule said unsure: one more badge, after the tier
    ("UNSURE (cloud)"), since the tier still stands."""
    demo = [m for m in ("device", "cloud") if m in set(demonstration)]
    doubt = [m for m in ("device", "cloud") if m in set(unsure) and m not in demo]
    doubt_badges = [f"{UNSURE} ({' and '.join(doubt)})"] if doubt else []
    if not demo:
        return [f"{(risk or 'unknown').upper()} risk", *doubt_badges]
    badges = [f"{risk.upper()} risk"] if risk else []
    named = "" if set(demo) >= set(answered) else f"{' and '.join(demo)}: "
    return [*badges, *doubt_badges, named + DEMONSTRATION]


def model_lines(title: str, result: Any, name: Callable[[str], str]) -> list[Line]:
    """One model's column in the case view: version, the demonstration warning right above the
    probabilities (before any number can be read as a finding), the call and, when the card's
    abstain rule said unsure, its prediction set, the risk line (never for
    a demonstration model), photo quality and the worker's message. ``name`` turns a label into the
    taxonomy's name."""
    lines = [Line(title, "title")]
    if not isinstance(result, Mapping):
        return [*lines, Line("No result yet." if title.startswith("Cloud") else "No on-device result.")]
    lines.append(Line(f"Version: {result.get('modelVersion', '?')}", "small"))
    demonstration = is_demonstration(result)
    if demonstration:
        lines.append(Line(DEMONSTRATION, "warning"))
    probs = result.get("probs") if isinstance(result.get("probs"), Mapping) else None
    # (label, shown name, p), most probable first: the device's top list comes in the call's order
    ranked = sorted(((str(k), name(str(k)), v) for k, v in probs.items()) if probs else
                    ((str(t.get("label")), t.get("name") or t.get("label"), t.get("p"))
                     for t in result.get("top") or [] if isinstance(t, Mapping)),
                    key=lambda r: -float(r[2] or 0))
    lines += [Line(f"{shown}: {pct(p)}") for _, shown, p in ranked]
    call = top_call(result)
    text = f"Call: {call.name if call else 'none (photo declined)'}"
    if call and ranked and ranked[0][0] != call.label and not demonstration:
        text += (f" (named over the more probable {ranked[0][1]}, {pct(ranked[0][2])}, by the card's "
                 "decision offset: missing it costs more)")
    lines.append(Line(text, "call"))
    unsure = unsure_line(result, name)
    if unsure:  # next to the call it qualifies; the risk line below still stands
        lines.append(Line(unsure, "warning"))
    if not demonstration:
        lines.append(Line(risk_line(result)))
    quality = result.get("quality") if isinstance(result.get("quality"), Mapping) else {}
    issues = quality.get("issues") or []
    lines.append(Line("Photo quality: " + ("good" if quality.get("ok") else "problems")
                      + (f" ({', '.join(map(str, issues))})" if issues else "")))
    if result.get("message"):
        lines.append(Line(str(result["message"]), "note"))
    return lines
