"""The case domain: one vocabulary for every program that touches a case.

A *case* is one photographed skin problem of one patient. The patient app, ``dermaloop submit``, the
cloud worker, the reviewer portal and retraining all read and write the same records, so their
shape lives here once: where each record is (RTDB and Storage paths), which statuses exist and which
moves between them are allowed, how each record is built, and which multi-path writes move a case
from one status to the next. docs/ARCHITECTURE.md draws the same model; database.rules.json enforces
it for end users.

Nothing here does I/O: builders return plain JSON-ready dicts (``SERVER_TIMESTAMP`` where a client
lets the server stamp the time), so a phone build, the worker (firebase-admin) and the tests can all
use them with their own transport.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

SERVER_TIMESTAMP: dict[str, str] = {".sv": "timestamp"}

# Limits the rules enforce (database.rules.json); checked here first so a caller gets a clear
# message instead of the server's bare "Permission denied".
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_SITE_CHARS = 100
MAX_NOTE_CHARS = 2000
MAX_MESSAGE_CHARS = 4000
MAX_RECOMMENDATION_CHARS = 4000
MAX_OTHER_TEXT_CHARS = 200  # the free-text diagnosis of a review labelled "other"
# How long a dermatologist's claim on a case holds without renewal (database.rules.json spells the
# same number: a claim whose server-stamped ``at`` is older than this may be taken by someone else).
CLAIM_TTL_MS = 15 * 60 * 1000
IMAGE_CONTENT_TYPES = ("image/jpeg", "image/png", "image/webp")


class CaseError(ValueError):
    """A record that would break the data model (too long, unknown label, forbidden move)."""


# ---- statuses and their life cycle --------------------------------------------------------------


class Status(StrEnum):
    CAPTURED = "captured"  # app's local store only
    DIAGNOSED_ON_DEVICE = "diagnosed_on_device"  # app's local store only, works offline
    UPLOADING = "uploading"  # app's local store only
    QUEUED = "queued"
    PROCESSING = "processing"
    DIAGNOSED = "diagnosed"
    FAILED = "failed"
    REVIEWED = "reviewed"
    LABELLED = "labelled"


LOCAL_STATUSES = frozenset({Status.CAPTURED, Status.DIAGNOSED_ON_DEVICE, Status.UPLOADING})
# The patient has an answer from the cloud side (or its reason for failing): nothing left to wait for.
SETTLED = frozenset({Status.DIAGNOSED, Status.FAILED, Status.REVIEWED, Status.LABELLED})
# The worker has nothing left to do for a case in one of these.
WORKER_FINISHED = frozenset({Status.DIAGNOSED, Status.REVIEWED, Status.LABELLED})

# Allowed moves, and who makes them (ARCHITECTURE.md "Case life cycle").
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.CAPTURED: frozenset({Status.DIAGNOSED_ON_DEVICE, Status.UPLOADING}),
    Status.DIAGNOSED_ON_DEVICE: frozenset({Status.UPLOADING}),
    Status.UPLOADING: frozenset({Status.QUEUED}),
    Status.QUEUED: frozenset({Status.PROCESSING, Status.FAILED, Status.REVIEWED}),
    # back to queued: a retry with backoff, a released or expired lease
    Status.PROCESSING: frozenset({Status.QUEUED, Status.DIAGNOSED, Status.FAILED}),
    Status.DIAGNOSED: frozenset({Status.REVIEWED}),
    # a dermatologist can still look at a photo the analysis could not handle
    Status.FAILED: frozenset({Status.REVIEWED}),
    Status.REVIEWED: frozenset({Status.REVIEWED, Status.LABELLED}),  # a changed review stays reviewed
    Status.LABELLED: frozenset(),
}


def can_move(current: str | None, new: str) -> bool:
    """Whether a case may go from ``current`` (None: not on the server yet) to ``new``."""
    if current is None:
        return new in (Status.QUEUED, Status.CAPTURED)
    try:
        return Status(new) in TRANSITIONS[Status(current)]
    except ValueError:
        return False


def check_move(current: str | None, new: str) -> None:
    if not can_move(current, new):
        raise CaseError(f"a case cannot go from {current or 'nothing'} to {new}")


# ---- the worker's job queue ---------------------------------------------------------------------


class JobState(StrEnum):
    QUEUED = "queued"  # also: no state yet (a job as the patient created it)
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


# ---- why a job did not produce a diagnosis --------------------------------------------------------

# reason code -> the sentence shown to the patient. ``reason`` is stable (apps map it to their own
# wording); ``detail`` is for logs and support.
FAILURE_REASONS: dict[str, str] = {
    "not_an_image": "The upload is not a photo we can read. Please take the photo again.",
    "corrupt_image": "The photo arrived damaged or incomplete. Please upload it again.",
    "image_too_large": "The photo is too large to analyse. Please send a smaller photo.",
    "hash_mismatch": "The photo we received differs from the one your phone sent. Please upload it again.",
    "missing_upload": "We could not find the uploaded photo. Please upload it again.",
    "case_missing": "The case record is missing.",
    "model_error": "The analysis failed on our side. A dermatologist can still look at your photo.",
    "worker_crashed": "The analysis stopped repeatedly on our side. A dermatologist can still look at your photo.",
    "internal_error": "Something went wrong on our side. A dermatologist can still look at your photo.",
}


def failure_message(reason: str | None) -> str:
    """The patient-facing sentence for a failure reason (an unknown code still says something)."""
    return FAILURE_REASONS.get(reason or "", "The analysis did not finish. A dermatologist can still look at your photo.")


# ---- where things are ---------------------------------------------------------------------------


def _key(name: str, value: str) -> str:
    if not isinstance(value, str) or not value or any(c in value for c in "/.#$[]"):
        raise CaseError(f"{name} {value!r} is not a valid database key")
    return value


def user_path(uid: str) -> str:
    return f"users/{_key('uid', uid)}"


def patient_cases_path(uid: str) -> str:
    return f"cases/{_key('uid', uid)}"


def case_path(uid: str, case_id: str) -> str:
    return f"{patient_cases_path(uid)}/{_key('caseId', case_id)}"


def job_path(case_id: str) -> str:
    return f"jobs/{_key('caseId', case_id)}"


def queue_path(case_id: str) -> str:
    return f"queue/{_key('caseId', case_id)}"


def messages_path(uid: str, case_id: str) -> str:
    return f"messages/{_key('uid', uid)}/{_key('caseId', case_id)}"


def claim_path(case_id: str) -> str:
    """Who is reviewing the case now (reviewer portal): one claim per case, see :func:`claim_record`."""
    return f"claims/{_key('caseId', case_id)}"


def review_history_path(case_id: str) -> str:
    """The append-only audit of every review saved on a case (push ids below it)."""
    return f"reviewHistory/{_key('caseId', case_id)}"


def reads_path(reader_uid: str, case_id: str | None = None) -> str:
    """Where a dermatologist's last read of a case's chat is kept (epoch ms), per dermatologist."""
    base = f"reads/{_key('uid', reader_uid)}"
    return base if case_id is None else f"{base}/{_key('caseId', case_id)}"


def reviewer_templates_path(reviewer_uid: str, urgency: str | None = None) -> str:
    """A dermatologist's own recommendation templates (``{urgency: text}``), kept across sessions."""
    base = f"reviewers/{_key('uid', reviewer_uid)}/templates"
    if urgency is None:
        return base
    if urgency not in REVIEW_URGENCIES:
        raise CaseError(f"urgency must be one of {', '.join(REVIEW_URGENCIES)}, not {urgency!r}")
    return f"{base}/{urgency}"


