"""First-run models: make sure a usable model directory exists before the system starts.

``dermaloop run`` calls ``ensure_starter_models``. With a dataset path (e.g. HAM10000) it trains the
fast path (frozen ImageNet backbones + linear heads on cached embeddings, minutes on 2 cores); with
none it trains on generated synthetic lesions, which makes the system runnable but is clinically
meaningless (the card says so). Existing starter models are reused: this is a no-op after the first run.

Both starter models use Lite0 by default: on HAM10000 its linear head scored as well as Lite2's
(docs/MODEL_REPORT.md) and its feature extraction is 2-3x faster, which keeps the first run within
the 10-minute budget. Fine-tuned models (``dermaloop train --epochs N``) replace the starters.
"""

from __future__ import annotations

import sys
from pathlib import Path

STARTER = "starter"
# Rough 2-core throughput (images/s) of feature extraction, measured on the development VM.
_RATE = {"lite0": 70.0, "lite2": 30.0, "tiny": 400.0}
_FIXED_SECONDS = 120  # head fitting, TFLite export and evaluation of the exported models


def _estimate_minutes(n_images: int, device: str, cloud: str) -> float:
    extraction = n_images / _RATE.get(device, 50.0)
    if cloud != device:  # the same backbone's features are extracted once and shared
        extraction += n_images / _RATE.get(cloud, 25.0)
    return (extraction + _FIXED_SECONDS + 0.2 * n_images / 25.0) / 60.0


RELEASE_DIR = Path(__file__).resolve().parents[1] / "models" / "release"


def install_release(models_dir: Path, release: Path | None = None) -> Path | None:
    """Copy the release model shipped in the repository (``models/release``) into ``models_dir``, so a
    fresh machine serves a model trained on real images rather than a synthetic starter. None when
    the repository has no release model (a trimmed checkout). Copied to a hidden folder first and
    renamed, so an interrupted copy is never mistaken for a model."""
    import shutil

    release = RELEASE_DIR if release is None else Path(release)
    if not (release / "card.json").is_file():
        return None
    target = Path(models_dir) / "release"
    if (target / "card.json").is_file():
        return target
    partial = Path(models_dir) / ".release.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(release, partial, ignore=shutil.ignore_patterns("README.md"))
    partial.rename(target)
    print(f"dermaloop: serving the release model shipped with DermaLoop ({release}/README.md)", file=sys.stderr,
          flush=True)
    return target


def ensure_starter_models(models_dir: Path, data_dir: Path | None = None, *, device_backbone: str = "lite0",
                          cloud_backbone: str = "lite0", cache_dir: Path | None = None,
                          synthetic_per_class: int = 40, progress: bool = True) -> Path:
    """Return the newest trained model directory under ``models_dir``; only where there is none,
    train ``models_dir/starter`` first.

    ``data_dir``: a dataset in a supported layout (HAM10000 recommended) or None for synthetic data.
    """
    from dermaloop.model_dir import newest_model_dir
    from dermaloop.taxonomy import load_taxonomy
    from training.datasets import open_dataset

    models_dir = Path(models_dir)
    target = models_dir / STARTER
    existing = newest_model_dir(models_dir)
    if existing is not None:  # a model trained with ``dermaloop train`` (or an earlier starter)
        return existing
    models_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else models_dir.parent / "cache" / "embeddings"
    synthetic = data_dir is None
    if synthetic:
        from training.synthetic import generate

        data_dir = generate(models_dir / "_synthetic_data", per_class=synthetic_per_class)
    n = len(open_dataset(data_dir, load_taxonomy()))
    minutes = _estimate_minutes(n, device_backbone, cloud_backbone)
    what = "SYNTHETIC images (not for clinical use)" if synthetic else f"images from {data_dir}"
    print(f"dermaloop: no models yet; training starter models on {n} {what}. "
          f"This happens once and takes about {max(1, round(minutes))} minutes on 2 CPU cores.",
          file=sys.stderr, flush=True)
    from training.pipeline import TrainOptions, train

    train(TrainOptions(data=Path(data_dir), out=target, device_backbone=device_backbone,
                       cloud_backbone=cloud_backbone, epochs=0, cache_dir=cache, progress=progress))
    if synthetic:
        import json

        card_path = target / "card.json"
        card = json.loads(card_path.read_text())
        card["warning"] = "Trained on synthetic images: runnable, but its outputs mean nothing clinically."
        card["demonstration"] = True  # dermaloop.model_dir.is_demonstration: no risk tier, say so
        card_path.write_text(json.dumps(card, indent=2))
    return target
