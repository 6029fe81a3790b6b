"""``dermaloop export``: (re-)export a model directory's device Keras model to TFLite int8 and fp32.

``dermaloop train`` already exports; this re-runs the conversion (e.g. with more calibration images
or after a TensorFlow upgrade), re-checks int8 parity on the validation split and updates the card.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="model directory")
    parser.add_argument("--data", required=True, type=Path,
                        help="the training dataset (int8 calibration uses its training split, parity its val split)")
    parser.add_argument("--calibration-images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    import keras
    import numpy as np

    from dermaloop.model_dir import (
        CARD,
        DEVICE_FP32,
        DEVICE_INT8,
        DEVICE_KERAS,
        DeviceModel,
        ModelDir,
        ModelError,
        sha256_file,
    )
    from training.datasets import open_dataset
    from training.embeddings import model_input
    from training.evaluate import predict_dataset
    from training.export import export_fp32, export_int8

    try:
        md = ModelDir.open(args.model)
        split = json.loads((args.model / "split.json").read_text())
        dataset = open_dataset(args.data, md.taxonomy)
        by_id = {s.id: i for i, s in enumerate(dataset.samples)}
        train_rows = [by_id[i] for i in split["train"] if i in by_id]
        val = dataset.subset([by_id[i] for i in split["val"] if i in by_id])
        if not train_rows or not val.samples:
            raise ValueError(f"{args.data} does not contain the model's training/validation images")
        model = keras.models.load_model(md.file(DEVICE_KERAS), compile=False, safe_mode=True)
        rng = np.random.default_rng(args.seed)
        rows = rng.choice(train_rows, size=min(args.calibration_images, len(train_rows)), replace=False)
        from dermaloop.preprocess import PreprocessConfig

        pre = PreprocessConfig.from_dict(md.section("device")["preprocess"])
        export_fp32(model, args.model / DEVICE_FP32)
        export_int8(model, args.model / DEVICE_INT8, [model_input(dataset.samples[i], pre) for i in rows])
        card = md.card
        for rel in (DEVICE_FP32, DEVICE_INT8):
            card["files"][rel] = sha256_file(args.model / rel)
            card.setdefault("file_bytes", {})[rel] = (args.model / rel).stat().st_size
        md = ModelDir(args.model, card)
        p8, y, _ = predict_dataset(DeviceModel(md, "int8"), val, progress=not args.quiet, desc="int8")
        p32, _, _ = predict_dataset(DeviceModel(md, "fp32"), val, progress=not args.quiet, desc="fp32")
    except (ModelError, ValueError, FileNotFoundError, KeyError) as exc:
        print(f"dermaloop export: {exc}")
        return 2
    from sklearn.metrics import balanced_accuracy_score

    drop = 100 * (balanced_accuracy_score(y, p32.argmax(1)) - balanced_accuracy_score(y, p8.argmax(1)))
    card["device"]["int8_parity"] = {"top1_agreement_with_float": float((p8.argmax(1) == p32.argmax(1)).mean()),
                                     "balanced_accuracy_drop_points": float(drop),
                                     "measured_on": f"val split, {len(y)} images"}
    # The int8 model changed: its report and card metrics must describe the new file.
    from training.metrics import compute_metrics
    from training.pipeline import _summary
    from training.report import write_report

    device = DeviceModel(md, "int8")
    metrics = compute_metrics(p8, y, device.taxonomy, device.policy)
    write_report(args.model / "reports" / "device", f"device model {device.version} (re-exported int8) on val",
                 p8, y, device.taxonomy, metrics, {**val.describe(), "split": "val", "variant": "int8",
                                                    "int8_calibration_images": len(rows)})
    card["device"]["metrics"] = _summary(metrics)
    card["data"]["int8_calibration"] = f"{len(rows)} random training-split images"
    (args.model / CARD).write_text(json.dumps(card, indent=2))
    print(f"exported; int8 top-1 agreement {card['device']['int8_parity']['top1_agreement_with_float']:.4f}, "
          f"balanced-accuracy drop {drop:.2f} points")
    return 0
