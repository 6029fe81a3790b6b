"""Every role on every path of the data model, read and write, against the deployed rules files.

The table is ``dermaloop.cases.ACCESS`` (who may read and write each path of docs/ARCHITECTURE.md).
From it this module generates, for every role and path, a read and the writes that belong there
(``WRITES``: each in the state where it belongs, and where a patient's own grants hold), runs them
against a real localbase holding a seeded case history (users, a labelled case, a failed one, jobs,
queue, chat, models, workers, photos), and asserts that what the table allows succeeds and
everything else is refused by the rules (``PermissionDenied``, never a token problem) and leaves the
data as it was.

A table is only worth as much as its coverage, so the last tests tie it to both ends: every node of
database.rules.json that grants something is a row, every top-level key and every ``$variable`` is
a row or leads to one, every ``match`` of storage.rules leads to a row; every row is a path of the
docs' data model and every record path there has a row. A path added to the rules or the docs
without a row (or a row without rules) therefore fails here.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from dermaloop import cases
from dermaloop.admin_app import delete_app
from dermaloop.cases import ACCESS, ACCESS_ROLES, ADMIN, DERMATOLOGIST, OWNER, PATIENT, SIGNED_OUT, Access
from dermaloop.database import UserDatabase, admin_reference, new_push_id
from dermaloop.errors import PermissionDenied, Unauthenticated
from dermaloop.settings import PROJECT_ROOT
from dermaloop.storage import UserStorage, admin_bucket
from localbase.rtdb.rules import blank_comments
from localbase.tokens import mint_id_token

APP_NAME = "test_rules_matrix"
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 2048
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 512
LABELS = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
NOW = 1_700_000_000_000  # a past time (the rules refuse future ones): what the worker (admin) stamps
RUN_ID = "20231114T221320Z-a1b2c3"  # a retraining run (training.decisions.new_run_id's shape)


# ---- a seeded world --------------------------------------------------------------------------------


@dataclass
class Actor:
    role: str
    uid: str
    db: UserDatabase
    storage: UserStorage


@dataclass
class Seed:
    settings: Any
    owner: str  # the patient whose data the paths name
    actors: dict[str, Actor]
    done: str = ""  # a labelled case: cloud, review, training, messages, photo and heatmap
    failed: str = ""  # a case the worker gave up on
    message: str = ""
    version: str = ""  # of models/cloud, in the RTDB and in Storage
    history: str = ""  # a review-history entry of the done case (reviewer portal)

    def admin(self, path: str = "/"):
        return admin_reference(path, self.settings, app_name=APP_NAME)

    def case(self, case_id: str) -> dict[str, Any]:
        """A case as the patient creates it, from the ``cases`` builders."""
        digest = hashlib.sha256(case_id.encode()).hexdigest()
        image = cases.image_record(self.owner, case_id, digest, "image/jpeg", len(JPEG), 640, 480)
        device = cases.device_record({"modelVersion": "device-1", "risk": "low", "quality": {"ok": True},
                                      "top": [{"label": "nv", "name": "Mole", "p": 0.8}]}, at=NOW)
        case = cases.new_case(self.owner, case_id, image, True, note=cases.note_record("back", "itchy"),
                              device=device, created_at=NOW)
        return case

    def queued_case(self, with_job: bool = True) -> str:
        """A case just created by its patient (and, usually, its job): nobody else touched it."""
        case_id = new_push_id()
        writes = cases.new_case_writes(self.case(case_id))
        if not with_job:
            writes.pop(cases.job_path(case_id))
        self.admin().update(writes)
        return case_id

    def diagnosed_case(self) -> str:
        """A case the worker has analysed: the point where dermatologists take over."""
        case_id = self.queued_case()
        entry = cases.queue_entry(self.owner, cases.Status.DIAGNOSED, "low", 1.0, NOW, NOW)
        self.admin().update(cases.diagnosed_writes(self.owner, case_id, cloud(), entry, NOW))
        return case_id


def cloud() -> dict[str, Any]:
    return cases.cloud_record(model_version="cloud-1", quality={"ok": True, "issues": []},
                              lesion={"is_lesion": True, "score": 0.9}, box=None, heatmap_path=None,
                              timings_ms={"total": 1.0}, message=None, at=NOW, probs={"nv": 0.9, "mel": 0.1},
                              top=[{"label": "nv", "name": "Mole", "p": 0.9}], risk="low", malignant_p=0.1)


def erasure_done() -> dict[str, Any]:
    """A request as the server program leaves it (no worker listens in this test's namespace)."""
    return {**cases.erasure_request(NOW), "state": cases.ErasureState.DONE.value, "doneAt": NOW,
            "counts": {"cases": 2}}


def _erasure_request(s: Seed, actor: Actor) -> Writes:
    """The patient's request, where it belongs: before there is one (the seeded one goes first)."""
    s.admin(cases.erasure_path(s.owner)).delete()
    return {cases.erasure_path(s.owner): cases.erasure_request()}


def _erasure_state(s: Seed, actor: Actor) -> list[Writes]:
    """The server program's fields, on a request as the patient made it and on a finished one."""
    path = cases.erasure_path(s.owner)
    s.admin(path).set(erasure_done())
    return [{f"{path}/state": cases.ErasureState.RUNNING.value},
            {f"{path}/doneAt": NOW + 1, f"{path}/counts/cases": 0}]


def review(reviewer: str) -> dict[str, Any]:
    return cases.review_record(reviewer, "mel", "See a dermatologist.", "soon", taxonomy_labels=LABELS)


@pytest.fixture(scope="module")
def seed(localbase) -> Seed:
    # A namespace of its own (nothing here may reach another module's worker); unique uids in Storage.
    settings = localbase.settings(database_url="https://rules-matrix-default-rtdb.firebaseio.com")
    tag = uuid.uuid4().hex[:8]
    actors = {}
    for role, claims in ((OWNER, {"role": "patient"}), (PATIENT, {"role": "patient"}),
                         (DERMATOLOGIST, {"role": "dermatologist"}), (ADMIN, {"role": "admin"}), (SIGNED_OUT, None)):
        uid = f"{role}-{tag}"
        token = None if claims is None else mint_id_token(settings.project_id, uid, claims)
        actors[role] = Actor(role, uid, UserDatabase(token, settings), UserStorage(token, settings))
    s = Seed(settings, actors[OWNER].uid, actors)
    derm = actors[DERMATOLOGIST].uid

    s.admin(cases.user_path(s.owner)).set({"displayName": "Owner", "role": "patient", "createdAt": NOW})
    s.done = s.diagnosed_case()
    s.admin(cases.case_path(s.owner, s.done)).update(
        {"review": {**review(derm), "at": NOW}, "status": cases.Status.LABELLED.value,
         "training": cases.training_record("ds-0123456789ab", NOW)})
    s.failed = s.queued_case()
    s.admin().update(cases.failed_writes(s.owner, s.failed, "corrupt_image", "truncated", 3, NOW))
    # Sent anyway, and the same spot as the failed case (both written by the patient at creation).
    s.admin(cases.case_path(s.owner, s.done)).update({"flags": {"sentAnyway": True}, "sameLesionAs": s.failed})
    s.message = new_push_id()
    s.admin(f"{cases.messages_path(s.owner, s.done)}/{s.message}").set(
        {**cases.message_record(derm, "dermatologist", "Hello"), "at": NOW})
    s.version = f"v-{tag}"
    s.admin("models/cloud").set({"current": s.version, "versions": {s.version: {
        "storagePath": f"models/cloud/{s.version}", "createdAt": NOW, "metrics": {"acc": 0.8}, "card": {}}}})
    s.admin("workers/w1").set({"updatedAt": NOW, "jobs": 3})
    # The reviewer portal's records: a (lapsed) claim, an audit entry, the dermatologist's last read.
    s.admin(cases.claim_path(s.done)).set(cases.claim_record(derm, s.owner, at=NOW))
    s.history = new_push_id()
    s.admin(f"{cases.review_history_path(s.done)}/{s.history}").set(
        cases.review_history_record(derm, s.owner, {**review(derm), "at": NOW}, at=NOW))
    s.admin(cases.reads_path(derm, s.done)).set(NOW)
    s.admin(cases.reviewer_templates_path(derm, "soon")).set("Please book an appointment.")
    # "Delete my data" (issue 17): a request carried out, and the tombstone of an erased case.
    s.admin(cases.erasure_path(s.owner)).set(erasure_done())
    s.admin(cases.erased_path(s.done)).set(cases.tombstone_record(NOW))
    # A dataset version (retraining, issue 19): its record and its manifest, admin credentials only.
    s.admin(cases.dataset_version_path(s.version)).set({"manifestSha256": "0" * 64, "createdAt": NOW,
                                                        "storagePath": cases.dataset_manifest_object(s.version)})
    # A retraining decision record (training/decisions.py), admin credentials only.
    s.admin(f"retrainRuns/{RUN_ID}").set({"runId": RUN_ID, "startedAt": NOW, "status": "refused", "by": "ops@host"})

    bucket = admin_bucket(settings)
    bucket.blob(cases.image_object(s.owner, s.done)).upload_from_string(JPEG, content_type="image/jpeg")
    bucket.blob(cases.heatmap_object(s.owner, s.done)).upload_from_string(PNG, content_type="image/png")
    bucket.blob(f"models/cloud/{s.version}/model.keras").upload_from_string(b"keras", content_type="application/octet-stream")
    bucket.blob(cases.dataset_manifest_object(s.version)).upload_from_string(b'{"format":1}',
                                                                             content_type="application/json")
    yield s
    delete_app(APP_NAME)


# ---- what each row's read and write are ------------------------------------------------------------


def concrete(seed: Seed, row: Access) -> str:
    """The row's path with the seeded keys (the failed case for ``failure``)."""
    case_id = seed.failed if row.path.endswith("/failure") else seed.done
    values = {"uid": seed.owner, "caseId": case_id, "msgId": seed.message, "kind": "cloud",
              "version": seed.version, "workerId": "w1", "file": "model.keras", "entryId": seed.history,
              "readerUid": seed.actors[DERMATOLOGIST].uid, "reviewerUid": seed.actors[DERMATOLOGIST].uid,
              "urgency": "soon", "runId": RUN_ID}
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], row.path).lstrip("/")


