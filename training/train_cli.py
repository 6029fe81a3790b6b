"""``dermaloop train --data DIR --out MODEL_DIR``: train the device and cloud models into a model directory."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from dermaloop import backbones
from dermaloop.preprocess import SYMMETRIES
from dermaloop.taxonomy import available_taxonomies
from training.embeddings import AUGMENTED, VIEWS


def default_cache_dir() -> Path:
    from dermaloop.settings import load_settings

    return Path(load_settings().data_dir) / "cache" / "embeddings"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path,
                        help="dataset folder: HAM10000 layout, ISIC 2019 GroundTruth CSV, or folder per class")
    parser.add_argument("--out", required=True, type=Path, help="model directory to write (replaced if present)")
    parser.add_argument("--taxonomy", default="ham10000",
                        help=f"bundled taxonomy ({', '.join(available_taxonomies())}) or a labels JSON file")
    parser.add_argument("--device-backbone", default="lite0", choices=sorted(backbones.BACKBONES))
    parser.add_argument("--cloud-backbone", default="lite2", choices=sorted(backbones.BACKBONES))
    parser.add_argument("--epochs", type=int, default=0,
                        help="fine-tune the top blocks this many epochs (0 = fast path: linear head only)")
    parser.add_argument("--views", default="orig",
                        help=f"comma-separated cached views for fine-tuning augmentation and cloud TTA ({', '.join(VIEWS)}; "
                             "aug1..aug16: random symmetry, crop and colour jitter, fixed per image)")
    parser.add_argument("--cloud-views", default=None, help="views for the cloud model if different from --views")
    parser.add_argument("--cloud-tta", default=None,
                        help="symmetries the cloud model averages over at test time, comma-separated "
                             f"({', '.join(SYMMETRIES[1:])}; 'all' for the 7 of them, 'none' for no TTA); "
                             "default: the symmetries among the cloud's training views")
    parser.add_argument("--cloud-lr-body", type=float, default=None, help="--lr-body for the cloud model if different")
    parser.add_argument("--cloud-train-stages", type=int, default=None,
                        help="--train-stages for the cloud model if different")
    parser.add_argument("--lr-head", type=float, default=3e-3)
    parser.add_argument("--lr-body", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-stages", type=int, default=2,
                        help="how many of the 7 backbone stages fine-tuning trains (2: stages 6-7 on cached "
                             "stage-5 maps; 3 adds stage 5, slower per epoch)")
    parser.add_argument("--full-epochs", type=int, default=0,
                        help="device model: after the top-block epochs, this many epochs of whole-network "
                             "fine-tuning on randomly augmented images (~3-4 min per epoch for 7k images "
                             "on 2 cores); the cloud ensemble's device member is this network")
    parser.add_argument("--cloud-full-epochs", type=int, default=0,
                        help="the same for the cloud model (Lite2 at 260 px: about twice as long per epoch)")
    parser.add_argument("--full-lr", type=float, default=1e-4,
                        help="peak learning rate of the whole-network phase (linear warm-up, one cosine decay)")
    parser.add_argument("--cycle-epochs", type=int, default=3,
                        help="length of the first cosine cycle; each warm restart doubles it")
    parser.add_argument("--colour-constancy", action="store_true", help="shades-of-grey white balance")
    parser.add_argument("--crop", choices=("centre", "box"), default="centre",
                        help="what the classifier is trained on: the centre square of each photo, or the crop the "
                             "runtimes make around the lesion box (the dataset's boxes, with the runtime's margin; "
                             "views then apply to that crop, augK becomes a scale-jittered crop)")
    parser.add_argument("--target-sensitivity", type=float, default=0.90,
                        help="malignant sensitivity the malignancy threshold is chosen for (on the calib split)")
    parser.add_argument("--sensitivity-confidence", type=float, default=None, metavar="C",
                        help="make the sensitivity's one-sided lower confidence bound (Clopper-Pearson, e.g. 0.95) "
                             "reach the target instead of its calib point estimate; the release uses 0.95")
    parser.add_argument("--cache-dir", type=Path, default=None, help="embedding cache (default: DATA_DIR/cache/embeddings)")
    parser.add_argument("--limit", type=int, default=None, help="use about this many images (whole lesions)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-cloud", action="store_true", help="train only the device model")
    parser.add_argument("--cloud-ensemble", action="store_true",
                        help="cloud model = average of the cloud and device networks (more accurate, slower)")
    parser.add_argument("--cloud-seeds", default="",
                        help="comma-separated seeds: the cloud model's whole-network phase is run again with each "
                             "(same warm start) and the networks join the cloud ensemble (~85 min each for Lite2 "
                             "on 2 cores); needs --cloud-full-epochs")
    parser.add_argument("--class-recall", default="",
                        help="e.g. mel=0.75: per-class decision offsets, the smallest that make the call reach "
                             "these recalls on the calib split (missing a melanoma costs more than over-calling "
                             "a nevus); probabilities and risk tiers are unchanged")
    parser.add_argument("--distill-from", type=Path, default=None,
                        help="a model directory whose cloud model teaches the device network: its probabilities on "
                             "each training image (computed once, cached) join the labels in the device's loss")
    parser.add_argument("--distill-alpha", type=float, default=0.5,
                        help="weight of the teacher's soft labels in the device's loss (0..1)")
    parser.add_argument("--distill-temperature", type=float, default=2.0,
                        help="temperature at which student and teacher probabilities are compared")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def parse_class_recall(text: str) -> dict[str, float]:
    """``mel=0.75,bcc=0.8`` -> {"mel": 0.75, "bcc": 0.8}; '' is no targets."""
    try:
        return {c.strip(): float(r) for c, r in (item.split("=") for item in text.split(",") if item.strip())}
    except ValueError:
        raise ValueError(f"--class-recall takes CLASS=RECALL pairs such as mel=0.75, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from training.finetune import FinetuneConfig
    from training.finetune_images import FullFinetuneConfig
    from training.pipeline import TrainOptions, train

    def parse_views(text: str) -> tuple[str, ...]:
        views = tuple(v.strip() for v in text.split(",") if v.strip())
        if any(v not in VIEWS and v not in AUGMENTED for v in views) or not views or views[0] != "orig":
            raise SystemExit(f"views must start with 'orig' and use only {', '.join(VIEWS)} or aug1..aug16 "
                             "(--crop box applies them to the lesion-box crop); "
                             f"got {text!r}")
        return views

    def parse_tta(text: str | None) -> tuple[str, ...] | None:
        if text is None:
            return None
        names = {"all": SYMMETRIES[1:], "none": ()}.get(text.strip())
        names = names if names is not None else tuple(v.strip() for v in text.split(",") if v.strip())
        if any(v not in SYMMETRIES[1:] for v in names):
            raise SystemExit(f"--cloud-tta takes 'all', 'none' or some of {', '.join(SYMMETRIES[1:])}; got {text!r}")
        return names

    views = parse_views(args.views)
    try:
        class_recall = parse_class_recall(args.class_recall)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    try:
        cloud_seeds = tuple(int(v) for v in args.cloud_seeds.split(",") if v.strip())
    except ValueError:
        raise SystemExit(f"--cloud-seeds takes comma-separated integers, got {args.cloud_seeds!r}") from None
    cloud_tta = parse_tta(args.cloud_tta)
    cloud_views = parse_views(args.cloud_views) if args.cloud_views else None
    recipe = FinetuneConfig(epochs=max(args.epochs, 1), batch_size=args.batch_size, lr_head=args.lr_head,
                            lr_body=args.lr_body, cycle_epochs=args.cycle_epochs, train_stages=args.train_stages,
                            seed=args.seed)
    cloud_recipe = None
    if args.cloud_lr_body is not None or args.cloud_train_stages is not None:
        cloud_recipe = replace(recipe, lr_body=args.cloud_lr_body if args.cloud_lr_body is not None else recipe.lr_body,
                               train_stages=args.cloud_train_stages or recipe.train_stages)
    opts = TrainOptions(
        data=args.data, out=args.out, taxonomy=args.taxonomy, device_backbone=args.device_backbone,
        cloud_backbone=args.cloud_backbone, epochs=args.epochs, views=views, cloud_views=cloud_views, cloud_tta=cloud_tta,
        colour_constancy=args.colour_constancy, crop=args.crop, cache_dir=args.cache_dir or default_cache_dir(),
        seed=args.seed, target_sensitivity=args.target_sensitivity,
        sensitivity_confidence=args.sensitivity_confidence, limit=args.limit, skip_cloud=args.skip_cloud,
        cloud_ensemble=args.cloud_ensemble, cloud_seeds=cloud_seeds, class_recall=class_recall,
        distill_from=args.distill_from, distill_alpha=args.distill_alpha, distill_temperature=args.distill_temperature,
        finetune=recipe, cloud_finetune=cloud_recipe, progress=not args.quiet,
        full_finetune=FullFinetuneConfig(epochs=args.full_epochs, lr_head=args.full_lr, lr_body=args.full_lr,
                                         seed=args.seed),
        cloud_full_finetune=FullFinetuneConfig(epochs=args.cloud_full_epochs, lr_head=args.full_lr,
                                               lr_body=args.full_lr, seed=args.seed))
    from dermaloop.model_dir import ModelError

    try:
        out = train(opts)
    except (ValueError, ModelError) as exc:
        print(f"dermaloop train: {exc}")
        return 2
    print(f"wrote {out}")
    return 0
