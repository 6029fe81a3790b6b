"""Dataset versions: frozen, content-addressed manifests of every image a model is trained on.

A manifest (JSON, canonical encoding) lists every image with its sha256, label, source and split:
base-dataset images by their id and path inside the base dataset, case images by case id, patient
uid, reviewer and review time. It names the base dataset (folder name, layout, sha256 of its
metadata file and of its image list), the taxonomy and the parent version. The version name is
``"ds-"`` + the first 12 hex digits of the manifest's sha256, so the same content always gives the
same version and a version can never name other content.

Splits, and why:

* ``benchmark``: base images never trained on, in every version alike, so a new model and the
  current one are compared on the same images. It is the validation part of
  ``training.datasets.grouped_split`` with the training pipeline's defaults (20 %, lesion-grouped,
  stratified, seed 0), i.e. the images a model trained by ``dermaloop train`` on the same base never
  saw; with a parent manifest the parent's assignment is reused as is (and the base must be the
  same). ``calib`` is that split's calibration part, ``train`` the rest.
* ``new_holdout``: about ``holdout_fraction`` of the case labels, never trained on, to check the
  new model on the kind of photos patients send. Drawn per group, a group being a patient (their
  photos may show one lesion; ``sameLesionAs`` links stay within a patient) joined with every
  patient who sent a byte-identical photo, from sha256 of the uid (so the draw never changes); a
  case in the parent manifest keeps its side in every later version. A photo identical to a
  benchmark image is never trained on: it, and its group's new cases, go to ``new_holdout``.

Storage and database (admin only; docs/ARCHITECTURE.md):

    Storage datasets/{version}/manifest.json   the manifest's exact bytes (never overwritten)
    RTDB    /datasets/versions/{version}       {storagePath, manifestSha256, bytes, createdAt,
                                                createdBy, parent, taxonomy, base, counts}

Publishing writes the manifest first and the record only then (a record never points at a missing
manifest); both are create-only, so publishing twice is harmless and other content under a name
is refused. Cases taken into a published version move to ``labelled`` with ``training``
(:func:`mark_cases_labelled`), each by a transaction on the case so that a case erased or
re-reviewed meanwhile is never written over or recreated.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from dermaloop import cases
from dermaloop.admin_handles import acting_user, app_or_default, bucket_or_default, reference, server_handles
from dermaloop.model_dir import sha256_file
from dermaloop.settings import Settings
from dermaloop.taxonomy import DEFAULT_TAXONOMY, Taxonomy, load_taxonomy
from training.datasets import Dataset, Sample, grouped_split, open_dataset
from training.new_labels import ImageRefused, LabelledImage, cached_image, fetch_photo

__all__ = ["FORMAT", "SPLITS", "EVAL_SPLITS", "DatasetError", "DatasetConflict", "ManifestImage", "DatasetRow",
           "Manifest", "Marked", "build_manifest", "publish_dataset", "load_manifest", "mark_cases_labelled",
           "dataset_record", "fetch_case_images", "benchmark_trained_on"]

FORMAT = 1
SPLITS = ("train", "calib", "benchmark", "new_holdout")
EVAL_SPLITS = ("benchmark", "new_holdout")  # never trained on (nor tuned on)
VERSION = re.compile(r"^ds-[0-9a-f]{12}$")
BENCHMARK = {"valFraction": 0.2, "calibFraction": 0.1, "seed": 0}  # training.pipeline.TrainOptions' defaults
HOLDOUT_FRACTION = 0.2
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class DatasetError(RuntimeError):
    """A manifest cannot be built, published, loaded or used (the message says why)."""


class DatasetConflict(DatasetError):
    """Storage or the database already holds other content under a version's name."""


