"""Retraining's fast path: keep the serving model's network, refit only its last layer.

A release model is fine-tuned as a whole network (and the cloud model is an ensemble); a fresh
linear head on ImageNet embeddings would lose to it by 20 points of balanced accuracy and the gates
would refuse every retrain. So the fast path starts FROM the current version: its network up to
the ``logits`` layer is frozen and run once per image (embeddings cached by the network's weight
digest and the image's sha256, see :class:`EmbeddingCache`), the final linear layer is refitted on
base train + new labels starting from the current weights (a class-balanced logistic regression
whose L2 penalty pulls toward the current weights: a Gaussian prior centred on what the model knows
already), then the temperature, risk thresholds and class offsets are refitted on the calib split
and the models are exported again.

Every model ``training.assemble`` builds is linear in its penultimate features:

* single network: ``probs = softmax((W f + b) * s)`` (``logits`` Dense, ``temperature`` Rescaling
  with scale s = 1/T);
* ensemble: ``probs = softmax(mean_i((W_i f_i + b_i) * s_i) * s)`` (each member's ``logits`` and
  ``temperature``, then ``ensemble_temperature``).

So the pre-temperature logits are ``A z + c`` over the concatenated member features ``z``, with
``A_i = W_i s_i / n`` and ``c = mean_i(b_i s_i)``; a refit ``A, c`` is written back member by member
(``W_i = n A_i / s_i``, ``b_i = c / s_i``) and the model keeps its architecture, its files and
everything the runtimes expect. The network is untouched, so a head-refit version has the same
weight digest as its parent and reuses every cached embedding: only new images cost a forward pass.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dermaloop.preprocess import PreprocessConfig, load_image, symmetric_pixels, to_model_input

__all__ = ["RefitError", "Head", "open_head", "body_digest", "EmbeddingCache", "embed", "fit_head",
           "balanced_weights", "probabilities"]

LOGITS = "logits"
TEMPERATURE = "temperature"
ENSEMBLE_TEMPERATURE = "ensemble_temperature"


class RefitError(RuntimeError):
    """The model has no refittable last layer (not built by training.assemble), or the data cannot refit it."""


@dataclass
class Head:
    """The last linear layer(s) of a classifier and the network that feeds them.

    ``members``: (logits Dense layer, member scale s_i or 1.0, feature sub-model) per network;
    ``outer``: the Rescaling layer whose scale is the final 1/temperature."""

    model: Any
    members: list[tuple[Any, float, Any]]
    outer: Any

    @property
    def n_classes(self) -> int:
        return int(self.members[0][0].units)

    @property
    def dims(self) -> list[int]:
        return [int(dense.kernel.shape[0]) for dense, _, _ in self.members]

    def linear(self) -> tuple[np.ndarray, np.ndarray]:
        """(A (D, k), c (k,)): the pre-temperature logits as one linear map of the concatenated features."""
        n = len(self.members)
        parts, bias = [], np.zeros(self.n_classes)
        for dense, s, _ in self.members:
            w, b = (np.asarray(v, np.float64) for v in dense.get_weights())
            parts.append(w * s / n)
            bias += b * s / n
        return np.concatenate(parts, axis=0), bias

    @property
    def temperature(self) -> float:
        return 1.0 / float(self.outer.scale)

    def set_linear(self, a: np.ndarray, c: np.ndarray, temperature: float) -> None:
        """Write a refitted map back into the members' Dense layers and the final temperature."""
        n = len(self.members)
        offsets = np.cumsum([0, *self.dims])
        if a.shape != (offsets[-1], self.n_classes) or c.shape != (self.n_classes,):
            raise RefitError(f"head shape {a.shape}/{c.shape} does not fit the model ({offsets[-1]}, {self.n_classes})")
        for i, (dense, s, _) in enumerate(self.members):
            dense.set_weights([(a[offsets[i]:offsets[i + 1]] * n / s).astype(np.float32),
                               (c / s).astype(np.float32)])
        if not (np.isfinite(temperature) and temperature > 0):
            raise RefitError(f"temperature must be a positive number, got {temperature}")
        self.outer.scale = float(1.0 / temperature)

    def extractor(self) -> Callable[[np.ndarray], np.ndarray]:
        """pixels (N, size, size, 3) -> the concatenated penultimate features of every member.

        Each member runs as its own Keras sub-model (one Keras model holding two members whose
        layers share names mixed their outputs up in Keras 3.15), resized as the ensemble resizes."""
        parts = []
        for i, (_, _, sub) in enumerate(self.members):
            resize = _find_layer(self.model, f"member{i}_resize") if i > 0 else None
            parts.append((sub, resize))

        def compute(pixels: np.ndarray) -> np.ndarray:
            x = np.asarray(pixels, np.float32)
            outs = [np.asarray(sub(resize(x) if resize is not None else x, training=False)) for sub, resize in parts]
            return np.concatenate(outs, axis=1)

        return compute


