"""``dermaloop lr-find``: learning-rate range test (Smith 2017) for fine-tuning the top blocks.

Trains the tail classifier on cached stage-5 maps for a few hundred steps while the learning rate
grows exponentially from ``--min-lr`` to ``--max-lr``; plots smoothed loss against learning rate and
suggests the rate of steepest descent (use about that for ``--lr-head``, a tenth of it for ``--lr-body``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dermaloop import backbones


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="training dataset (any supported layout)")
    parser.add_argument("--backbone", default="lite0", choices=sorted(backbones.BACKBONES))
    parser.add_argument("--taxonomy", default="ham10000")
    parser.add_argument("--min-lr", type=float, default=1e-6)
    parser.add_argument("--max-lr", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("lr_find"), help="folder for lr_find.png and lr_find.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")


def lr_range_test(model, maps: np.ndarray, labels: np.ndarray, rows: np.ndarray, n_classes: int, min_lr: float,
                  max_lr: float, steps: int, batch_size: int, seed: int, progress: bool = True) -> dict:
    import keras
    import tensorflow as tf
    from tqdm import tqdm

    from training.finetune import class_weights

    rng = np.random.default_rng(seed)
    lrs = np.geomspace(min_lr, max_lr, steps)
    lr_var = tf.Variable(float(lrs[0]), trainable=False)
    opt = keras.optimizers.Adam(learning_rate=lambda: lr_var)
    cw = tf.constant(class_weights(labels[rows], n_classes))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    variables = model.trainable_variables

    @tf.function(reduce_retracing=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(loss_fn(y, model(x, training=True)) * tf.gather(cw, y))
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return loss

    losses, smooth, best = [], 0.0, np.inf
    for i, lr in enumerate(tqdm(lrs, desc="lr range test", disable=not progress)):
        lr_var.assign(float(lr))
        pick = np.sort(rng.choice(rows, size=min(batch_size, len(rows)), replace=False))
        loss = float(step(tf.constant(np.asarray(maps[pick], np.float32)), tf.constant(labels[pick])))
        smooth = 0.9 * smooth + 0.1 * loss
        corrected = smooth / (1 - 0.9 ** (i + 1))
        losses.append(corrected)
        best = min(best, corrected)
        if not np.isfinite(corrected) or corrected > 4 * best:
            break  # diverged: the useful range is behind us
    lrs = lrs[: len(losses)]
    grads = np.gradient(np.array(losses), np.log(lrs)) if len(losses) > 2 else np.zeros(len(losses))
    suggestion = float(lrs[int(np.argmin(grads))]) if len(losses) > 2 else float(lrs[0])
    return {"lr": lrs.tolist(), "loss": losses, "suggested_lr_head": suggestion, "suggested_lr_body": suggestion / 10}


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dermaloop.preprocess import PreprocessConfig
    from dermaloop.taxonomy import load_taxonomy
    from training.datasets import grouped_split, open_dataset
    from training.embeddings import extract_features
    from training.finetune import build_tail_classifier
    from training.train_cli import default_cache_dir

    try:
        taxonomy = load_taxonomy(args.taxonomy)
        ds = open_dataset(args.data, taxonomy)
    except ValueError as exc:
        print(f"dermaloop lr-find: {exc}")
        return 2
    split = grouped_split(ds, seed=args.seed)
    cfg = PreprocessConfig(size=backbones.input_size(args.backbone))
    feats = extract_features(ds, args.backbone, cfg, args.cache_dir or default_cache_dir(), with_maps=True,
                             progress=not args.quiet)
    start = backbones.stage_end_block(args.backbone, 4) + 1
    model = build_tail_classifier(args.backbone, start, tuple(feats.maps.shape[1:]), len(taxonomy), 0.3)
    result = lr_range_test(model, feats.maps, ds.labels, split["train"], len(taxonomy), args.min_lr, args.max_lr,
                           args.steps, args.batch_size, args.seed, progress=not args.quiet)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lr_find.json").write_text(json.dumps(result, indent=1))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogx(result["lr"], result["loss"])
    ax.axvline(result["suggested_lr_head"], color="r", ls="--", label=f"steepest {result['suggested_lr_head']:.1e}")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed class-weighted loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "lr_find.png", dpi=110)
    plt.close(fig)
    print(f"suggested --lr-head {result['suggested_lr_head']:.1e} --lr-body {result['suggested_lr_body']:.1e}; "
          f"plot: {args.out / 'lr_find.png'}")
    return 0