# ---- the manifest ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestImage:
    """One image of a manifest. Base images carry ``image_id`` and ``path`` (relative to the base
    dataset's folder); case images ``case_id``, ``uid``, ``reviewer`` and ``reviewed_at``."""

    sha256: str
    label: str
    source: str  # "base" | "case"
    split: str  # one of SPLITS
    group: str  # images of one group never straddle splits: the lesion (base) or the patient (case)
    image_id: str | None = None
    path: str | None = None
    case_id: str | None = None
    uid: str | None = None
    reviewer: str | None = None
    reviewed_at: int | None = None

    def to_json(self) -> dict[str, Any]:
        fields = {"sha256": self.sha256, "label": self.label, "source": self.source, "split": self.split,
                  "group": self.group, "imageId": self.image_id, "path": self.path, "caseId": self.case_id,
                  "uid": self.uid, "reviewer": self.reviewer, "reviewedAt": self.reviewed_at}
        return {k: v for k, v in fields.items() if v is not None}

    @classmethod
    def from_json(cls, item: Any, labels: set[str]) -> ManifestImage:
        if not isinstance(item, Mapping):
            raise DatasetError(f"malformed manifest entry {item!r}")
        try:
            image = cls(item["sha256"], item["label"], item["source"], item["split"], item["group"],
                        item.get("imageId"), item.get("path"), item.get("caseId"), item.get("uid"),
                        item.get("reviewer"), item.get("reviewedAt"))
        except KeyError as exc:
            raise DatasetError(f"manifest entry without {exc}: {dict(item)!r}") from None
        problem = (None if isinstance(image.sha256, str) and _SHA256.match(image.sha256) else "sha256")
        problem = problem or (None if image.label in labels else "label")
        problem = problem or (None if image.split in SPLITS else "split")
        problem = problem or (None if isinstance(image.group, str) and image.group else "group")
        if image.source == "base":
            problem = problem or (None if isinstance(image.image_id, str) and image.image_id else "imageId")
            problem = problem or (None if _safe_relpath(image.path) else "path")
        elif image.source == "case":
            problem = problem or (None if isinstance(image.case_id, str) and image.case_id else "caseId")
            problem = problem or (None if isinstance(image.uid, str) and image.uid else "uid")
            problem = problem or (None if image.split in ("train", "new_holdout") else "split")
            problem = problem or (None if image.reviewer is None or isinstance(image.reviewer, str) else "reviewer")
            problem = problem or (None if image.reviewed_at is None or type(image.reviewed_at) is int else "reviewedAt")
        else:
            problem = problem or "source"
        if problem:
            raise DatasetError(f"manifest entry with a bad {problem}: {dict(item)!r}")
        return image


def _safe_relpath(path: Any) -> bool:
    """Whether a manifest's base path stays inside the base folder it is resolved against."""
    if not isinstance(path, str) or not path or "\\" in path or "\x00" in path or path.startswith("/"):
        return False
    parts = PurePosixPath(path).parts
    return all(p not in ("", ".", "..") for p in parts) and "/".join(parts) == path


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


