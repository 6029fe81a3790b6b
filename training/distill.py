"""Knowledge distillation: the device network learns from the cloud model's answers as well as the labels.

Why: the device model must stay small (int8 Lite0, at most 6 MB) while the cloud model can be an
ensemble of bigger networks with test-time views. A one-hot label says only "this is a nevus"; the
teacher's probabilities also say "and it looks a bit like a melanoma", which is what the small
network gets wrong. The teacher runs once per training image (as the student's crop sees it) and
its probabilities are cached, so distillation adds no per-epoch cost: it stays a CPU-hours recipe.

Loss per image: (1 - alpha) * cross-entropy with the label (class-weighted, label smoothing, as
without distillation) + alpha * T^2 * KL(teacher || student) at temperature T (Hinton et al. 2015;
T^2 keeps the gradients' scale independent of T). The KL term carries the same class weight as the
label term, so distillation does not undo the balancing of rare classes. alpha = 0 is exactly the
undistilled loss.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from training.datasets import Dataset
from training.embeddings import model_input, view_for_crop


def soften(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities at ``temperature`` (p ** (1/T), renormalised): what softmax(logits / T) gives."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logp = np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)) / temperature
    logp -= logp.max(axis=1, keepdims=True)
    p = np.exp(logp)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def distillation_loss(logits, labels, teacher_probs, class_weight, alpha: float, temperature: float,
                      label_smoothing: float):
    """Mean over the batch of the loss in the module docstring (TensorFlow tensors in, scalar out).
    ``teacher_probs`` are already softened to ``temperature`` (``soften``)."""
    import tensorflow as tf

    n_classes = tf.shape(logits)[-1]
    smooth = tf.one_hot(labels, n_classes) * (1.0 - label_smoothing) + label_smoothing / tf.cast(n_classes, tf.float32)
    hard = -tf.reduce_sum(smooth * tf.nn.log_softmax(logits), axis=-1)
    log_student = tf.nn.log_softmax(logits / temperature)
    kl = tf.reduce_sum(tf.math.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_student, axis=-1)
    per_image = (1.0 - alpha) * hard + alpha * temperature ** 2 * kl
    return tf.reduce_mean(per_image * tf.gather(class_weight, labels))


def teacher_probabilities(teacher_dir: str | Path, dataset: Dataset, rows: np.ndarray, crop: str = "centre",
                          cache_dir: str | Path | None = None, batch_size: int = 32,
                          progress: bool = True) -> np.ndarray:
    """The teacher's cloud model (its own preprocessing and test-time views) on ``rows`` of
    ``dataset``, cropped as the student is trained (``crop``). Returns (len(dataset), K) with NaN
    outside ``rows``; cached per (teacher version and files, data, crop, rows)."""
    from dermaloop.model_dir import CloudModel, ModelDir

    md = ModelDir.open(teacher_dir)
    if "cloud" not in md.card:
        raise ValueError(f"{teacher_dir} has no cloud model to learn from")
    if list(md.taxonomy.ids) != list(dataset.taxonomy.ids):
        raise ValueError(f"the teacher's classes ({', '.join(md.taxonomy.ids)}) are not the data's "
                         f"({', '.join(dataset.taxonomy.ids)})")
    rows = np.sort(np.asarray(rows, int))
    view = view_for_crop(crop, "orig")
    key = hashlib.sha256("|".join([md.card.get("version", ""), _files_key(md.card), dataset.fingerprint(), view,
                                   ",".join(map(str, rows.tolist()))]).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"teacher-{key}.npy" if cache_dir else None
    out = np.full((len(dataset), len(dataset.taxonomy)), np.nan, np.float32)
    if cache and cache.is_file():
        out[rows] = np.load(cache)
        return out
    teacher = CloudModel(md)
    probs = np.zeros((len(rows), len(dataset.taxonomy)), np.float32)
    with tqdm(total=len(rows), desc=f"teacher {teacher.version}", unit="img", disable=not progress) as bar:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            x = np.stack([model_input(dataset.samples[r], teacher.preprocess, view) for r in chunk])
            probs[i:i + len(chunk)] = teacher.predict(x)
            bar.update(len(chunk))
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npy")
        np.save(tmp, probs)
        tmp.replace(cache)
    out[rows] = probs
    return out


def _files_key(card: dict) -> str:
    """The teacher's file hashes as one string: a retrained teacher with the same version name is another teacher."""
    files = card.get("files", {})
    return ",".join(f"{k}={files[k]}" for k in sorted(files))
