"""Gathering the dermatologists' labels that retraining may learn from, with their images.

A reviewed case becomes a training label only when every one of these holds, checked in this
order (the first that fails is the reason reported for the case):

1. its patient has not erased it (no tombstone ``/erased/{caseId}``);
2. it is ``reviewed``; a ``labelled`` case is already in an earlier dataset version and is reported
   as such unless ``include_labelled`` (rebuilding a version from every label still valid);
3. the caller did not exclude it;
4. its patient gave research consent (``consent.research``) and its reviewer marked the image
   usable for training (``review.trainingUse``);
5. the label is a class of the taxonomy: "other", "ungradable" and unknown labels are no classes;
6. ``dermaloop.cases.trusted_review`` accepts it: the reviewer holds the dermatologist (or admin)
   role *now*, looked up in Auth (a withdrawn role withdraws the label);
7. it is not disputed. Rule: every trusted dermatologist who ever saved a review of the case
   (``/reviewHistory/{caseId}`` plus the current review) must stand by the current label with their
   own latest review. A reviewer may change their own mind; if a second dermatologist's latest
   label differs, the case is disputed until one of them changes theirs. History entries of
   someone who is not a trusted reviewer now carry no opinion;
8. its photo is in Storage and its bytes match the sha256 of the case's image record (a photo
   replaced after the review is not the photo that was labelled).

Photos are downloaded into ``cache_dir`` under their sha256 (content-addressed), each through a
temporary file that is hashed and only then renamed into place, so the cache never holds a partial
or wrong file under a hash name. A cached photo is reused only while Storage still holds the same
bytes (size and MD5 from the object's metadata), so tampering after an earlier run is still seen.

Only admin access is used (firebase-admin for the database and Auth, google-cloud-storage for the
photos). Nothing is written: taking the labels into a dataset is ``training.dataset_versions``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermaloop import cases
from dermaloop.admin_handles import reference, server_handles
from dermaloop.settings import Settings
from dermaloop.taxonomy import DEFAULT_TAXONOMY, Taxonomy, load_taxonomy

__all__ = ["LabelledImage", "Gathered", "GatherError", "ImageRefused", "gather_labels", "fetch_photo", "cached_image",
           "dispute", "role_lookup"]

_SHA256_HEX = frozenset("0123456789abcdef")


class GatherError(RuntimeError):
    """The labels could not be gathered at all (the database or Storage unreachable, ...)."""


@dataclass(frozen=True)
class LabelledImage:
    """One image with a label retraining may learn from, and where the label came from."""

    sha256: str
    label: str
    source: str  # "base" (a base-dataset image) or "case" (a reviewed case)
    path: Path  # the local file
    case_id: str | None = None
    uid: str | None = None  # the patient's (groups a patient's photos: they may show one lesion)
    reviewer: str | None = None
    reviewed_at: int | None = None
    image_id: str | None = None  # base dataset id


@dataclass
class Gathered:
    """What :func:`gather_labels` found: the usable labels, and each reviewed case it left out with
    why, in plain words (cases not reviewed yet are not listed)."""

    images: list[LabelledImage]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (case_id, reason)

    def reason(self, case_id: str) -> str | None:
        """Why ``case_id`` was left out, or None if it was taken or never a candidate."""
        return next((why for cid, why in self.skipped if cid == case_id), None)


# ---- checks without I/O ------------------------------------------------------------------------------


def role_lookup(app: Any) -> Callable[[str], str | None]:
    """``role_of`` for ``cases.trusted_review``: the ``role`` claim of a user in Auth now (None for
    no claim or no such user), asked once per uid per gathering."""
    from firebase_admin import auth

    known: dict[str, str | None] = {}

    def role_of(uid: str) -> str | None:
        if uid not in known:
            try:
                role = (auth.get_user(uid, app=app).custom_claims or {}).get("role")
            except auth.UserNotFoundError:
                role = None
            known[uid] = role if isinstance(role, str) else None
        return known[uid]

    return role_of


def dispute(review: Mapping[str, Any], history: Any, trusted: Callable[[str], bool]) -> str | None:
    """Why the case is disputed (the rule in the module docstring), or None if it is not.

    ``history`` is the stored ``/reviewHistory/{caseId}`` (push id -> entry) or None; ``trusted(uid)``
    says whether a reviewer's opinion counts (asked only for reviewers who disagree)."""
    current_by, current_label = review.get("reviewerUid"), review.get("label")
    latest: dict[str, tuple[tuple[float, str], Any]] = {}
    for entry_id, entry in (history.items() if isinstance(history, Mapping) else ()):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("review"), Mapping):
            continue
        saved = entry["review"]
        by = saved.get("reviewerUid") or entry.get("editorUid")
        at = entry.get("at") if isinstance(entry.get("at"), int | float) else 0
        if isinstance(by, str) and by and (by not in latest or (at, str(entry_id)) > latest[by][0]):
            latest[by] = ((at, str(entry_id)), saved.get("label"))
    others = sorted((by, label) for by, (_, label) in latest.items()
                    if by != current_by and label != current_label and trusted(by))
    if not others:
        return None
    said = ", ".join(f"{by} says {label!r}" for by, label in others)
    return (f"disputed: dermatologists disagree ({said}; the current review by {current_by} says "
            f"{current_label!r}); a label needs them to agree, so one of them must change their review")