Writes = dict[str, Any]  # RTDB: one multi-path update at the root; Storage: path, bytes, content type
Scenario = Callable[[Seed, Actor], Any]


def _case_field(name: str, value: Callable[[Seed, str], Any], untouched_too: bool = False) -> Scenario:
    """A field of a diagnosed case; with ``untouched_too`` also of a case nobody but its patient
    has touched (the patient may still re-send their creation there, but never this field)."""
    def scenario(s: Seed, actor: Actor) -> list[Writes]:
        ids = [s.diagnosed_case(), *([s.queued_case()] if untouched_too else [])]
        return [{f"{cases.case_path(s.owner, case_id)}/{name}": value(s, case_id)} for case_id in ids]
    return scenario


def _review(s: Seed, actor: Actor) -> list[Writes]:
    """A review and the move to reviewed, on a case the worker diagnosed and on one it has not
    touched yet (where the patient's own creation grant holds: issue 16)."""
    out = []
    for case_id in (s.diagnosed_case(), s.queued_case()):
        case = cases.case_path(s.owner, case_id)
        out.append({f"{case}/review": review(actor.uid), f"{case}/status": cases.Status.REVIEWED.value})
    return out


def _new_case(s: Seed) -> tuple[str, dict]:
    case_id = new_push_id()
    return case_id, cases.new_case(s.owner, case_id, s.case(case_id)["image"], False)


