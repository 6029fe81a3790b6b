"""Two models' deployed evaluations of the same photos, compared photo for photo with confidence intervals.

Why: choosing a recipe by "its balanced accuracy as deployed is higher" on a split of 1,000 photos
with a dozen dermatofibromas is choosing by noise as often as not (one df photo moves balanced
accuracy by more than a point). This reads the ``photos.jsonl`` that ``dermaloop evaluate
--as-deployed`` writes for each model, keeps the photos both classified, and reports each model's
balanced accuracy, accuracy, malignant calls and the risk tier's malignant sensitivity and
specificity (the tier is what sends a patient to a doctor) with the paired bootstrap of the
retraining gates (``training.gates``: resampling photos within each class, the same photos for both
models).

    python -m training.compare_deployed var/deployed-eval/release-device-val var/deployed-eval/box-top-device-val
    python -m training.compare_deployed SERVING_REPORT CANDIDATE_REPORT --gates   # may B replace A?
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dermaloop.taxonomy import load_taxonomy
from training.gates import (
    Decision,
    balanced_accuracy,
    balanced_accuracy_gate,
    decide,
    ece_gate,
    mcnemar_exact,
    paired_bootstrap,
    sensitivity_gate,
)

TIERS = ("low", "moderate", "high")


def read_photos(report_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Photo id -> (label, call, risk tier) for every classified photo of one deployed evaluation."""
    path = Path(report_dir) / "photos.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `dermaloop evaluate --as-deployed --out {report_dir}` first")
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
        if row.get("status") == "classified":
            answer = row.get("answer") or {}
            out[row["id"]] = {"label": row["label"], "called": row["called"], "risk": answer.get("risk")}
    return out


def compare(a_dir: str | Path, b_dir: str | Path, taxonomy_name: str = "ham10000") -> dict[str, Any]:
    """Figures of A and B on the photos both classified, and B - A with 95 % paired-bootstrap intervals."""
    taxonomy = load_taxonomy(taxonomy_name)
    a, b, ids, labels, call_a, call_b = _paired(a_dir, b_dir, taxonomy.ids)
    malignant = np.asarray(taxonomy.malignant_mask, bool)
    mal = malignant[labels]
    flag_a, flag_b = malignant[call_a], malignant[call_b]
    d_ba, lo_ba, hi_ba = paired_bootstrap(call_a == labels, call_b == labels, labels)
    d_acc, lo_acc, hi_acc = paired_bootstrap(call_a == labels, call_b == labels, np.zeros(len(ids)))
    d_sens, lo_sens, hi_sens = paired_bootstrap(flag_a[mal], flag_b[mal], np.zeros(int(mal.sum())))
    return {
        "photos": len(ids), "only_a": len(set(a) - set(b)), "only_b": len(set(b) - set(a)),
        "a": {"balanced_accuracy": balanced_accuracy(labels, call_a), "accuracy": float((call_a == labels).mean()),
              "malignant_called_malignant": float(flag_a[mal].mean())},
        "b": {"balanced_accuracy": balanced_accuracy(labels, call_b), "accuracy": float((call_b == labels).mean()),
              "malignant_called_malignant": float(flag_b[mal].mean())},
        "b_minus_a": {"balanced_accuracy": [d_ba, lo_ba, hi_ba], "accuracy": [d_acc, lo_acc, hi_acc],
                      "malignant_called_malignant": [d_sens, lo_sens, hi_sens]},
        "malignant_mcnemar": mcnemar_exact(flag_a[mal], flag_b[mal]),
        **tier_figures([a[i]["risk"] for i in ids], [b[i]["risk"] for i in ids], mal),
        "per_class_recall": {c: [float((call_a[labels == k] == k).mean()), float((call_b[labels == k] == k).mean()),
                                 int((labels == k).sum())]
                             for k, c in enumerate(taxonomy.ids) if (labels == k).any()},
    }


def _paired(a_dir: str | Path, b_dir: str | Path, class_ids: list[str] | tuple[str, ...]):
    """Both reports' photos, the ids both classified, and their labels and calls as class indices;
    a refusal when they share no photo or disagree on a label (not the same split)."""
    a, b = read_photos(a_dir), read_photos(b_dir)
    ids = sorted(set(a) & set(b))
    if not ids:
        raise ValueError("the two evaluations share no classified photo: were they run on the same split?")
    mismatched = [i for i in ids if a[i]["label"] != b[i]["label"]]
    if mismatched:
        raise ValueError(f"the evaluations disagree on the labels of {len(mismatched)} photos, e.g. {mismatched[0]}")
    index = {c: k for k, c in enumerate(class_ids)}
    return (a, b, ids, np.array([index[a[i]["label"]] for i in ids]), np.array([index[a[i]["called"]] for i in ids]),
            np.array([index[b[i]["called"]] for i in ids]))


