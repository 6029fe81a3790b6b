"""Sanity check for Grad-CAM: on held-out photos, does the heat fall on the lesion?

For each validation photo the classifier's input is made exactly as in production (the model's own
preprocessing, no lesion box), the Grad-CAM map of the predicted class is upsampled to the input,
and its mass inside the true lesion box is compared with what a uniform map would put there (the
box's share of the input area). A meaningful map beats uniform on most photos.

    python -m training.gradcam_check --data ../shared/data/ham10000 --model MODEL_DIR
    python -m training.gradcam_check --data ../shared/data/ham10000   # linear probe (see below)

Without ``--model`` the check runs on a stand-in: the ImageNet Lite0 backbone with a 7-class
logistic-regression head fitted on the training split's cached pooled features, so the method can be
checked before a trained cloud model exists.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from dermaloop.analysis import gradcam
from training.hamdata import lesion_split, read_records


def box_in_crop(box, region, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """A box in photo fractions -> fractions of the square crop ``region`` (pixels), clipped."""
    w, h = size
    left, top, right, bottom = region
    side_w, side_h = right - left, bottom - top
    x0, y0, x1, y1 = box
    out = ((x0 * w - left) / side_w, (y0 * h - top) / side_h, (x1 * w - left) / side_w, (y1 * h - top) / side_h)
    return tuple(float(np.clip(v, 0.0, 1.0)) for v in out)  # type: ignore[return-value]


def linear_probe_model(cache_dir: Path):
    """ImageNet Lite0 + a 7-class logistic regression fitted on cached pooled train features."""
    import keras
    from sklearn.linear_model import LogisticRegression

    from dermaloop.backbones import build_backbone
    from training.localiser_data import load_cache
    from training.ood_train import pooled_from_cache

    maps, _, meta = load_cache(cache_dir)  # type: ignore[misc]
    records = {r.image_id: r.dx for r in read_records(meta["data_dir"])}
    sel = np.flatnonzero((np.array(meta["split"]) == 0) & (np.array(meta["scale"]) >= 1.0))
    x = pooled_from_cache(maps[sel])
    labels = sorted(set(records.values()))
    y = np.array([labels.index(records[meta["image_id"][i]]) for i in sel])
    clf = LogisticRegression(C=0.1, class_weight="balanced", max_iter=3000).fit(x, y)
    inputs = keras.Input((224, 224, 3))
    feats = build_backbone("lite0", pooling="avg")(inputs)
    dense = keras.layers.Dense(len(labels), activation="softmax")
    out = dense(feats)
    dense.set_weights([clf.coef_.T.astype(np.float32), clf.intercept_.astype(np.float32)])
    return keras.Model(inputs, out), None


def run_check(data_dir: str | Path, model_dir: str | Path | None, n: int = 200, seed: int = 0,
              cache_dir: Path = Path("var/cache/analysis/ham")) -> dict[str, Any]:
    from dermaloop.preprocess import PreprocessConfig, crop_box, to_model_input

    if model_dir is not None:
        from dermaloop.model_dir import load_cloud_model

        cloud = load_cloud_model(model_dir)
        model, config, name = cloud.model, cloud.preprocess, f"cloud model {cloud.version}"
    else:
        model, _ = linear_probe_model(cache_dir)
        config, name = PreprocessConfig(size=224), "stand-in: ImageNet Lite0 + linear head"
    records = read_records(data_dir)
    _, val = lesion_split(records)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(val, size=min(n, len(val)), replace=False)
    masses, areas = [], []
    for i in tqdm(chosen, desc="grad-cam check"):
        rec = records[i]
        with Image.open(rec.path) as im:
            img = im.convert("RGB")
        pixels = to_model_input(img, box=None, config=config)
        cam = gradcam.grad_cam(model, pixels)
        heat = gradcam.upsample(cam.heatmap, (config.size, config.size))
        box = box_in_crop(rec.box, crop_box(img.width, img.height, None, config), img.size)
        masses.append(gradcam.mass_in_box(heat, box))
        areas.append((box[2] - box[0]) * (box[3] - box[1]))
    masses_a, areas_a = np.array(masses), np.array(areas)
    informative = areas_a < 0.9  # a box covering the whole input cannot discriminate
    return {
        "model": name, "images": int(len(chosen)), "split": "lesion-grouped validation (hamdata.lesion_split)",
        "share_beating_uniform": float(np.mean(masses_a[informative] > areas_a[informative])),
        "images_with_box_below_90pct_of_input": int(informative.sum()),
        "mean_mass_in_box": float(masses_a[informative].mean()),
        "mean_uniform_mass_in_box": float(areas_a[informative].mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", help="model directory with a cloud model (default: linear-probe stand-in)")
    ap.add_argument("-n", type=int, default=200)
    args = ap.parse_args()
    print(json.dumps(run_check(args.data, args.model, args.n), indent=1))


if __name__ == "__main__":
    main()