@dataclass(frozen=True)
class DatasetRow:
    """One image ready to train or evaluate on: a local file, its class id and split."""

    id: str
    path: Path
    label: str
    split: str
    group: str
    source: str
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A dataset version's manifest: its exact bytes (hashed for the version name) and views on them.
    Build one with :func:`build_manifest`, read one with :meth:`from_bytes` or :func:`load_manifest`."""

    raw: bytes

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Manifest:
        try:
            raw = _canonical(data)
        except (TypeError, ValueError) as exc:  # NaN, infinity, or no JSON type at all
            raise DatasetError(f"the manifest holds a value JSON cannot: {exc}") from None
        return cls.from_bytes(raw)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        """Parse and check a manifest; refuses anything but the canonical encoding of a valid one
        (so that its sha256, and the version name, are a function of its content)."""
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DatasetError(f"the manifest is not JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DatasetError(f"not a dataset manifest of format {FORMAT}")
        try:
            canonical = _canonical(data)
        except ValueError as exc:  # NaN or infinity: not JSON a manifest may hold
            raise DatasetError(f"the manifest holds a value JSON cannot: {exc}") from None
        if canonical != raw:
            raise DatasetError("the manifest is not in its canonical encoding (edited by hand?)")
        manifest = cls(raw)
        manifest.images  # noqa: B018 - validates every entry now, not at first use
        return manifest

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    @cached_property
    def version(self) -> str:
        return f"ds-{self.sha256[:12]}"

    @cached_property
    def _parsed(self) -> dict[str, Any]:
        return json.loads(self.raw)

    @property
    def data(self) -> dict[str, Any]:
        """A copy of the parsed manifest (the manifest itself never changes)."""
        return copy.deepcopy(self._parsed)

    @cached_property
    def labels(self) -> tuple[str, ...]:
        labels = (self._parsed.get("taxonomy") or {}).get("labels")
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise DatasetError("the manifest names no taxonomy labels")
        return tuple(labels)

    @property
    def taxonomy_name(self) -> str:
        return str((self._parsed.get("taxonomy") or {}).get("name") or "")

    @property
    def parent(self) -> str | None:
        return self._parsed.get("parent")

    @property
    def base(self) -> dict[str, Any] | None:
        base = self._parsed.get("base")
        return copy.deepcopy(base) if isinstance(base, dict) else None

    @cached_property
    def images(self) -> tuple[ManifestImage, ...]:
        raw = self._parsed.get("images")
        if not isinstance(raw, list):
            raise DatasetError("the manifest lists no images")
        labels = set(self.labels)
        images = tuple(ManifestImage.from_json(item, labels) for item in raw)
        for key, name in ((lambda i: i.image_id, "base image"), (lambda i: i.case_id, "case")):
            ids = [key(i) for i in images if key(i) is not None]
            if len(ids) != len(set(ids)):
                raise DatasetError(f"the manifest lists a {name} twice")
        if any(i.source == "base" for i in images) and not isinstance(self.base, dict):
            raise DatasetError("the manifest lists base images but names no base dataset")
        return images

    def case_images(self) -> list[ManifestImage]:
        return [i for i in self.images if i.source == "case"]

    def counts(self) -> dict[str, Any]:
        """Images per source, per split and per label and source (what the version record shows)."""
        by_label: dict[str, dict[str, int]] = {}
        for image in self.images:
            by_label.setdefault(image.label, {}).setdefault(image.source, 0)
            by_label[image.label][image.source] += 1
        return {"images": len(self.images),
                "bySource": dict(sorted(Counter(i.source for i in self.images).items())),
                "bySplit": dict(sorted(Counter(i.split for i in self.images).items())),
                "byLabel": dict(sorted(by_label.items()))}

    # ---- as training data ----------------------------------------------------------------------
    def rows(self, base: str | Path | None, cache_dir: str | Path | None, *, verify: bool = True) -> list[DatasetRow]:
        """Every image as a local file: base images under ``base`` (the same base dataset: its
        metadata file's sha256 is checked), case images in ``cache_dir`` (where
        ``gather_labels`` or :func:`fetch_case_images` put them). ``verify`` re-hashes every file.
        Raises :class:`DatasetError` naming what is missing or different."""
        root = _check_base(self.base, base) if any(i.source == "base" for i in self.images) else None
        if cache_dir is None and any(i.source == "case" for i in self.images):
            raise DatasetError(f"dataset {self.version} has case images: give the cache directory holding them")
        rows, missing, wrong = [], [], []
        for image in self.images:
            if image.source == "base":
                path, row_id = root / image.path, image.image_id
            else:
                path, row_id = cached_image(cache_dir, image.sha256), f"case-{image.case_id}"
            if not path.is_file():
                missing.append(str(path))
            elif verify and sha256_file(path) != image.sha256:
                wrong.append(str(path))
            rows.append(DatasetRow(row_id, path, image.label, image.split, image.group, image.source, image.sha256))
        if missing or wrong:
            parts = ([f"{len(missing)} missing (e.g. {', '.join(missing[:3])})"] if missing else []) + (
                [f"{len(wrong)} not matching their sha256 (e.g. {', '.join(wrong[:3])})"] if wrong else [])
            raise DatasetError(f"dataset {self.version}: images " + "; ".join(parts)
                               + ". Case photos come back with fetch_case_images (unless their patient erased them).")
        return rows

    def to_dataset(self, base: str | Path | None, cache_dir: str | Path | None, taxonomy: Taxonomy | None = None,
                   *, verify: bool = True) -> tuple[Dataset, dict[str, np.ndarray]]:
        """A ``training.datasets.Dataset`` of every image and the indices of each split
        (``train``, ``calib``, ``benchmark``, ``new_holdout``; sorted, possibly empty), ready for
        the training pipeline's code (``grouped_split``'s shape, with the benchmark for ``val``)."""
        taxonomy = taxonomy or load_taxonomy(self.taxonomy_name)
        if tuple(taxonomy.ids) != self.labels:
            raise DatasetError(f"taxonomy {taxonomy.name!r} has classes {taxonomy.ids}, the dataset {list(self.labels)}")
        rows = self.rows(base, cache_dir, verify=verify)
        samples = [Sample(r.id, r.path, taxonomy.index(r.label), r.group) for r in rows]
        ds = Dataset(samples, taxonomy, f"dataset version {self.version}", "dataset_version")
        split = {name: np.array([i for i, r in enumerate(rows) if r.split == name], dtype=np.int64)
                 for name in SPLITS}
        return ds, split


def _check_base(identity: Mapping[str, Any] | None, base: str | Path | None) -> Path:
    if base is None:
        raise DatasetError(f"this dataset version is built on the base dataset {identity.get('name')!r}: "
                           "give its folder")
    base = Path(base)
    root = base if base.is_dir() else base.parent
    meta = identity.get("metadataFile")
    if meta:
        if not _safe_relpath(meta) or not (root / meta).is_file():
            raise DatasetError(f"{root} has no {meta}: not the base dataset {identity.get('name')!r}")
        if sha256_file(root / meta) != identity.get("metadataSha256"):
            raise DatasetError(f"{root / meta} differs from the one the dataset version was built from: "
                               "another version of the base dataset")
    return root


# ---- building ----------------------------------------------------------------------------------------


def _metadata_file(path: Path, layout: str) -> Path | None:
    if layout == "ham10000":
        return path / "metadata.csv"
    if layout == "isic2019":
        return path if path.is_file() else sorted(path.glob("*GroundTruth*.csv"))[0]
    return None


def _base_entries(base: Path, taxonomy: Taxonomy, parent: Manifest | None) -> tuple[dict[str, Any], list[ManifestImage]]:
    ds = open_dataset(base, taxonomy)
    root = base if base.is_dir() else base.parent
    meta = _metadata_file(base, ds.layout)
    entries = []
    for sample in ds.samples:
        entries.append(ManifestImage(sha256_file(sample.path), taxonomy.ids[sample.label], "base", "train",
                                     sample.group, image_id=sample.id,
                                     path=sample.path.relative_to(root).as_posix()))
    listing = hashlib.sha256("".join(f"{e.image_id}\t{e.label}\t{e.sha256}\n"
                                     for e in sorted(entries, key=lambda e: e.image_id)).encode()).hexdigest()
    identity = {"name": root.name, "layout": ds.layout, "images": len(entries), "imagesSha256": listing,
                "skipped": dict(sorted(ds.skipped.items())) or None}
    if meta is not None:
        identity.update(metadataFile=meta.relative_to(root).as_posix(), metadataSha256=sha256_file(meta))
    identity = {k: v for k, v in identity.items() if v is not None}

    if parent is not None and parent.base is not None:
        theirs = parent.base
        if (theirs.get("imagesSha256"), theirs.get("metadataSha256")) != (listing, identity.get("metadataSha256")):
            raise DatasetError(f"the base dataset at {base} differs from the one of parent {parent.version} "
                               f"({theirs.get('name')!r}): its benchmark would change, and the current model "
                               "may have trained on part of a new one. Use the same base, or start a new "
                               "line of versions without a parent on purpose")
        sides = {i.image_id: i.split for i in parent.images if i.source == "base"}
        return identity, [replace(e, split=sides[e.image_id]) for e in entries]
    try:
        split = grouped_split(ds, BENCHMARK["valFraction"], BENCHMARK["calibFraction"], BENCHMARK["seed"])
    except ValueError as exc:
        raise DatasetError(f"{base}: cannot carve a lesion-grouped benchmark: {exc}") from None
    sides = {}
    for name, part in (("calib", split["calib"]), ("benchmark", split["val"])):
        sides.update({ds.samples[i].id: name for i in part})
    return identity, [replace(e, split=sides.get(e.image_id, "train")) for e in entries]


def _holdout_draw(uid: str) -> float:
    """A patient's fixed draw in [0, 1): below the holdout fraction means new_holdout."""
    digest = hashlib.sha256(f"dermaloop-new-holdout:{uid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _case_entries(new: list[LabelledImage], taxonomy: Taxonomy, base: list[ManifestImage],
                  parent: Manifest | None, fraction: float) -> list[ManifestImage]:
    seen: set[str] = set()
    for image in new:
        problem = None
        if image.source != "case" or not image.case_id or not image.uid:
            problem = "is not a case image with a case id and a patient uid"
        elif image.label not in taxonomy.ids:
            problem = f"has label {image.label!r}, not a class of taxonomy {taxonomy.name!r}"
        elif not _SHA256.match(image.sha256 or ""):
            problem = "has no sha256"
        elif image.case_id in seen:
            problem = "is listed twice"
        if problem:
            raise DatasetError(f"case image {image.case_id or image.sha256!r} {problem}")
        seen.add(image.case_id)

    before = {i.case_id: i.split for i in parent.case_images()} if parent is not None else {}
    benchmark = {i.sha256 for i in base if i.split in EVAL_SPLITS}
    earlier = parent.case_images() if parent is not None else []
    trained_before = {i.sha256 for i in earlier if i.split == "train"}
    held_before = {i.sha256 for i in earlier if i.split != "train"}

    # Patients who share a photo byte for byte are one group: union-find over uids and photos.
    links: dict[str, str] = {}

    def find(node: str) -> str:
        while links.setdefault(node, node) != node:
            links[node] = links[links[node]]
            node = links[node]
        return node

    for image in new:
        links[find(f"uid:{image.uid}")] = find(f"sha:{image.sha256}")
    groups: dict[str, list[LabelledImage]] = {}
    for image in new:
        groups.setdefault(find(f"uid:{image.uid}"), []).append(image)

    entries = []
    for members in groups.values():
        kept = {before[i.case_id] for i in members if i.case_id in before}
        if any(i.sha256 in benchmark for i in members) or "new_holdout" in kept:
            fresh = "new_holdout"
        elif kept:
            fresh = "train"
        else:
            fresh = "new_holdout" if any(_holdout_draw(i.uid) < fraction for i in members) else "train"
        name = f"patient:{min(i.uid for i in members)}"
        for i in members:
            if i.sha256 in benchmark:
                side = "new_holdout"  # training on it would be training on the benchmark
            elif i.case_id in before:
                side = before[i.case_id]  # a case keeps its side from version to version
            elif i.sha256 in trained_before or i.sha256 in held_before:
                side = "train" if i.sha256 in trained_before else "new_holdout"  # as its earlier copy
            else:
                side = fresh
            entries.append(ManifestImage(i.sha256, i.label, "case", side, name, case_id=i.case_id, uid=i.uid,
                                         reviewer=i.reviewer, reviewed_at=i.reviewed_at))
    return sorted(entries, key=lambda e: e.case_id)