def case_folder(uid: str, case_id: str) -> str:
    """The Storage folder of one case (photo, heatmap)."""
    return f"cases/{_key('uid', uid)}/{_key('caseId', case_id)}"


def image_object(uid: str, case_id: str) -> str:
    """The Storage path of the patient's photo (whatever its format, as the rules require)."""
    return f"{case_folder(uid, case_id)}/image.jpg"


def heatmap_object(uid: str, case_id: str) -> str:
    return f"{case_folder(uid, case_id)}/heatmap.png"


# ---- who may read and write what ----------------------------------------------------------------

# The identities a rule can tell apart. Server programs use admin *credentials*, bypass the rules
# and have no column: they read and write everything. ADMIN is an end user whose token carries the
# ``admin`` role claim (a clinical lead or maintainer in the reviewer portal): what dermatologists
# read, read-only in the database (never a claim, a review or a message) and in Storage.
OWNER = "owner"  # the patient whose uid is in the path (or in the job); a patient where there is none
PATIENT = "patient"  # any other signed-in patient
DERMATOLOGIST = "dermatologist"  # the ``role`` claim
ADMIN = "admin"  # the ``role`` claim, signed in as an end user
SIGNED_OUT = "signed_out"
ACCESS_ROLES = (OWNER, PATIENT, DERMATOLOGIST, ADMIN, SIGNED_OUT)


@dataclass(frozen=True)
class Access:
    """Who may read and who may write one path of the data model (docs/ARCHITECTURE.md).

    database.rules.json and storage.rules enforce this table and tests/test_rules_matrix.py tries
    every role on every row against them, so a rule and the model cannot drift apart silently.
    ``path`` is spelled as the docs spell it: RTDB paths start with "/", Storage paths do not.
    ``write`` is who may write there at the point of the case's life where such a write belongs:
    for a record whose key its writer makes (a case, a job, a message, a photo) that is creating it;
    for anything else, changing it once its record has left its creator (a diagnosed case, a job
    as the patient created it). The conditions (statuses, shapes) are in the rules files."""

    path: str
    read: frozenset[str] = frozenset()
    write: frozenset[str] = frozenset()

    @property
    def service(self) -> str:
        return "database" if self.path.startswith("/") else "storage"