def tier_figures(risk_a: list[str | None], risk_b: list[str | None], malignant: np.ndarray) -> dict[str, Any]:
    """The risk tier's malignant sensitivity and specificity (a malignant photo is caught when its tier
    is moderate or high) for both models, B - A with paired intervals; empty when a report has no tiers
    (a demonstration model's answers name none)."""
    if any(r not in TIERS for r in (*risk_a, *risk_b)):
        return {}
    caught_a = np.array([r != "low" for r in risk_a])
    caught_b = np.array([r != "low" for r in risk_b])
    out: dict[str, Any] = {"tier": {"a": {}, "b": {}, "b_minus_a": {}}}
    for key, rows, hit_a, hit_b in (("sensitivity", malignant, caught_a, caught_b),
                                    ("specificity", ~malignant, ~caught_a, ~caught_b)):
        if rows.any():
            d, lo, hi = paired_bootstrap(hit_a[rows], hit_b[rows], np.zeros(int(rows.sum())))
            out["tier"]["a"][key], out["tier"]["b"][key] = float(hit_a[rows].mean()), float(hit_b[rows].mean())
            out["tier"]["b_minus_a"][key] = [d, lo, hi]
    return out


def gates(current_dir: str | Path, candidate_dir: str | Path, taxonomy_name: str = "ham10000") -> Decision:
    """The retraining gates (``training.gates``) on two deployed evaluations: may the candidate
    (B) replace the serving model (A) as deployed? Balanced accuracy of the calls, the risk tier's
    malignant sensitivity (a malignant photo caught when told moderate or high, per-class strata as
    in the retraining job) and calibration (each report's ECE). The int8 gate compares a device
    model with its own float model and is not a two-report question; it is in the training card."""
    taxonomy = load_taxonomy(taxonomy_name)
    a, b, ids, labels, call_a, call_b = _paired(current_dir, candidate_dir, taxonomy.ids)
    verdicts = [balanced_accuracy_gate(labels, call_a, call_b)]
    if all(a[i]["risk"] in TIERS and b[i]["risk"] in TIERS for i in ids):
        verdicts.append(sensitivity_gate(labels, taxonomy.malignant_mask,
                                         np.array([a[i]["risk"] != "low" for i in ids]),
                                         np.array([b[i]["risk"] != "low" for i in ids])))
    eces = []
    for folder in (current_dir, candidate_dir):
        try:
            eces.append(json.loads((Path(folder) / "metrics.json").read_text()).get("ece"))
        except (OSError, json.JSONDecodeError):
            eces.append(None)
    if isinstance(eces[1], int | float):
        verdicts.append(ece_gate(eces[0] if isinstance(eces[0], int | float) else None, float(eces[1])))
    return decide(verdicts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.compare_deployed", description=__doc__.split("\n")[0])
    parser.add_argument("a", type=Path, help="report folder of the first model's deployed evaluation")
    parser.add_argument("b", type=Path, help="report folder of the second model's, on the same split")
    parser.add_argument("--taxonomy", default="ham10000")
    parser.add_argument("--gates", action="store_true",
                        help="also run the retraining gates with A as the serving model and B as the candidate")
    args = parser.parse_args(argv)
    try:
        result = compare(args.a, args.b, args.taxonomy)
        decision = gates(args.a, args.b, args.taxonomy) if args.gates else None
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"compare_deployed: {exc}", file=sys.stderr)
        return 2
    print(f"{result['photos']} photos classified by both ({result['only_a']} only by A, {result['only_b']} only by B)")
    for key in ("balanced_accuracy", "accuracy", "malignant_called_malignant"):
        d, lo, hi = result["b_minus_a"][key]
        print(f"{key}: A {result['a'][key]:.4f}, B {result['b'][key]:.4f}, B - A {d:+.4f} (95 % CI {lo:+.4f} .. {hi:+.4f})")
    tier = result.get("tier", {})
    for key, (d, lo, hi) in tier.get("b_minus_a", {}).items():
        print(f"risk tier malignant {key} (moderate or high): A {tier['a'][key]:.4f}, B {tier['b'][key]:.4f}, "
              f"B - A {d:+.4f} (95 % CI {lo:+.4f} .. {hi:+.4f})")
    print("per-class recall (A, B, photos): " + ", ".join(f"{c} {x:.3f}/{y:.3f} ({n})"
                                                          for c, (x, y, n) in result["per_class_recall"].items()))
    if decision is not None:
        for verdict in decision.verdicts:
            print(f"gate {verdict.gate}: {'passed' if verdict.passed else 'FAILED'}: {verdict.reason}")
        print(f"B may replace A: {'yes' if decision.promote else 'no'} ({decision.reason})")
        result["gates"] = decision.to_json()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