def build_manifest(base: str | Path | None, new: list[LabelledImage], *, parent: str | Manifest | None,
                   taxonomy: Taxonomy | str | None = None, holdout_fraction: float | None = None) -> Manifest:
    """The manifest of the base dataset at ``base`` (any layout ``training.datasets`` reads; None for
    none) plus the case labels ``new``.

    ``new`` is every case label the version should hold: a new version is built from all labels
    still valid (``gather_labels(..., include_labelled=True)``), so a case erased since the parent
    drops out; the parent's cases are not copied. ``parent``: the version this one follows, by
    name or, better, as its loaded manifest, whose benchmark and case sides are then kept (its base
    must be the same). ``holdout_fraction`` defaults to the parent's, else 0.2. Hashes every base
    image; raises :class:`DatasetError` for bad input."""
    taxonomy = taxonomy if isinstance(taxonomy, Taxonomy) else load_taxonomy(taxonomy or DEFAULT_TAXONOMY)
    parent_manifest = parent if isinstance(parent, Manifest) else None
    parent_name = parent.version if isinstance(parent, Manifest) else parent
    if parent_name is not None and not VERSION.match(parent_name):
        raise DatasetError(f"{parent_name!r} is not a dataset version name (ds- and 12 hex digits)")
    if parent_manifest is not None:
        if parent_manifest.labels != tuple(taxonomy.ids):
            raise DatasetError(f"parent {parent_name} uses other classes ({list(parent_manifest.labels)})")
        if parent_manifest.base is not None and base is None:
            raise DatasetError(f"parent {parent_name} is built on the base dataset "
                               f"{parent_manifest.base.get('name')!r}: give it (its benchmark must stay)")
    if holdout_fraction is None:
        holdout = ((parent_manifest._parsed.get("splits") or {}).get("newHoldout") or {}) if parent_manifest else {}
        holdout_fraction = float(holdout.get("fraction", HOLDOUT_FRACTION))
    if not 0.0 <= holdout_fraction < 1.0:
        raise DatasetError(f"holdout_fraction must be in [0, 1), not {holdout_fraction}")

    identity, base_images = (None, []) if base is None else _base_entries(Path(base), taxonomy, parent_manifest)
    case_images = _case_entries(list(new), taxonomy, base_images, parent_manifest, holdout_fraction)
    bench_ids = sorted(i.image_id for i in base_images if i.split == "benchmark")
    data = {
        "format": FORMAT,
        "taxonomy": {"name": taxonomy.name, "version": taxonomy.version, "labels": list(taxonomy.ids)},
        "parent": parent_name,
        "base": identity,
        "splits": {
            "benchmark": {**BENCHMARK, "images": len(bench_ids),
                          "idsSha256": hashlib.sha256("\n".join(bench_ids).encode()).hexdigest(),
                          "method": "validation part of training.datasets.grouped_split (lesion-grouped, "
                                    "stratified) of the base dataset; frozen from the parent version"},
            "newHoldout": {"fraction": holdout_fraction,
                           "method": "per patient: sha256('dermaloop-new-holdout:' + uid) below the fraction; "
                                     "kept from the parent; photos identical to a benchmark image held out"},
        },
        "images": [i.to_json() for i in sorted(base_images, key=lambda i: i.image_id)] + [i.to_json() for i in case_images],
    }
    return Manifest.from_data(data)