def _find_layer(model, name: str):
    try:
        return model.get_layer(name)
    except ValueError:
        return None


def open_head(model) -> Head:
    """The refittable head of a classifier built by ``training.assemble`` (single or ensemble)."""
    import keras

    logits = _find_layer(model, LOGITS)
    temperature = _find_layer(model, TEMPERATURE)
    if logits is None or temperature is None or not isinstance(logits, keras.layers.Dense):
        raise RefitError("the model has no 'logits' Dense layer and 'temperature' scaling: it was not built by "
                         "dermaloop train, so its last layer cannot be refitted (use --recipe train)")
    primary = keras.Model(model.input, logits.input)
    outer = _find_layer(model, ENSEMBLE_TEMPERATURE)
    if outer is None:
        return Head(model, [(logits, 1.0, primary)], temperature)
    members = [(logits, float(temperature.scale), primary)]
    nested = sorted((layer for layer in model.layers if isinstance(layer, keras.Model)
                     and layer.name.startswith("member")), key=lambda m: int(m.name[6:].split("_")[0]))
    for sub in nested:
        dense, scale = _find_layer(sub, LOGITS), _find_layer(sub, TEMPERATURE)
        if dense is None or scale is None:
            raise RefitError(f"ensemble member {sub.name} has no 'logits' and 'temperature' layers")
        members.append((dense, float(scale.scale), keras.Model(sub.input, dense.input)))
    return Head(model, members, outer)


