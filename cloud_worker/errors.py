"""Why a job did not produce a diagnosis, in words the patient app can show.

``reason`` is a stable code the app maps to its own wording; ``detail`` is for logs and support.
Permanent errors fail the case at once (retrying a text file will not turn it into a photo);
transient ones are retried with backoff and fail the case only when the attempts run out.
"""

from __future__ import annotations

# reason code -> the sentence shown to the patient
REASONS: dict[str, str] = {
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


class JobError(Exception):
    """A job-level failure with a patient-facing reason code."""

    def __init__(self, reason: str, detail: str, permanent: bool) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown failure reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.permanent = permanent


def permanent(reason: str, detail: str) -> JobError:
    return JobError(reason, detail, permanent=True)


def transient(reason: str, detail: str) -> JobError:
    return JobError(reason, detail, permanent=False)
