"""Time each on-device analysis step on one thread, and the whole device path with and without
localisation (the baseline, measured in the same run).

    python bench/bench_analysis.py [--model MODEL_DIR] [--analysis TFLITE] [--runs 30]

A 12-megapixel JPEG of a synthetic spot is the input (decoded in Pillow's draft mode, as the app
does). Without --analysis the float32 and (if calibration data is present) int8 analysis models are
built under var/models. Without --model the classifier steps are skipped.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def _median_ms(fn, runs: int) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000.0)
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model directory with the device TFLite classifier")
    ap.add_argument("--analysis", type=Path, action="append", help="analysis TFLite(s) to time")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/ham10000"),
                    help="HAM10000 folder (int8 calibration of the analysis model, if present)")
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()

    from dermaloop.analysis import quality
    from dermaloop.analysis.device_classifier import load_device_classifier
    from dermaloop.analysis.device_path import Analyser, DevicePath
    from dermaloop.analysis.features import frame_input
    from dermaloop.preprocess import load_image, to_model_input
    from tests.example_photos import lesion_photo

    img, box = lesion_photo((4000, 3000), (0.42, 0.4, 0.58, 0.62))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    decoded = load_image(jpeg)
    rows: list[tuple[str, float, float]] = []

    rows.append(("decode 12 MP JPEG (draft mode)", *_median_ms(lambda: load_image(jpeg), args.runs)))
    rows.append(("quality gate (with box)", *_median_ms(lambda: quality.assess(decoded, box), args.runs)))
    rows.append(("frame resize to 224", *_median_ms(lambda: frame_input(decoded), args.runs)))

    analysers = [p for p in (args.analysis or []) if p.is_file()]
    if not analysers:
        from training.localiser_train import ensure_localiser

        analysers.append(ensure_localiser(Path("var/models")))
        if args.data.is_dir():
            analysers.append(ensure_localiser(Path("var/models"), args.data, int8=True))
    loaded = {}
    for path in analysers:
        a = Analyser(path, threads=1)
        loaded[path.name] = a
        frame = frame_input(decoded)
        rows.append((f"analysis model {path.name} ({path.stat().st_size / 1e6:.1f} MB) invoke",
                     *_median_ms(lambda a=a, frame=frame: a.model(frame), args.runs)))

    classifier = load_device_classifier(args.model, None, threads=1) if args.model else None
    if classifier is not None:
        rows.append(("crop + resize to classifier input",
                     *_median_ms(lambda: to_model_input(decoded, box=box, config=classifier.config), args.runs)))
        pixels = to_model_input(decoded, box=box, config=classifier.config)
        rows.append((f"classifier {classifier.path.name} invoke",
                     *_median_ms(lambda: classifier.model.predict(pixels[None]), args.runs)))
    without = DevicePath(None, classifier)
    rows.append(("whole device path WITHOUT localisation (baseline)",
                 *_median_ms(lambda: without.run(jpeg, force=True), args.runs)))
    for name, analyser in loaded.items():
        with_loc = DevicePath(analyser, classifier)
        rows.append((f"whole device path WITH localisation ({name})",
                     *_median_ms(lambda p=with_loc: p.run(jpeg, force=True), args.runs)))

    print(f"| step (one thread, {args.runs} runs) | median ms | p90 ms |")
    print("|---|---|---|")
    for name, med, p90 in rows:
        print(f"| {name} | {med:.1f} | {p90:.1f} |")
    print(json.dumps({"classifier": None if classifier is None else str(classifier.path)}))


if __name__ == "__main__":
    main()