def _candidate_problem(case_id: str, case: Mapping[str, Any], *, tombstones: Mapping[str, Any],
                       include_labelled: bool, excluded: frozenset[str], classes: frozenset[str],
                       taxonomy: Taxonomy) -> str | None:
    """Checks 1-5 of the module docstring (no I/O)."""
    if case_id in tombstones:
        return "erased: its patient deleted their data"
    if case.get("status") == cases.Status.LABELLED:
        training = case.get("training") if isinstance(case.get("training"), Mapping) else {}
        if not include_labelled:
            return f"already taken into dataset version {training.get('datasetVersion') or '(unknown)'}"
    if case_id in excluded:
        return "excluded by the caller"
    consent = case.get("consent") if isinstance(case.get("consent"), Mapping) else {}
    if consent.get("research") is not True:
        return "no research consent: the patient did not agree to their photos being used for training"
    review = case.get("review") if isinstance(case.get("review"), Mapping) else {}
    if review.get("trainingUse") is not True:
        return "the reviewer did not mark the image usable for training"
    label = review.get("label")
    if label in cases.REVIEW_SPECIAL_LABELS:
        return f"labelled {label!r}: not a class a model can learn"
    if label not in classes:
        return f"label {label!r} is not a class of taxonomy {taxonomy.name!r}"
    return None


def _image_problem(image: Any) -> str | None:
    if not isinstance(image, Mapping):
        return "the case has no image record"
    sha = image.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64 or not set(sha) <= _SHA256_HEX:
        return "the case's image record has no valid sha256: its photo cannot be checked"
    return None


# ---- the photo cache -----------------------------------------------------------------------------------


def cached_image(cache_dir: str | Path, sha256: str) -> Path:
    """Where the photo with this sha256 lives in the cache (whether or not it is there yet)."""
    return Path(cache_dir) / sha256