def _job_field(name: str, value: Any) -> Scenario:
    """A field of a job exactly as its patient created it (where the patient's grant holds)."""
    def scenario(s: Seed, actor: Actor) -> Writes:
        return {f"{cases.job_path(s.queued_case())}/{name}": value}
    return scenario


def _reviewed_with_queue(s: Seed, actor: Actor) -> Writes:
    """The portal's review write on a diagnosed case: review, case and queue status, audit entry."""
    case_id = s.diagnosed_case()
    return cases.reviewed_writes(s.owner, case_id, review(actor.uid), new_push_id())


def _claim(s: Seed, actor: Actor) -> Writes:
    """A claim on a freshly diagnosed case (nobody holds one), as the writer themself."""
    return {cases.claim_path(s.diagnosed_case()): {"uid": actor.uid, "patientUid": s.owner,
                                                     "at": cases.SERVER_TIMESTAMP}}


def _history(s: Seed, actor: Actor) -> Writes:
    entry = {"editorUid": actor.uid, "patientUid": s.owner, "review": review(actor.uid),
             "at": cases.SERVER_TIMESTAMP}
    return {f"{cases.review_history_path(s.done)}/{new_push_id()}": entry}


def _message(s: Seed, actor: Actor) -> dict:
    sender_role = "dermatologist" if actor.role in (DERMATOLOGIST, ADMIN) else "patient"
    return cases.message_record(actor.uid, sender_role, f"from {actor.role}")


