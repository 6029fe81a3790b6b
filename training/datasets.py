"""Dataset readers and lesion-grouped splits.

Every reader returns a ``Dataset``: a list of ``Sample`` (image path, class index in a taxonomy,
group id, optional lesion box) plus where it came from. Supported layouts:

* HAM10000: ``metadata.csv`` (image_id, lesion_id, dx[, box_x0..box_y1]) + ``images/<image_id>.jpg``
  (the synthetic generator writes this layout too);
* ISIC 2019: ``*GroundTruth*.csv`` (image + one-hot class columns), optional ``*Metadata*.csv`` with
  ``lesion_id``, images next to it or in ``ISIC_2019_Training_Input/``;
* folder per class: ``ROOT/<class id>/*.jpg``;
* the system's own reviewed cases (``read_reviewed_cases``), for retraining.

Splits group by lesion (several photos of one lesion never straddle train and validation, which
would inflate scores) and stratify by class.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dermaloop.taxonomy import Taxonomy

__all__ = ["Sample", "Dataset", "open_dataset", "read_ham10000", "read_isic2019", "read_folder",
           "read_reviewed_cases", "grouped_split", "detect_layout", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Same diagnosis under different names in different taxonomies.
_ALIASES = {"ak": ("akiec",), "akiec": ("ak",), "melanoma": ("mel",), "mel": ("melanoma",)}


@dataclass(frozen=True)
class Sample:
    id: str
    path: Path
    label: int
    group: str  # lesion id (or patient id): samples of one group stay on one side of a split
    box: tuple[float, float, float, float] | None = None  # lesion box, fractions of width/height


@dataclass
class Dataset:
    samples: list[Sample]
    taxonomy: Taxonomy
    source: str
    layout: str
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count, reported not hidden

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    @property
    def groups(self) -> np.ndarray:
        return np.array([s.group for s in self.samples])

    def subset(self, indices: Iterable[int]) -> Dataset:
        return Dataset([self.samples[i] for i in indices], self.taxonomy, self.source, self.layout, dict(self.skipped))

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.taxonomy.ids[s.label] for s in self.samples)
        return {c: counts.get(c, 0) for c in self.taxonomy.ids}

    def fingerprint(self) -> str:
        """Stable digest of ids, labels and groups: identifies exactly which data a model saw."""
        h = hashlib.sha256()
        for s in self.samples:
            h.update(f"{s.id}\t{s.label}\t{s.group}\n".encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "layout": self.layout, "images": len(self),
                "groups": len(set(self.groups.tolist())), "class_counts": self.class_counts(),
                "skipped": self.skipped, "fingerprint": self.fingerprint()}


def _label_index(taxonomy: Taxonomy, name: str) -> int | None:
    for candidate in (name, *_ALIASES.get(name.strip().lower(), ())):
        try:
            return taxonomy.index(candidate)
        except KeyError:
            continue
    return None


def _box(row: Mapping[str, str]) -> tuple[float, float, float, float] | None:
    try:
        box = tuple(float(row[k]) for k in ("box_x0", "box_y0", "box_x1", "box_y1"))
    except (KeyError, TypeError, ValueError):
        return None
    x0, y0, x1, y1 = box
    return box if 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0 else None  # type: ignore[return-value]


def read_ham10000(root: str | Path, taxonomy: Taxonomy) -> Dataset:
    root = Path(root)
    skipped: Counter[str] = Counter()
    samples = []
    with open(root / "metadata.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"image_id", "dx"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{root / 'metadata.csv'}: missing columns {sorted(missing)}")
        for row in reader:
            label = _label_index(taxonomy, row["dx"])
            if label is None:
                skipped[f"class {row['dx']!r} not in taxonomy"] += 1
                continue
            path = root / "images" / f"{row['image_id']}.jpg"
            if not path.is_file():
                skipped["image file missing"] += 1
                continue
            samples.append(Sample(row["image_id"], path, label, row.get("lesion_id") or row["image_id"], _box(row)))
    return Dataset(samples, taxonomy, str(root), "ham10000", dict(skipped))


def read_isic2019(csv_path: str | Path, taxonomy: Taxonomy) -> Dataset:
    csv_path = Path(csv_path)
    root = csv_path.parent
    image_dirs = [root, root / "ISIC_2019_Training_Input", root / "images"]
    lesions: dict[str, str] = {}
    for meta in root.glob("*Metadata*.csv"):
        with open(meta, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get("lesion_id"):
                    lesions[row["image"]] = row["lesion_id"]
    skipped: Counter[str] = Counter()
    samples = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "image" not in (reader.fieldnames or ()):
            raise ValueError(f"{csv_path}: expected an 'image' column and one column per class")
        class_columns = [c for c in reader.fieldnames or () if c != "image"]
        for row in reader:
            hot = [c for c in class_columns if float(row[c] or 0) >= 0.5]
            if len(hot) != 1:
                skipped["not exactly one class"] += 1
                continue
            label = _label_index(taxonomy, hot[0])
            if label is None:
                skipped[f"class {hot[0]!r} not in taxonomy"] += 1
                continue
            path = next((d / f"{row['image']}{s}" for d in image_dirs for s in (".jpg", ".png")
                         if (d / f"{row['image']}{s}").is_file()), None)
            if path is None:
                skipped["image file missing"] += 1
                continue
            samples.append(Sample(row["image"], path, label, lesions.get(row["image"], row["image"])))
    return Dataset(samples, taxonomy, str(csv_path), "isic2019", dict(skipped))


def read_folder(root: str | Path, taxonomy: Taxonomy) -> Dataset:
    """``ROOT/<class id>/<image>``; each image is its own group unless named ``<group>__<anything>``."""
    root = Path(root)
    skipped: Counter[str] = Counter()
    samples = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        label = _label_index(taxonomy, sub.name)
        files = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if label is None:
            skipped[f"folder {sub.name!r} not in taxonomy"] += len(files)
            continue
        for p in files:
            group = p.stem.split("__", 1)[0]
            samples.append(Sample(f"{sub.name}/{p.stem}", p, label, f"{sub.name}/{group}"))
    return Dataset(samples, taxonomy, str(root), "folder", dict(skipped))


def read_reviewed_cases(cases: Mapping[str, Mapping[str, Any]], image_dir: str | Path, taxonomy: Taxonomy,
                        require_consent: bool = True) -> Dataset:
    """Reviewed cases exported from RTDB (``/cases/{uid}/{caseId}`` records flattened to caseId -> record).

    Images are expected as ``image_dir/<caseId>.jpg`` (downloaded by the retraining job). Only cases
    with a dermatologist label in the taxonomy and, unless told otherwise, research consent are used;
    everything else is counted in ``skipped``. Groups are patients: a patient's photos may show the
    same lesion, so they never straddle a split.
    """
    image_dir = Path(image_dir)
    skipped: Counter[str] = Counter()
    samples = []
    for case_id, case in sorted(cases.items()):
        review = case.get("review") or {}
        if require_consent and not (case.get("consent") or {}).get("research"):
            skipped["no research consent"] += 1
            continue
        label = _label_index(taxonomy, str(review.get("label", ""))) if review.get("label") else None
        if label is None:
            skipped["no usable review label"] += 1
            continue
        path = image_dir / f"{case_id}.jpg"
        if not path.is_file():
            skipped["image file missing"] += 1
            continue
        box = case.get("device", {}).get("box") if isinstance(case.get("device"), dict) else None
        box_t = tuple(float(v) for v in box) if isinstance(box, list) and len(box) == 4 else None
        samples.append(Sample(case_id, path, label, str(case.get("patientUid", case_id)),
                              box_t if box_t and _box(dict(zip(("box_x0", "box_y0", "box_x1", "box_y1"),
                                                                 map(str, box_t), strict=True))) else None))
    return Dataset(samples, taxonomy, str(image_dir), "reviewed_cases", dict(skipped))


def detect_layout(root: str | Path) -> str:
    root = Path(root)
    if root.is_file() and root.suffix == ".csv":
        return "isic2019"
    if (root / "metadata.csv").is_file():
        return "ham10000"
    if any(root.glob("*GroundTruth*.csv")):
        return "isic2019"
    if (root / "cases.json").is_file():
        return "reviewed_cases"
    if root.is_dir() and any(p.is_dir() for p in root.iterdir()):
        return "folder"
    raise ValueError(f"{root}: not a dataset in a supported layout (HAM10000 metadata.csv, ISIC 2019 "
                     "GroundTruth CSV, folder per class, or an exported cases.json)")


def open_dataset(path: str | Path, taxonomy: Taxonomy, layout: str | None = None) -> Dataset:
    """Read a dataset in any supported layout (detected unless given)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"dataset path {path} does not exist")
    layout = layout or detect_layout(path)
    if layout == "ham10000":
        ds = read_ham10000(path, taxonomy)
    elif layout == "isic2019":
        csv_path = path if path.is_file() else sorted(path.glob("*GroundTruth*.csv"))[0]
        ds = read_isic2019(csv_path, taxonomy)
    elif layout == "folder":
        ds = read_folder(path, taxonomy)
    elif layout == "reviewed_cases":
        cases = json.loads((path / "cases.json").read_text())
        ds = read_reviewed_cases(cases, path / "images", taxonomy)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    if not ds.samples:
        raise ValueError(f"{path}: no usable images for taxonomy {taxonomy.name!r} (skipped: {ds.skipped})")
    return ds


