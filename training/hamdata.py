"""HAM10000 lesion boxes and a lesion-grouped split, for training and measuring the analysis models.

Several photos show the same lesion, so every split here is grouped by ``lesion_id``: a lesion is on
one side only, or validation figures leak. Users do not have this folder; callers pass its path.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BOX_COLUMNS = ("box_x0", "box_y0", "box_x1", "box_y1")


@dataclass(frozen=True)
class HamRecord:
    image_id: str
    lesion_id: str
    dx: str
    path: Path
    box: tuple[float, float, float, float]  # fractions of width/height


def read_records(data_dir: str | Path) -> list[HamRecord]:
    """Every image of a HAM10000-layout folder (metadata.csv + images/) that has a lesion box."""
    data_dir = Path(data_dir)
    meta = data_dir / "metadata.csv"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: expected the HAM10000 layout (metadata.csv, images/)")
    records = []
    with meta.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if not all(row.get(k) for k in BOX_COLUMNS):
                continue
            path = data_dir / "images" / f"{row['image_id']}.jpg"
            if not path.is_file():
                continue
            box = tuple(float(row[k]) for k in BOX_COLUMNS)
            records.append(HamRecord(row["image_id"], row["lesion_id"], row["dx"], path, box))  # type: ignore[arg-type]
    return records


def lesion_split(records: list[HamRecord], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices (train, val) grouped by lesion and stratified by diagnosis (StratifiedGroupKFold)."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, int(round(1.0 / val_fraction)))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    y = np.array([r.dx for r in records])
    groups = np.array([r.lesion_id for r in records])
    train, val = next(splitter.split(np.zeros(len(records)), y, groups))
    return sorted(train.tolist()), sorted(val.tolist())