# The writes of each row, in the states where such a write belongs (docs: who moves what, when) and,
# for patients, where their own grants hold; each with a payload the rules accept from the right
# writer. A scenario returns one write or a list of them; every call prepares its own fresh state
# (as admin), so one role's allowed write cannot change what the next role meets.
WRITES: dict[str, Scenario] = {
    "/users/{uid}": lambda s, a: [{cases.user_path(s.owner): {"displayName": "Renamed", "role": "patient",
                                                              "createdAt": NOW}},
                                  {cases.user_path(s.owner): None}],  # deletes skip .validate
    "/users/{uid}/displayName": lambda s, a: {f"{cases.user_path(s.owner)}/displayName": f"Renamed by {a.role}"},
    "/users/{uid}/role": lambda s, a: [{f"{cases.user_path(s.owner)}/role": "dermatologist"},
                                       {f"{cases.user_path(s.owner)}/role": None}],
    "/users/{uid}/createdAt": lambda s, a: {f"{cases.user_path(s.owner)}/createdAt": NOW + 1},
    "/cases": lambda s, a: (lambda cid, case: {"cases": {s.owner: {cid: case}}})(*_new_case(s)),
    "/cases/{uid}": lambda s, a: (lambda cid, case: {cases.patient_cases_path(s.owner): {cid: case}})(*_new_case(s)),
    "/cases/{uid}/{caseId}": lambda s, a: (lambda cid, case: {cases.case_path(s.owner, cid): case})(*_new_case(s)),
    "/cases/{uid}/{caseId}/status": _review,
    "/cases/{uid}/{caseId}/review": _review,
    "/cases/{uid}/{caseId}/consent": _case_field("consent", lambda s, c: {"research": False, "at": NOW}),
    "/cases/{uid}/{caseId}/image": _case_field(
        "image", lambda s, c: cases.image_record(s.owner, c, "0" * 64, "image/png", 10, 1, 1)),
    "/cases/{uid}/{caseId}/note": _case_field("note", lambda s, c: {"site": "arm", "text": "changed"}),
    "/cases/{uid}/{caseId}/device": _case_field(
        "device", lambda s, c: cases.device_record({"modelVersion": "device-9", "risk": "high"}, at=NOW)),
    "/cases/{uid}/{caseId}/cloud": _case_field("cloud", lambda s, c: {**cloud(), "risk": "high"}, untouched_too=True),
    "/cases/{uid}/{caseId}/failure": _case_field(
        "failure", lambda s, c: cases.failure_record("model_error", "x", 1, NOW), untouched_too=True),
    "/cases/{uid}/{caseId}/training": _case_field(
        "training", lambda s, c: cases.training_record("ds-0123456789ab", NOW), untouched_too=True),
    "/cases/{uid}/{caseId}/flags": _case_field("flags", lambda s, c: {"sentAnyway": True}),
    "/cases/{uid}/{caseId}/sameLesionAs": _case_field("sameLesionAs", lambda s, c: s.failed),
    "/jobs/{caseId}": lambda s, a: (lambda cid: {cases.job_path(cid): cases.job_record(s.owner, cid)})(
        s.queued_case(with_job=False)),
    "/jobs/{caseId}/state": _job_field("state", cases.JobState.DONE.value),
    "/jobs/{caseId}/lease": _job_field("lease", {"worker": "mine", "token": "t", "expiresAt": NOW * 2}),
    "/queue": lambda s, a: {"queue": {s.done: cases.queue_entry(s.owner, "diagnosed", "high", 99.0, NOW, NOW)}},
    "/queue/{caseId}": lambda s, a: {cases.queue_path(s.done): cases.queue_entry(s.owner, "diagnosed", "high", 99.0,
                                                                                 NOW, NOW)},
    "/queue/{caseId}/status": _reviewed_with_queue,
    "/claims": lambda s, a: {"claims": {s.diagnosed_case(): {"uid": a.uid, "patientUid": s.owner, "at": NOW}}},
    "/claims/{caseId}": _claim,
    "/reviewHistory": lambda s, a: {"reviewHistory": {s.done: {new_push_id(): {"editorUid": a.uid}}}},
    "/reviewHistory/{caseId}/{entryId}": _history,
    "/reads/{readerUid}": lambda s, a: {cases.reads_path(s.actors[DERMATOLOGIST].uid): {s.done: NOW}},
    "/reads/{readerUid}/{caseId}": lambda s, a: {
        cases.reads_path(s.actors[DERMATOLOGIST].uid, s.diagnosed_case()): cases.SERVER_TIMESTAMP},
    "/reviewers/{reviewerUid}": lambda s, a: {
        f"reviewers/{s.actors[DERMATOLOGIST].uid}": {"templates": {"soon": f"by {a.role}"}}},
    "/reviewers/{reviewerUid}/templates/{urgency}": lambda s, a: {
        cases.reviewer_templates_path(s.actors[DERMATOLOGIST].uid, "urgent"): f"by {a.role} {uuid.uuid4().hex[:6]}"},
    "/messages": lambda s, a: {"messages": {s.owner: {s.done: {new_push_id(): _message(s, a)}}}},
    "/messages/{uid}": lambda s, a: {f"messages/{s.owner}": {s.done: {new_push_id(): _message(s, a)}}},
    "/messages/{uid}/{caseId}/{msgId}": lambda s, a: {
        f"{cases.messages_path(s.owner, s.done)}/{new_push_id()}": _message(s, a)},
    "/models": lambda s, a: {"models": {"cloud": {"current": "evil"}}},
    "/models/{kind}": lambda s, a: {"models/cloud": {"current": "evil"}},
    "/models/{kind}/current": lambda s, a: {"models/cloud/current": "evil"},
    "/models/{kind}/versions/{version}": lambda s, a: {
        f"models/cloud/versions/evil-{uuid.uuid4().hex[:6]}": {"storagePath": "models/cloud/evil", "createdAt": NOW}},
    "/modelAudit/{kind}/{entryId}": lambda s, a: {f"modelAudit/cloud/{new_push_id()}": {
        "action": "promote", "version": "evil", "by": a.role, "at": NOW}},
    "/workers/{workerId}": lambda s, a: {f"workers/w-{a.role}": {"updatedAt": NOW}},
    "/erasures/{uid}": _erasure_request,
    "/erasures/{uid}/state": _erasure_state,
    "/erased/{caseId}": lambda s, a: {cases.erased_path(s.queued_case()): cases.tombstone_record(NOW)},
    "/datasets/versions/{version}": lambda s, a: [
        {cases.dataset_version_path(s.version): {"manifestSha256": "f" * 64, "createdAt": NOW}},
        {cases.dataset_version_path(f"ds-{uuid.uuid4().hex[:12]}"): {"manifestSha256": "f" * 64, "createdAt": NOW}}],
    "/retrainRuns/{runId}": lambda s, a: [{f"retrainRuns/{RUN_ID}/status": "promoted"},
                                          {f"retrainRuns/{RUN_ID[:-1]}0": {"runId": "x", "status": "done"}}],
    "datasets/{version}/manifest.json": lambda s, a: (cases.dataset_manifest_object(s.version), b'{"evil":1}',
                                                      "application/json"),
    "cases/{uid}/{caseId}/image.jpg": lambda s, a: (cases.image_object(s.owner, new_push_id()), JPEG, "image/jpeg"),
    "cases/{uid}/{caseId}/heatmap.png": lambda s, a: (cases.heatmap_object(s.owner, new_push_id()), PNG, "image/png"),
    "models/{kind}/{version}/{file}": lambda s, a: (f"models/cloud/{s.version}/model.keras", b"evil",
                                                    "application/octet-stream"),
}


