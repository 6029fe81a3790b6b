"""Probe: would per-class decision offsets (added to log-probabilities before the top class is
picked, fitted on the calib split) help balanced accuracy or melanoma recall on val?

An offline experiment, not part of any runtime: it runs a model directory's cloud model (with its
TTA) on its own calib and val splits, then fits (a) all 7 offsets for calib balanced accuracy by
coordinate ascent and (b) one melanoma offset, the smallest that gives calib melanoma recall >= the
target (``dermaloop.risk.fit_class_offsets``, which ``dermaloop train --class-recall`` now builds in).
Only calib chooses; val is reported. Results: docs/MODEL_REPORT.md.

    .venv/bin/python bench/probe_decision_offsets.py --model var/models/ham-l2full12 --data ../shared/data/ham10000
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.metrics import balanced_accuracy_score, recall_score


def split_log_probs(model_dir: str, data: str) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """The cloud runtime's log-probabilities, labels and image ids on the model's own calib and val
    splits. An unreadable image is an error: a probe must not quietly score a smaller split."""
    from dermaloop.model_dir import load_cloud_model
    from training.datasets import open_dataset
    from training.evaluate import own_split, predict_dataset

    model = load_cloud_model(model_dir)
    ds = open_dataset(data, model.taxonomy)
    out = {}
    for part in ("calib", "val"):
        subset = own_split(ds, model_dir, part)
        probs, labels, failed = predict_dataset(model, subset, desc=part)
        if failed:
            raise SystemExit(f"{len(failed)} unreadable {part} images, e.g. {failed[0]}")
        out[part] = (np.log(probs + 1e-9), labels, [s.id for s in subset.samples])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--melanoma", default="mel", help="class id of melanoma")
    parser.add_argument("--target-recall", type=float, default=0.75)
    args = parser.parse_args()
    from dermaloop.model_dir import ModelDir

    ids = ModelDir.open(args.model).taxonomy.ids
    parts = split_log_probs(args.model, args.data)
    (lc, yc, _), (lv, yv, _) = parts["calib"], parts["val"]
    k, mel = lc.shape[1], ids.index(args.melanoma)

    def ba(logp, y, b):
        return balanced_accuracy_score(y, (logp + b).argmax(1))

    def report(name, b):
        rv = recall_score(yv, (lv + b).argmax(1), average=None, labels=range(k))
        print(f"{name}: offsets {np.round(b, 2).tolist()}; calib BA {ba(lc, yc, b):.3f}; val BA {ba(lv, yv, b):.3f}, "
              f"val melanoma recall {rv[mel]:.3f}; val recall {dict(zip(ids, np.round(rv, 3).tolist(), strict=True))}")

    report("none", np.zeros(k))
    b, grid = np.zeros(k), np.linspace(-1.5, 1.5, 31)
    for _ in range(4):
        for c in range(k):
            b[c] = max(grid, key=lambda g, c=c: (ba(lc, yc, np.where(np.arange(k) == c, g, b)), -abs(g)))
    report("all classes, fitted for calib balanced accuracy", b)
    from dermaloop.risk import fit_class_offsets

    m = np.array(fit_class_offsets(np.exp(lc), yc, {mel: args.target_recall}))  # what train --class-recall fits
    report(f"melanoma only, smallest with calib recall >= {args.target_recall}", m)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