_OWNER = frozenset({OWNER})
_CARE = frozenset({OWNER, DERMATOLOGIST})  # the patient and the dermatologists
_CARE_READ = _CARE | {ADMIN}  # and, to read only, admins
_DERMATOLOGISTS = frozenset({DERMATOLOGIST})
_STAFF = frozenset({DERMATOLOGIST, ADMIN})  # to read: the dermatologists' data, read-only for admins
_SIGNED_IN = frozenset({OWNER, PATIENT, DERMATOLOGIST, ADMIN})

ACCESS: tuple[Access, ...] = (
    Access("/users/{uid}", read=_CARE_READ),  # a user writes only their displayName, never the record
    Access("/users/{uid}/displayName", read=_CARE_READ, write=_OWNER),
    Access("/users/{uid}/role", read=_CARE_READ),  # the claim's mirror
    Access("/users/{uid}/createdAt", read=_CARE_READ),
    Access("/cases", read=_STAFF),
    Access("/cases/{uid}", read=_CARE_READ),
    Access("/cases/{uid}/{caseId}", read=_CARE_READ, write=_OWNER),  # created queued, once (or re-sent untouched)
    Access("/cases/{uid}/{caseId}/status", read=_CARE_READ, write=_DERMATOLOGISTS),  # to reviewed, with the review
    Access("/cases/{uid}/{caseId}/review", read=_CARE_READ, write=_DERMATOLOGISTS),
    Access("/cases/{uid}/{caseId}/consent", read=_CARE_READ),
    Access("/cases/{uid}/{caseId}/image", read=_CARE_READ),
    Access("/cases/{uid}/{caseId}/note", read=_CARE_READ),
    Access("/cases/{uid}/{caseId}/device", read=_CARE_READ),
    Access("/cases/{uid}/{caseId}/cloud", read=_CARE_READ),
    Access("/cases/{uid}/{caseId}/failure", read=_CARE_READ),
    Access("/cases/{uid}/{caseId}/training", read=_CARE_READ),
    Access("/cases/{uid}/{caseId}/flags", read=_CARE_READ),  # the patient's, with the case's creation
    Access("/cases/{uid}/{caseId}/sameLesionAs", read=_CARE_READ),  # likewise
    Access("/jobs/{caseId}", write=_OWNER),  # with the case, in one write
    Access("/jobs/{caseId}/state"),
    Access("/jobs/{caseId}/lease"),
    Access("/queue", read=_STAFF),
    Access("/queue/{caseId}", read=_STAFF),
    Access("/queue/{caseId}/status", read=_STAFF, write=_DERMATOLOGISTS),  # to reviewed, with the review
    Access("/claims", read=_STAFF),
    Access("/claims/{caseId}", read=_STAFF, write=_DERMATOLOGISTS),  # if absent, expired or their own
    Access("/reviewHistory", read=_STAFF),
    Access("/reviewHistory/{caseId}/{entryId}", read=_STAFF, write=_DERMATOLOGISTS),  # create-only
    Access("/reads/{readerUid}", read=_DERMATOLOGISTS),  # each dermatologist their own
    Access("/reads/{readerUid}/{caseId}", read=_DERMATOLOGISTS, write=_DERMATOLOGISTS),
    Access("/reviewers/{reviewerUid}", read=_DERMATOLOGISTS),  # each dermatologist their own
    Access("/reviewers/{reviewerUid}/templates/{urgency}", read=_DERMATOLOGISTS, write=_DERMATOLOGISTS),
    Access("/messages", read=_STAFF),  # unread counts over every case in one stream
    Access("/messages/{uid}", read=_CARE_READ),
    Access("/messages/{uid}/{caseId}/{msgId}", read=_CARE_READ, write=_CARE),  # each as themself, never edited
    Access("/models", read=_SIGNED_IN),
    Access("/models/{kind}", read=_SIGNED_IN),
    Access("/models/{kind}/current", read=_SIGNED_IN),
    Access("/models/{kind}/versions/{version}", read=_SIGNED_IN),
    Access("/modelAudit/{kind}/{entryId}"),  # who moved a model pointer, when, why: admin only
    Access("/workers/{workerId}"),
    Access("/erasures/{uid}", read=_OWNER, write=_OWNER),  # "delete my data": created once, by a patient
    Access("/erasures/{uid}/state", read=_OWNER),  # and doneAt, counts, lease: the server program's
    Access("/erased/{caseId}"),  # tombstones of erased cases (retraining checks them)
    Access("/datasets/versions/{version}"),  # training-set versions (training/dataset_versions.py): admin only
    Access("/retrainRuns/{runId}"),  # retraining's decision records (training/decisions.py): admin only
    # Storage: the admin role reads here as in the database and writes nothing; heatmaps and model
    # files are written with admin credentials (the worker, `dermaloop models publish`)
    Access("cases/{uid}/{caseId}/image.jpg", read=_CARE_READ, write=_OWNER),  # IMAGE_CONTENT_TYPES only
    Access("cases/{uid}/{caseId}/heatmap.png", read=_CARE_READ),
    Access("models/{kind}/{version}/{file}", read=_SIGNED_IN),
    Access("datasets/{version}/manifest.json"),  # a dataset version's frozen manifest: admin credentials only
)


