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
    parser.add_argument("--as-deployed", action="store_true",
                        help="run each photo through the deployed path instead of the centre square: device = "
                             "`dermaloop diagnose`'s path (gates, localiser crop, the int8 model it loads), cloud = "
                             "the worker's pipeline (checks, crop, TTA, decision rule); declined photos are reported")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="with --as-deployed: where the analysis model is (default: the settings' models dir; "
                             "built there on first use, as diagnose does)")
    parser.add_argument("--analysis-model", type=Path, default=None,
                        help="with --as-deployed: the analysis (localiser + not-skin) TFLite file itself")
    parser.add_argument("--no-centre", action="store_true",
                        help="with --as-deployed: skip the centre-square comparison on the same photos")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate a fixed random subset of this many photos (for quick checks)")


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
        if args.limit is not None:
            from training.deployed_eval import limit_samples

            dataset = limit_samples(dataset, args.limit)
            split_name += f", {len(dataset)} photos drawn at random (--limit)"
        if args.as_deployed:
            return _run_deployed(args, dataset, split_name)
        model = load_runtime(args.model, args.kind, args.variant)
        metrics = evaluate(model, dataset, args.out, split_name, progress=not args.quiet)
    except (ModelError, ValueError, FileNotFoundError) as exc:
        print(f"dermaloop evaluate: {exc}")
        return 2
    print(f"balanced accuracy {metrics['balanced_accuracy']:.4f} on {metrics['n']} images; "
          f"report: {args.out / 'report.md'}")
    return 0


def _run_deployed(args: argparse.Namespace, dataset, split_name: str) -> int:
    from training.deployed_eval import evaluate_deployed

    if args.variant != "int8":
        print("dermaloop evaluate: --as-deployed runs the device model the device path loads (int8 when present); "
              "--variant does not apply")
        return 2
    models_dir = args.models_dir
    if args.analysis_model is None:
        from dermaloop.analysis.on_device import find_analysis_model

        if models_dir is None:
            from dermaloop.settings import load_settings

            models_dir = load_settings().models_dir
        if find_analysis_model(models_dir) is None:  # what diagnose and `dermaloop run` do on first use
            from training.localiser_train import ensure_localiser

            print(f"dermaloop evaluate: building the analysis model under {models_dir} (first run only)...")
            ensure_localiser(models_dir)
    try:
        summary = evaluate_deployed(args.kind, args.model, dataset, args.out, split_name, models_dir=models_dir,
                                    analysis_model=args.analysis_model, centre=not args.no_centre,
                                    progress=not args.quiet)
    except RuntimeError as exc:  # e.g. the worker's model loader (ModelLoadError)
        print(f"dermaloop evaluate: {exc}")
        return 2
    c, w = summary["classified"], summary["declined_as_wrong"]
    print(f"as deployed: balanced accuracy {c['balanced_accuracy']:.4f} on the {c['n']} classified photos, "
          f"{w['balanced_accuracy']:.4f} counting the {w['n'] - w['classified']} declined or unreadable of {w['n']} "
          f"as wrong; report: {args.out / 'report.md'}")
    centre = (summary.get("centre_square") or {}).get("centre_all")
    if centre:
        print(f"centre square on the same readable photos: balanced accuracy {centre['balanced_accuracy']:.4f}")
    return 0