def body_digest(head: Head) -> str:
    """sha256 of every weight except the refittable Dense layers', plus the architecture's layer
    names: two models with the same digest compute the same penultimate features."""
    heads = {id(dense) for dense, _, _ in head.members}
    h = hashlib.sha256()

    def walk(model) -> None:
        for layer in model.layers:
            h.update(layer.name.encode())
            if id(layer) in heads:
                continue
            if hasattr(layer, "layers") and layer is not model:
                walk(layer)
                continue
            for w in layer.weights:
                h.update(np.ascontiguousarray(np.asarray(w), np.float32).tobytes())

    walk(head.model)
    h.update(repr([(len(head.members), head.dims)]).encode())
    return h.hexdigest()[:24]


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Per-sample weights that give every class present the same total weight (mean weight 1)."""
    labels = np.asarray(labels, np.int64)
    counts = np.bincount(labels)
    present = int((counts > 0).sum())
    return len(labels) / (present * counts[labels])


def fit_head(features: np.ndarray, labels: np.ndarray, a0: np.ndarray, c0: np.ndarray, *, c: float = 0.01,
             sample_weight: np.ndarray | None = None, max_iter: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression warm-started at (a0, c0), whose penalty pulls toward them.

    On standardised features (so the penalty does not depend on each feature's scale) it minimises
    ``sum_i w_i CE_i + ||B - B0||^2 / (2 c)`` with class-balanced weights ``w`` (mean 1), ``B`` the
    weights on standardised features and ``B0`` the current ones: scikit-learn's ``C`` with the
    prior centred on the current layer instead of on zero. ``c`` = 0.01 is the training pipeline's
    fast-path ``head_c``: the prior is strong for a few hundred images and fades as labels
    accumulate. Returns (A, c) on the raw features."""
    from scipy.optimize import minimize

    x = np.asarray(features, np.float64)
    y = np.asarray(labels, np.int64)
    if len(y) == 0 or len(np.unique(y)) < 2:
        raise RefitError("the training rows hold fewer than two classes: nothing to refit")
    if not c > 0:
        raise RefitError(f"the inverse regularisation c must be positive, got {c}")
    k = a0.shape[1]
    w = balanced_weights(y) if sample_weight is None else np.asarray(sample_weight, np.float64)
    w = w / w.sum()  # mean-weighted cross-entropy; the penalty is divided by n to match
    lam = 1.0 / (c * len(y))
    mu, sd = x.mean(axis=0), x.std(axis=0)
    sd = np.where(sd > 1e-8, sd, 1.0)
    xs = (x - mu) / sd
    # the same map in standardised coordinates: A z + c = (A * sd)^T zs + (c + mu A)
    b0 = a0 * sd[:, None]
    d0 = c0 + mu @ a0
    onehot = np.eye(k)[y]
    d = x.shape[1]

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        b, bias = theta[:d * k].reshape(d, k), theta[d * k:]
        z = xs @ b + bias
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        value = -float((w * (onehot * logp).sum(axis=1)).sum())
        g = (np.exp(logp) - onehot) * w[:, None]
        diff = b - b0
        value += 0.5 * lam * float((diff ** 2).sum())
        gb = xs.T @ g + lam * diff
        return value, np.concatenate([gb.ravel(), g.sum(axis=0)])

    theta0 = np.concatenate([b0.ravel(), d0])
    res = minimize(loss, theta0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    b, bias = res.x[:d * k].reshape(d, k), res.x[d * k:]
    a = b / sd[:, None]
    return a, bias - mu @ a


def probabilities(features: np.ndarray | Sequence[np.ndarray], a: np.ndarray, c: np.ndarray,
                  temperature: float) -> np.ndarray:
    """What the model outputs for these features: softmax((A z + c) / T), averaged over views when
    ``features`` is a list (one array per test-time view, as the cloud runtime averages them)."""
    from dermaloop.risk import softmax

    views = [features] if isinstance(features, np.ndarray) else list(features)
    probs = np.mean([softmax(np.asarray(f, np.float64) @ a + c, temperature) for f in views], axis=0)
    return probs / probs.sum(axis=1, keepdims=True)


class EmbeddingCache:
    """One small .npy per (network digest, preprocessing, view, image sha256), written atomically
    (temporary name, then rename): a killed run leaves whole files or none, and a later run, of
    this version or of any head-refit descendant, reuses them."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def folder(self, digest: str, preprocess: PreprocessConfig, view: str) -> Path:
        pre = hashlib.sha256(repr(sorted(preprocess.to_dict().items())).encode()).hexdigest()[:8]
        return self.root / f"{digest}-{pre}" / view

    def get(self, folder: Path, sha256: str) -> np.ndarray | None:
        path = folder / sha256[:2] / f"{sha256}.npy"
        try:
            return np.load(path)
        except (FileNotFoundError, ValueError, OSError):
            return None  # absent, or damaged by something other than us: computed again

    def put(self, folder: Path, sha256: str, value: np.ndarray) -> None:
        path = folder / sha256[:2] / f"{sha256}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:6]}.tmp.npy")
        np.save(tmp, np.asarray(value, np.float32))
        os.replace(tmp, path)


def embed(compute: Callable[[np.ndarray], np.ndarray], images: Sequence[tuple[str, Path]],
          preprocess: PreprocessConfig, cache: EmbeddingCache | None, digest: str, view: str = "orig", *,
          batch_size: int = 16, progress: bool = True, desc: str = "") -> np.ndarray:
    """Outputs of ``compute`` (a batch of preprocessed pixels -> one row per image) for
    ``images`` = [(sha256, path)] in view ``view`` (a symmetry applied to the preprocessed pixels,
    exactly as the cloud runtime's test-time views), from the cache where present."""
    folder = cache.folder(digest, preprocess, view) if cache else None
    rows: list[np.ndarray | None] = [cache.get(folder, sha) if cache else None for sha, _ in images]
    todo = [i for i, r in enumerate(rows) if r is None]
    with tqdm(total=len(todo), desc=desc or f"features ({view})", unit="img",
              disable=not progress or not todo) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            pixels = np.stack([to_model_input(load_image(images[i][1]), config=preprocess) for i in chunk])
            out = np.asarray(compute(symmetric_pixels(pixels, view)), np.float32)
            for i, row in zip(chunk, out, strict=True):
                rows[i] = row
                if cache:
                    cache.put(folder, images[i][0], row)
            bar.update(len(chunk))
    if not rows:
        return np.zeros((0, 0), np.float32)
    return np.stack(rows)  # type: ignore[arg-type]
