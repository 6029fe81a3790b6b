"""Claiming a case for review: ``/claims/{caseId}`` taken with a conditional write.

Opening a case takes its claim, so two dermatologists never review one case at once. The write is
``set_if_match`` with the ETag of what was just read: of two dermatologists who both saw the case
free, exactly one wins (the other gets a 412 and is told who holds it). The rules enforce the rest:
a claim is written only as oneself, only over none, one's own or a lapsed one (server-stamped
``at`` + ``cases.CLAIM_TTL_MS``), and only its holder deletes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from dermaloop import cases
from dermaloop.database import UserDatabase
from dermaloop.errors import Conflict, PermissionDenied, Unauthenticated


@dataclass
class ClaimHeld(Exception):
    """Someone else holds a live claim on the case."""

    holder: str
    expires_at: int | None

    def __str__(self) -> str:
        return f"another dermatologist ({self.holder}) is reviewing this case"


class CaseGone(Exception):
    """The case no longer exists (its patient deleted it, with their account)."""


def now_ms() -> int:
    return int(time.time() * 1000)


def take(db: UserDatabase, me: str, patient_uid: str, case_id: str) -> dict[str, Any]:
    """Take (or renew) the claim; returns the stored claim. Raises :class:`ClaimHeld` when another
    dermatologist holds it and :class:`CaseGone` when the case is gone."""
    path = cases.claim_path(case_id)
    for _ in range(3):
        current, etag = db.get_with_etag(path)
        holder = cases.claim_holder(current, now_ms())
        if holder is not None and holder != me:
            raise ClaimHeld(holder, cases.claim_expires_at(current))
        try:
            ok, stored, _ = db.set_if_match(path, cases.claim_record(me, patient_uid), etag)
        except Unauthenticated:
            raise
        except PermissionDenied:
            # The rules said no: the case is gone, or a claim appeared that our clock thought lapsed.
            if db.get(cases.case_path(patient_uid, case_id)) is None:
                raise CaseGone(case_id) from None
            current = db.get(path)
            if isinstance(current, dict) and current.get("uid") != me:
                raise ClaimHeld(str(current.get("uid")), cases.claim_expires_at(current)) from None
            raise
        if ok:
            return stored if isinstance(stored, dict) else cases.claim_record(me, patient_uid, at=now_ms())
        # 412: someone wrote in between; look again (their claim, or a release)
    raise Conflict("the claim kept changing while it was being taken; try again")


def release(db: UserDatabase, me: str, case_id: str) -> bool:
    """Release our claim (no-op when it is not ours any more). True when one was released."""
    path = cases.claim_path(case_id)
    current = db.get(path)
    if not isinstance(current, dict) or current.get("uid") != me:
        return False
    try:
        db.delete(path)
    except PermissionDenied:
        return False
    return True


def holder(db: UserDatabase, case_id: str) -> str | None:
    return cases.claim_holder(db.get(cases.claim_path(case_id)), now_ms())