def benchmark_trained_on(manifest: Manifest, model_dir: str | Path) -> list[str]:
    """Benchmark image ids that the model in ``model_dir`` trained or calibrated on, by its
    ``split.json`` (the training pipeline writes the ids of each part). Empty when it never saw
    the benchmark, which a fair comparison on it requires. A model directory without split.json
    raises :class:`DatasetError`: what it saw is unknown."""
    split_file = Path(model_dir) / "split.json"
    if not split_file.is_file():
        raise DatasetError(f"{model_dir} has no split.json: which images it trained on is unknown")
    seen = json.loads(split_file.read_text())
    used = {str(x) for part in ("train", "calib") for x in (seen.get(part) or [])}
    return sorted(i.image_id for i in manifest.images if i.split == "benchmark" and i.image_id in used)


# ---- Storage and the database ------------------------------------------------------------------------


def _check_version(version: Any) -> str:
    if not isinstance(version, str) or not VERSION.match(version):
        raise DatasetError(f"{version!r} is not a dataset version name (ds- and 12 hex digits)")
    return version


def dataset_record(version: str, *, app: Any = None, settings: Settings | None = None) -> dict[str, Any] | None:
    """The record ``/datasets/versions/{version}``, or None when that version was never published."""
    record = reference(cases.dataset_version_path(_check_version(version)), app_or_default(app, settings)).get()
    return record if isinstance(record, dict) else None


