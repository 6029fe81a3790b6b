"""Fine-tuning the top blocks of a backbone on cached stage-5 feature maps.

Why on cached maps: on 2 CPU cores a full forward/backward pass through EfficientNet per image per
epoch is hours; the lower blocks (stem .. stage 5) stay frozen, so their output is computed once per
augmented view (``training/embeddings.py``) and each epoch only runs stages 6-7, the 1280-d head
convolution and the classifier. Augmentation = picking one of the cached views (original, flipped,
rotated) per image per epoch.

Recipe: BatchNorm statistics frozen (small batches, small data), differential learning rates (the
new classifier learns faster than the pretrained blocks), cosine schedule with warm restarts,
class-weighted cross-entropy with label smoothing, fixed seeds, model selection on the calibration
split's balanced accuracy, and a checkpoint after every epoch (weights, both optimizers' moments,
history) so an interrupted run resumes where it stopped: each epoch's shuffle comes from
``(seed, epoch)``. Before the moments were saved, a run resumed at a cosine restart fell from 0.67 to
0.25 calib balanced accuracy with empty Adam moments at the peak rate (an uninterrupted restart
dipped to 0.46 and recovered).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dermaloop import backbones
from training.embeddings import map_stage


@dataclass
class FinetuneConfig:
    epochs: int = 9
    batch_size: int = 64
    lr_head: float = 3e-3
    lr_body: float = 3e-4
    cycle_epochs: int = 3  # first cosine cycle; each restart doubles it (3, 6, 12 ...)
    weight_decay: float = 1e-4
    dropout: float = 0.3
    label_smoothing: float = 0.1
    class_weight_power: float = 1.0  # 1.0 = fully balanced, 0 = none
    seed: int = 0
    train_stages: int = 2  # top stages trained (of 7); the rest are frozen and their output is cached
    distill_alpha: float = 0.0  # weight of the teacher's soft labels (training/distill.py); 0: labels only
    distill_temperature: float = 2.0


def class_weights(labels: np.ndarray, n_classes: int, power: float = 1.0) -> np.ndarray:
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, (len(labels) / (n_classes * np.maximum(counts, 1))) ** power, 0.0)
    return (w / (w[counts > 0].mean() if (counts > 0).any() else 1.0)).astype(np.float32)


def build_tail_classifier(name: str, start_block: int, feature_shape: tuple[int, int, int], n_classes: int,
                          dropout: float, imagenet: bool = True):
    """Stages from ``start_block`` on + pooled 1280-d features + dropout + a Dense ``logits`` layer."""
    import keras

    tail = backbones.build_tail(name, start_block, feature_shape, pooling="avg")
    if imagenet:
        backbones.copy_weights_by_name(backbones.build_backbone(name, weights="imagenet"), tail)
    x = keras.layers.Dropout(dropout, name="head_dropout")(tail.output)
    logits = keras.layers.Dense(n_classes, name="logits")(x)
    model = keras.Model(tail.input, logits, name=f"{name}_tail_classifier")
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False  # frozen statistics: runs in inference mode even when training
    return model


def predict_logits(model, maps: np.ndarray, batch_size: int = 256) -> np.ndarray:
    out = [np.asarray(model(np.asarray(maps[i:i + batch_size], np.float32), training=False))
           for i in range(0, len(maps), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, model.output_shape[-1]), np.float32)


def finetune(name: str, views: list[np.ndarray], labels: np.ndarray, train_idx: np.ndarray,
             calib_idx: np.ndarray, n_classes: int, config: FinetuneConfig, checkpoint_dir: str | Path,
             progress: bool = True, imagenet: bool = True, soft_targets: np.ndarray | None = None):
    """Train; returns (model with the best calibration-split weights, history list). ``soft_targets``:
    a teacher's probabilities per dataset row, learnt from with ``config.distill_alpha``."""
    import keras

    keras.utils.set_random_seed(config.seed)
    start_block = backbones.stage_end_block(name, map_stage(config.train_stages)) + 1
    feature_shape = tuple(int(d) for d in views[0].shape[1:])
    model = build_tail_classifier(name, start_block, feature_shape, n_classes, config.dropout, imagenet)
    steps = int(np.ceil(len(train_idx) / config.batch_size))

    def schedule(lr: float):
        return keras.optimizers.schedules.CosineDecayRestarts(lr, steps * config.cycle_epochs, t_mul=2.0,
                                                              m_mul=1.0, alpha=0.01)

    def batches(rng: np.random.Generator):
        order = rng.permutation(train_idx)
        view_of = rng.integers(0, len(views), size=len(order))
        for s in range(steps):
            sel = slice(s * config.batch_size, (s + 1) * config.batch_size)
            rows, vsel = order[sel], view_of[sel]
            x = np.empty((len(rows), *feature_shape), np.float32)
            for v in range(len(views)):
                pick = vsel == v
                if pick.any():
                    src = rows[pick]
                    srt = np.argsort(src)  # sorted reads are much faster on memmaps
                    x[np.flatnonzero(pick)[srt]] = np.asarray(views[v][src[srt]], np.float32)
            yield (x, labels[rows]) if soft is None else (x, labels[rows], soft[rows])

    soft = distill_targets(soft_targets, train_idx, config)
    calib = np.sort(calib_idx)

    def calib_logits(m) -> np.ndarray:
        return predict_logits(m, views[0][calib])

    loop = EpochLoop(model, labels, train_idx, labels[calib], n_classes, config, schedule(config.lr_head),
                     schedule(config.lr_body), checkpoint_dir, f"{name} fine-tune", progress)
    return loop.run(batches, steps, calib_logits)


