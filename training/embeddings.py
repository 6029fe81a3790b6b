"""Frozen-backbone features, computed once per (backbone, preprocessing, view, dataset) and cached.

The fast path trains heads on pooled 1280-d embeddings; fine-tuning the top blocks trains on the
cached output of the last block of stage 5 (14x14x112 for Lite0), so each fine-tuning epoch costs
only the top blocks. The cache lives outside git (``var/cache`` by default) as .npy files plus a
JSON manifest saying exactly what they contain.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dermaloop import backbones
from dermaloop.preprocess import (
    SYMMETRIES,
    PreprocessConfig,
    load_image,
    symmetric_image,
    symmetric_pixels,
    to_model_input,
)
from training.datasets import Dataset, Sample

CACHE_VERSION = 1
VIEWS = SYMMETRIES  # label-preserving transforms of a dermoscopic image (dermoscopy has no "up")
AUGMENTED = tuple(f"aug{k}" for k in range(1, 17))  # random augmentations, fixed per (image, view)
TAIL_STAGE = 4  # default: the maps after stage 5 (0-based 4) are cached for fine-tuning stages 6-7

# Augmented views: a random one of the 8 symmetries of the square (dermoscopy has no "up"), a random
# crop of 70-100 % of each side (scale and position), brightness/contrast/saturation jitter and a
# per-channel gain (the colour casts of different dermatoscopes and cameras).
CROP_SCALE = (0.7, 1.0)
JITTER = 0.2  # brightness, contrast, saturation factors in [1 - JITTER, 1 + JITTER]
CHANNEL_GAIN = 0.08  # per-channel gains in [1 - CHANNEL_GAIN, 1 + CHANNEL_GAIN]

# Serving-matched views (issue 20): the runtimes do not feed the classifier the centre square but a
# square around the localiser's lesion box with ``box_margin`` context (preprocess.crop_box). "box"
# is that crop around the dataset's lesion box (HAM10000's metadata boxes, from the masks), "box-<s>"
# the same crop under symmetry s, and "boxjK" a scale-jittered version: a margin drawn from
# BOX_MARGIN_JITTER (from tight to about four times the runtime's context), a shift of the box by up
# to BOX_SHIFT of its side (a localiser's box is not the mask's) and a random symmetry, fixed per
# (image, view). A photo without a box falls back to the centre square, as the runtimes do.
CROPS = ("centre", "box")
BOX_MARGIN_JITTER = (0.0, 0.6)
BOX_SHIFT = 0.1
BOX_VIEWS = ("box", *(f"box-{s}" for s in SYMMETRIES[1:]))
BOX_JITTERED = tuple(f"boxj{k}" for k in range(1, len(AUGMENTED) + 1))


@dataclass
class Features:
    pooled: np.ndarray  # (N, 1280) float32
    maps: np.ndarray | None  # (N, h, w, c) float16 memmap, or None
    ids: list[str]
    images_per_second: float
    cached: bool


def is_view(view: str) -> bool:
    return view in VIEWS or view in AUGMENTED or view in BOX_VIEWS or view in BOX_JITTERED


def view_for_crop(crop: str, view: str) -> str:
    """The cached view that plays ``view`` (a symmetry or augK, as recipes name them) when the
    classifier is trained on ``crop``: "centre" keeps it, "box" maps orig -> box, s -> box-s and
    augK -> boxjK."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    if crop == "centre" or view in BOX_VIEWS or view in BOX_JITTERED:
        return view
    if view == "orig":
        return "box"
    if view in SYMMETRIES:
        return f"box-{view}"
    if view in AUGMENTED:
        return f"boxj{view[3:]}"
    raise ValueError(f"unknown view {view!r}")


