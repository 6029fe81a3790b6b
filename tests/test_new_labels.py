"""Gathering training labels (``training.new_labels``) on a real localbase with the real clients.

Patients create their cases through the rules (``UserDatabase``/``UserStorage`` with their own
token, ``dermaloop.cases`` builders), dermatologists review them through the portal's own save
(``reviewer_portal.review.save``: claim, validation, the one multi-path write, the audit entry),
and dermatologists' roles live in Auth, where retraining looks them up. Then every way a review
can fail to be a label is tried: no consent, not marked usable, "other"/"ungradable", a label
outside the taxonomy, a reviewer whose role was withdrawn, disputed reviews, an erased case, a
missing or replaced photo, a case already labelled, a case the caller excludes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dermaloop import auth as dl_auth
from dermaloop import cases
from dermaloop.admin_app import get_app
from dermaloop.storage import admin_bucket
from dermaloop.taxonomy import load_taxonomy
from tests.labels_support import LABELS, World, make_world, photo
from training.new_labels import Gathered, GatherError, cached_image, dispute, gather_labels

# ---- the rule for disputed reviews, on its own ---------------------------------------------------------


def _entry(by: str, label: str, at: int) -> dict[str, Any]:
    return {"editorUid": by, "patientUid": "p", "at": at, "review": {"reviewerUid": by, "label": label, "at": at}}


def test_the_dispute_rule():
    current = {"reviewerUid": "a", "label": "nv"}
    everyone = lambda uid: True  # noqa: E731
    assert dispute(current, None, everyone) is None
    assert dispute(current, {"1": _entry("a", "mel", 1), "2": _entry("a", "nv", 2)}, everyone) is None  # own change
    assert dispute(current, {"1": _entry("b", "nv", 1), "2": _entry("a", "nv", 2)}, everyone) is None  # agreement
    why = dispute(current, {"1": _entry("b", "mel", 1), "2": _entry("a", "nv", 2)}, everyone)
    assert why is not None and why.startswith("disputed") and "b says 'mel'" in why and "'nv'" in why
    # b changed their mind later and now agrees: no dispute; b's earlier "ungradable" counts as dissent
    assert dispute(current, {"1": _entry("b", "mel", 1), "2": _entry("b", "nv", 3)}, everyone) is None
    assert dispute(current, {"1": _entry("b", "ungradable", 1)}, everyone) is not None
    # someone who is not a trusted reviewer now carries no opinion, and is asked only when they dissent
    asked: list[str] = []
    assert dispute(current, {"1": _entry("x", "mel", 1), "2": _entry("b", "nv", 2)},
                   lambda uid: asked.append(uid) or False) is None
    assert asked == ["x"]
    assert dispute(current, {"1": "junk", "2": {"review": "junk"}}, everyone) is None  # malformed entries


# ---- gathering against a real backend --------------------------------------------------------------------


@dataclass
class Scene:
    world: World
    ids: dict[str, str]  # scenario -> case id
    uids: dict[str, str]  # scenario -> patient uid
    cache: Path
    gathered: Gathered


@pytest.fixture(scope="module")
def scene(localbase, tmp_path_factory) -> Scene:
    w = make_world(localbase, "new-labels-tests")
    a, b, c = w.dermatologist("derm-a"), w.dermatologist("derm-b"), w.dermatologist("derm-c")
    assert len({a, b, c}) == 3
    ids: dict[str, str] = {}
    uids: dict[str, str] = {}

    def submit(name: str, seed: int, consent: bool = True, uid: str | None = None) -> tuple[str, str]:
        uid = w.patient(uid)
        ids[name], uids[name] = w.submit(uid, photo(seed), consent=consent), uid
        return uid, ids[name]

    w.review("derm-a", *submit("good", 1), "mel")
    w.review("derm-a", *submit("good-same-patient", 2, uid=uids["good"]), "nv")
    w.review("derm-b", *submit("no-consent", 3, consent=False), "mel", usable=False)  # the portal allows no other
    w.review("derm-a", *submit("not-usable", 4), "bcc", usable=False)
    w.review("derm-a", *submit("other", 5), "other", other_text="seborrhoeic wart")
    w.review("derm-a", *submit("ungradable", 6), "ungradable")
    submit("unreviewed", 7)
    # the reviewer changes their own mind: the latest label is the label
    w.review("derm-a", *submit("own-change", 8), "mel")
    w.review("derm-a", uids["own-change"], ids["own-change"], "bkl")
    # a second dermatologist overrides the first: disputed
    w.review("derm-a", *submit("disputed", 9), "mel")
    w.review("derm-b", uids["disputed"], ids["disputed"], "nv")
    # ...and settled: the first agrees with the second
    w.review("derm-a", *submit("settled", 10), "mel")
    w.review("derm-b", uids["settled"], ids["settled"], "nv")
    w.review("derm-a", uids["settled"], ids["settled"], "nv")
    # a reviewer whose role was withdrawn after reviewing
    w.review("derm-c", *submit("withdrawn", 11), "df")
    # a label outside the taxonomy (as older rules let in): written as admin
    uid, case_id = submit("outside", 12)
    w.ref(cases.case_path(uid, case_id)).update({
        "review": {**cases.review_record(a, "mel", "", "routine", taxonomy_labels=LABELS, at=1, training_use=True),
                   "label": "lentigo"}, "status": "reviewed"})
    # photos that went missing or were replaced in Storage after the review
    w.review("derm-a", *submit("missing-photo", 13), "nv")
    w.bucket.blob(cases.image_object(uids["missing-photo"], ids["missing-photo"])).delete()
    w.review("derm-a", *submit("tampered", 14), "nv")
    w.bucket.blob(cases.image_object(uids["tampered"], ids["tampered"])).upload_from_string(
        photo(99), content_type="image/jpeg")
    # erased: a whole patient (case gone, tombstone left), and a tombstone while the case is still
    # there (an erasure caught between its steps)
    uid, gone = submit("erased-patient", 15)
    w.review("derm-a", uid, gone, "mel")
    w.ref().update(cases.erasure_writes(uid, tombstones=[gone], history=[gone], now=1))
    w.review("derm-a", *submit("tombstoned", 16), "mel")
    w.ref(cases.erased_path(ids["tombstoned"])).set(cases.tombstone_record(2))
    # already taken into a dataset version; and one the caller leaves out
    w.review("derm-a", *submit("labelled", 17), "vasc")
    w.ref().update(cases.labelled_writes(uids["labelled"], ids["labelled"], "ds-000000000001", 3))
    w.review("derm-a", *submit("excluded", 18), "akiec")
    dl_auth.set_role(c, "patient", settings=w.settings)

    cache = tmp_path_factory.mktemp("label-cache")
    gathered = gather_labels(cache, app=w.app, bucket=w.bucket, exclude_case_ids=[ids["excluded"]], progress=False)
    return Scene(w, ids, uids, cache, gathered)


def test_consented_usable_agreed_labels_are_taken_with_their_photos(scene):
    taken = {im.case_id: im for im in scene.gathered.images}
    assert set(taken) == {scene.ids[n] for n in ("good", "good-same-patient", "own-change", "settled")}
    good = taken[scene.ids["good"]]
    a = scene.world.derms["derm-a"][0]
    assert (good.label, good.source, good.uid, good.reviewer) == ("mel", "case", scene.uids["good"], a)
    assert isinstance(good.reviewed_at, int) and good.reviewed_at > 1_600_000_000_000
    assert good.sha256 == hashlib.sha256(photo(1)).hexdigest()
    assert good.path == cached_image(scene.cache, good.sha256) and good.path.read_bytes() == photo(1)
    assert taken[scene.ids["own-change"]].label == "bkl"
    assert taken[scene.ids["settled"]].label == "nv"
    assert [im.case_id for im in scene.gathered.images] == sorted(taken)  # a stable order
    assert sorted(p.name for p in scene.cache.iterdir()) == sorted(im.sha256 for im in taken.values())


@pytest.mark.parametrize("name,reason", [
    ("no-consent", "no research consent"),
    ("not-usable", "did not mark the image usable"),
    ("other", "labelled 'other': not a class"),
    ("ungradable", "labelled 'ungradable': not a class"),
    ("disputed", "disputed: dermatologists disagree"),
    ("withdrawn", "does not hold the dermatologist role"),
    ("outside", "label 'lentigo' is not a class of taxonomy 'ham10000'"),
    ("missing-photo", "image missing in Storage"),
    ("tampered", "does not match the case's sha256"),
    ("tombstoned", "erased: its patient deleted their data"),
    ("labelled", "already taken into dataset version ds-000000000001"),
    ("excluded", "excluded by the caller"),
])
def test_each_unusable_case_is_skipped_with_its_reason(scene, name, reason):
    why = scene.gathered.reason(scene.ids[name])
    assert why is not None and reason in why, why


def test_unreviewed_and_erased_cases_are_neither_taken_nor_listed(scene):
    listed = {cid for cid, _ in scene.gathered.skipped} | {im.case_id for im in scene.gathered.images}
    assert scene.ids["unreviewed"] not in listed
    assert scene.ids["erased-patient"] not in listed
    assert scene.world.case(scene.uids["erased-patient"], scene.ids["erased-patient"]) is None
    disputed = scene.gathered.reason(scene.ids["disputed"])
    assert scene.world.derms["derm-b"][0] in disputed and "'mel'" in disputed and "'nv'" in disputed


def test_include_labelled_takes_earlier_labels_again_and_the_cache_is_reused(scene, tmp_path):
    w = scene.world
    before = {p.name: p.stat().st_mtime_ns for p in scene.cache.iterdir()}
    (scene.cache / ".deadbeef.1234.partial").write_bytes(b"half a photo")  # a crashed download's leftover
    again = gather_labels(scene.cache, app=w.app, bucket=w.bucket, include_labelled=True, progress=False)
    taken = {im.case_id for im in again.images}
    assert scene.ids["labelled"] in taken and scene.ids["excluded"] in taken
    assert {p.name: p.stat().st_mtime_ns for p in scene.cache.iterdir() if p.name in before} == before
    assert not list(scene.cache.glob(".*.partial"))

    # A damaged cache file is never used: it is replaced by the checked download.
    good = next(im for im in again.images if im.case_id == scene.ids["good"])
    good.path.write_bytes(b"corrupted")
    third = gather_labels(scene.cache, app=w.app, bucket=w.bucket, progress=False)
    assert scene.ids["good"] in {im.case_id for im in third.images}
    assert hashlib.sha256(good.path.read_bytes()).hexdigest() == good.sha256

    # A photo replaced in Storage after it was cached is still caught (the cache is not trusted blindly).
    w.bucket.blob(cases.image_object(scene.uids["good"], scene.ids["good"])).upload_from_string(
        photo(98), content_type="image/jpeg")
    fourth = gather_labels(scene.cache, app=w.app, bucket=w.bucket, progress=False)
    assert "does not match" in (fourth.reason(scene.ids["good"]) or "")
    assert good.path.read_bytes() == photo(1)  # the cached original is kept, not overwritten
    w.bucket.blob(cases.image_object(scene.uids["good"], scene.ids["good"])).upload_from_string(
        photo(1), content_type="image/jpeg")


def test_a_taxonomy_without_the_label_skips_it(scene, tmp_path):
    w = scene.world
    mobile = load_taxonomy("mobile6")
    result = gather_labels(tmp_path, app=w.app, bucket=w.bucket, taxonomy=mobile, progress=False)
    for im in result.images:
        assert im.label in mobile.ids
    missing = [n for n in ("good", "good-same-patient", "own-change", "settled")
               if (scene.world.case(scene.uids[n], scene.ids[n])["review"]["label"] not in mobile.ids)]
    assert missing  # mel, nv and bkl are no classes of mobile6
    for name in missing:
        assert f"is not a class of taxonomy {mobile.name!r}" in result.reason(scene.ids[name])


def test_an_unreachable_database_is_a_clear_error_and_nothing_is_cached(localbase, tmp_path):
    import socket
    from dataclasses import replace as dc_replace

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = dc_replace(localbase.settings(database_url="https://nowhere-default-rtdb.firebaseio.com"),
                          database_emulator_host=f"127.0.0.1:{port}")
    with pytest.raises(GatherError, match="cannot read the cases"):
        gather_labels(tmp_path / "cache", app=get_app(settings), bucket=admin_bucket(settings), progress=False)
    assert list((tmp_path / "cache").iterdir()) == []