# ---- records --------------------------------------------------------------------------------------


def image_record(uid: str, case_id: str, sha256: str, content_type: str, size: int, width: int, height: int) -> dict:
    if content_type not in IMAGE_CONTENT_TYPES:
        raise CaseError(f"photos must be one of {', '.join(IMAGE_CONTENT_TYPES)}, not {content_type!r}")
    if not 0 < size <= MAX_IMAGE_BYTES:
        raise CaseError(f"a photo must be 1 byte to {MAX_IMAGE_BYTES // (1024 * 1024)} MiB, not {size} bytes")
    if len(sha256) != 64:
        raise CaseError("the photo's sha256 must be 64 hex digits")
    return {"path": image_object(uid, case_id), "sha256": sha256.lower(), "contentType": content_type,
            "bytes": int(size), "width": int(width), "height": int(height)}


def note_record(site: str | None, text: str | None) -> dict[str, str] | None:
    """Body site and the patient's own words; None when neither was given."""
    if site is not None and len(site) > MAX_SITE_CHARS:
        raise CaseError(f"the body site is limited to {MAX_SITE_CHARS} characters ({len(site)} given)")
    if text is not None and len(text) > MAX_NOTE_CHARS:
        raise CaseError(f"the note is limited to {MAX_NOTE_CHARS} characters ({len(text)} given)")
    note = {k: v for k, v in (("site", site), ("text", text)) if v}
    return note or None


