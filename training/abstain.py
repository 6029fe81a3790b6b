"""A calibrated "not sure": fit the model card's abstain rule on the model's own calib split.

Split conformal prediction (Vovk et al.; Angelopoulos & Bates 2021): score every calib photo's true
class (``dermaloop.risk.conformal_scores``), take ``qhat`` = the ceil((n + 1) x coverage)-th smallest
score. On photos exchangeable with the calib ones, the set of classes scoring at most ``qhat``
contains the true class with probability at least ``coverage``, whatever the model. The runtime
(``dermaloop.risk.AbstainRule``) says "unsure: a dermatologist will look" unless that set is
exactly the class the model names.

The calib photos go through the deployed path by default (``training.deployed_eval``: gates, crop
around the lesion box, the runtime model), because the guarantee holds for photos scored the way
the rule will score them; ``--path centre`` fits on centre squares (as ``dermaloop evaluate``).
Photos the gates decline are not classified at runtime, so they are not part of the fit either.

    python -m training.abstain MODEL_DIR --data DATASET [--kind both] [--coverage 0.9] [--method lac] [--val]

writes ``card.json[kind]["abstain"]`` (method, coverage, qhat, calib size, the path it was fitted
on, calib figures, and val figures with ``--val``). Never run it on a model directory someone
else is packing: copy it first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dermaloop.risk import ABSTAIN_METHODS, AbstainRule, RiskPolicy, conformal_scores

RULE_TEXT = "unsure unless the prediction set is exactly the called class"
SWEEP_COVERAGES = (0.8, 0.85, 0.9, 0.95)


def fit_abstain(probs: np.ndarray, labels: np.ndarray, coverage: float = 0.9, method: str = "lac") -> AbstainRule:
    """The split-conformal rule at ``coverage`` from held-out probabilities and true labels."""
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels, np.int64)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"expected (n, classes) probabilities and n labels, got {p.shape} and {y.shape}")
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"coverage must be between 0 and 1, not {coverage}")
    n = len(y)
    needed = math.ceil(coverage / (1.0 - coverage) - 1e-9)
    if n < needed:
        raise ValueError(f"{n} calib photos cannot back a coverage of {coverage:.2f}: split conformal needs at "
                         f"least {needed}")
    scores = conformal_scores(p, method)[np.arange(n), y]
    k = math.ceil((n + 1) * coverage - 1e-9)
    qhat = float(np.sort(scores)[k - 1])
    return AbstainRule(method, float(coverage), qhat, n)


def abstain_figures(rule: AbstainRule, probs: np.ndarray, labels: np.ndarray, calls: np.ndarray,
                    policy: RiskPolicy, ids: Sequence[str] | None = None) -> dict[str, Any]:
    """What the rule does on labelled photos: coverage, how often it abstains (overall, per class,
    on malignant photos), and how good the answers it does give are."""
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels, np.int64)
    calls = np.asarray(calls, np.int64)
    inside = rule.prediction_set(p)
    unsure = rule.unsure(p, calls)
    sure = ~unsure
    k = p.shape[1]
    recalls = [float((calls[sure & (y == c)] == c).mean()) for c in range(k) if (sure & (y == c)).any()]
    out: dict[str, Any] = {
        "n": int(len(y)),
        "coverage": float(inside[np.arange(len(y)), y].mean()),
        "abstain_rate": float(unsure.mean()),
        "mean_set_size": float(inside.sum(axis=1).mean()),
        "set_sizes": {str(s): int(v) for s, v in zip(*np.unique(inside.sum(axis=1), return_counts=True), strict=True)},
        "accuracy_sure": float((calls[sure] == y[sure]).mean()) if sure.any() else None,
        "accuracy_all": float((calls == y).mean()),
        "balanced_accuracy_sure": float(np.mean(recalls)) if recalls else None,
        "abstain_rate_per_class": {(ids[c] if ids else str(c)): float(unsure[y == c].mean())
                                   for c in range(k) if (y == c).any()},
    }
    mask = np.array(policy.malignant_mask, bool)
    is_mal = mask[y]
    if is_mal.any():
        flagged = policy.malignant_probability(p) >= policy.moderate_threshold
        out["malignant_abstained"] = float(unsure[is_mal].mean())
        out["malignant_sensitivity_sure"] = float(flagged[sure & is_mal].mean()) if (sure & is_mal).any() else None
        out["malignant_sensitivity_all"] = float(flagged[is_mal].mean())
        out["malignant_missed_sure"] = int((sure & is_mal & ~flagged).sum())
        out["malignant_flagged_or_abstained"] = float((flagged | unsure)[is_mal].mean())
        out["n_malignant"] = int(is_mal.sum())
    return out


def calib_part(model_dir: str | Path, part: str = "calib") -> list[str]:
    """The ids of the model's own ``part`` split, or a clear refusal when it has none."""
    split_file = Path(model_dir) / "split.json"
    why = ("the abstain rule must be fitted on held-out photos the model never trained on, and this model "
           "directory does not say which those are; retrain with `dermaloop train` (it writes split.json)")
    if not split_file.is_file():
        raise ValueError(f"{model_dir}: no split.json, so no {part} data: {why}")
    try:
        ids = json.loads(split_file.read_text()).get(part)
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{split_file}: unreadable ({exc})") from None
    if not ids:
        raise ValueError(f"{model_dir}: split.json has no {part} photos: {why}")
    return list(ids)


