"""What the patient reads: risk advice per tier, case states, consent, errors. In one place so the
wording stays calibrated and consistent across screens (and is tested without a browser).

Risk wording follows the calibrated tiers of the risk policy: a tier is a reason to act within a
time, never a diagnosis, and every answer carries the disclaimer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dermaloop import DISCLAIMER, cases

RISK_ADVICE = {
    "high": ("Higher risk", "See a doctor within two weeks. Show them this photo and say what you noticed."),
    "moderate": ("Moderate risk", "Have a doctor look at it within a few weeks, sooner if it changes, "
                                  "bleeds or itches."),
    "low": ("Lower risk", "Nothing here suggests you need to hurry. Keep an eye on it and see a doctor if it "
                          "changes in size, shape or colour, bleeds or itches."),
}
NO_TIER = ("No risk estimate", "The photo could not be assessed. A dermatologist can still look at it.")

STATE_TEXT = {
    cases.Status.CAPTURED: "On this device only",
    cases.Status.DIAGNOSED_ON_DEVICE: "On this device only: waiting to upload",
    cases.Status.UPLOADING: "Uploading",
    cases.Status.QUEUED: "Waiting for the cloud analysis",
    cases.Status.PROCESSING: "The cloud is analysing it",
    cases.Status.DIAGNOSED: "Cloud result ready",
    cases.Status.FAILED: "Analysis failed",
    cases.Status.REVIEWED: "Reviewed by a dermatologist",
    cases.Status.LABELLED: "Reviewed by a dermatologist",
}

OFFLINE_PENDING = "On this device only: it uploads by itself when you are back online"

URGENCY_TEXT = {"routine": "Routine: at your next convenient appointment",
                "soon": "Soon: within the next few weeks",
                "urgent": "Urgent: as soon as possible"}

CONSENT_TITLE = "Before your first photo"
CONSENT_TEXT = (
    "DermaLoop gives an automated risk estimate, not a diagnosis.\n\n"
    "What is stored: the photos you take, your answers and notes, the results of the models and "
    "your messages with the dermatologists. Photos stay on this device until they are uploaded.\n\n"
    "Who sees them: you, and the dermatologists of the service. Nobody else.\n\n"
    "You can ask the service to delete all your data at any time. Labels that were already frozen into "
    "a released training set (only if you allow it below) cannot be taken back out of that release."
)
RESEARCH_TEXT = ("Also allow my photos, once a dermatologist has labelled them, to be used to improve the "
                 "models (optional)")

SENT_ANYWAY_NOTE = ("The checks on this device were not sure this is a close-up of a skin spot. "
                    "You can take it again, or send it to a dermatologist anyway.")

FIELD_LIMITS = {"note": cases.MAX_NOTE_CHARS, "site": cases.MAX_SITE_CHARS}


# A model trained on synthetic images (the starter a bare machine builds) names classes only to show
# how the app works; it never gives a risk tier (dermaloop.model_dir.is_demonstration).
DEMONSTRATION = ("Demonstration model: no risk estimate",
                 "This answer comes from a demonstration model trained on synthetic pictures, not on real skin. "
                 "The names above mean nothing medically. A dermatologist can still look at your photo.")


# The model's call can be a class less probable than another (a melanoma offset, dermaloop.risk):
# the patient's list is in order of probability, so the numbers never contradict the percentages,
# and this line says why the call differs.
CALL_NOTE = ("The model flags {call} for a dermatologist's attention although {likely} is more probable: "
             "missing {call} would cost more.")


def by_probability(top: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """A model's top list (in the order of its call) in order of probability, most probable first."""
    return sorted(top or [], key=lambda t: -float(t.get("p") or 0))


def call_note(top: Sequence[Mapping[str, Any]]) -> str | None:
    """The line that explains a call which is not the most probable class; None when it is."""
    if not top:
        return None
    ranked = by_probability(top)
    if ranked[0] is top[0]:
        return None
    name = lambda t: t.get("name") or t.get("label")  # noqa: E731
    return CALL_NOTE.format(call=name(top[0]), likely=name(ranked[0]))


def risk_advice(risk: str | None, demonstration: bool = False) -> tuple[str, str]:
    if demonstration:
        return DEMONSTRATION
    return RISK_ADVICE.get(risk or "", NO_TIER)


# The card's abstain rule (dermaloop.risk.AbstainRule, issue 20): the model is sure only when its
# calibrated prediction set is exactly the class it names. Otherwise the app says so next to the
# risk advice (the tier still stands: it is the calibrated malignancy estimate, not the call).
UNSURE_APART = "Unsure: the model could not tell these apart: {names}. A dermatologist will look."
UNSURE_ONE = ("Unsure: the photo does not clearly support the model's answer (closest: {names}). "
              "A dermatologist will look.")
UNSURE_NONE = "Unsure: no condition fits this photo clearly enough. A dermatologist will look."


def unsure_text(names: Sequence[str]) -> str:
    """The unsure line for a prediction set, given its classes' names (most probable first)."""
    if len(names) >= 2:
        return UNSURE_APART.format(names=", ".join(names))
    return UNSURE_ONE.format(names=names[0]) if names else UNSURE_NONE


def unsure_line(result: Mapping[str, Any] | None, name: Callable[[str], str] = str) -> str | None:
    """The unsure line for a device answer (``prediction_set``) or a case's ``device``/``cloud``
    record (``predictionSet``); None when the model is sure, its card has no abstain rule, or it is
    a demonstration model (whose names mean nothing medically: its own wording says so)."""
    if not isinstance(result, Mapping) or result.get("unsure") is not True or result.get("demonstration"):
        return None
    labels = result.get("predictionSet") or result.get("prediction_set") or []
    return unsure_text([name(str(label)) for label in labels if label])


def state_text(status: str | None, failure: dict[str, Any] | None = None) -> str:
    try:
        text = STATE_TEXT[cases.Status(status)]
    except ValueError:
        text = "Unknown state"
    if status == cases.Status.FAILED:
        text += ": " + cases.failure_message((failure or {}).get("reason"))
    return text


def percent(p: float) -> str:
    return f"{p:.0%}" if p >= 0.01 else "under 1%"


def disclaimer() -> str:
    return DISCLAIMER
