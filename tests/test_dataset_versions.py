"""Dataset versions (``training.dataset_versions``) on a real localbase with the real clients, over a
tiny synthetic base dataset: the manifest is content-addressed and deterministic, the benchmark is
lesion-grouped and frozen across versions, new labels are held out per patient, publishing is
create-only and idempotent, loading is hash-checked, and taking cases into a version moves them to
``labelled`` without recreating a case its patient erased meanwhile."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from dermaloop import cases
from dermaloop.database import new_push_id
from dermaloop.errors import PermissionDenied
from dermaloop.taxonomy import load_taxonomy
from reviewer_portal import review
from tests.labels_support import World, make_world, photo
from training.dataset_versions import (
    DatasetConflict,
    DatasetError,
    Manifest,
    _holdout_draw,
    benchmark_trained_on,
    build_manifest,
    dataset_record,
    fetch_case_images,
    load_manifest,
    mark_cases_labelled,
    publish_dataset,
)
from training.datasets import grouped_split, open_dataset
from training.new_labels import Gathered, gather_labels
from training.synthetic import generate


def patient_uid(world: World, held_out: bool) -> str:
    """A patient whose fixed draw puts their cases in new_holdout (or in train)."""
    for n in range(1000):
        uid = f"p-{world.tag}-{n}"
        if (_holdout_draw(uid) < 0.2) == held_out and uid not in world.patients:
            return world.patient(uid)
    raise AssertionError("no uid found")


@dataclass
class Scene:
    world: World
    base: Path
    cache: Path
    gathered: Gathered
    ids: dict[str, str]
    uids: dict[str, str]


@pytest.fixture(scope="module")
def scene(localbase, tmp_path_factory) -> Scene:
    w = make_world(localbase, "dataset-versions-tests")
    w.dermatologist("derm-a")
    base = generate(tmp_path_factory.mktemp("base") / "synthetic", per_class=6, size=(48, 36), seed=3)
    ids: dict[str, str] = {}
    uids: dict[str, str] = {}
    trainer, held, other = patient_uid(w, False), patient_uid(w, True), patient_uid(w, False)
    for name, uid, seed, label in (("t1", trainer, 1, "mel"), ("t2", trainer, 2, "nv"), ("h1", held, 3, "bcc"),
                                   ("h2", held, 4, "nv"), ("o1", other, 5, "bkl")):
        ids[name], uids[name] = w.submit(uid, photo(seed)), uid
        w.review("derm-a", uid, ids[name], label)
    # A patient photo identical to a benchmark image of the base: must never be trained on.
    first = build_manifest(base, [], parent=None)
    bench = next(i for i in first.images if i.split == "benchmark")
    ids["dup"], uids["dup"] = w.submit(other, (base / bench.path).read_bytes()), other
    w.review("derm-a", other, ids["dup"], bench.label)
    cache = tmp_path_factory.mktemp("cache")
    gathered = gather_labels(cache, app=w.app, bucket=w.bucket)  # with its progress bar, as maintainers see it
    assert {im.case_id for im in gathered.images} == set(ids.values()), gathered.skipped
    return Scene(w, base, cache, gathered, ids, uids)


def _split(manifest: Manifest) -> dict[str, str]:
    return {(i.image_id or i.case_id): i.split for i in manifest.images}


def test_the_manifest_is_deterministic_and_content_addressed(scene):
    m1 = build_manifest(scene.base, scene.gathered.images, parent=None)
    m2 = build_manifest(scene.base, list(reversed(scene.gathered.images)), parent=None)
    assert m1.raw == m2.raw and m1.version == m2.version
    assert m1.version == "ds-" + hashlib.sha256(m1.raw).hexdigest()[:12]
    fewer = build_manifest(scene.base, scene.gathered.images[1:], parent=None)
    assert fewer.version != m1.version
    relabelled = [replace(scene.gathered.images[0], label="df"), *scene.gathered.images[1:]]
    assert build_manifest(scene.base, relabelled, parent=None).version != m1.version
    assert Manifest.from_bytes(m1.raw).version == m1.version

    data = m1.data
    assert data["taxonomy"]["labels"] == load_taxonomy().ids and data["parent"] is None
    assert data["base"]["layout"] == "ham10000" and data["base"]["metadataFile"] == "metadata.csv"
    assert data["base"]["metadataSha256"] == hashlib.sha256((scene.base / "metadata.csv").read_bytes()).hexdigest()
    base_rows = [i for i in m1.images if i.source == "base"]
    assert len(base_rows) == len(open_dataset(scene.base, load_taxonomy()))
    for image in base_rows:
        assert image.sha256 == hashlib.sha256((scene.base / image.path).read_bytes()).hexdigest()
    a = scene.world.derms["derm-a"][0]
    for image in m1.case_images():
        assert (image.reviewer, image.uid) == (a, scene.uids[next(n for n, c in scene.ids.items() if c == image.case_id)])
        assert isinstance(image.reviewed_at, int)
    counts = m1.counts()
    assert counts["bySource"] == {"base": len(base_rows), "case": 6}
    assert sum(v.get("case", 0) for v in counts["byLabel"].values()) == 6

    # Anything but the canonical bytes of a valid manifest is refused.
    with pytest.raises(DatasetError, match="canonical"):
        Manifest.from_bytes(json.dumps(data, indent=1).encode())
    broken = dict(data, images=[{**data["images"][0], "label": "cancer"}])
    with pytest.raises(DatasetError, match="bad label"):
        Manifest.from_data(broken)
    escaping = dict(data, images=[{**data["images"][0], "path": "../../etc/passwd"}])
    with pytest.raises(DatasetError, match="bad path"):
        Manifest.from_data(escaping)
    with pytest.raises(DatasetError, match="not a class"):
        build_manifest(scene.base, [replace(scene.gathered.images[0], label="other")], parent=None)
    with pytest.raises(DatasetError, match="twice"):
        build_manifest(scene.base, [scene.gathered.images[0]] * 2, parent=None)


def test_the_benchmark_is_lesion_grouped_frozen_and_never_trained_on(scene, tmp_path):
    m1 = build_manifest(scene.base, scene.gathered.images, parent=None)
    ds = open_dataset(scene.base, load_taxonomy())
    expected = {ds.samples[i].id for i in grouped_split(ds)["val"]}  # what `dermaloop train` validates on
    bench = {i.image_id for i in m1.images if i.split == "benchmark"}
    assert bench == expected and len(bench) >= 5
    sides: dict[str, set[str]] = {}
    for image in m1.images:
        sides.setdefault(image.group, set()).add("eval" if image.split in ("benchmark", "new_holdout") else "fit")
    assert all(len(s) == 1 for s in sides.values()), "a lesion or patient straddles training and evaluation"

    # A child version keeps the parent's benchmark and case sides, whatever else changes.
    m2 = build_manifest(scene.base, scene.gathered.images[:-1], parent=m1)
    assert m2.parent == m1.version
    assert {k: v for k, v in _split(m2).items()} == {k: v for k, v in _split(m1).items() if k in _split(m2)}
    assert m2.data["splits"]["benchmark"]["idsSha256"] == m1.data["splits"]["benchmark"]["idsSha256"]
    # ...and is refused on another base (its benchmark would change) or without the base.
    other = tmp_path / "other"
    shutil.copytree(scene.base, other)
    (other / "images" / f"{ds.samples[0].id}.jpg").write_bytes(photo(50))  # one image replaced
    with pytest.raises(DatasetError, match="differs from the one of parent"):
        build_manifest(other, scene.gathered.images, parent=m1)
    with pytest.raises(DatasetError, match="give it"):
        build_manifest(None, scene.gathered.images, parent=m1)

    # A model whose split.json trained on a benchmark image is caught.
    model = tmp_path / "model"
    model.mkdir()
    trained = sorted(bench)[:2]
    (model / "split.json").write_text(json.dumps({"train": trained, "calib": [], "val": []}))
    assert benchmark_trained_on(m1, model) == trained
    (model / "split.json").write_text(json.dumps({"train": [i.id for i in ds.samples if i.id not in bench]}))
    assert benchmark_trained_on(m1, model) == []


def test_new_labels_are_held_out_per_patient_and_benchmark_copies_never_trained(scene):
    m = build_manifest(scene.base, scene.gathered.images, parent=None)
    side = _split(m)
    assert side[scene.ids["t1"]] == side[scene.ids["t2"]] == "train"
    assert side[scene.ids["h1"]] == side[scene.ids["h2"]] == "new_holdout"
    # Same bytes as a benchmark image: held out, with the rest of that patient's new cases.
    assert side[scene.ids["dup"]] == side[scene.ids["o1"]] == "new_holdout"
    none = build_manifest(scene.base, scene.gathered.images, parent=None, holdout_fraction=0.0)
    assert {_split(none)[scene.ids[n]] for n in ("t1", "t2", "h1", "h2")} == {"train"}
    assert _split(none)[scene.ids["dup"]] == "new_holdout"


def test_rows_and_to_dataset_give_local_files_to_train_on(scene, tmp_path):
    m = build_manifest(scene.base, scene.gathered.images, parent=None)
    ds, split = m.to_dataset(scene.base, scene.cache)
    assert len(ds) == len(m.images)
    assert set(split) == {"train", "calib", "benchmark", "new_holdout"}
    assert sorted(np.concatenate(list(split.values())).tolist()) == list(range(len(ds)))
    rows = m.rows(scene.base, scene.cache)
    for row, sample in zip(rows, ds.samples, strict=True):
        assert row.path.is_file() and hashlib.sha256(row.path.read_bytes()).hexdigest() == row.sha256
        assert ds.taxonomy.ids[sample.label] == row.label
    case_rows = [r for r in rows if r.source == "case"]
    assert {r.id for r in case_rows} == {f"case-{c}" for c in scene.ids.values()}

    with pytest.raises(DatasetError, match="missing"):
        m.rows(scene.base, tmp_path / "empty-cache")
    with pytest.raises(DatasetError, match="give the cache"):
        m.rows(scene.base, None)
    changed = tmp_path / "changed"
    shutil.copytree(scene.base, changed)
    with open(changed / "metadata.csv", "a") as f:
        f.write("ISIC_extra,HAM_extra,nv\n")
    with pytest.raises(DatasetError, match="another version of the base dataset"):
        m.rows(changed, scene.cache)
    # A file changed under the cache is caught by the hash check.
    copy = tmp_path / "cache-copy"
    shutil.copytree(scene.cache, copy)
    (copy / m.case_images()[0].sha256).write_bytes(b"not the photo")
    with pytest.raises(DatasetError, match="not matching their sha256"):
        m.rows(scene.base, copy)
    # Photos come back from Storage into an empty cache, hash-checked.
    fresh = tmp_path / "fresh-cache"
    assert fetch_case_images(m, fresh, bucket=scene.world.bucket) == []
    assert len(m.rows(scene.base, fresh)) == len(m.images)


def test_publish_is_idempotent_and_never_overwrites(scene):
    w = scene.world
    m = build_manifest(scene.base, scene.gathered.images, parent=None)
    assert dataset_record(m.version, app=w.app) is None
    version = publish_dataset(m, app=w.app, bucket=w.bucket, created_by="test")
    assert version == m.version
    record = dataset_record(version, app=w.app)
    assert record["manifestSha256"] == m.sha256 and record["bytes"] == len(m.raw)
    assert record["storagePath"] == f"datasets/{version}/manifest.json" and record["createdBy"] == "test"
    assert record["counts"] == m.counts() and record["taxonomy"] == "ham10000" and "parent" not in record
    assert record["base"]["metadataSha256"] == m.base["metadataSha256"]
    assert w.bucket.blob(record["storagePath"]).download_as_bytes() == m.raw
    assert publish_dataset(m, app=w.app, bucket=w.bucket, created_by="someone else") == version
    assert dataset_record(version, app=w.app) == record  # nothing changed, not even createdAt

    # Other bytes already under a new version's name: refused, nothing recorded, nothing replaced.
    child = build_manifest(scene.base, scene.gathered.images[:2], parent=m)
    squatter = b'{"not": "this manifest"}'
    w.bucket.blob(f"datasets/{child.version}/manifest.json").upload_from_string(squatter)
    with pytest.raises(DatasetConflict, match="other content"):
        publish_dataset(child, app=w.app, bucket=w.bucket)
    assert dataset_record(child.version, app=w.app) is None
    assert w.bucket.blob(f"datasets/{child.version}/manifest.json").download_as_bytes() == squatter
    # A record naming another manifest: refused and kept.
    other = build_manifest(scene.base, scene.gathered.images[:3], parent=m)
    w.ref(cases.dataset_version_path(other.version)).set({"manifestSha256": "0" * 64, "createdAt": 1})
    with pytest.raises(DatasetConflict, match="another manifest"):
        publish_dataset(other, app=w.app, bucket=w.bucket)
    assert dataset_record(other.version, app=w.app) == {"manifestSha256": "0" * 64, "createdAt": 1}


def test_load_manifest_is_hash_checked(scene):
    w = scene.world
    m = build_manifest(scene.base, scene.gathered.images[:4], parent=None)
    publish_dataset(m, app=w.app, bucket=w.bucket)
    loaded = load_manifest(m.version, app=w.app, bucket=w.bucket)
    assert loaded.raw == m.raw and loaded.images == m.images
    with pytest.raises(DatasetError, match="unknown dataset version"):
        load_manifest("ds-0123456789ab", app=w.app, bucket=w.bucket)
    with pytest.raises(DatasetError, match="not a dataset version name"):
        load_manifest("../models", app=w.app, bucket=w.bucket)
    # Changed in Storage after publication (by someone with admin access): refused.
    tampered = Manifest.from_data({**m.data, "parent": "ds-000000000000"}).raw
    w.bucket.blob(f"datasets/{m.version}/manifest.json").upload_from_string(tampered)
    with pytest.raises(DatasetError, match="does not match the sha256 in its record"):
        load_manifest(m.version, app=w.app, bucket=w.bucket)
    w.bucket.blob(f"datasets/{m.version}/manifest.json").delete()
    with pytest.raises(DatasetError, match="missing from Storage"):
        load_manifest(m.version, app=w.app, bucket=w.bucket)


def test_cases_taken_are_labelled_and_erased_ones_never_come_back(scene, tmp_path):
    w = scene.world
    # Own cases for this test (the scene's stay reviewed for the other tests).
    uid, held = patient_uid(w, False), patient_uid(w, True)
    mine = {n: w.submit(u, photo(s)) for n, u, s in (("a", uid, 60), ("b", uid, 61), ("c", held, 62),
                                                      ("erased", held, 63), ("changed", uid, 64))}
    owners = {"a": uid, "b": uid, "c": held, "erased": held, "changed": uid}
    for name, case_id in mine.items():
        w.review("derm-a", owners[name], case_id, "nv")
    gathered = gather_labels(tmp_path / "cache", app=w.app, bucket=w.bucket, progress=False)
    new = [im for im in gathered.images if im.case_id in mine.values()]
    assert len(new) == 5
    m = build_manifest(scene.base, new, parent=None)
    with pytest.raises(DatasetError, match="not published"):
        mark_cases_labelled(m, app=w.app)
    publish_dataset(m, app=w.app, bucket=w.bucket)

    # Between gathering and marking: the patient of "erased" deletes their data, and the review of
    # "changed" is changed by its dermatologist.
    w.ref().update(cases.erasure_writes(held, tombstones=[mine["c"], mine["erased"]], now=5))
    w.review("derm-a", uid, mine["changed"], "mel")
    result = mark_cases_labelled(m, app=w.app, now=1_700_000_000_123)
    assert sorted(result.labelled) == sorted([mine["a"], mine["b"]])
    skipped = dict(result.skipped)
    assert "erased" in skipped[mine["erased"]] and "erased" in skipped[mine["c"]]
    assert "review changed" in skipped[mine["changed"]]
    for name in ("a", "b"):
        case = w.case(uid, mine[name])
        assert case["status"] == "labelled"
        assert case["training"] == {"usable": True, "labelledAt": 1_700_000_000_123, "datasetVersion": m.version}
        assert case["review"]["label"] == "nv" and case["image"]["sha256"]  # the rest of the case kept
    assert w.case(held, mine["erased"]) is None and w.case(held, mine["c"]) is None  # never recreated
    assert w.ref(cases.patient_cases_path(held)).get() is None
    assert w.case(uid, mine["changed"])["status"] == "reviewed"

    # Again: nothing moves; the labelled ones keep their first version.
    again = mark_cases_labelled(m, app=w.app)
    assert again.labelled == [] and sorted(again.already) == sorted([mine["a"], mine["b"]])
    assert w.case(uid, mine["a"])["training"]["labelledAt"] == 1_700_000_000_123
    # A labelled case is a frozen label: the portal refuses a new review of it.
    me, database = w.derms["derm-a"]
    with pytest.raises(review.ReviewRefused, match="already a training label"):
        review.save(database, me, uid, mine["a"], review.ReviewForm("mel", "x", "routine", training_use=True),
                    load_taxonomy().ids)
    # ...and so do the rules, to a dermatologist writing around the portal.
    new_review = cases.review_record(me, "mel", "x", "routine", taxonomy_labels=load_taxonomy().ids, training_use=True)
    with pytest.raises(PermissionDenied):
        database.update("/", cases.reviewed_writes(uid, mine["a"], new_review, new_push_id(), in_queue=False))
    assert w.case(uid, mine["a"])["status"] == "labelled" and w.case(uid, mine["a"])["review"]["label"] == "nv"
    # The next gathering reports them as taken, and takes the changed review as a new label.
    later = gather_labels(tmp_path / "cache", app=w.app, bucket=w.bucket, progress=False)
    assert m.version in later.reason(mine["a"])
    assert next(im for im in later.images if im.case_id == mine["changed"]).label == "mel"


def test_the_case_builders_for_the_move_to_labelled():
    case = {"caseId": "c1", "patientUid": "u1", "status": "reviewed", "review": {"label": "nv"}}
    moved = cases.labelled_case(case, "ds-0123456789ab", 7)
    assert moved == {**case, "status": "labelled",
                     "training": {"usable": True, "labelledAt": 7, "datasetVersion": "ds-0123456789ab"}}
    assert case["status"] == "reviewed"  # the stored record is not changed in place
    for status in ("queued", "diagnosed", "failed", "labelled", None):
        with pytest.raises(cases.CaseError):
            cases.labelled_case({**case, "status": status}, "ds-0123456789ab", 7)
    assert cases.labelled_writes("u1", "c1", "ds-0123456789ab", 7) == {
        "cases/u1/c1/status": "labelled", "cases/u1/c1/training": cases.training_record("ds-0123456789ab", 7)}
    assert cases.dataset_version_path("ds-0123456789ab") == "datasets/versions/ds-0123456789ab"
    assert cases.dataset_manifest_object("ds-0123456789ab") == "datasets/ds-0123456789ab/manifest.json"
    with pytest.raises(cases.CaseError):
        cases.dataset_version_path("../x")
