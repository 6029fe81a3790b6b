"""``dermaloop evaluate``: run a model directory's device or cloud model over a dataset; write a report."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="model directory (from dermaloop train)")
    parser.add_argument("--kind", choices=("device", "cloud"), default="device")
    parser.add_argument("--variant", choices=("int8", "fp32"), default="int8", help="device model variant")
    parser.add_argument("--data", required=True, type=Path, help="dataset in any supported layout")
    parser.add_argument("--split", default=None, choices=("train", "calib", "val"),
                        help="evaluate only this part of the model's own split (default: every image)")
    parser.add_argument("--out", required=True, type=Path, help="folder for report.md, PNGs and metrics.json")
    parser.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    from dermaloop.model_dir import ModelDir, ModelError
    from training.datasets import open_dataset
    from training.evaluate import evaluate, load_runtime, own_split

    try:
        md = ModelDir.open(args.model)
        dataset = open_dataset(args.data, md.taxonomy)
        split_name = "all images"
        if args.split:
            dataset = own_split(dataset, args.model, args.split)
            split_name = f"{args.split} split of the model's training run"
        model = load_runtime(args.model, args.kind, args.variant)
        metrics = evaluate(model, dataset, args.out, split_name, progress=not args.quiet)
    except (ModelError, ValueError, FileNotFoundError) as exc:
        print(f"dermaloop evaluate: {exc}")
        return 2
    print(f"balanced accuracy {metrics['balanced_accuracy']:.4f} on {metrics['n']} images; "
          f"report: {args.out / 'report.md'}")
    return 0