def _digests(path: Path) -> tuple[str, str]:
    """(sha256 hex, MD5 base64 as Storage reports it) of a file, in one read."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), base64.b64encode(md5.digest()).decode()


class ImageRefused(Exception):
    """A case's photo cannot be used (missing, or not the bytes its record names); the message is
    the reason reported for the case."""


def fetch_photo(bucket: Any, object_path: str, sha256: str, cache_dir: Path) -> Path:
    """The photo ``object_path`` of a case in the cache, checked against ``sha256``; raises
    :class:`ImageRefused` when Storage does not hold exactly those bytes."""
    from google.api_core import exceptions as gexc

    blob = bucket.get_blob(object_path)
    if blob is None:
        raise ImageRefused(f"image missing in Storage ({object_path})")
    target = cached_image(cache_dir, sha256)
    if target.is_file():
        have_sha, have_md5 = _digests(target)
        if have_sha == sha256 and blob.size == target.stat().st_size and (blob.md5_hash in (None, have_md5)):
            return target
        if have_sha != sha256:  # a damaged cache entry: never used, replaced below
            target.unlink(missing_ok=True)
    tmp = cache_dir / f".{sha256}.{uuid.uuid4().hex[:8]}.partial"
    try:
        try:
            blob.download_to_filename(str(tmp))
        except gexc.NotFound:
            raise ImageRefused(f"image missing in Storage ({object_path})") from None
        got, _ = _digests(tmp)
        if got != sha256:
            raise ImageRefused(f"image in Storage does not match the case's sha256 (tampered or corrupt): "
                                f"expected {sha256[:12]}…, got {got[:12]}…")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _remove_leftovers(cache_dir: Path) -> None:
    for leftover in cache_dir.glob(".*.partial"):
        leftover.unlink(missing_ok=True)


# ---- gathering --------------------------------------------------------------------------------------


def _read(app: Any, path: str) -> Any:
    return reference(path, app).get()


def gather_labels(cache_dir: str | Path, *, app: Any = None, bucket: Any = None, settings: Settings | None = None,
                  taxonomy: Taxonomy | str | None = None, exclude_case_ids: Iterable[str] = (),
                  include_labelled: bool = False, progress: bool = True) -> Gathered:
    """Every reviewed case retraining may take as a label (the rules of the module docstring), with
    its photo downloaded into ``cache_dir`` and hash-checked.

    ``include_labelled``: also take cases already ``labelled`` by an earlier dataset version, still
    subject to every other check (a case erased since, or whose reviewer lost the role, drops out).
    A new dataset version is built from all of them; without it only the labels that arrived since
    are returned (how many are waiting). ``progress`` shows a tqdm bar for the downloads.
    Raises :class:`GatherError` when the database cannot be read or Storage fails (nothing is
    written, the cache stays consistent); a case whose photo is missing or not the bytes its record
    names is skipped with the reason, never fatal."""
    from tqdm import tqdm

    taxonomy = taxonomy if isinstance(taxonomy, Taxonomy) else load_taxonomy(taxonomy or DEFAULT_TAXONOMY)
    app, bucket = server_handles(app, bucket, settings)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(cache_dir)
    try:
        tree, tombstones, histories = (_read(app, "cases"), _read(app, "erased"), _read(app, "reviewHistory"))
    except Exception as exc:  # firebase-admin raises several kinds: say what could not be done
        raise GatherError(f"cannot read the cases from the database: {exc}") from exc
    tombstones = tombstones if isinstance(tombstones, Mapping) else {}
    histories = histories if isinstance(histories, Mapping) else {}
    excluded, classes = frozenset(exclude_case_ids), frozenset(taxonomy.ids)
    role_of = role_lookup(app)

    def trusted(uid: str) -> bool:
        return role_of(uid) in cases.TRUSTED_REVIEWER_ROLES

    skipped: list[tuple[str, str]] = []
    wanted: list[tuple[str, str, Mapping[str, Any], Mapping[str, Any]]] = []  # uid, caseId, case, review
    for uid, patient in sorted((tree or {}).items() if isinstance(tree, Mapping) else ()):
        if not isinstance(patient, Mapping):
            continue
        for case_id, case in sorted(patient.items()):
            if not isinstance(case, Mapping) or case.get("status") not in (cases.Status.REVIEWED, cases.Status.LABELLED):
                continue  # not reviewed yet: not a candidate, nothing to report
            problem = _candidate_problem(case_id, case, tombstones=tombstones, include_labelled=include_labelled,
                                         excluded=excluded, classes=classes, taxonomy=taxonomy)
            review = None
            if problem is None:
                review = cases.trusted_review(case, role_of, taxonomy_labels=taxonomy.ids)
                if review is None:
                    who = (case.get("review") or {}).get("reviewerUid")
                    problem = f"its reviewer {who} does not hold the dermatologist role now"
            if problem is None:
                problem = dispute(review, histories.get(case_id), trusted) or _image_problem(case.get("image"))
            if problem is not None:
                skipped.append((case_id, problem))
            else:
                wanted.append((uid, case_id, case, review))

    images: list[LabelledImage] = []
    with tqdm(total=len(wanted), desc="labelled photos", unit="img", disable=not progress) as bar:
        for uid, case_id, case, review in wanted:
            sha = case["image"]["sha256"]
            try:
                path = fetch_photo(bucket, cases.image_object(uid, case_id), sha, cache_dir)
            except ImageRefused as exc:
                skipped.append((case_id, str(exc)))
            except Exception as exc:  # Storage unreachable or refusing: stop, the cache stays consistent
                raise GatherError(f"cannot download the photo of case {case_id}: {exc}") from exc
            else:
                at = review.get("at")
                images.append(LabelledImage(sha, review["label"], "case", path, case_id=case_id, uid=uid,
                                            reviewer=review["reviewerUid"],
                                            reviewed_at=int(at) if isinstance(at, int | float) else None))
            bar.update(1)
    images.sort(key=lambda im: im.case_id or "")
    return Gathered(images, skipped)
