"""``dermaloop diagnose IMAGE... [--model MODEL_DIR] [--json]``: the patient app's on-device path.

Quality checks, not-skin check, lesion box and crop, the device model's top-3 and risk tier, and the
time of each step. Models load once for all images. With ``--json`` one JSON object per image per
line (an unreadable image gives ``{"file": ..., "error": ...}`` on its line). Exit status: 0 when
every image was read, 1 when any image could not be read, 2 when the models cannot be loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="photo files (JPEG, PNG, WebP, ...)")
    parser.add_argument("--model", type=Path, metavar="MODEL_DIR",
                        help="model directory from `dermaloop train` (default: the newest under the models dir)")
    parser.add_argument("--json", action="store_true", help="one JSON object per image, one per line")
    parser.add_argument("--analysis-model", type=Path, metavar="TFLITE",
                        help="localiser/not-skin TFLite (default: built or found under <models dir>/localiser)")
    parser.add_argument("--no-localise", action="store_true",
                        help="skip localisation and the not-skin check (classify the centre square)")
    parser.add_argument("--force", action="store_true",
                        help="classify even when the photo is declined (for testing; never in the app)")
    parser.add_argument("--threads", type=int, default=1, help="interpreter threads (the phone budget is 1)")


def _human(name: str, res: dict[str, Any]) -> str:
    lines = [f"{name}:"]
    if res.get("demonstration") and res["top"]:
        lines.append(f"  DEMONSTRATION MODEL ({res.get('model_version')}): trained on synthetic images, so the "
                     "classes below mean nothing medically and no risk is given.")
    q = res["quality"]
    lines.append(f"  quality: {'ok' if q['ok'] else ', '.join(q['issues'])}")
    les = res["lesion"]
    if les["score"] is not None:
        lines.append(f"  skin lesion: {'yes' if les['is_lesion'] else 'NO'} (score {les['score']:.2f})")
    if res["box"]:
        lines.append("  lesion box: " + ", ".join(f"{v:.2f}" for v in res["box"])
                     + f" (confidence {res['box_confidence']:.2f})")
    for t in res["top"]:
        lines.append(f"  {t['p']:6.1%}  {t['name']} ({t['label']})")
    if len(res["top"]) > 1 and res["top"][0]["p"] < max(t["p"] for t in res["top"][1:]):
        lines.append(f"  ({res['top'][0]['name']} is listed first on purpose: the model names it even when it is "
                     "less probable, because missing it costs more)")
    if res["risk"]:
        lines.append(f"  risk: {res['risk']}")
    if res.get("unsure") is True and not res.get("demonstration"):  # the card's abstain rule (issue 20)
        kept = res.get("prediction_set") or []
        lines.append("  UNSURE: " + (f"prediction set {', '.join(kept)}: the model cannot tell these apart"
                                     if len(kept) > 1 else
                                     f"prediction set {kept[0]}: the photo does not support the call" if kept
                                     else "empty prediction set: no class fits clearly")
                     + "; a dermatologist should look")
    if res["message"]:
        lines.append(f"  note: {res['message']}")
    lines.append("  times (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in res["timings_ms"].items()))
    lines.append("  This is not a diagnosis. See a doctor about any spot that changes, bleeds or worries you.")
    return "\n".join(lines)


def _load(args: argparse.Namespace):
    from dermaloop.analysis.on_device import AnalysisModelMissing, open_device_path
    from dermaloop.services import prepare_step
    from dermaloop.settings import load_settings

    settings = load_settings()

    def open_path():
        return open_device_path(settings.models_dir, args.model, analysis_model=args.analysis_model,
                                localise=not args.no_localise, threads=args.threads)

    try:
        path = open_path()
    except AnalysisModelMissing:
        step = prepare_step("image-analysis model")
        if args.analysis_model is not None or step is None:
            raise
        print(f"dermaloop diagnose: building the localiser model under {settings.models_dir} "
              "(first run only)...", file=sys.stderr)
        step(settings, {})
        path = open_path()
    if path.classifier is None:
        print("dermaloop diagnose: no device model found (pass --model MODEL_DIR from `dermaloop train`); "
              "running the photo checks only.", file=sys.stderr)
    return path


def run(args: argparse.Namespace) -> int:
    from dermaloop.preprocess import ImageError

    try:
        path = _load(args)
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as exc:
        print(f"dermaloop diagnose: cannot load the models: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for name in args.images:
        try:
            result = path.run(Path(name), force=args.force).to_json()
        except ImageError as exc:
            failed += 1
            print(f"dermaloop diagnose: {name}: {exc}", file=sys.stderr)
            if args.json:
                print(json.dumps({"file": name, "error": str(exc)}), flush=True)
            continue
        result = {"file": name, **result}
        print(json.dumps(result) if args.json else _human(name, result), flush=True)
    return 1 if failed else 0