def refused(call: Callable[[], Any]) -> bool:
    """Whether the rules refused the call; a token problem would be a broken test, not a denial."""
    try:
        call()
    except PermissionDenied as exc:
        assert not isinstance(exc, Unauthenticated), f"token refused, not the rules: {exc}"
        return True
    return False


def _stored(seed: Seed, row: Access, target: Any) -> Any:
    if row.service == "storage":
        blob = admin_bucket(seed.settings).blob(target[0])
        return blob.download_as_bytes() if blob.exists() else None
    return {path: seed.admin(path).get() for path in target}


MATRIX = [pytest.param(row, role, id=f"{row.path} {role}") for row in ACCESS for role in ACCESS_ROLES]


@pytest.mark.parametrize("row,role", MATRIX)
def test_read(seed, row, role):
    actor, path = seed.actors[role], concrete(seed, row)
    read = (lambda: actor.storage.download(path)) if row.service == "storage" else (lambda: actor.db.get(path))
    if role in row.read:
        assert read() is not None, "allowed, and the seed holds data there"
    else:
        assert refused(read), f"{role} could read {path}"


@pytest.mark.parametrize("row,role", MATRIX)
def test_write(seed, row, role):
    assert row.path in WRITES, f"no write scenario for the new row {row.path}: add one to WRITES"
    actor = seed.actors[role]
    targets = WRITES[row.path](seed, actor)
    for target in targets if isinstance(targets, list) else [targets]:
        before = _stored(seed, row, target)
        if row.service == "storage":
            write = lambda t=target: actor.storage.upload(*t)  # noqa: E731
        else:
            write = lambda t=target: actor.db.update("/", t)  # noqa: E731
        shown = target[0] if row.service == "storage" else target
        if role in row.write:
            write()
            after = _stored(seed, row, target)
            values = after.values() if isinstance(after, dict) else [after]
            assert after != before and None not in values, f"{role}'s write of {shown} did not land"
        else:
            assert refused(write), f"{role} could write {shown}"
            assert _stored(seed, row, target) == before, "a refused write changed data"


