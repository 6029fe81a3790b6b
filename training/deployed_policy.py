"""Fit the card's risk thresholds and class offsets on calib photos as the deployed path sees them.

`dermaloop train` fits the malignant thresholds (90 % sensitivity) and the melanoma offset
(``--class-recall``) on the calib split's *training views*: centre squares, or with ``--crop box``
box crops of the dataset's boxes. Patients' photos reach the model through the quality gate, the
localiser's box and its crop, and a model trained on box crops saw the val photos land below both
targets (issue 20: sensitivity 0.850, melanoma recall 0.658). The targets are promises about what
the patient gets, so they are fitted where the patient is: on the calib photos run through the
deployed path (``training.deployed_eval``), the way the abstain rule already is. The temperature
stays (it is folded into the model files); only ``card[kind]["risk"]``'s thresholds and offsets
change, and the card keeps the previous policy and the calib figures before and after under
``policy_fit``.

    python -m training.deployed_policy MODEL_DIR --data DATASET [--kind both] [--class-recall mel=0.75]
        [--report DIR ...] [--sensitivity-confidence 0.95|point] [--abstain 0.9]

``--sensitivity-confidence 0.95`` fits the moderate threshold so that the one-sided 95 % lower
confidence bound of the calib sensitivity reaches the target (the release's rule: the point estimate
misses on new photos about half the time); the card keeps the rule, later refits follow it, and
``point`` goes back to the point estimate.

``--report`` reuses a `dermaloop evaluate --as-deployed --split calib` folder of this very model
(its photos.jsonl holds every photo's probabilities) instead of running the path again. When the
card has an abstain rule, it is refitted from the same probabilities (its figures depend on the
calls); ``--abstain COVERAGE`` fits one (LAC) where the card has none, so packing a release needs
one pass over calib. Never run it on a model directory someone else is packing: copy it first.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dermaloop.risk import RiskPolicy, fit_class_offsets, policy_from_probabilities
from training.abstain import abstain_figures, calib_part, fit_abstain, labelled_probs, write_card_sections

POINT_ESTIMATE = "point"  # --sensitivity-confidence point: drop a card's confidence-bound rule


def fit_deployed_policy(probs: np.ndarray, labels: np.ndarray, old: RiskPolicy, class_recall: dict[int, float],
                        sensitivity_confidence: float | str | None = None) -> RiskPolicy:
    """``old``'s temperature and targets with thresholds and offsets refitted on ``probs``; the
    sensitivity rule is ``old``'s unless ``sensitivity_confidence`` names one (a confidence, or
    ``POINT_ESTIMATE``): a refit never weakens a card's promise unless asked to."""
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels, np.int64)
    if p.ndim != 2 or len(p) != len(y) or not len(y):
        raise ValueError(f"expected (n, classes) probabilities and n labels, got {p.shape} and {y.shape}")
    confidence = (old.sensitivity_confidence if sensitivity_confidence is None
                  else None if sensitivity_confidence == POINT_ESTIMATE else float(sensitivity_confidence))
    policy = policy_from_probabilities(old.temperature, p, y, old.malignant_mask, old.target_sensitivity,
                                       old.target_specificity, confidence)
    offsets = fit_class_offsets(p, y, class_recall) if class_recall else ()
    return replace(policy, class_offsets=offsets, demonstration=old.demonstration)


def policy_figures(policy: RiskPolicy, probs: np.ndarray, labels: np.ndarray, ids: list[str]) -> dict[str, Any]:
    """What a policy does on labelled photos: the tier's sensitivity / specificity and the calls."""
    from sklearn.metrics import balanced_accuracy_score, recall_score

    p, y = np.asarray(probs, np.float64), np.asarray(labels, np.int64)
    calls = policy.decide(p)
    positive = np.array(policy.malignant_mask, bool)[y]
    flagged = policy.malignant_probability(p) >= policy.moderate_threshold
    recalls = recall_score(y, calls, labels=range(len(ids)), average=None, zero_division=0)
    return {"n": int(len(y)),
            "malignant_sensitivity": float(flagged[positive].mean()) if positive.any() else None,
            "malignant_specificity": float((~flagged[~positive]).mean()) if (~positive).any() else None,
            "balanced_accuracy": float(balanced_accuracy_score(y, calls)),
            "accuracy": float((calls == y).mean()),
            "per_class_recall": {c: float(r) for c, r in zip(ids, recalls, strict=True) if (y == ids.index(c)).any()}}


