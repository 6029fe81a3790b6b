"""Pack a trained model directory as the release model shipped in the repository (``models/release``).

A fresh clone must serve a model trained on real images (issue 19), and the repository must stay
small: the release keeps only what the runtimes load (the int8 device model, the cloud model and
their cards, labels, split and reports) and stores the cloud Keras weights as float16. Keras loads
float16 weights into its float32 variables, so the packed directory is an ordinary model directory:
``dermaloop evaluate --model models/release``, the worker, the app and the registry use it as is.
Rounding to float16 moves calibrated probabilities by at most about 6e-3 on random-pixel inputs (the
figure ``pack`` measures and records in the card); on HAM10000's validation split the packed release
scored balanced accuracy 0.6709 against 0.6711 for its float32 source (models/release/README.md).

    python -m training.release var/models/ham-release models/release
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from dermaloop.model_dir import CARD, CLOUD_KERAS, DEVICE_INT8, LABELS, sha256_file

KEPT = (CARD, LABELS, "split.json", DEVICE_INT8, CLOUD_KERAS)
KEPT_REPORTS = ("reports/device", "reports/cloud")


def keras_float16(src: Path, dst: Path) -> None:
    """Copy a ``.keras`` file with every float32 weight stored as float16 (the config is unchanged)."""
    import h5py

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith(".h5"):
                data = _h5_float16(h5py, data)
            info = zipfile.ZipInfo(item.filename, date_time=(2026, 1, 1, 0, 0, 0))  # reproducible bytes
            info.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(info, data)


def _h5_float16(h5py: Any, data: bytes) -> bytes:
    out = io.BytesIO()
    with h5py.File(io.BytesIO(data), "r") as fin, h5py.File(out, "w") as fout:
        for key, value in fin.attrs.items():
            fout.attrs[key] = value

        def copy(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                array = obj[()]
                fout.create_dataset(name, data=array.astype(np.float16) if array.dtype == np.float32 else array)
            else:
                fout.require_group(name)
            for key, value in obj.attrs.items():
                fout[name].attrs[key] = value

        fin.visititems(copy)
    return out.getvalue()


def _max_probability_change(original: Path, packed: Path, size: int, n: int = 16) -> float:
    """The largest change of any calibrated probability over ``n`` random images, original vs packed."""
    import keras

    x = np.random.default_rng(0).uniform(0, 255, (n, size, size, 3)).astype(np.float32)
    a = keras.models.load_model(original, compile=False, safe_mode=True).predict(x, verbose=0)
    b = keras.models.load_model(packed, compile=False, safe_mode=True).predict(x, verbose=0)
    return float(np.abs(a - b).max())


def pack(model_dir: Path, out: Path) -> dict[str, Any]:
    """Write the release directory ``out`` from ``model_dir``; returns what was measured."""
    model_dir, out = Path(model_dir), Path(out)
    card = json.loads((model_dir / CARD).read_text())
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for rel in KEPT:
        if rel in (CLOUD_KERAS, CARD) or not (model_dir / rel).is_file():
            continue
        (partial / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(model_dir / rel, partial / rel)
    for rel in KEPT_REPORTS:
        if (model_dir / rel).is_dir():
            shutil.copytree(model_dir / rel, partial / rel)
    (partial / CLOUD_KERAS).parent.mkdir(parents=True, exist_ok=True)
    keras_float16(model_dir / CLOUD_KERAS, partial / CLOUD_KERAS)
    change = _max_probability_change(model_dir / CLOUD_KERAS, partial / CLOUD_KERAS,
                                     int(card["cloud"]["preprocess"]["size"]))
    files = {rel: sha256_file(partial / rel) for rel in KEPT if rel != CARD and (partial / rel).is_file()}
    card["files"] = files
    card["file_bytes"] = {rel: (partial / rel).stat().st_size for rel in files}
    card["release"] = {
        "packed_from": str(model_dir),
        "left_out": "device/model_fp32.tflite and device/model.keras (reference copies for export and parity "
                    "checks; the runtimes load the int8 device model)",
        "cloud_weights": "float16 (loaded into float32 variables)",
        "max_probability_change_float16": round(change, 6),
    }
    (partial / CARD).write_text(json.dumps(card, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"version": card["version"], "bytes": total, "max_probability_change": change}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    result = pack(args.model_dir, args.out)
    print(f"release {result['version']}: {result['bytes'] / 1e6:.1f} MB in {args.out}; float16 cloud weights move "
          f"probabilities by at most {result['max_probability_change']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