class _Exists(Exception):
    pass


def publish_dataset(manifest: Manifest, *, app: Any = None, bucket: Any = None, settings: Settings | None = None,
                    created_by: str | None = None) -> str:
    """Store the manifest at ``datasets/{version}/manifest.json`` and create its record; returns the
    version. Idempotent: publishing the same manifest again changes nothing. Never overwrites:
    other bytes already under that name, or a record naming another sha256, raise
    :class:`DatasetConflict` and leave everything as it was."""
    from google.api_core import exceptions as gexc

    version = manifest.version
    app, bucket = server_handles(app, bucket, settings)
    path = cases.dataset_manifest_object(version)
    blob = bucket.blob(path)
    blob.metadata = {"sha256": manifest.sha256}
    try:
        blob.upload_from_string(manifest.raw, content_type="application/json", if_generation_match=0)
    except gexc.PreconditionFailed:
        there = bucket.get_blob(path)
        same = there is not None and there.size == len(manifest.raw) and (
            (there.metadata or {}).get("sha256") == manifest.sha256
            or hashlib.sha256(there.download_as_bytes()).hexdigest() == manifest.sha256)
        if not same:
            raise DatasetConflict(f"{path} already exists in Storage with other content: it is not the "
                                  f"manifest of {version}. Nothing was changed; look at who wrote it") from None

    record = {"storagePath": path, "manifestSha256": manifest.sha256, "bytes": len(manifest.raw),
              "createdAt": int(time.time() * 1000), "createdBy": acting_user(created_by),
              "parent": manifest.parent, "taxonomy": manifest.taxonomy_name, "counts": manifest.counts()}
    if manifest.base is not None:
        record["base"] = {k: manifest.base[k] for k in ("name", "layout", "images", "imagesSha256", "metadataSha256")
                          if k in manifest.base}
    record = {k: v for k, v in record.items() if v is not None}

    def create(current: Any) -> Any:
        if isinstance(current, dict):
            if current.get("manifestSha256") == manifest.sha256:
                raise _Exists
            raise DatasetConflict(f"/datasets/versions/{version} already names another manifest "
                                  f"({current.get('manifestSha256')!r}); nothing was changed")
        return record

    with contextlib.suppress(_Exists):  # published before, with this very manifest
        reference(cases.dataset_version_path(version), app).transaction(create)
    return version


