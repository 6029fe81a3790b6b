"""Whole-network fine-tuning on augmented images, warm-started from the top-block recipe.

Why a second phase: the cached-map recipe (``training/finetune.py``) trains only stages 6-7 on frozen
stage-5 maps, so it cannot learn from crops, rotations or colour shifts (tried as cached views: worse,
docs/MODEL_REPORT.md recipe F) and plateaus near 0.70 balanced accuracy. Here every layer trains on a
fresh random augmentation of each training image per epoch (``training.embeddings.augment``: one of
the 8 symmetries, a 70-100 % crop, brightness/contrast/saturation jitter, per-channel gains). Starting
from the top-block recipe's best weights, the new classifier is already sensible, so the pretrained
lower stages are not wrecked by large early gradients; a short linear warm-up of the rates then one
cosine decay. On 2 CPU cores EfficientNet-Lite0 at 224 px trains at ~38 images/s, about 3-4 minutes
per epoch for HAM10000's 7,010 training images.

BatchNorm statistics stay frozen (batches of 32 on 7 imbalanced classes would make noisy estimates),
as in the first phase. Checkpoints, resumption and epoch selection on the calib split come from the
shared ``EpochLoop``.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dermaloop.preprocess import PreprocessConfig, crop_box, load_image, symmetric_pixels, to_model_input
from training.datasets import Dataset
from training.embeddings import augment, jittered_box, model_input, view_for_crop
from training.finetune import EpochLoop, distill_targets


@dataclass
class FullFinetuneConfig:
    epochs: int = 0  # 0: no whole-network phase
    batch_size: int = 32
    lr_head: float = 1e-4
    lr_body: float = 1e-4
    warmup_epochs: float = 0.5
    weight_decay: float = 1e-4
    dropout: float = 0.3
    label_smoothing: float = 0.1
    class_weight_power: float = 1.0
    seed: int = 0
    # "box": each augmentation starts from a scale-jittered crop around the lesion box (the runtime's
    # view of the photo, training.embeddings.jittered_box) instead of the whole photo; the calib
    # split is scored on the runtime's box crop
    crop: str = "centre"
    distill_alpha: float = 0.0  # as in FinetuneConfig
    distill_temperature: float = 2.0


def warm_start_key(start) -> str:
    """Part of the checkpoint folder name: a phase-2 checkpoint must never resume on top of a
    different phase-1 result (phase 1 on 2 CPU threads is not bit-reproducible)."""
    digest = hashlib.sha256()
    for w in start.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()[:12]


def build_full_network(name: str, n_classes: int, dropout: float, start=None):
    """Backbone + pooled features + dropout + ``logits``, with frozen BatchNorm; weights of ``start``
    (any model sharing layer names, e.g. the fine-tuned tail) copied in."""
    import keras

    from dermaloop import backbones

    base = backbones.build_backbone(name, weights="imagenet", pooling="avg")
    x = keras.layers.Dropout(dropout, name="head_dropout")(base.output)
    model = keras.Model(base.input, keras.layers.Dense(n_classes, name="logits")(x), name=f"{name}_full_classifier")
    if start is not None and backbones.copy_weights_by_name(start, model) < 3:
        raise ValueError("the warm-start model shares no layers with the backbone")
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return model


def image_logits(model, ds: Dataset, rows: np.ndarray, config: PreprocessConfig, view: str = "orig",
                 batch_size: int = 64, symmetry: str = "orig") -> np.ndarray:
    """Logits of the network on the shared preprocessing of ``rows`` (one of the fixed views), with
    ``symmetry`` applied to the model input afterwards, exactly as the cloud runtime's TTA does."""
    out = []
    with ThreadPoolExecutor(2) as pool:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            x = symmetric_pixels(np.stack(list(pool.map(lambda r: model_input(ds.samples[r], config, view), chunk))),
                                 symmetry)
            out.append(np.asarray(model(x.astype(np.float32), training=False)))
    return np.concatenate(out) if out else np.zeros((0, model.output_shape[-1]), np.float32)


def finetune_full(name: str, ds: Dataset, train_idx: np.ndarray, calib_idx: np.ndarray, config: FullFinetuneConfig,
                  preprocess: PreprocessConfig, checkpoint_dir: str | Path, start=None, progress: bool = True,
                  soft_targets: np.ndarray | None = None):
    """Train every layer on augmented images; returns (network with the best calib weights, history)."""
    import keras

    keras.utils.set_random_seed(config.seed)
    k = len(ds.taxonomy)
    model = build_full_network(name, k, config.dropout, start)
    steps = int(np.ceil(len(train_idx) / config.batch_size))
    warmup = int(round(config.warmup_epochs * steps))

    def schedule(lr: float):
        return keras.optimizers.schedules.CosineDecay(0.0, max(1, config.epochs * steps - warmup), alpha=0.01,
                                                      warmup_target=lr, warmup_steps=warmup)

    samples = ds.samples

    def one(args: tuple[int, int]) -> np.ndarray:
        row, seed = args
        img = load_image(samples[row].path)
        if config.crop == "box":
            box, margin = jittered_box(samples[row].box, seed)
            img = img.crop(tuple(round(v) for v in crop_box(img.width, img.height, box,
                                                             replace(preprocess, box_margin=margin))))
        return to_model_input(augment(img, seed), config=preprocess)

    def batches(rng: np.random.Generator):
        order = rng.permutation(train_idx)
        seeds = rng.integers(0, 2**63 - 1, size=len(order))
        chunks = [slice(s * config.batch_size, (s + 1) * config.batch_size) for s in range(steps)]
        # decode + augment the next batch on a background thread while the network trains on this one
        with ThreadPoolExecutor(1) as pool:
            def submit(sel: slice):
                return pool.submit(lambda: np.stack(list(map(one, zip(order[sel], seeds[sel], strict=True)))))

            pending = submit(chunks[0])
            for i, sel in enumerate(chunks):
                x = pending.result()
                if i + 1 < len(chunks):
                    pending = submit(chunks[i + 1])
                rows = order[sel]
                yield (x.astype(np.float32), ds.labels[rows]) if soft is None else \
                    (x.astype(np.float32), ds.labels[rows], soft[rows])

    soft = distill_targets(soft_targets, train_idx, config)
    calib = np.sort(calib_idx)
    loop = EpochLoop(model, ds.labels, train_idx, ds.labels[calib], k, config, schedule(config.lr_head),
                     schedule(config.lr_body), checkpoint_dir, f"{name} whole-network fine-tune", progress,
                     extendable=False)  # the cosine decay spans all epochs: a longer run is another run
    return loop.run(batches, steps, lambda m: image_logits(m, ds, calib, preprocess, view_for_crop(config.crop, "orig")))


def checkpoint_dir(base: Path, name: str, ds: Dataset, recipe: str, start) -> Path:
    return Path(base) / f"full-{name}-{ds.fingerprint()}-{recipe}-{warm_start_key(start)}"