def grouped_split(dataset: Dataset, val_fraction: float = 0.2, calib_fraction: float = 0.1,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Indices of train / calib / val parts, grouped by ``Sample.group`` and stratified by class.

    ``val`` is only ever used for the final report; ``calib`` (carved from the non-validation groups)
    fits temperature, threshold and early stopping, so nothing reported was tuned on itself.
    """
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    y, groups = dataset.labels, dataset.groups
    idx = np.arange(len(y))

    def carve(indices: np.ndarray, fraction: float, salt: int) -> tuple[np.ndarray, np.ndarray]:
        if fraction <= 0:
            return indices, indices[:0]
        n_splits = max(2, round(1.0 / fraction))
        if len(set(groups[indices].tolist())) < n_splits:
            raise ValueError(f"only {len(set(groups[indices].tolist()))} groups: too few to split off {fraction:.0%}")
        counts = np.bincount(y[indices])
        if counts[counts > 0].min() >= n_splits:
            splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed + salt)
            keep, held = next(splitter.split(indices, y[indices], groups[indices]))
        else:  # a class too rare to stratify (tiny datasets): still grouped, just not stratified
            splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed + salt)
            keep, held = next(splitter.split(indices, y[indices], groups[indices]))
        return indices[keep], indices[held]

    rest, val = carve(idx, val_fraction, 0)
    train, calib = carve(rest, calib_fraction / max(1e-9, 1.0 - val_fraction), 1)
    return {"train": np.sort(train), "calib": np.sort(calib), "val": np.sort(val)}