def load_manifest(version: str, *, app: Any = None, bucket: Any = None, settings: Settings | None = None) -> Manifest:
    """A published version's manifest, checked against its record's sha256 and its name."""
    version = _check_version(version)
    app, bucket = server_handles(app, bucket, settings)
    record = dataset_record(version, app=app)
    if record is None:
        raise DatasetError(f"unknown dataset version {version}: /datasets/versions/{version} does not exist")
    path = cases.dataset_manifest_object(version)
    if record.get("storagePath") != path:
        raise DatasetError(f"the record of {version} points at {record.get('storagePath')!r}, not {path}")
    blob = bucket.get_blob(path)
    if blob is None:
        raise DatasetError(f"the manifest of {version} is missing from Storage ({path})")
    raw = blob.download_as_bytes()
    if hashlib.sha256(raw).hexdigest() != record.get("manifestSha256"):
        raise DatasetError(f"the manifest of {version} in Storage does not match the sha256 in its record: "
                           "changed after publication; refusing it")
    manifest = Manifest.from_bytes(raw)
    if manifest.version != version:
        raise DatasetError(f"the manifest stored as {version} is {manifest.version}")
    return manifest


def fetch_case_images(manifest: Manifest, cache_dir: str | Path, *, bucket: Any = None,
                      settings: Settings | None = None) -> list[tuple[str, str]]:
    """Download into ``cache_dir`` the case photos of ``manifest`` that are not there (another
    machine, a cleared cache), each checked against its sha256; returns ``(case_id, reason)`` for
    those that cannot be had (erased by their patient, changed in Storage)."""
    bucket = bucket_or_default(bucket, settings)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    problems = []
    for image in manifest.case_images():
        if cached_image(cache_dir, image.sha256).is_file() and sha256_file(cached_image(cache_dir, image.sha256)) == image.sha256:
            continue
        try:
            fetch_photo(bucket, cases.image_object(image.uid, image.case_id), image.sha256, cache_dir)
        except ImageRefused as exc:
            problems.append((image.case_id, str(exc)))
    return problems