def labelled_probs(kind: str, model_dir: str | Path, dataset: Any, path: str, *, models_dir: str | Path | None,
                   analysis_model: str | Path | None, progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any,
                                                                            dict[str, int]]:
    """(probs, labels, calls, runtime model, counts) of the photos the chosen path classified."""
    if path == "deployed":
        from training.deployed_eval import run_path

        photos, model, _ = run_path(kind, model_dir, dataset.samples, models_dir=models_dir,
                                    analysis_model=analysis_model, progress=progress)
        done = [p for p in photos if p.status == "classified"]
        counts = {s: sum(p.status == s for p in photos) for s in ("classified", "declined", "unreadable")}
        if not done:
            raise ValueError("the deployed path classified none of the calib photos")
        return (np.stack([p.probs for p in done]), np.array([p.label for p in done]),
                np.array([p.called for p in done]), model, counts)
    if path == "centre":
        from dermaloop.model_dir import DEVICE_INT8
        from training.evaluate import load_runtime, predict_dataset

        # the variant the device path loads: int8 when there is one
        model = load_runtime(model_dir, kind, "int8" if (Path(model_dir) / DEVICE_INT8).is_file() else "fp32")
        probs, labels, failed = predict_dataset(model, dataset, progress=progress, desc=f"centre square ({kind})")
        return probs, labels, model.policy.decide(probs), model, {"classified": len(labels), "unreadable": len(failed)}
    raise ValueError(f"path must be 'deployed' or 'centre', not {path!r}")


def sweep(probs_calib: np.ndarray, labels_calib: np.ndarray, probs: np.ndarray, labels: np.ndarray,
          calls: np.ndarray, policy: RiskPolicy, methods: Sequence[str] = ABSTAIN_METHODS,
          coverages: Sequence[float] = SWEEP_COVERAGES) -> list[dict[str, Any]]:
    """Each method x coverage fitted on calib and measured on the other photos (for the report)."""
    rows = []
    for method in methods:
        for coverage in coverages:
            rule = fit_abstain(probs_calib, labels_calib, coverage, method)
            rows.append({"method": method, "target": coverage, "qhat": rule.qhat,
                         **abstain_figures(rule, probs, labels, calls, policy)})
    return rows


def write_card_section(model_dir: str | Path, kind: str, section: dict[str, Any], key: str = "abstain") -> None:
    """Replace ``card[kind][key]``; the rest of the card is left as it was (written atomically)."""
    write_card_sections(model_dir, kind, {key: section})


def write_card_sections(model_dir: str | Path, kind: str, sections: dict[str, dict[str, Any]]) -> None:
    """Replace several of ``card[kind]``'s sections in one atomic write, so a reader never sees a
    card with new thresholds and old offsets."""
    card_file = Path(model_dir) / "card.json"
    card = json.loads(card_file.read_text())
    if kind not in card:
        raise ValueError(f"{model_dir}: the card has no {kind} model")
    card[kind].update(sections)
    tmp = card_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp, card_file)