def _round(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


# A prediction set names at most this many classes (the rules refuse more; the taxonomy has 7).
MAX_PREDICTION_SET = 7


def device_record(result: Mapping[str, Any], model_version: str | None = None, at: Any = None) -> dict[str, Any]:
    """The case's ``device`` field from the on-device answer (``DeviceResult.to_json()`` or
    ``DeviceAnswer.to_json()``), in the shape the rules accept: ``modelVersion``, ``top``, ``at``
    and, when known, ``risk``, ``quality`` and ``box``; with the card's abstain rule also ``unsure``
    and ``predictionSet`` (so the portal sees "unsure: a dermatologist will look" for this answer)."""
    version = model_version or result.get("modelVersion") or result.get("model_version")
    if not isinstance(version, str) or not version:
        raise CaseError("a device result must name the model version that produced it")
    quality = result.get("quality") or {}
    record: dict[str, Any] = {
        "modelVersion": version[:100],
        "top": [{"label": str(t["label"]), "name": str(t.get("name", t["label"])), "p": _round(t["p"]) or 0.0}
                for t in (result.get("top") or [])[:3]],
        "risk": result.get("risk"),
        "quality": {"ok": bool(quality.get("ok")), "issues": list(quality.get("issues") or [])},
        "box": None if result.get("box") is None else [_round(v) for v in result["box"]],
        "at": SERVER_TIMESTAMP if at is None else at,
        "demonstration": True if result.get("demonstration") else None,
        "unsure": None if result.get("unsure") is None else bool(result["unsure"]),
        "predictionSet": [str(label)[:64] for label in
                          (result.get("predictionSet") or result.get("prediction_set") or [])][:MAX_PREDICTION_SET],
    }
    # RTDB stores no empty list: a photo the checks declined has no ``top`` at all.
    return {k: v for k, v in record.items() if v is not None and v != []}


def new_case(uid: str, case_id: str, image: dict[str, Any], research_consent: bool, *,
             note: dict[str, str] | None = None, device: dict[str, Any] | None = None,
             created_at: Any = None, sent_anyway: bool = False,
             same_lesion_as: str | None = None) -> dict[str, Any]:
    """A case as the patient creates it on the server (status ``queued``).

    ``sent_anyway``: the device checks declined the photo and the patient sent it to a
    dermatologist anyway (``flags.sentAnyway``, shown as such in the portal). ``same_lesion_as``:
    the patient's earlier case of the same spot, so the portal can put the photos side by side."""
    now = SERVER_TIMESTAMP if created_at is None else created_at
    case: dict[str, Any] = {
        "caseId": _key("caseId", case_id), "patientUid": _key("uid", uid), "createdAt": now,
        "status": Status.QUEUED.value,
        "consent": {"research": bool(research_consent), "at": now},
        "image": image,
    }
    if note:
        case["note"] = note
    if device:
        case["device"] = device
    if sent_anyway:
        case["flags"] = {"sentAnyway": True}
    if same_lesion_as is not None:
        if _key("caseId", same_lesion_as) == case_id:
            raise CaseError("a case cannot be the same lesion as itself")
        case["sameLesionAs"] = same_lesion_as
    return case


def job_record(uid: str, case_id: str, created_at: Any = None) -> dict[str, Any]:
    """A new job, exactly as the rules let the patient create it (state and lease are the worker's)."""
    return {"uid": _key("uid", uid), "caseId": _key("caseId", case_id),
            "createdAt": SERVER_TIMESTAMP if created_at is None else created_at}


def new_case_writes(case: dict[str, Any]) -> dict[str, Any]:
    """The one multi-path write that puts a case and its job on the server together or not at all.
    Safe to repeat: the rules let the patient re-send it while the worker has not touched the case."""
    uid, case_id = case["patientUid"], case["caseId"]
    return {case_path(uid, case_id): case, job_path(case_id): job_record(uid, case_id, case["createdAt"])}


def cloud_record(*, model_version: str, quality: dict | None, lesion: dict | None, box: list[float] | None,
                 heatmap_path: str | None, timings_ms: dict[str, float], message: str | None, at: int,
                 probs: Mapping[str, float] | None = None, top: list[dict[str, Any]] | None = None,
                 risk: str | None = None, malignant_p: float | None = None,
                 demonstration: bool = False) -> dict[str, Any]:
    """The case's ``cloud`` field (worker only). A declined photo has no probabilities, an empty
    top list and no risk: only why it was declined (``quality``, ``lesion``, ``message``). A model
    trained on synthetic images answers with ``demonstration: true`` and no risk."""
    record = {
        "modelVersion": model_version,
        "quality": quality,
        "lesion": lesion,
        "box": box,
        "heatmapPath": heatmap_path,
        "timingsMs": timings_ms,
        "message": message,
        "at": at,
        "probs": None if probs is None else {label: _round(p) for label, p in probs.items()},
        "top": [{"label": t["label"], "name": t["name"], "p": _round(t["p"])} for t in (top or [])],
        "risk": None if demonstration else risk,
        "malignantP": _round(malignant_p),
    }
    if demonstration:
        record["demonstration"] = True
    return record


def queue_entry(uid: str, status: str, risk: str | None, score: float, created_at: Any, now: int) -> dict[str, Any]:
    """The dermatologists' triage index entry of a case (worker only)."""
    return {"uid": uid, "status": str(status), "risk": risk, "score": score,
            "createdAt": created_at if isinstance(created_at, int | float) else now, "updatedAt": now}


def failure_record(reason: str, detail: str, attempts: int, at: int) -> dict[str, Any]:
    if reason not in FAILURE_REASONS:
        raise CaseError(f"unknown failure reason {reason!r}")
    return {"reason": reason, "detail": detail[:500], "attempts": int(attempts), "at": at}


REVIEW_URGENCIES = ("routine", "soon", "urgent")
REVIEW_SPECIAL_LABELS = ("other", "ungradable")


REVIEW_CONFIDENCES = ("low", "medium", "high")


def review_record(reviewer_uid: str, label: str, recommendation: str, urgency: str, *,
                  taxonomy_labels: Iterable[str], at: Any = None, confidence: str | None = None,
                  other_text: str | None = None, training_use: bool | None = None) -> dict[str, Any]:
    """A dermatologist's review; the label is a taxonomy class id or "other"/"ungradable".

    The keywords are the reviewer portal's additions, each optional so older writers stay valid:
    ``confidence`` (low/medium/high), ``other_text`` (what "other" is: required with that label,
    refused with any other) and ``training_use`` (whether the image may train the models; the rules
    accept ``True`` only on a case whose patient gave research consent)."""
    allowed = set(taxonomy_labels) | set(REVIEW_SPECIAL_LABELS)
    if not isinstance(label, str) or not label:
        raise CaseError("choose a diagnosis (a class, \"other\" with a description, or \"ungradable\")")
    if label not in allowed:
        raise CaseError(f"unknown diagnosis {label!r}; expected one of {', '.join(sorted(allowed))}")
    if urgency not in REVIEW_URGENCIES:
        raise CaseError(f"urgency must be one of {', '.join(REVIEW_URGENCIES)}, not {urgency!r}")
    if len(recommendation) > MAX_RECOMMENDATION_CHARS:
        raise CaseError(f"the recommendation is limited to {MAX_RECOMMENDATION_CHARS} characters "
                        f"({len(recommendation)} given)")
    record: dict[str, Any] = {"reviewerUid": reviewer_uid, "label": label, "recommendation": recommendation,
                              "urgency": urgency, "at": SERVER_TIMESTAMP if at is None else at}
    if confidence is not None:
        if confidence not in REVIEW_CONFIDENCES:
            raise CaseError(f"confidence must be one of {', '.join(REVIEW_CONFIDENCES)}, not {confidence!r}")
        record["confidence"] = confidence
    other = (other_text or "").strip()
    if label == "other" and other_text is not None and not other:
        raise CaseError("say what the \"other\" diagnosis is")
    if other:
        if label != "other":
            raise CaseError("a free-text diagnosis goes with the label \"other\" only")
        if len(other) > MAX_OTHER_TEXT_CHARS:
            raise CaseError(f"the other diagnosis is limited to {MAX_OTHER_TEXT_CHARS} characters ({len(other)} given)")
        record["otherText"] = other
    if training_use is not None:
        record["trainingUse"] = bool(training_use)
    return record


TRUSTED_REVIEWER_ROLES = ("dermatologist", "admin")


def trusted_review(case: Mapping[str, Any], role_of: Callable[[str], str | None], *,
                   taxonomy_labels: Iterable[str] | None = None) -> dict[str, Any] | None:
    """The case's review if retraining may take it as a label, else None.

    The rules let only dermatologists write a review, but a label outlives its write: reviews
    written under older rules stay in the database (before issue 16 a patient could review their
    own case), and a role can be withdrawn later (a mistaken grant, someone who left). So the
    reviewer's role is asked now: ``role_of(uid)`` (retraining passes a firebase-admin look-up of
    the ``role`` claim; None for no claim or no such user) must say dermatologist or admin. The
    label must be a class of ``taxonomy_labels`` (default: the default taxonomy) or
    "other"/"ungradable", and the case must be reviewed or labelled, the only statuses a review
    leads to. No I/O but ``role_of``, asked last and at most once (and, without
    ``taxonomy_labels``, reading the packaged default taxonomy)."""
    if case.get("status") not in (Status.REVIEWED, Status.LABELLED):
        return None
    review = case.get("review")
    if not isinstance(review, Mapping):
        return None
    reviewer, label = review.get("reviewerUid"), review.get("label")
    if not isinstance(reviewer, str) or not reviewer or not isinstance(label, str):
        return None
    if taxonomy_labels is None:
        from dermaloop.taxonomy import DEFAULT_TAXONOMY, load_taxonomy

        taxonomy_labels = load_taxonomy(DEFAULT_TAXONOMY).ids
    if label not in {*taxonomy_labels, *REVIEW_SPECIAL_LABELS}:
        return None
    if role_of(reviewer) not in TRUSTED_REVIEWER_ROLES:
        return None
    return dict(review)


SENDER_ROLES = ("patient", "dermatologist")


def message_record(sender_uid: str, sender_role: str, text: str, at: Any = None) -> dict[str, Any]:
    """One chat message about a case."""
    if sender_role not in SENDER_ROLES:
        raise CaseError(f"a message is sent by a patient or a dermatologist, not {sender_role!r}")
    text = text.strip()
    if not 1 <= len(text) <= MAX_MESSAGE_CHARS:
        raise CaseError(f"a message must have 1 to {MAX_MESSAGE_CHARS} characters ({len(text)} given)")
    return {"senderUid": sender_uid, "senderRole": sender_role, "text": text,
            "at": SERVER_TIMESTAMP if at is None else at}


# ---- the worker's outcomes: each one multi-path write that moves the job and the case together ----


def _job_fields(case_id: str, now: int, **fields: Any) -> dict[str, Any]:
    base = job_path(case_id)
    return {f"{base}/{name}": value for name, value in {**fields, "updatedAt": now}.items()}


def diagnosed_writes(uid: str, case_id: str, cloud: dict[str, Any], entry: dict[str, Any], now: int) -> dict:
    case = case_path(uid, case_id)
    return {
        f"{case}/cloud": cloud,
        f"{case}/status": Status.DIAGNOSED.value,
        f"{case}/failure": None,
        queue_path(case_id): entry,
        **_job_fields(case_id, now, state=JobState.DONE.value, lease=None, error=None),
    }


def failed_writes(uid: str, case_id: str, reason: str, detail: str, attempts: int, now: int,
                  case_exists: bool = True, entry: dict[str, Any] | None = None) -> dict:
    """Give up on a job. ``entry`` (a ``queue_entry`` with status ``failed``) puts the case in the
    dermatologists' queue: the patient is told that a dermatologist can still look at the photo."""
    writes = _job_fields(case_id, now, state=JobState.FAILED.value, lease=None, error=f"{reason}: {detail}"[:500])
    if case_exists:
        case = case_path(uid, case_id)
        writes[f"{case}/status"] = Status.FAILED.value
        writes[f"{case}/failure"] = failure_record(reason, detail, attempts, now)
        if entry is not None:
            writes[queue_path(case_id)] = entry
    return writes


def done_writes(case_id: str, now: int) -> dict:
    """Settle a job whose case was already diagnosed (a crash between result and bookkeeping)."""
    return _job_fields(case_id, now, state=JobState.DONE.value, lease=None)


def requeue_writes(uid: str, case_id: str, now: int, retry_at: int | None = None, error: str | None = None) -> dict:
    """Put a job back (retry later with backoff, or a released lease) and show the case as queued."""
    fields: dict[str, Any] = {"state": JobState.QUEUED.value, "lease": None}
    if retry_at is not None:
        fields["retryAt"] = retry_at
    if error is not None:
        fields["error"] = error[:500]
    return {**_job_fields(case_id, now, **fields), f"{case_path(uid, case_id)}/status": Status.QUEUED.value}


# ---- reading events ---------------------------------------------------------------------------------


def touched_cases(path: str, data: Any) -> set[str]:
    """Case ids an RTDB event on ``/cases/{uid}`` touched. Multi-path writes arrive as a ``patch``
    at the listened path whose keys are deeper paths (``"{caseId}/status"``), so keys are split."""
    parts = [p for p in path.split("/") if p]
    if parts:
        return {parts[0]}
    if isinstance(data, dict):
        return {key.split("/")[0] for key in data if key}
    return set()


# ---- the reviewer portal: claims, the review audit, the move to reviewed ----------------------------


def claim_record(reviewer_uid: str, patient_uid: str, at: Any = None) -> dict[str, Any]:
    """A dermatologist's claim on a case (``/claims/{caseId}``): who holds it, whose case it is (so
    the rules can check the case exists), and when it was taken or last renewed. The time is
    stamped by the server, so expiry (``at + CLAIM_TTL_MS``) does not depend on anyone's clock."""
    return {"uid": _key("uid", reviewer_uid), "patientUid": _key("uid", patient_uid),
            "at": SERVER_TIMESTAMP if at is None else at}


def claim_expires_at(claim: Any) -> int | None:
    """When a stored claim lapses (epoch ms), None if it is not a claim."""
    if not isinstance(claim, Mapping) or not isinstance(claim.get("at"), int | float):
        return None
    return int(claim["at"]) + CLAIM_TTL_MS


def claim_holder(claim: Any, now_ms: float) -> str | None:
    """The uid holding a stored claim at ``now_ms``, or None when there is none or it lapsed."""
    expires = claim_expires_at(claim)
    if expires is None or expires <= now_ms:
        return None
    uid = claim.get("uid")
    return uid if isinstance(uid, str) else None


def review_history_record(editor_uid: str, patient_uid: str, review: Mapping[str, Any],
                          previous: Mapping[str, Any] | None = None, at: Any = None) -> dict[str, Any]:
    """One audit entry (``/reviewHistory/{caseId}/{pushId}``): who saved which review when, and the
    review it replaced (absent for the first). Written in the same update as the review itself."""
    entry: dict[str, Any] = {"editorUid": _key("uid", editor_uid), "patientUid": _key("uid", patient_uid),
                             "review": dict(review), "at": SERVER_TIMESTAMP if at is None else at}
    if previous:
        entry["previous"] = dict(previous)
    return entry


def reviewed_writes(uid: str, case_id: str, review: dict[str, Any], history_id: str,
                    previous: Mapping[str, Any] | None = None, in_queue: bool = True) -> dict[str, Any]:
    """The one multi-path write that saves a review: the review, the case's move to ``reviewed`` (the
    rules want both in one write), the queue entry's status (so open queues drop the case) when the
    case has one, and the audit entry. All of it lands or none of it does."""
    case = case_path(uid, case_id)
    writes = {
        f"{case}/review": review,
        f"{case}/status": Status.REVIEWED.value,
        f"{review_history_path(case_id)}/{_key('entryId', history_id)}":
            review_history_record(review["reviewerUid"], uid, review, previous),
    }
    if in_queue:
        writes[f"{queue_path(case_id)}/status"] = Status.REVIEWED.value
    return writes


# ---- erasure: "delete my data" (issue 17) ------------------------------------------------------------
#
# The patient cannot delete through the rules (and must not be able to touch queue entries, jobs or
# heatmaps), so erasure is a request: the patient creates ``/erasures/{uid}`` (``requestedAt`` only)
# and a server program (the cloud worker's ``cloud_worker/erasure.py``, admin) claims it with a
# lease, deletes everything of that uid, leaves a tombstone ``/erased/{caseId}`` per erased case
# (no personal data: retraining never takes such a case again) and records ``state: done``.


class ErasureState(StrEnum):
    REQUESTED = "requested"  # also: no state yet (the request as the patient wrote it)
    RUNNING = "running"  # a server program holds the request's lease and is deleting
    DONE = "done"  # everything is gone, the Auth account too; the record stays (uid only)


# What ``/erasures/{uid}/counts`` counts: records and objects removed, by kind ("account" and "user"
# are 0 or 1; "tombstones" is how many ``/erased/{caseId}`` were written).
ERASURE_COUNTS = ("cases", "jobs", "queue", "messages", "images", "heatmaps", "files", "claims",
                  "reviewHistory", "reads", "user", "account", "tombstones")


def erasure_path(uid: str) -> str:
    """The patient's erasure request and, once carried out, its outcome (``/erasures/{uid}``)."""
    return f"erasures/{_key('uid', uid)}"


def erased_path(case_id: str) -> str:
    """The tombstone of an erased case (``/erased/{caseId}``, admin only)."""
    return f"erased/{_key('caseId', case_id)}"


def patient_folder(uid: str) -> str:
    """The Storage prefix of everything of one patient (photos and heatmaps of every case), with the
    trailing slash, so that ``cases/ab/`` never matches ``cases/abc/``."""
    return f"cases/{_key('uid', uid)}/"


def erasure_request(requested_at: Any = None) -> dict[str, Any]:
    """The request exactly as the rules let the patient create it (once; nothing else in it)."""
    return {"requestedAt": SERVER_TIMESTAMP if requested_at is None else requested_at}


def erasure_state(record: Any) -> ErasureState | None:
    """The state of a stored ``/erasures/{uid}`` record; None when there is no request."""
    if not isinstance(record, Mapping) or "requestedAt" not in record:
        return None
    try:
        return ErasureState(record.get("state") or ErasureState.REQUESTED)
    except ValueError:
        return None


def tombstone_record(at: int) -> dict[str, Any]:
    """``/erased/{caseId}``: when the case was erased, nothing else (no uid, no content)."""
    return {"at": int(at)}


def erasure_writes(uid: str, *, tombstones: Iterable[str] = (),
                   jobs: Iterable[str] = (), queue: Iterable[str] = (), claims: Iterable[str] = (),
                   history: Iterable[str] = (), reads: Iterable[tuple[str, str]] = (), now: int) -> dict[str, Any]:
    """The one multi-path write that removes a patient from the database: their cases, chats and user
    record, the given jobs, queue entries, claims and review histories (by case id; the caller checked
    each belongs to ``uid``), dermatologists' read marks ``(readerUid, caseId)``, and a tombstone per
    case id in ``tombstones``. All of it lands or none of it does."""
    writes: dict[str, Any] = {patient_cases_path(uid): None, f"messages/{_key('uid', uid)}": None,
                              user_path(uid): None}
    for case_id in jobs:
        writes[job_path(case_id)] = None
    for case_id in queue:
        writes[queue_path(case_id)] = None
    for case_id in claims:
        writes[claim_path(case_id)] = None
    for case_id in history:
        writes[review_history_path(case_id)] = None
    for reader, case_id in reads:
        writes[reads_path(reader, case_id)] = None
    for case_id in tombstones:
        writes[erased_path(case_id)] = tombstone_record(now)
    return writes


# ---- retraining: labels taken into dataset versions (issue 19) ---------------------------------------
#
# Retraining (``training/new_labels.py``, ``training/dataset_versions.py``, admin) freezes the
# labels it takes into a content-addressed dataset version: its manifest in Storage
# (``datasets/{version}/manifest.json``), its record in the RTDB (``/datasets/versions/{version}``),
# and on each case taken ``training`` and the move ``reviewed`` -> ``labelled`` (after which the
# review is a training label and never changes).


def training_path(uid: str, case_id: str) -> str:
    """A case's ``training`` field: which dataset version took its review as a label, and when."""
    return f"{case_path(uid, case_id)}/training"


def dataset_version_path(version: str) -> str:
    """The RTDB record of one dataset version (``/datasets/versions/{version}``, admin only)."""
    return f"datasets/versions/{_key('version', version)}"


def dataset_manifest_object(version: str) -> str:
    """The Storage path of a dataset version's manifest (admin only; never overwritten)."""
    return f"datasets/{_key('version', version)}/manifest.json"


def training_record(dataset_version: str, labelled_at: int) -> dict[str, Any]:
    """The case's ``training`` field as retraining writes it when it takes the case's review as a
    label: ``usable`` (the reviewer marked it so, the patient consented), the first dataset version
    that took it and when."""
    return {"usable": True, "labelledAt": int(labelled_at), "datasetVersion": _key("datasetVersion", dataset_version)}


def labelled_case(case: Mapping[str, Any], dataset_version: str, labelled_at: int) -> dict[str, Any]:
    """``case`` (a stored record) moved to ``labelled`` with its ``training`` field: what retraining
    writes back in a transaction on the case, so that a case erased or re-reviewed meanwhile is
    never written over. Refused (``CaseError``) from any status but ``reviewed``."""
    check_move(case.get("status"), Status.LABELLED.value)
    return {**case, "status": Status.LABELLED.value, "training": training_record(dataset_version, labelled_at)}


def labelled_writes(uid: str, case_id: str, dataset_version: str, labelled_at: int) -> dict[str, Any]:
    """The same move as a multi-path update, for a writer that has otherwise made sure the case still
    exists and is ``reviewed`` (a plain update would recreate an erased case as a fragment)."""
    case = case_path(uid, case_id)
    return {f"{case}/status": Status.LABELLED.value,
            f"{case}/training": training_record(dataset_version, labelled_at)}