# ---- issue 16: stored script through Storage -----------------------------------------------------------


def test_stored_script_uploads_are_refused(seed):
    """``image/.*`` accepted ``image/png, text/html`` and SVG; photos are an exact allow-list now."""
    owner = seed.actors[OWNER]
    path = cases.image_object(seed.owner, new_push_id())
    raw = requests.post(owner.storage.base, params={"name": path}, data=b"<script>alert(1)</script>", timeout=30,
                        headers={"Authorization": f"Firebase {owner.db.token()}", "Content-Type": "image/png, text/html"})
    assert raw.status_code == 403
    for content_type in ("image/svg+xml", "text/html", "image/png, text/html"):
        assert refused(lambda ct=content_type: owner.storage.upload(path, b"<svg onload='alert(1)'/>", ct))
    assert not admin_bucket(seed.settings).blob(path).exists()
    # Nor by re-labelling a photo that is already there.
    photo = cases.image_object(seed.owner, new_push_id())
    owner.storage.upload(photo, JPEG, "image/jpeg")
    assert refused(lambda: owner.storage.update_metadata(photo, {"contentType": "text/html"}))
    assert owner.storage.metadata(photo)["contentType"] == "image/jpeg"


# ---- the table covers the rules and the docs, and the docs the table ------------------------------------


def _segments(path: str) -> list[str]:
    """Path segments with every variable spelled ``{}`` (``$uid``, ``{uid}``, ``...``), ``{**}`` a rest."""
    out = []
    for part in path.strip("/").split("/"):
        if part.endswith("=**}"):
            out.append("{**}")
        elif part.startswith("$") or (part.startswith("{") and part.endswith("}")) or part == "...":
            out.append("{}")
        elif part:
            out.append(part)
    return out