def fit_model_dir(model_dir: str | Path, data: str | Path, kind: str, *, coverage: float = 0.9,
                  method: str = "lac", path: str = "deployed", models_dir: str | Path | None = None,
                  analysis_model: str | Path | None = None, with_val: bool = False, limit: int | None = None,
                  progress: bool = True, write: bool = True) -> dict[str, Any]:
    """Fit the rule for one model of ``model_dir`` on its calib split; write it into the card."""
    from dermaloop.model_dir import ModelDir
    from training.datasets import open_dataset
    from training.deployed_eval import limit_samples

    md = ModelDir.open(model_dir)
    md.section(kind)
    ids = set(calib_part(model_dir, "calib"))
    dataset = open_dataset(data, md.taxonomy)
    calib = dataset.subset([i for i, s in enumerate(dataset.samples) if s.id in ids])
    if not calib.samples:
        raise ValueError(f"none of the model's {len(ids)} calib photos are in {data}")
    calib = limit_samples(calib, limit)
    probs, labels, calls, model, counts = labelled_probs(kind, model_dir, calib, path, models_dir=models_dir,
                                                         analysis_model=analysis_model, progress=progress)
    rule = fit_abstain(probs, labels, coverage, method)
    section: dict[str, Any] = {
        **rule.to_dict(), "rule": RULE_TEXT,
        "fitted_on": f"calib split ({counts}), {'deployed path' if path == 'deployed' else 'centre square'}",
        "fitted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "calib": abstain_figures(rule, probs, labels, calls, model.policy, model.taxonomy.ids),
    }
    if limit is not None:
        section["fitted_on"] += f", limited to {limit} photos (development only)"
    result: dict[str, Any] = {"kind": kind, "section": section}
    if with_val:
        val_ids = set(calib_part(model_dir, "val"))
        val = limit_samples(dataset.subset([i for i, s in enumerate(dataset.samples) if s.id in val_ids]), limit)
        pv, lv, cv, _, val_counts = labelled_probs(kind, model_dir, val, path, models_dir=models_dir,
                                                   analysis_model=analysis_model, progress=progress)
        section["val"] = {"photos": val_counts, **abstain_figures(rule, pv, lv, cv, model.policy, model.taxonomy.ids)}
        result["sweep"] = sweep(probs, labels, pv, lv, cv, model.policy)
    if write:
        write_card_section(model_dir, kind, section)
    return result


def _print(result: dict[str, Any]) -> None:
    s = result["section"]
    print(f"{result['kind']}: {s['method'].upper()} at coverage {s['coverage']:.2f}: qhat {s['qhat']:.4f} "
          f"from {s['n_calib']} calib photos ({s['fitted_on']})")
    for part in ("calib", "val"):
        f = s.get(part)
        if f:
            print(f"  {part}: coverage {f['coverage']:.3f}, unsure {f['abstain_rate']:.3f}, mean set size "
                  f"{f['mean_set_size']:.2f}, accuracy of sure calls {_fmt(f['accuracy_sure'])} (all: "
                  f"{f['accuracy_all']:.3f}), malignant sensitivity not abstained "
                  f"{_fmt(f.get('malignant_sensitivity_sure'))} (all: {_fmt(f.get('malignant_sensitivity_all'))}), "
                  f"malignant abstained {_fmt(f.get('malignant_abstained'))}")
    if result.get("sweep"):
        print("  val sweep (fitted on calib): method target coverage unsure set-size acc-sure mal-sens-sure")
        for r in result["sweep"]:
            print(f"    {r['method']} {r['target']:.2f} {r['coverage']:.3f} {r['abstain_rate']:.3f} "
                  f"{r['mean_set_size']:.2f} {_fmt(r['accuracy_sure'])} {_fmt(r.get('malignant_sensitivity_sure'))}")


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.abstain", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, metavar="MODEL_DIR")
    parser.add_argument("--data", required=True, type=Path, help="the dataset the model was trained on")
    parser.add_argument("--kind", choices=("device", "cloud", "both"), default="both")
    parser.add_argument("--coverage", type=float, default=0.9)
    parser.add_argument("--method", choices=ABSTAIN_METHODS, default="lac")
    parser.add_argument("--path", choices=("deployed", "centre"), default="deployed",
                        help="score the calib photos through the deployed path (default) or the centre square")
    parser.add_argument("--models-dir", type=Path, help="where the analysis model is (default: the settings')")
    parser.add_argument("--analysis-model", type=Path, help="the analysis TFLite file itself")
    parser.add_argument("--val", action="store_true", help="also measure the rule on the val split (and a sweep)")
    parser.add_argument("--limit", type=int, help="at most this many photos per split (development only)")
    parser.add_argument("--dry-run", action="store_true", help="fit and print; do not write the card")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    from dermaloop.model_dir import ModelError

    models_dir = args.models_dir
    if models_dir is None and args.analysis_model is None and args.path == "deployed":
        from dermaloop.settings import load_settings

        models_dir = load_settings().models_dir
    kinds = ("device", "cloud") if args.kind == "both" else (args.kind,)
    results = []
    try:
        from dermaloop.model_dir import ModelDir

        card = ModelDir.open(args.model).card
        for kind in kinds:
            if args.kind == "both" and kind not in card:
                print(f"{args.model}: no {kind} model; skipped", file=sys.stderr)
                continue
            result = fit_model_dir(args.model, args.data, kind, coverage=args.coverage, method=args.method,
                                   path=args.path, models_dir=models_dir, analysis_model=args.analysis_model,
                                   with_val=args.val, limit=args.limit, progress=not args.quiet,
                                   write=not args.dry_run)
            results.append(result)
            _print(result)
    except (ModelError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"training.abstain: {exc}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if not args.dry_run:
        print(f"written to {args.model / 'card.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
