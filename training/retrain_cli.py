"""``dermaloop retrain --data BASE``: retrain on the dermatologists' new labels; promote only through the gates.

Exit codes: 0 promoted (or a dry run finished), 1 refused by the gates (the decision record says
why), 2 could not run (no current model, no new labels, unknown version, backend down...).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from training import gates


def default_out() -> Path:
    from dermaloop.settings import load_settings

    return Path(load_settings().data_dir) / "retrain"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path,
                        help="the base dataset the current model was trained on (HAM10000 layout, ISIC 2019 CSV or "
                             "folder per class); its benchmark part is never trained on")
    parser.add_argument("--out", type=Path, default=None,
                        help="work folder: run states, fetched models, photo and feature caches (default DATA_DIR/retrain)")
    parser.add_argument("--taxonomy", default="ham10000", help="bundled taxonomy name or labels JSON file")
    parser.add_argument("--dry-run", action="store_true",
                        help="train, evaluate and decide, but write nothing to the backend (no dataset version, "
                             "record, publication, promotion or labelling)")
    parser.add_argument("--min-new-labels", type=int, default=1, metavar="K",
                        help="refuse to run with fewer than K usable labels the current model's dataset lacks")
    parser.add_argument("--watch", type=int, default=None, metavar="N",
                        help="keep running: start a retrain whenever N usable labels arrived since the last run")
    parser.add_argument("--poll-seconds", type=float, default=60.0, help="--watch: how often to look for labels")
    parser.add_argument("--recipe", choices=("refit", "train"), default="refit",
                        help="refit (default, fast): refit the current versions' last layer on base + new labels; "
                             "train: a full `dermaloop train` run from ImageNet weights with --train-args")
    parser.add_argument("--train-args", default="",
                        help="--recipe train: `dermaloop train` options, quoted, e.g. \"--epochs 14 --views orig,flip "
                             "--cloud-ensemble --full-epochs 12\" (--data and --out are retraining's)")
    parser.add_argument("--parent-dataset", default=None, metavar="VERSION",
                        help="dataset version to build on (default: the one the current model was trained on)")
    parser.add_argument("--refit-c", type=float, default=0.01, metavar="C",
                        help="refit: inverse strength of the pull toward the current last layer, as scikit-learn's "
                             "C (default %(default)s, the fast path's; smaller: stays closer)")
    parser.add_argument("--calibration-images", type=int, default=500, help="images calibrating the int8 export")
    parser.add_argument("--ba-tolerance", type=float, default=gates.BA_TOLERANCE,
                        help="largest balanced-accuracy loss the 95%% CI may allow (default %(default)s)")
    parser.add_argument("--sensitivity-tolerance", type=float, default=gates.SENSITIVITY_TOLERANCE,
                        help="the same for malignant sensitivity (default %(default)s)")
    parser.add_argument("--ece-bound", type=float, default=gates.ECE_BOUND,
                        help="ECE always allowed (default %(default)s; above it: at most current + 0.01)")
    parser.add_argument("--int8-max-drop", type=float, default=gates.INT8_DROP_POINTS,
                        help="balanced-accuracy points the device int8 model may lose to its float model")
    parser.add_argument("--device-answer", choices=("int8", "fp32"), default="int8",
                        help="which device file the device gates compare: int8 (default: what phones run); fp32 "
                             "only where int8 is known to be meaningless, e.g. models on the tiny test backbone")
    parser.add_argument("--by", default=None, help="who runs it, for the records (default user@host)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (step lines still print)")
    # Diagnostics and tests: a candidate trained on permuted labels must be refused by the gates.
    parser.add_argument("--shuffle-labels", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from training.candidate import RefitConfig
    from training.compare import GateConfig
    from training.decisions import RunLocked
    from training.retrain import RetrainError, RetrainOptions, retrain, watch

    if args.min_new_labels < 0:
        print("dermaloop retrain: --min-new-labels must be 0 or more", file=sys.stderr)
        return 2
    try:
        train_args = tuple(shlex.split(args.train_args))
    except ValueError as exc:
        print(f"dermaloop retrain: --train-args: {exc}", file=sys.stderr)
        return 2
    if train_args and args.recipe != "train":
        print("dermaloop retrain: --train-args needs --recipe train", file=sys.stderr)
        return 2
    opts = RetrainOptions(
        data=args.data, out=args.out or default_out(), taxonomy=args.taxonomy, recipe=args.recipe,
        dry_run=args.dry_run, min_new_labels=args.min_new_labels, parent_dataset=args.parent_dataset, by=args.by,
        refit=RefitConfig(c=args.refit_c, calibration_images=args.calibration_images, shuffle_labels=args.shuffle_labels,
                          progress=not args.quiet, train_args=train_args),
        gates=GateConfig(ba_tolerance=args.ba_tolerance, sensitivity_tolerance=args.sensitivity_tolerance,
                         ece_bound=args.ece_bound, int8_max_drop=args.int8_max_drop,
                         device_answer=args.device_answer),
        progress=not args.quiet)
    try:
        if args.watch is not None:
            watch(opts, args.watch, poll_seconds=args.poll_seconds)
            return 0
        result = retrain(opts)
    except (RetrainError, RunLocked) as exc:
        print(f"dermaloop retrain: {exc}", file=sys.stderr)
        return 2
    if result.status in ("done", "dry-run-pass"):
        print(f"{'promoted' if result.promoted else 'would promote (dry run)'} {result.version} "
              f"(run {result.run_id}, dataset {result.dataset_version})")
        return 0
    print(f"refused: {result.decision['reason']} (run {result.run_id})")
    return 1
