"""Model speed and size figures for docs/BENCHMARKS.md.

Measures, in one run on this machine:
* single-image latency with one thread: device TFLite int8 and fp32 (ai-edge-litert) vs Keras
  ``predict`` and a direct Keras call on the same float model;
* the full device path on a 12-megapixel JPEG: decode (Pillow draft mode vs full decode as the
  baseline), crop, preprocess, int8 inference;
* backbone feature extraction throughput (images/s, batch 32, all cores) for Lite0 and Lite2;
* model file sizes from the card.

    .venv/bin/python bench/bench_models.py --model var/models/ham-fast [--data ../shared/data/ham10000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def _median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def _twelve_mp_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((4000, 3000), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _extraction(args: argparse.Namespace) -> dict[str, float]:
    """Backbone feature throughput with all cores, batch 32, shared preprocessing included."""
    from dermaloop import backbones
    from dermaloop.model_dir import ModelDir
    from dermaloop.preprocess import PreprocessConfig
    from training.datasets import open_dataset
    from training.embeddings import extract_features

    ds = open_dataset(args.data, ModelDir.open(args.model).taxonomy).subset(range(args.extract_images))
    out = {}
    for name in ("lite0", "lite2"):
        feats = extract_features(ds, name, PreprocessConfig(size=backbones.input_size(name)), None, progress=False)
        out[name] = round(feats.images_per_second, 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=None, help="dataset for the extraction throughput test")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--extract-images", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--extract-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.extract_only:  # child process: TensorFlow's thread pools are fixed once initialised
        print(json.dumps(_extraction(args)))
        return 0

    import keras
    import tensorflow as tf

    from dermaloop.model_dir import ModelDir, load_device_model
    from dermaloop.preprocess import load_image, to_model_input

    results: dict = {"machine": f"{os.cpu_count()} cores", "repeats": args.repeats}
    md = ModelDir.open(args.model)
    int8 = load_device_model(args.model, "int8", num_threads=1)
    fp32 = load_device_model(args.model, "fp32", num_threads=1)
    size = int8.size
    x = np.random.default_rng(0).integers(0, 256, (1, size, size, 3)).astype(np.float32)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras_model = keras.models.load_model(md.file("device/model.keras"), compile=False)
    results["latency_ms_one_thread"] = {
        "tflite_int8": _median_ms(lambda: int8.predict(x), args.repeats),
        "tflite_fp32": _median_ms(lambda: fp32.predict(x), args.repeats),
        "keras_predict": _median_ms(lambda: keras_model.predict(x, verbose=0), max(5, args.repeats // 3)),
        "keras_call": _median_ms(lambda: keras_model(x, training=False), max(5, args.repeats // 3)),
    }
    jpeg = _twelve_mp_jpeg()

    def device_path(draft: bool) -> None:
        img = load_image(jpeg, draft_min_side=1024 if draft else None)
        int8.predict(to_model_input(img, config=int8.preprocess)[None])

    results["device_path_12mp_ms"] = {
        "decode_draft": _median_ms(lambda: load_image(jpeg), max(5, args.repeats // 3)),
        "decode_full": _median_ms(lambda: load_image(jpeg, draft_min_side=None), max(5, args.repeats // 3)),
        "total_draft": _median_ms(lambda: device_path(True), max(5, args.repeats // 3)),
        "total_full_decode": _median_ms(lambda: device_path(False), max(5, args.repeats // 3)),
        "jpeg_bytes": len(jpeg),
    }
    results["file_bytes"] = md.card.get("file_bytes", {})
    results["fine_tuning_seconds_per_epoch"] = {
        k: statistics.median([h["seconds"] for h in md.card[k]["training"]["history"]])
        for k in ("device", "cloud") if k in md.card and md.card[k]["training"]["history"]}
    if args.data:
        import subprocess
        import sys

        child = subprocess.run([sys.executable, __file__, "--model", str(args.model), "--data", str(args.data),
                                "--extract-images", str(args.extract_images), "--extract-only"],
                               capture_output=True, text=True, check=True)
        results["extraction_images_per_second"] = json.loads(child.stdout.strip().splitlines()[-1])
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