def jittered_box(box: tuple[float, float, float, float] | None, seed: int) -> tuple[tuple[float, ...] | None, float]:
    """A lesion box shifted by up to BOX_SHIFT of its side, and a context margin drawn from
    BOX_MARGIN_JITTER: what a localiser's box and the runtime's crop might have made of this photo."""
    rng = np.random.default_rng(seed)
    margin = float(rng.uniform(*BOX_MARGIN_JITTER))
    if box is None:
        return None, margin
    x0, y0, x1, y1 = box
    dx, dy = rng.uniform(-BOX_SHIFT, BOX_SHIFT, size=2) * (x1 - x0, y1 - y0)
    dx = float(np.clip(dx, -x0, 1.0 - x1))
    dy = float(np.clip(dy, -y0, 1.0 - y1))
    return (x0 + dx, y0 + dy, x1 + dx, y1 + dy), margin


def _seed(key: str, view: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{key}/{view}".encode()).digest()[:8], "little")


def _box_input(img: Image.Image, sample: Sample, config: PreprocessConfig, view: str) -> np.ndarray:
    if view in BOX_VIEWS:
        pixels = to_model_input(img, box=sample.box, config=config)
        symmetry = "orig" if view == "box" else view[4:]
    else:
        seed = _seed(sample.id, view)
        box, margin = jittered_box(sample.box, seed)
        pixels = to_model_input(img, box=box, config=replace(config, box_margin=margin))
        symmetry = SYMMETRIES[int(np.random.default_rng(seed + 1).integers(len(SYMMETRIES)))]
    return pixels if symmetry == "orig" else np.ascontiguousarray(symmetric_pixels(pixels[None], symmetry)[0])


def augment(img: Image.Image, seed: int) -> Image.Image:
    """One random, label-preserving augmentation of a dermoscopic photo, reproducible from ``seed``."""
    from PIL import ImageEnhance

    rng = np.random.default_rng(seed)
    img = symmetric_image(img, SYMMETRIES[int(rng.integers(len(SYMMETRIES)))])
    scale = rng.uniform(*CROP_SCALE)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    left, top = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
    img = img.crop((left, top, left + w, top + h))
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(rng.uniform(1 - JITTER, 1 + JITTER))
    gains = rng.uniform(1 - CHANNEL_GAIN, 1 + CHANNEL_GAIN, size=3)
    pixels = np.asarray(img, np.float32) * gains
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")


def _view(img: Image.Image, view: str, key: str = "") -> Image.Image:
    if view in VIEWS:
        return symmetric_image(img, view)
    if view in AUGMENTED:
        return augment(img, _seed(key, view))
    raise ValueError(f"unknown view {view!r}; choose from {VIEWS}, aug1..aug{len(AUGMENTED)}, "
                     f"box, box-<symmetry> or boxj1..boxj{len(BOX_JITTERED)}")


def model_input(sample: Sample, config: PreprocessConfig, view: str = "orig") -> np.ndarray:
    """The shared preprocessing (dermaloop.preprocess) of one sample, in one of the label-preserving
    views (augmented views are seeded by the sample id, so a cache can be rebuilt exactly)."""
    if view in BOX_VIEWS or view in BOX_JITTERED:
        return _box_input(load_image(sample.path), sample, config, view)
    return to_model_input(_view(load_image(sample.path), view, sample.id), config=config)


def map_stage(train_stages: int) -> int:
    """The 0-based stage whose output is cached when the top ``train_stages`` of the 7 stages train."""
    if not 1 <= train_stages <= 6:
        raise ValueError(f"train_stages must be 1..6, got {train_stages}")
    return 6 - train_stages


def extractor(name: str, with_maps: bool, stage: int = TAIL_STAGE):
    """Backbone returning the pooled embedding (and the output of ``stage`` when asked)."""
    import keras

    model = backbones.build_backbone(name, pooling="avg")
    if not with_maps:
        return model
    k = backbones.stage_end_block(name, stage)
    return keras.Model(model.input, [model.get_layer(f"block{k}_add").output, model.output])


def _boxes_digest(dataset: Dataset) -> str:
    """Box views depend on the lesion boxes, which the dataset fingerprint (ids, labels, groups) omits."""
    h = hashlib.sha256()
    for s in dataset.samples:
        h.update(f"{s.id}\t{s.box}\n".encode())
    return h.hexdigest()[:16]


def _key(name: str, config: PreprocessConfig, view: str, dataset: Dataset, stage: int = TAIL_STAGE) -> str:
    seeded = backbones.BACKBONES[name].wheel_module is None
    ckpt = "seeded-init" if seeded else backbones.checkpoint_path(name).name
    blob = json.dumps({"v": CACHE_VERSION, "backbone": name, "ckpt": ckpt,
                       "pre": config.to_dict(), "view": view, "data": dataset.fingerprint(),
                       "source": dataset.source,
                       **({"aug": [CROP_SCALE, JITTER, CHANNEL_GAIN]} if view in AUGMENTED else {}),
                       **({"boxj": [BOX_MARGIN_JITTER, BOX_SHIFT]} if view in BOX_JITTERED else {}),
                       **({"boxes": _boxes_digest(dataset)} if view in BOX_VIEWS or view in BOX_JITTERED else {}),
                       **({"stage": stage} if stage != TAIL_STAGE else {})},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def extract_features(dataset: Dataset, name: str, config: PreprocessConfig, cache_dir: str | Path | None,
                     view: str = "orig", with_maps: bool = False, batch_size: int = 32,
                     progress: bool = True, stage: int = TAIL_STAGE) -> Features:
    """Pooled embeddings (and optionally stage-5 maps) for every sample, from cache when possible."""
    cache = Path(cache_dir) / f"{name}-{view}-{_key(name, config, view, dataset, stage)}" if cache_dir else None
    ids = [s.id for s in dataset.samples]
    if cache and (cache / "manifest.json").is_file():
        manifest = json.loads((cache / "manifest.json").read_text())
        if manifest.get("complete") and (manifest.get("has_maps") or not with_maps):
            maps = np.load(cache / "maps.npy", mmap_mode="r") if with_maps else None
            return Features(np.load(cache / "pooled.npy"), maps, manifest["ids"],
                            manifest["images_per_second"], True)
    model = extractor(name, with_maps, stage)
    n = len(dataset)
    pooled = np.zeros((n, 1280), np.float32)
    maps = None
    if with_maps:
        shape = tuple(int(d) for d in model.outputs[0].shape[1:])
        if cache:
            cache.mkdir(parents=True, exist_ok=True)
            maps = np.lib.format.open_memmap(cache / "maps.npy", mode="w+", dtype=np.float16, shape=(n, *shape))
        else:
            maps = np.zeros((n, *shape), np.float16)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool, \
            tqdm(total=n, desc=f"{name} features ({view})", unit="img", disable=not progress) as bar:
        batches = [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]

        def load(r: range) -> np.ndarray:
            return np.stack([model_input(dataset.samples[j], config, view) for j in r])

        # Decode the next batch while the model runs on this one; never more than one batch ahead.
        ahead = pool.submit(load, batches[0]) if batches else None
        for b, rng in enumerate(batches):
            x = ahead.result()
            ahead = pool.submit(load, batches[b + 1]) if b + 1 < len(batches) else None
            out = model.predict_on_batch(x)
            if with_maps:
                maps[rng.start:rng.stop] = np.asarray(out[0], np.float16)
                out = out[1]
            pooled[rng.start:rng.stop] = np.asarray(out)
            bar.update(len(rng))
    rate = n / max(1e-9, time.perf_counter() - started)
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
        np.save(cache / "pooled.npy", pooled)
        if maps is not None and hasattr(maps, "flush"):
            maps.flush()
        (cache / "manifest.json").write_text(json.dumps({
            "complete": True, "has_maps": with_maps, "backbone": name, "view": view,
            "preprocess": config.to_dict(), "dataset": dataset.describe(), "ids": ids,
            "images_per_second": rate}, indent=1))
    return Features(pooled, maps, ids, rate, False)
