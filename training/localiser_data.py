"""Cached trunk features of HAM10000 frames (and zoomed-out copies) for the localiser and not-skin heads.

The trunk is frozen, so its features are computed once and reused by every head training run. The
cache is a set of .npy files under a cache folder (git-ignored ``var/cache``); it is rebuilt when
missing. Zoomed-out copies teach the localiser small, distant lesions (the quality gate's "move
closer" case), which HAM10000's close-up dermoscopy otherwise never shows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dermaloop.analysis.features import MAP_SHAPE, MID_LAYER, MID_SHAPE, frame_input
from training import degrade
from training.analysis_net import build_trunk
from training.hamdata import lesion_split, read_records

CACHE_VERSION = 1


def _zoom_scale(rng: np.random.Generator) -> float:
    return float(rng.uniform(0.25, 0.8))


def _distant_scale(rec, size: tuple[int, int], rng: np.random.Generator) -> float:
    """Zoom that leaves the lesion's longer side at 5-22% of the frame's shorter side (a far shot)."""
    w, h = size
    x0, y0, x1, y1 = rec.box
    side = max((x1 - x0) * w, (y1 - y0) * h, 1.0)
    return float(min(1.0, rng.uniform(0.05, 0.22) * min(w, h) / side))


def build_cache(data_dir: str | Path, cache_dir: str | Path, mode: str = "frames", zoom_fraction: float = 0.35,
                limit: int | None = None, seed: int = 0, batch: int = 64) -> Path:
    """Write maps.npy (float16 N x 7 x 7 x 1280), mid.npy (N x 14 x 14 x 112), boxes.npy, meta.json.

    ``mode="frames"``: every photo plus zoomed-out copies (scale 0.25-0.8) of ``zoom_fraction`` of them;
    ``mode="distant"``: only far-shot copies (lesion 5-22% of the frame) of ``zoom_fraction`` of them."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    records = read_records(data_dir)
    if limit:
        records = records[:limit]
    train_idx, val_idx = lesion_split(records)
    split = np.zeros(len(records), np.int8)  # 0 train, 1 val
    split[val_idx] = 1
    rng = np.random.default_rng(seed + (0 if mode == "frames" else 1))
    # Items: (record index, zoom scale or 1.0), for both splits.
    if mode == "frames":
        items = [(i, 1.0) for i in range(len(records))]
        items += [(i, _zoom_scale(rng)) for i in range(len(records)) if rng.random() < zoom_fraction]
    elif mode == "distant":
        items = []
        for i, rec in enumerate(records):
            if rng.random() < zoom_fraction:
                with Image.open(rec.path) as im:
                    items.append((i, _distant_scale(rec, im.size, rng)))
    else:
        raise ValueError(f"mode must be 'frames' or 'distant', not {mode!r}")
    n = len(items)
    maps = np.lib.format.open_memmap(cache_dir / "maps.tmp.npy", mode="w+", dtype=np.float16,
                                     shape=(n, *MAP_SHAPE))
    mid = np.lib.format.open_memmap(cache_dir / "mid.tmp.npy", mode="w+", dtype=np.float16,
                                    shape=(n, *MID_SHAPE))
    boxes = np.zeros((n, 4), np.float32)
    trunk = build_trunk(mid=True)
    for start in tqdm(range(0, n, batch), desc=f"trunk features ({mode})", unit="batch"):
        chunk = items[start:start + batch]
        frames = []
        for j, (i, scale) in enumerate(chunk):
            rec = records[i]
            with Image.open(rec.path) as im:
                img = im.convert("RGB")
            box = rec.box
            if scale < 1.0:
                img, box = degrade.zoom_out(img, box, scale)
            boxes[start + j] = box
            frames.append(frame_input(img))
        top, fine = trunk(np.stack(frames), training=False)
        maps[start:start + len(chunk)] = np.asarray(top, np.float16)
        mid[start:start + len(chunk)] = np.asarray(fine, np.float16)
    for arr, name in ((maps, "maps"), (mid, "mid")):
        arr.flush()
        del arr
        (cache_dir / f"{name}.tmp.npy").replace(cache_dir / f"{name}.npy")
    np.save(cache_dir / "boxes.npy", boxes)
    meta = {
        "version": CACHE_VERSION,
        "mode": mode,
        "data_dir": str(Path(data_dir).resolve()),
        "record": [i for i, _ in items],
        "scale": [s for _, s in items],
        "split": [int(split[i]) for i, _ in items],
        "image_id": [records[i].image_id for i, _ in items],
        "lesion_id": [records[i].lesion_id for i, _ in items],
    }
    (cache_dir / "meta.json").write_text(json.dumps(meta))
    return cache_dir


def load_cache(cache_dir: str | Path) -> tuple[np.ndarray, np.ndarray, dict] | None:
    cache_dir = Path(cache_dir)
    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION:
            return None
        return np.load(cache_dir / "maps.npy", mmap_mode="r"), np.load(cache_dir / "boxes.npy"), meta
    except (FileNotFoundError, ValueError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", required=True)
    ap.add_argument("--cache", default="var/cache/analysis/ham")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--mode", choices=("frames", "distant"), default="frames")
    ap.add_argument("--mid", action="store_true", help="add the 14x14 mid-level features to an old cache")
    args = ap.parse_args()
    if args.mid:
        build_mid_cache(args.data, args.cache)
    else:
        build_cache(args.data, args.cache, mode=args.mode, limit=args.limit)



def build_mid_cache(data_dir: str | Path, cache_dir: str | Path, batch: int = 64) -> Path:
    """Add mid.npy (float16 N x 14 x 14 x 112) for the same items as maps.npy (same order)."""
    import keras

    cache_dir = Path(cache_dir)
    meta = json.loads((cache_dir / "meta.json").read_text())
    records = {r.image_id: r for r in read_records(data_dir)}
    trunk = build_trunk()
    mid_model = keras.Model(trunk.inputs, trunk.get_layer(MID_LAYER).output)
    n = len(meta["image_id"])
    mid = np.lib.format.open_memmap(cache_dir / "mid.tmp.npy", mode="w+", dtype=np.float16, shape=(n, 14, 14, 112))
    for start in tqdm(range(0, n, batch), desc="mid features", unit="batch"):
        frames = []
        for k in range(start, min(n, start + batch)):
            rec = records[meta["image_id"][k]]
            with Image.open(rec.path) as im:
                img = im.convert("RGB")
            if meta["scale"][k] < 1.0:
                img, _ = degrade.zoom_out(img, rec.box, meta["scale"][k])
            frames.append(frame_input(img))
        mid[start:start + len(frames)] = np.asarray(mid_model(np.stack(frames), training=False), np.float16)
    mid.flush()
    del mid
    (cache_dir / "mid.tmp.npy").replace(cache_dir / "mid.npy")
    return cache_dir


if __name__ == "__main__":
    main()
