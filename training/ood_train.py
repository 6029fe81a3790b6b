"""Train and measure the not-skin check on pooled trunk features.

    python -m training.ood_train            # needs the localiser feature cache (training/localiser_data.py)

Positives: HAM10000 frames (and zoomed-out copies) from the feature cache, split by lesion.
Negatives: ``training/ood_negatives.py``, split by source. The decision threshold is set from
out-of-fold scores of the TRAINING positives (1% false rejection there); the rejection rate on
held-out negative sources and the false rejection rate on held-out lesions are then reported.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from dermaloop.analysis.features import frame_input
from dermaloop.analysis.ood import OOD_FILE
from training.analysis_net import build_trunk, extract_maps
from training.localiser_data import load_cache
from training.ood_negatives import held_out, negatives

DEFAULT_CACHE = Path("var/cache/analysis/ham")
TARGET_TRAIN_FRR = 0.01


def pooled_from_cache(maps: np.ndarray, batch: int = 1024) -> np.ndarray:
    out = np.empty((len(maps), maps.shape[-1]), np.float32)
    for i in range(0, len(maps), batch):
        out[i:i + batch] = np.asarray(maps[i:i + batch], np.float32).mean(axis=(1, 2))
    return out


def negative_features(seed: int = 0) -> tuple[np.ndarray, list[str], list[str]]:
    trunk = build_trunk()
    feats, sources, kinds, frames = [], [], [], []

    def flush() -> None:
        if frames:
            feats.append(extract_maps(trunk, np.stack(frames)).astype(np.float32).mean(axis=(1, 2)))
            frames.clear()

    for neg in tqdm(list(negatives(seed=seed)), desc="not-skin features"):
        frames.append(frame_input(neg.image))
        sources.append(neg.source)
        kinds.append(neg.kind)
        if len(frames) == 64:
            flush()
    flush()
    return np.concatenate(feats), sources, kinds


def train(cache_dir: Path = DEFAULT_CACHE, out: Path = OOD_FILE, C: float = 0.05) -> dict[str, Any]:
    loaded = load_cache(cache_dir)
    if loaded is None:
        raise FileNotFoundError(f"no feature cache in {cache_dir}: run python -m training.localiser_data --data DIR")
    maps, _, meta = loaded
    pos = pooled_from_cache(maps)
    pos_split = np.array(meta["split"])
    pos_groups = np.array(meta["lesion_id"])
    neg, sources, kinds = negative_features()
    neg_test = np.array([held_out(s) for s in sources])
    kinds_arr = np.array(kinds)

    x = np.concatenate([pos[pos_split == 0], neg[~neg_test]])
    y = np.concatenate([np.ones(int((pos_split == 0).sum())), np.zeros(int((~neg_test).sum()))])
    groups = np.concatenate([pos_groups[pos_split == 0], np.array(sources)[~neg_test]])
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=5000))
    oof = cross_val_predict(model, x, y, groups=groups, cv=GroupKFold(5), method="predict_proba")[:, 1]
    # Threshold: halfway (in logit space) between the 1st percentile of the training lesions' and the
    # 99th percentile of the training negatives' out-of-fold scores, so that degraded but real lesion
    # photos (darker, blurred, distant) keep a margin; never above the 1%-false-rejection point.
    def logit(p: float) -> float:
        p = float(np.clip(p, 1e-9, 1 - 1e-9))
        return float(np.log(p / (1 - p)))

    lo = logit(np.quantile(oof[y == 0], 1.0 - TARGET_TRAIN_FRR))
    hi = logit(np.quantile(oof[y == 1], TARGET_TRAIN_FRR))
    threshold = float(1.0 / (1.0 + np.exp(-(lo + hi) / 2))) if lo < hi else float(np.quantile(oof[y == 1], TARGET_TRAIN_FRR))
    model.fit(x, y)
    scaler, clf = model[0], model[1]
    w = clf.coef_[0] / scaler.scale_
    b = float(clf.intercept_[0] - np.sum(clf.coef_[0] * scaler.mean_ / scaler.scale_))

    def prob(f: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.clip(f.astype(np.float64) @ w + b, -50, 50)))

    zoomed = np.array(meta["scale"]) < 1.0
    val = pos_split == 1
    metrics: dict[str, Any] = {
        "threshold_rule": "logit midpoint between the 1st percentile of out-of-fold training lesion scores and "
                          "the 99th percentile of out-of-fold training not-skin scores",
        "oof_lesion_p01": float(np.quantile(oof[y == 1], TARGET_TRAIN_FRR)),
        "oof_not_skin_p99": float(np.quantile(oof[y == 0], 1.0 - TARGET_TRAIN_FRR)),
        "train": {"lesions": int((pos_split == 0).sum()), "negatives": int((~neg_test).sum()),
                  "negative_sources": sorted({s for s, t in zip(sources, neg_test, strict=True) if not t})},
        "false_rejection_val_original": float((prob(pos[val & ~zoomed]) < threshold).mean()),
        "false_rejection_val_zoomed_out": float((prob(pos[val & zoomed]) < threshold).mean()),
        "n_val_original": int((val & ~zoomed).sum()),
        "held_out_sources": sorted({s for s, t in zip(sources, neg_test, strict=True) if t}),
        "rejection_held_out": float((prob(neg[neg_test]) < threshold).mean()),
        "n_held_out": int(neg_test.sum()),
        "rejection_held_out_by_kind": {},
        "rejection_held_out_by_source": {},
    }
    by_source: dict[str, list[bool]] = defaultdict(list)
    for s, f, t in zip(sources, neg, neg_test, strict=True):
        if t:
            by_source[s].append(bool(prob(f[None])[0] < threshold))
    metrics["rejection_held_out_by_source"] = {s: float(np.mean(v)) for s, v in sorted(by_source.items())}
    for k in sorted(set(kinds)):
        sel = neg_test & (kinds_arr == k)
        if sel.any():
            metrics["rejection_held_out_by_kind"][k] = float((prob(neg[sel]) < threshold).mean())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"w": [round(float(v), 7) for v in w], "b": b, "threshold": threshold,
                               "trunk": "lite0 imagenet, whole frame 224, global average pool",
                               "metrics": metrics}) + "\n")
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--C", type=float, default=0.05)
    args = ap.parse_args()
    print(json.dumps(train(args.cache, C=args.C), indent=1))


if __name__ == "__main__":
    main()
