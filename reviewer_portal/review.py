"""Saving a dermatologist's review: validated first, then one multi-path write, never half-written.

The labels retraining learns from come from here, so a review must be impossible to lose or to
corrupt: the form is checked with ``dermaloop.cases.review_record`` (the same limits the rules
enforce) before anything is sent, the claim is renewed (so a save after the claim lapsed and was
taken by someone else is refused with who holds it), and review, case status, queue status and the
audit entry go in one update (``cases.reviewed_writes``): all of it lands or none of it does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dermaloop import cases
from dermaloop.database import UserDatabase, new_push_id
from dermaloop.errors import PermissionDenied, Unauthenticated
from reviewer_portal import claims

# Starting text of the recommendation for each urgency; the dermatologist edits it per case, and
# per session in the portal's template editor.
DEFAULT_TEMPLATES: dict[str, str] = {
    "routine": "This looks harmless. Keep an eye on it and send a new photo if it changes in size, "
               "shape or colour, or at your next routine check.",
    "soon": "Please book an appointment with a dermatologist within the next few weeks to have this "
            "examined in person.",
    "urgent": "Please see a dermatologist within days. Call your doctor or a skin clinic today and "
              "mention that this spot needs an urgent check.",
}
REVIEWABLE = frozenset({cases.Status.QUEUED, cases.Status.DIAGNOSED, cases.Status.FAILED, cases.Status.REVIEWED})


class ReviewRefused(Exception):
    """The review was not saved; the message says why in the dermatologist's words."""


@dataclass
class ReviewForm:
    label: str | None
    recommendation: str
    urgency: str | None
    confidence: str | None = None
    other_text: str | None = None
    training_use: bool = False


def build(form: ReviewForm, me: str, taxonomy_ids: Iterable[str], research_consent: bool) -> dict[str, Any]:
    """The review record for ``form``, or :class:`ReviewRefused` saying what to fix."""
    if not form.label:
        raise ReviewRefused("Choose a diagnosis before saving (or 'Ungradable' if the photo cannot be assessed).")
    if not form.urgency:
        raise ReviewRefused("Choose an urgency before saving.")
    if form.label == "other" and not (form.other_text or "").strip():
        raise ReviewRefused("Say what the 'Other' diagnosis is.")
    if form.training_use and not research_consent:
        raise ReviewRefused("This patient did not agree to research use: the image cannot be used for training.")
    try:
        return cases.review_record(me, form.label, form.recommendation.strip(), form.urgency,
                                   taxonomy_labels=taxonomy_ids, confidence=form.confidence,
                                   other_text=form.other_text if form.label == "other" else None,
                                   training_use=bool(form.training_use) if research_consent else None)
    except cases.CaseError as exc:
        text = str(exc)
        raise ReviewRefused(text[:1].upper() + text[1:] + ".") from None


def save(db: UserDatabase, me: str, uid: str, case_id: str, form: ReviewForm,
         taxonomy_ids: Iterable[str]) -> dict[str, Any]:
    """Validate and save; returns the review as stored. Raises :class:`ReviewRefused` (nothing was
    written) or :class:`~dermaloop.errors.Unauthenticated` (the session ended)."""
    case = db.get(cases.case_path(uid, case_id))
    if not isinstance(case, dict):
        raise ReviewRefused("This case no longer exists: its patient deleted it. Nothing was saved.")
    consent = case.get("consent") if isinstance(case.get("consent"), dict) else {}
    review = build(form, me, taxonomy_ids, consent.get("research") is True)
    status = case.get("status")
    if status not in REVIEWABLE:
        why = {cases.Status.PROCESSING: "the cloud model is analysing it right now; try again in a moment",
               cases.Status.LABELLED: "its review is already a training label"}.get(status, f"it is {status}")
        raise ReviewRefused(f"This case cannot be reviewed now: {why}. Nothing was saved.")
    try:
        claims.take(db, me, uid, case_id)  # renew ours, or learn that someone else has it
    except claims.ClaimHeld as exc:
        raise ReviewRefused(f"Your claim on this case lapsed and {exc.holder} is reviewing it now. "
                            "Nothing was saved.") from None
    except claims.CaseGone:
        raise ReviewRefused("This case no longer exists: its patient deleted it. Nothing was saved.") from None
    in_queue = db.get(f"{cases.queue_path(case_id)}/status") is not None
    previous = case.get("review") if isinstance(case.get("review"), dict) else None
    try:
        db.update("/", cases.reviewed_writes(uid, case_id, review, new_push_id(), previous, in_queue=in_queue))
    except Unauthenticated:
        raise
    except PermissionDenied:
        if db.get(cases.case_path(uid, case_id)) is None:
            raise ReviewRefused("This case no longer exists: its patient deleted it. Nothing was saved.") from None
        held = claims.holder(db, case_id)
        if held not in (None, me):
            raise ReviewRefused(f"{held} took this case over. Nothing was saved.") from None
        raise ReviewRefused("The database refused this review (the case changed meanwhile). Nothing was saved; "
                            "reopen the case and try again.") from None
    stored = db.get(f"{cases.case_path(uid, case_id)}/review")
    return stored if isinstance(stored, dict) else review
