"""Probe: would the patient's age, sex and body site (HAM10000's metadata) lift the cloud model's
balanced accuracy if folded in as a prior?

An offline experiment, not part of any runtime. A multinomial logistic regression on the metadata alone
(age and age squared with a missing flag, sex, one-hot body site) is fitted on the model's own train
split (the networks never saw metadata, so its train probabilities are honest). The fused score is the
cloud runtime's log-probability plus ``a`` x (metadata log-probability - log class prior): Bayes' rule
with the image and the metadata taken as independent, ``a`` damping the double counting. The melanoma
offset is refitted on calib for each ``a`` as ``dermaloop train --class-recall mel=0.75`` would.
Only calib chooses ``a``; val is reported. Results: docs/MODEL_REPORT.md.

    .venv/bin/python bench/probe_context_prior.py --model var/models/ham-l2full12-mel --data ../shared/data/ham10000
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, recall_score


def metadata_features(rows: list[dict[str, str]], sites: list[str]) -> np.ndarray:
    out = []
    for r in rows:
        known = r["age"] not in ("", "0", "0.0")
        age = float(r["age"]) / 100 if known else 0.0
        out.append([age, age * age, 0.0 if known else 1.0, r["sex"] == "male", r["sex"] == "female",
                    *(r["localization"] == s for s in sites)])
    return np.array(out, float)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="a HAM10000-layout folder (metadata.csv with age, sex, localization)")
    parser.add_argument("--weights", default="0,0.25,0.5,0.75,1", help="values of a to try")
    parser.add_argument("--melanoma", default="mel")
    parser.add_argument("--target-recall", type=float, default=0.75)
    args = parser.parse_args()
    from probe_decision_offsets import split_log_probs

    from dermaloop.model_dir import ModelDir
    from dermaloop.risk import fit_class_offsets

    md = ModelDir.open(args.model)
    ids, mel = md.taxonomy.ids, md.taxonomy.ids.index(args.melanoma)
    with open(Path(args.data) / "metadata.csv", encoding="utf-8", newline="") as f:
        rows = {r["image_id"]: r for r in csv.DictReader(f)}
    sites = sorted({r["localization"] for r in rows.values()} - {"unknown"})
    train = [rows[i] for i in json.loads((Path(args.model) / "split.json").read_text())["train"]]
    y_train = np.array([ids.index(r["dx"]) for r in train])
    meta = LogisticRegression(max_iter=2000).fit(metadata_features(train, sites), y_train)
    log_prior = np.log(np.bincount(y_train, minlength=len(ids)) / len(y_train))

    parts = {part: (lp, y, meta.predict_log_proba(metadata_features([rows[i] for i in ids], sites)) - log_prior)
             for part, (lp, y, ids) in split_log_probs(args.model, args.data).items()}
    (lc, yc, mc), (lv, yv, mv) = parts["calib"], parts["val"]
    print(f"metadata alone: calib BA {balanced_accuracy_score(yc, mc.argmax(1)):.3f}, "
          f"val BA {balanced_accuracy_score(yv, mv.argmax(1)):.3f}")
    for a in (float(w) for w in args.weights.split(",")):
        zc, zv = lc + a * mc, lv + a * mv
        pc = np.exp(zc - np.logaddexp.reduce(zc, axis=1, keepdims=True))
        off = np.array(fit_class_offsets(pc, yc, {mel: args.target_recall}))
        rv = recall_score(yv, (zv + off).argmax(1), average=None, labels=range(len(ids)))
        print(f"a={a:.2f}, melanoma offset {off[mel]:.2f}: calib BA {balanced_accuracy_score(yc, (zc + off).argmax(1)):.4f}; "
              f"val BA {balanced_accuracy_score(yv, (zv + off).argmax(1)):.4f} "
              f"(argmax {balanced_accuracy_score(yv, zv.argmax(1)):.4f}), val melanoma recall {rv[mel]:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