def report_probs(report_dir: str | Path, version: str, kind: str, ids: list[str],
                 calib_ids: set[str]) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(probs, labels, counts) of a deployed calib report made with this very model, or a refusal."""
    report = Path(report_dir)
    try:
        data = json.loads((report / "metrics.json").read_text())["data"]
        rows = [json.loads(line) for line in (report / "photos.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{report}: not a `dermaloop evaluate --as-deployed` folder ({exc})") from None
    if data.get("path") != "as deployed":
        raise ValueError(f"{report}: wanted an as-deployed report, found {data.get('path')!r}")
    if data.get("model_version") != version or data.get("model_kind") != kind:
        raise ValueError(f"{report}: made with the {data.get('model_kind')} model {data.get('model_version')}, "
                         f"not this {kind} model {version}")
    if {r["id"] for r in rows} != calib_ids:
        raise ValueError(f"{report}: its photos ({data.get('split')}) are not all of this model's calib split")
    done = [r for r in rows if r["status"] == "classified"]
    if not done:
        raise ValueError(f"{report}: the deployed path classified none of the calib photos")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("classified", "declined", "unreadable")}
    return (np.array([r["probs"] for r in done], np.float64), np.array([ids.index(r["label"]) for r in done]),
            counts)


def refit_model_dir(model_dir: str | Path, data: str | Path | None, kind: str, *,
                    class_recall: dict[str, float] | None = None, report: str | Path | None = None,
                    models_dir: str | Path | None = None, analysis_model: str | Path | None = None,
                    abstain_coverage: float | None = None, sensitivity_confidence: float | str | None = None,
                    progress: bool = True, write: bool = True) -> dict[str, Any]:
    """Refit ``kind``'s thresholds and offsets on its calib photos as deployed; write them into the card.

    ``class_recall`` defaults to the targets the card's decision rule was trained with."""
    from dermaloop.model_dir import ModelDir

    md = ModelDir.open(model_dir)
    section = md.section(kind)
    ids = list(md.taxonomy.ids)
    old = RiskPolicy.from_dict(section["risk"])
    if class_recall is None:
        class_recall = dict((section.get("decision") or {}).get("calib_recall_targets") or {})
    unknown = [c for c, r in class_recall.items() if c not in ids or not 0 < r <= 1]
    if unknown:
        raise ValueError(f"--class-recall: {unknown} are not classes of this model with a recall in (0, 1]")
    calib_ids = set(calib_part(model_dir, "calib"))
    if report is not None:
        probs, labels, counts = report_probs(report, md.card["version"], kind, ids, calib_ids)
        source = f"the as-deployed report {Path(report).name}"
    else:
        if data is None:
            raise ValueError("give --data (to run the calib photos through the deployed path) or --report")
        from training.datasets import open_dataset

        dataset = open_dataset(data, md.taxonomy)
        calib = dataset.subset([i for i, s in enumerate(dataset.samples) if s.id in calib_ids])
        if not calib.samples:
            raise ValueError(f"none of the model's {len(calib_ids)} calib photos are in {data}")
        probs, labels, _, _, counts = labelled_probs(kind, model_dir, calib, "deployed", models_dir=models_dir,
                                                     analysis_model=analysis_model, progress=progress)
        source = "the deployed path"
    policy = fit_deployed_policy(probs, labels, old, {ids.index(c): r for c, r in class_recall.items()},
                                 sensitivity_confidence)
    fitted_on = f"calib split as deployed ({counts}), probabilities from {source}"
    decision: dict[str, Any] = {"rule": "most probable class"}
    if class_recall:
        called = policy.decide(probs)
        decision = {"rule": "argmax of log-probability + class offset", "calib_recall_targets": dict(class_recall),
                    "class_offsets": {c: v for c, v in zip(ids, policy.class_offsets, strict=True) if v},
                    "calib_recall": {c: float((called[labels == ids.index(c)] == ids.index(c)).mean())
                                     for c in class_recall},
                    "fitted_on": fitted_on}
    fit = {"fitted_on": fitted_on, "fitted_at": datetime.now(UTC).isoformat(timespec="seconds"),
           "previous": {"risk": section["risk"], "decision": section.get("decision")},
           "calib_before": policy_figures(old, probs, labels, ids),
           "calib_after": policy_figures(policy, probs, labels, ids),
           "note": "the card's `metrics` are centre-square figures computed with the previous policy"}
    result: dict[str, Any] = {"kind": kind, "policy": policy, "fit": fit, "decision": decision}
    abstain = section.get("abstain")
    if abstain_coverage is not None:
        from training.abstain import RULE_TEXT

        abstain = {**(abstain or {}), "method": "lac", "coverage": abstain_coverage, "rule": RULE_TEXT}
    if abstain:
        rule = fit_abstain(probs, labels, float(abstain["coverage"]), str(abstain["method"]))
        result["abstain"] = {**abstain, **rule.to_dict(), "fitted_on": fitted_on,
                             "fitted_at": fit["fitted_at"],
                             "calib": abstain_figures(rule, probs, labels, policy.decide(probs), policy, ids)}
        result["abstain"].pop("val", None)  # measured with the previous calls: no longer true
    if write:
        sections = {"risk": {**policy.to_dict(),
                             "temperature_in_model": section["risk"].get("temperature_in_model", True)},
                    "decision": decision, "policy_fit": fit}
        if "abstain" in result:
            sections["abstain"] = result["abstain"]
        write_card_sections(model_dir, kind, sections)
    return result