def distill_targets(soft_targets: np.ndarray | None, train_idx: np.ndarray, config) -> np.ndarray | None:
    """The teacher's probabilities softened to the recipe's temperature, or None when not distilling;
    refuses a recipe that asks for distillation without a teacher, or a teacher missing training rows."""
    from training.distill import soften

    alpha = float(getattr(config, "distill_alpha", 0.0))
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distill_alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return None
    if soft_targets is None:
        raise ValueError("distill_alpha > 0 needs the teacher's probabilities (--distill-from)")
    if np.isnan(soft_targets[train_idx]).any():
        raise ValueError("the teacher's probabilities do not cover every training image")
    out = np.zeros_like(soft_targets, dtype=np.float32)
    out[train_idx] = soften(soft_targets[train_idx], config.distill_temperature)
    return out


class EpochLoop:
    """The training loop shared by every fine-tuning recipe: a head optimizer and a body optimizer
    (differential learning rates), class-weighted cross-entropy with label smoothing, a calib-split
    balanced accuracy after each epoch (the best epoch's weights are kept) and a checkpoint after
    each epoch that a re-run of the same recipe resumes exactly. The recipe supplies the model,
    the learning-rate schedules, the batches of an epoch and the calib-split logits."""

    def __init__(self, model, labels: np.ndarray, train_idx: np.ndarray, calib_labels: np.ndarray, n_classes: int,
                 config, lr_head, lr_body, checkpoint_dir: str | Path, desc: str, progress: bool = True,
                 extendable: bool = True) -> None:
        import keras
        import tensorflow as tf

        self.model, self.config, self.desc, self.progress = model, config, desc, progress
        # extendable: the schedule does not depend on the number of epochs (warm restarts), so a
        # finished run may be continued with a larger ``epochs``; else ``epochs`` is part of the recipe
        self.ignored = ("epochs",) if extendable else ()
        self.calib_labels = calib_labels
        self.ckpt = Path(checkpoint_dir)
        self.ckpt.mkdir(parents=True, exist_ok=True)
        head_vars = model.get_layer("logits").trainable_variables
        head_ids = {id(v) for v in head_vars}
        body_vars = [v for v in model.trainable_variables if id(v) not in head_ids]
        self.opt_head = keras.optimizers.AdamW(lr_head, weight_decay=config.weight_decay)
        self.opt_body = keras.optimizers.AdamW(lr_body, weight_decay=config.weight_decay)
        self.opt_head.build(head_vars)
        self.opt_body.build(body_vars)
        cw = tf.constant(class_weights(labels[train_idx], n_classes, config.class_weight_power))
        loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing,
                                                       reduction="none")
        opt_head, opt_body = self.opt_head, self.opt_body
        alpha = float(getattr(config, "distill_alpha", 0.0))
        temperature = float(getattr(config, "distill_temperature", 1.0))

        def apply(tape, loss):
            grads = tape.gradient(loss, head_vars + body_vars)
            opt_head.apply_gradients(zip(grads[:len(head_vars)], head_vars, strict=True))
            opt_body.apply_gradients(zip(grads[len(head_vars):], body_vars, strict=True))
            return loss

        @tf.function(reduce_retracing=True)
        def step(x, y):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = tf.reduce_mean(loss_fn(tf.one_hot(y, n_classes), logits) * tf.gather(cw, y))
            return apply(tape, loss)

        @tf.function(reduce_retracing=True)
        def distill_step(x, y, soft):
            from training.distill import distillation_loss

            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = distillation_loss(logits, y, soft, cw, alpha, temperature, config.label_smoothing)
            return apply(tape, loss)

        self.step = distill_step if alpha > 0 else step

    def _resume(self, steps: int) -> tuple[list[dict], float, int]:
        state_file = self.ckpt / "state.json"
        if not state_file.is_file():
            return [], -1.0, 0
        state = json.loads(state_file.read_text())
        saved = {**asdict(type(self.config)()), **state.get("config", {})}  # options added since take defaults
        same = {k: v for k, v in saved.items() if k not in self.ignored} == \
            {k: v for k, v in asdict(self.config).items() if k not in self.ignored}
        if not (same and state["epoch"] + 1 <= self.config.epochs and (self.ckpt / "last.weights.h5").is_file()):
            return [], -1.0, 0
        self.model.load_weights(self.ckpt / "last.weights.h5")
        first = state["epoch"] + 1
        if not _load_optimizers(self.ckpt / "optimizers.npz", self.opt_head, self.opt_body):
            self.opt_head.iterations.assign(first * steps)  # checkpoints from before the moments were saved
            self.opt_body.iterations.assign(first * steps)
        return state["history"], state["best"], first

    def run(self, batches, steps: int, calib_logits):
        """``batches(rng)`` yields (x, y) for one epoch; ``calib_logits(model)`` scores the calib split."""
        import tensorflow as tf
        from sklearn.metrics import balanced_accuracy_score

        cfg, ckpt = self.config, self.ckpt
        history, best, first_epoch = self._resume(steps)
        for epoch in range(first_epoch, cfg.epochs):
            started = time.perf_counter()
            losses = []
            with tqdm(total=steps, desc=f"{self.desc} epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                      disable=not self.progress) as bar:
                for batch in batches(np.random.default_rng([cfg.seed, epoch])):  # (x, y) or (x, y, teacher)
                    losses.append(float(self.step(*(tf.constant(a) for a in batch))))
                    bar.update(1)
                    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            bacc = float(balanced_accuracy_score(self.calib_labels, calib_logits(self.model).argmax(1)))
            history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "calib_balanced_accuracy": bacc,
                            "seconds": time.perf_counter() - started})
            if bacc > best:
                best = bacc
                self.model.save_weights(ckpt / "best.weights.h5")
            self.model.save_weights(ckpt / "last.weights.h5")
            _save_optimizers(ckpt / "optimizers.npz", self.opt_head, self.opt_body)
            (ckpt / "state.json").write_text(json.dumps({"epoch": epoch, "best": best, "history": history,
                                                         "config": asdict(cfg)}, indent=1))
            if self.progress:
                tqdm.write(f"epoch {epoch + 1}: loss {np.mean(losses):.4f}, calib balanced accuracy {bacc:.4f}")
        if (ckpt / "best.weights.h5").is_file():
            self.model.load_weights(ckpt / "best.weights.h5")
        return self.model, history


def _save_optimizers(path: Path, *optimizers) -> None:
    arrays = {f"{i}_{j}": np.asarray(v.numpy()) for i, opt in enumerate(optimizers) for j, v in enumerate(opt.variables)}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)  # never a half-written file next to finished weights


def _load_optimizers(path: Path, *optimizers) -> bool:
    """Restore step counts and Adam moments; False (nothing changed) if absent or not matching."""
    if not path.is_file():
        return False
    with np.load(path) as saved:
        pairs = [(v, saved.get(f"{i}_{j}")) for i, opt in enumerate(optimizers) for j, v in enumerate(opt.variables)]
        if len(saved.files) != len(pairs) or any(a is None or a.shape != tuple(v.shape) for v, a in pairs):
            return False
        for v, a in pairs:
            v.assign(a)
    return True