# ---- cases taken ---------------------------------------------------------------------------------------


@dataclass
class Marked:
    """What :func:`mark_cases_labelled` did, case by case."""

    labelled: list[str] = field(default_factory=list)  # moved to labelled by this call
    already: list[str] = field(default_factory=list)  # labelled before (this or an earlier version)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (case_id, why it was left as it is)


class _Leave(Exception):
    def __init__(self, why: str, already: bool = False) -> None:
        super().__init__(why)
        self.why, self.already = why, already


def mark_cases_labelled(manifest: Manifest, *, app: Any = None, settings: Settings | None = None,
                        now: int | None = None, case_ids: Iterable[str] | None = None) -> Marked:
    """Move every case of ``manifest`` (train and new_holdout: both are in the version, and their
    labels must not change any more) from ``reviewed`` to ``labelled`` with ``training: {usable,
    labelledAt, datasetVersion}``. The version must be published first.

    Each case is one transaction on the case record, which writes only if the case still exists,
    is still ``reviewed`` and still carries the very review the manifest took (same label, reviewer
    and time). So a case erased meanwhile (the erasure deletes it and leaves a tombstone in one
    write) is never recreated, and a review changed after the gathering stays a review, for the
    next version. A case labelled already keeps its first version. Safe to run again."""
    version = manifest.version
    app = app_or_default(app, settings)
    if dataset_record(version, app=app) is None:
        raise DatasetError(f"dataset version {version} is not published: publish it before marking its cases")
    now = int(time.time() * 1000) if now is None else int(now)
    wanted = None if case_ids is None else set(case_ids)
    tombstones = reference("erased", app).get()
    tombstones = tombstones if isinstance(tombstones, dict) else {}
    result = Marked()
    for image in manifest.case_images():
        if wanted is not None and image.case_id not in wanted:
            continue
        if image.case_id in tombstones:
            result.skipped.append((image.case_id, "erased: its patient deleted their data"))
            continue

        def move(case: Any, image: ManifestImage = image) -> Any:
            if not isinstance(case, dict) or "caseId" not in case:
                raise _Leave("gone: the case no longer exists (erased)")
            if case.get("status") == cases.Status.LABELLED:
                raise _Leave(f"labelled before, into {(case.get('training') or {}).get('datasetVersion')}", True)
            if case.get("status") != cases.Status.REVIEWED:
                raise _Leave(f"it is {case.get('status')}, not reviewed")
            review = case.get("review") if isinstance(case.get("review"), dict) else {}
            if (review.get("label"), review.get("reviewerUid"), review.get("at")) != (
                    image.label, image.reviewer, image.reviewed_at):
                raise _Leave("its review changed after the labels were gathered: it stays reviewed, for the next version")
            if (case.get("consent") or {}).get("research") is not True or review.get("trainingUse") is not True:
                raise _Leave("no longer usable for training (consent or the reviewer's mark)")
            return cases.labelled_case(case, version, now)

        try:
            reference(cases.case_path(image.uid, image.case_id), app).transaction(move)
        except _Leave as leave:
            (result.already.append(image.case_id) if leave.already
             else result.skipped.append((image.case_id, leave.why)))
        else:
            result.labelled.append(image.case_id)
    return result