def _print(result: dict[str, Any]) -> None:
    fit = result["fit"]
    prev = RiskPolicy.from_dict(fit["previous"]["risk"])
    new: RiskPolicy = result["policy"]
    print(f"{result['kind']}: fitted on {fit['fitted_on']}")
    print(f"  moderate threshold {prev.moderate_threshold:.4f} -> {new.moderate_threshold:.4f}, high "
          f"{prev.high_threshold:.4f} -> {new.high_threshold:.4f}, offsets {list(prev.class_offsets)} -> "
          f"{list(new.class_offsets)}")
    rule = ("point estimate" if new.sensitivity_confidence is None
            else f"lower {new.sensitivity_confidence:.0%} confidence bound")
    print(f"  moderate threshold: malignant sensitivity {new.target_sensitivity:.2f} on calib ({rule})")
    for name in ("calib_before", "calib_after"):
        f = fit[name]
        print(f"  {name}: malignant sensitivity {_fmt(f['malignant_sensitivity'])} / specificity "
              f"{_fmt(f['malignant_specificity'])}, balanced accuracy {f['balanced_accuracy']:.3f}, "
              f"accuracy {f['accuracy']:.3f}, recall {json.dumps({k: round(v, 3) for k, v in f['per_class_recall'].items()})}")
    if "abstain" in result:
        print(f"  abstain rule refitted: qhat {result['abstain']['qhat']:.4f}")


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.deployed_policy", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, metavar="MODEL_DIR")
    parser.add_argument("--data", type=Path, help="the dataset the model was trained on")
    parser.add_argument("--kind", choices=("device", "cloud", "both"), default="both")
    parser.add_argument("--class-recall", help="CLASS=RECALL pairs such as mel=0.75 (default: the card's targets; "
                                               "'' for none)")
    parser.add_argument("--report", type=Path, action="append", default=[],
                        help="an as-deployed calib report of this model to take the probabilities from "
                             "(one per kind; repeat)")
    parser.add_argument("--models-dir", type=Path, help="where the analysis model is (default: the settings')")
    parser.add_argument("--analysis-model", type=Path, help="the analysis TFLite file itself")
    parser.add_argument("--abstain", type=float, metavar="COVERAGE",
                        help="also fit a LAC abstain rule at this coverage (default: refit the card's own, if any)")
    parser.add_argument("--sensitivity-confidence", metavar="C",
                        help="fit the moderate threshold so that the one-sided lower confidence bound of the "
                             "malignant sensitivity reaches the target (e.g. 0.95), or 'point' for its calib "
                             "point estimate (default: the card's own rule)")
    parser.add_argument("--dry-run", action="store_true", help="fit and print; do not write the card")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    from dermaloop.model_dir import ModelDir, ModelError
    from training.train_cli import parse_class_recall

    confidence: float | str | None = args.sensitivity_confidence
    if confidence is not None and confidence != POINT_ESTIMATE:
        try:
            confidence = float(confidence)
        except ValueError:
            confidence = -1.0
        if not 0 < confidence < 1:
            print(f"training.deployed_policy: --sensitivity-confidence takes a confidence strictly between 0 and 1 "
                  f"or '{POINT_ESTIMATE}', got {args.sensitivity_confidence!r}", file=sys.stderr)
            return 2
    class_recall = None
    if args.class_recall is not None:
        try:
            class_recall = parse_class_recall(args.class_recall)
        except ValueError as exc:
            print(f"training.deployed_policy: {exc}", file=sys.stderr)
            return 2
    models_dir = args.models_dir
    if models_dir is None and args.analysis_model is None and not args.report:
        from dermaloop.settings import load_settings

        models_dir = load_settings().models_dir
    try:
        reports = {}
        for report in args.report:
            try:
                kind = json.loads((report / "metrics.json").read_text())["data"]["model_kind"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{report}: not a `dermaloop evaluate --as-deployed` folder ({exc})") from None
            reports[kind] = report
        card = ModelDir.open(args.model).card
        kinds = ("device", "cloud") if args.kind == "both" else (args.kind,)
        for kind in kinds:
            if args.kind == "both" and kind not in card:
                print(f"{args.model}: no {kind} model; skipped", file=sys.stderr)
                continue
            if kind not in reports and args.data is None:
                raise ValueError(f"no --report for the {kind} model and no --data to run its calib photos")
            _print(refit_model_dir(args.model, args.data, kind, class_recall=class_recall, report=reports.get(kind),
                                   models_dir=models_dir, analysis_model=args.analysis_model,
                                   abstain_coverage=args.abstain,
                                   sensitivity_confidence=confidence, progress=not args.quiet,
                                   write=not args.dry_run))
    except (ModelError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"training.deployed_policy: {exc}", file=sys.stderr)
        return 2
    if not args.dry_run:
        print(f"written to {args.model / 'card.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