def _leads_to(a: list[str], b: list[str]) -> bool:
    """Whether ``a`` is ``b`` or one of its ancestors (variables match anything, ``{**}`` the rest)."""
    for x, y in zip(a, b, strict=False):
        if "{**}" in (x, y):
            return True
        if x != y and "{}" not in (x, y):
            return False
    return len(a) <= len(b) or "{**}" in b


def _rows(service: str) -> list[list[str]]:
    return [_segments(row.path) for row in ACCESS if row.service == service]


def _rules_nodes() -> list[tuple[list[str], dict]]:
    spec = json.loads(blank_comments((PROJECT_ROOT / "database.rules.json").read_text()))["rules"]
    out: list[tuple[list[str], dict]] = []

    def walk(node: dict, path: list[str]) -> None:
        out.append((path, node))
        for key, child in node.items():
            if not key.startswith("."):
                walk(child, [*path, key])

    walk(spec, [])
    return out


def test_the_table_has_one_row_per_path_and_a_write_scenario_each():
    paths = [row.path for row in ACCESS]
    assert len(paths) == len(set(paths))
    assert set(WRITES) == set(paths)
    for row in ACCESS:
        assert row.read | row.write <= set(ACCESS_ROLES), row.path


def test_every_rule_of_database_rules_json_is_in_the_table():
    rows = _rows("database")
    for path, node in _rules_nodes():
        if not path:
            continue
        pattern = _segments("/".join(path))
        where = "/" + "/".join(path)
        if ".read" in node or ".write" in node:
            assert pattern in rows, f"{where} grants access but is not a row of cases.ACCESS"
        if node == {".validate": False}:
            continue  # a catch-all refusal ("$other"): no path, nothing to grant
        # A $variable below a row that has no rows under it is part of that row's record
        # (device/top/$i); any other one must be a row or lead to one, as must a top-level key.
        in_a_leaf_row = any(row != pattern and _leads_to(row, pattern)
                            and not any(other != row and _leads_to(row, other) for other in rows) for row in rows)
        if len(path) == 1 or (path[-1].startswith("$") and not in_a_leaf_row):
            assert any(_leads_to(pattern, row) for row in rows), f"{where} is in the rules but not in cases.ACCESS"


def test_every_match_of_storage_rules_is_in_the_table():
    text = (PROJECT_ROOT / "storage.rules").read_text()
    matches = [m for m in re.findall(r"^\s*match (\S+)", text, re.M) if m != "/b/{bucket}/o"]
    assert matches
    rows = _rows("storage")
    for match in matches:
        pattern = _segments(match)
        assert any(_leads_to(pattern, row) or _leads_to(row, pattern) for row in rows), match


def _docs_block(text: str, heading: str) -> list[str]:
    section = text.split(f"## {heading}\n", 1)[1]
    return section.split("```", 2)[1].splitlines()[1:]


def _documented() -> tuple[list[list[str]], list[list[str]]]:
    """(record paths, paths of their named fields) of the docs' RTDB data model and Storage paths."""
    text = (PROJECT_ROOT / "docs" / "ARCHITECTURE.md").read_text()
    records, fields, last = [], [], ""
    for line in _docs_block(text, "RTDB data model"):
        if m := re.match(r"(/\S+)", line):
            last = m.group(1)
            records.append(_segments(last))
        elif m := re.match(r" {4}([A-Za-z][\w/{}]*):", line):
            fields.append(_segments(f"{last}/{m.group(1)}"))
    for line in _docs_block(text, "Storage paths"):
        if m := re.match(r"(\w\S+)", line):
            records.append(["storage:", *_segments(m.group(1))])
    return records, fields


def test_every_row_is_a_path_of_the_docs_and_every_documented_record_has_a_row():
    records, fields = _documented()
    assert len(records) >= 10, "the docs' data model could not be read"
    rows = [(["storage:"] if row.service == "storage" else []) + _segments(row.path) for row in ACCESS]
    for row, access in zip(rows, ACCESS, strict=True):
        assert row in records or row in fields or any(_leads_to(row, r) for r in records), (
            f"{access.path} is in cases.ACCESS but not in docs/ARCHITECTURE.md's data model")
    for record in records:
        assert record in rows, f"docs/ARCHITECTURE.md documents {'/'.join(record)} but cases.ACCESS has no row for it"
