"""Why a job did not produce a diagnosis: the worker's exceptions around the case domain's reasons
(``dermaloop.cases.FAILURE_REASONS``).

Permanent errors fail the case at once (retrying a text file will not turn it into a photo);
transient ones are retried with backoff and fail the case only when the attempts run out.
"""

from __future__ import annotations

from dermaloop.cases import FAILURE_REASONS


class JobError(Exception):
    """A job-level failure with a patient-facing reason code."""

    def __init__(self, reason: str, detail: str, permanent: bool) -> None:
        if reason not in FAILURE_REASONS:
            raise ValueError(f"unknown failure reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.permanent = permanent


def permanent(reason: str, detail: str) -> JobError:
    return JobError(reason, detail, permanent=True)


def transient(reason: str, detail: str) -> JobError:
    return JobError(reason, detail, permanent=False)
