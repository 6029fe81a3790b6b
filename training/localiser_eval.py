"""End-to-end evaluation of the exported device analysis model (TFLite) on held-out data.

    python -m training.localiser_eval --data ../shared/data/ham10000 --tflite var/models/localiser/<v>/analysis_int8.tflite

On the lesion-grouped validation split: box IoU and AP at IoU 0.5/0.75 on the original photos and on
zoomed-out copies, not-skin false rejections; on held-out not-skin sources: rejection rate; and the
quality gate's flag rates when it uses the model's own boxes (not the true ones).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from dermaloop.analysis import quality
from dermaloop.analysis.device_path import Analyser
from dermaloop.analysis.localiser import MIN_CONFIDENCE, average_precision, iou
from training import degrade
from training.hamdata import lesion_split, read_records
from training.quality_calibrate import degraded_variants


def evaluate(data_dir: str | Path, tflite: str | Path, n_quality: int = 500, seed: int = 0) -> dict[str, Any]:
    analyser = Analyser(tflite, threads=2)
    records = read_records(data_dir)
    _, val = lesion_split(records)
    rng = np.random.default_rng(seed)
    rows = {"original": [], "zoomed_out": []}
    for i in tqdm(val, desc="validation photos"):
        rec = records[i]
        with Image.open(rec.path) as im:
            img = im.convert("RGB")
        box, conf, p = analyser(img)
        rows["original"].append((float(iou(np.array(box), np.array(rec.box))), conf, p))
        small, small_box = degrade.zoom_out(img, rec.box, float(rng.uniform(0.25, 0.8)))
        box, conf, p = analyser(small)
        rows["zoomed_out"].append((float(iou(np.array(box), np.array(small_box))), conf, p))
    out: dict[str, Any] = {"model": Path(tflite).name, "split": "lesion-grouped validation (hamdata.lesion_split)",
                           "threshold_p_lesion": analyser.threshold}
    for name, r in rows.items():
        a = np.array(r)
        out[name] = {"n": len(a), "mean_iou": float(a[:, 0].mean()), "median_iou": float(np.median(a[:, 0])),
                     "ap50": average_precision(a[:, 0], a[:, 1], 0.5),
                     "ap75": average_precision(a[:, 0], a[:, 1], 0.75),
                     "share_confident": float((a[:, 1] >= MIN_CONFIDENCE).mean()),
                     "false_rejection_not_skin": float((a[:, 2] < analyser.threshold).mean())}
    from training.ood_negatives import held_out, negatives

    rejected: dict[str, list[bool]] = {}
    for neg in tqdm(list(negatives(seed=1)), desc="not-skin photos"):
        if held_out(neg.source):
            _, _, p = analyser(neg.image)
            rejected.setdefault(neg.kind, []).append(p < analyser.threshold)
    out["not_skin_held_out"] = {k: {"n": len(v), "rejection": float(np.mean(v))} for k, v in rejected.items()}
    allv = [x for v in rejected.values() for x in v]
    out["not_skin_held_out"]["all"] = {"n": len(allv), "rejection": float(np.mean(allv))}

    # Quality gate with the model's boxes, on the strong degradations.
    counts: dict[str, list[int]] = {}
    for i in tqdm(rng.choice(val, size=min(n_quality, len(val)), replace=False), desc="quality with model boxes"):
        rec = records[i]
        with Image.open(rec.path) as im:
            img = im.convert("RGB")
        for name, variant, _ in degraded_variants(img, rec.box, rng):
            box, conf, p = analyser(variant)
            lesion = p >= analyser.threshold
            used = box if conf >= MIN_CONFIDENCE else None  # as the device path: any confident box
            ok = quality.assess(variant, used).ok
            # flagged by the gate; declined by the device path (gate or not-skin: not classified)
            counts.setdefault(name, []).append((int(not ok), int(not ok or not lesion)))
    out["quality_with_model_boxes"] = {
        k: {"n": len(v), "flag_rate": float(np.mean([a for a, _ in v])),
            "declined_rate_gate_or_not_skin": float(np.mean([b for _, b in v]))} for k, v in counts.items()}
    return out


def correction_benefit(data_dir: str | Path, tflite: str | Path, model_dir: str | Path | None,
                       n: int = 300, seed: int = 0) -> dict[str, Any]:
    """Does the gamma correction help? For gamma 0.3 / 3.0 copies of validation photos: box IoU,
    not-skin false rejection and (with a device model) top-1 agreement with the clean photo's
    answer, each without and with ``quality.correct_exposure``."""
    from dermaloop.analysis.device_classifier import load_device_classifier

    analyser = Analyser(tflite, threads=2)
    classifier = load_device_classifier(model_dir) if model_dir else None
    records = read_records(data_dir)
    _, val = lesion_split(records)
    rng = np.random.default_rng(seed)
    rows: dict[str, dict[str, list[float]]] = {}
    for i in tqdm(rng.choice(val, size=min(n, len(val)), replace=False), desc="exposure correction"):
        rec = records[i]
        with Image.open(rec.path) as im:
            img = im.convert("RGB")
        clean_top = classifier.classify(img, rec.box)[0][0]["label"] if classifier else None
        for g in (0.3, 3.0):
            bad = degrade.gamma(img, g)
            for name, variant in (("uncorrected", bad), ("corrected", quality.correct_exposure(bad)[0])):
                box, _, p = analyser(variant)
                r = rows.setdefault(f"gamma_{g}_{name}", {"iou": [], "rejected": [], "top1_agrees": []})
                r["iou"].append(float(iou(np.array(box), np.array(rec.box))))
                r["rejected"].append(float(p < analyser.threshold))
                if classifier:
                    r["top1_agrees"].append(float(classifier.classify(variant, rec.box)[0][0]["label"] == clean_top))
    return {k: {m: (float(np.mean(v)) if v else None) for m, v in r.items()} | {"n": len(r["iou"])}
            for k, r in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--tflite", required=True)
    ap.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    ap.add_argument("--correction", action="store_true",
                    help="only measure the exposure correction (with --model: also the classifier)")
    ap.add_argument("--model", help="model directory (device classifier) for --correction")
    args = ap.parse_args()
    res = correction_benefit(args.data, args.tflite, args.model) if args.correction else evaluate(args.data, args.tflite)
    text = json.dumps(res, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
