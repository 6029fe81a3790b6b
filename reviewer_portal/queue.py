"""The triage queue as a dermatologist sees it: one row per queued case, in triage order, filtered.

Pure functions over the live copies the session keeps (``/queue``, ``/cases``, ``/claims``,
``/messages``, ``/reads/{me}``), so the order, the filters, the overdue badge and the unread counts
are tested without a browser and recomputed cheaply on every change.

Order: the stored ``score`` (higher first). The worker folds risk, device/cloud disagreement, the
cloud model's uncertainty and waiting time into it, and makes it time-invariant (ageing is
subtracted from the creation time), so sorting by it is the triage order at any moment; ties go to
the case that has waited longer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dermaloop import cases
from reviewer_portal import results
from reviewer_portal.results import Call, top_call

HOUR_MS = 3_600_000
# How long a case of each risk tier may wait before it is flagged overdue (issue 18: high 24 h).
TIER_LIMIT_HOURS: dict[str | None, float] = {"high": 24.0, "moderate": 72.0, "low": 168.0, None: 168.0}
RISKS = ("high", "moderate", "low")
# Waiting cases without a risk tier: a demonstration model's answer has none by design
# (docs/ARCHITECTURE.md "Demonstration models"), which is not the same as a tier not known yet.
DEMONSTRATION_TIER = "demonstration"
UNKNOWN_TIER = "unknown"
TIERS = (*RISKS, DEMONSTRATION_TIER, UNKNOWN_TIER)  # the order the filter and monitoring list them in
STATUS_FILTERS = ("unreviewed", "diagnosed", "failed", "reviewed", "all")
# "Age" is how long the case has waited: the data model holds no patient age.
AGE_FILTERS: dict[str, tuple[float, float]] = {
    "any": (0.0, float("inf")), "under 1 day": (0.0, 24.0), "1 to 3 days": (24.0, 72.0),
    "over 3 days": (72.0, float("inf")),
}


@dataclass(frozen=True)
class QueueRow:
    case_id: str
    uid: str
    score: float
    status: str
    risk: str | None
    created_at: int
    waited_ms: int
    device: Call | None
    cloud: Call | None
    site: str | None
    sent_anyway: bool
    unread: int
    claimed_by: str | None  # a live claim's holder (None: free or lapsed)
    answered: tuple[str, ...] = ()  # the models ("device", "cloud") with a record on the case
    demonstration: tuple[str, ...] = ()  # those of them that are demonstration models (no risk)
    unsure: tuple[str, ...] = ()  # those whose card's abstain rule said unsure

    @property
    def overdue(self) -> bool:
        return self.waited_ms > TIER_LIMIT_HOURS.get(self.risk, TIER_LIMIT_HOURS[None]) * HOUR_MS

    @property
    def disagree(self) -> bool:
        return self.device is not None and self.cloud is not None and self.device.label != self.cloud.label

    @property
    def tier(self) -> str:
        """What the risk filter and the monitoring screen count the row under: its tier; without one,
        "demonstration" when a demonstration model answered (its badge), else "unknown"."""
        if self.risk:
            return self.risk
        return DEMONSTRATION_TIER if self.demonstration else UNKNOWN_TIER

    @property
    def risk_badges(self) -> list[str]:
        """The tier badge, or the demonstration warning in place of any risk wording; "UNSURE" too."""
        return results.risk_badges(self.risk, self.demonstration, self.answered, self.unsure)


@dataclass(frozen=True)
class Filters:
    status: str = "unreviewed"
    risk: str = "any"
    site: str = "any"
    age: str = "any"


def unread_count(messages: Any, last_read: Any) -> int:
    """Messages from the patient after this dermatologist's last read of the case's chat."""
    if not isinstance(messages, Mapping):
        return 0
    since = last_read if isinstance(last_read, int | float) else -1
    return sum(1 for m in messages.values()
               if isinstance(m, Mapping) and m.get("senderRole") == "patient"
               and isinstance(m.get("at"), int | float) and m["at"] > since)


def build_rows(queue: Any, all_cases: Any, messages: Any, reads: Any, claims: Any, now_ms: int) -> list[QueueRow]:
    """One row per queue entry, joined with its case (calls, site, flags), chat and claim, in order."""
    rows: list[QueueRow] = []
    queue = queue if isinstance(queue, Mapping) else {}
    all_cases = all_cases if isinstance(all_cases, Mapping) else {}
    messages = messages if isinstance(messages, Mapping) else {}
    reads = reads if isinstance(reads, Mapping) else {}
    claims = claims if isinstance(claims, Mapping) else {}
    for case_id, entry in queue.items():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("uid"), str):
            continue
        uid = entry["uid"]
        case = (all_cases.get(uid) or {}).get(case_id) if isinstance(all_cases.get(uid), Mapping) else None
        case = case if isinstance(case, Mapping) else {}
        created = entry.get("createdAt") if isinstance(entry.get("createdAt"), int | float) else now_ms
        note = case.get("note") if isinstance(case.get("note"), Mapping) else {}
        flags = case.get("flags") if isinstance(case.get("flags"), Mapping) else {}
        chat = (messages.get(uid) or {}).get(case_id) if isinstance(messages.get(uid), Mapping) else None
        score = entry.get("score")
        models = ("device", "cloud")
        rows.append(QueueRow(
            case_id=case_id, uid=uid, score=float(score) if isinstance(score, int | float) else float("-inf"),
            # The case's own status wins: it is the truth (the queue entry follows it).
            status=str(case.get("status") or entry.get("status") or ""),
            risk=entry.get("risk") if entry.get("risk") in RISKS else None,
            created_at=int(created), waited_ms=max(0, int(now_ms - created)),
            device=top_call(case.get("device")), cloud=top_call(case.get("cloud")),
            site=note.get("site") if isinstance(note.get("site"), str) else None,
            sent_anyway=flags.get("sentAnyway") is True,
            unread=unread_count(chat, reads.get(case_id)),
            claimed_by=cases.claim_holder(claims.get(case_id), now_ms),
            answered=tuple(m for m in models if isinstance(case.get(m), Mapping)),
            demonstration=tuple(m for m in models if results.is_demonstration(case.get(m))),
            unsure=tuple(m for m in models if results.is_unsure(case.get(m))),
        ))
    return ordered(rows)


def ordered(rows: Iterable[QueueRow]) -> list[QueueRow]:
    """Triage order: highest score first, then the longest wait."""
    return sorted(rows, key=lambda r: (-r.score, r.created_at, r.case_id))


def matches(row: QueueRow, filters: Filters) -> bool:
    if filters.status == "unreviewed" and row.status in (cases.Status.REVIEWED, cases.Status.LABELLED):
        return False
    if filters.status not in ("unreviewed", "all") and row.status != filters.status:
        return False
    if filters.risk != "any" and row.tier != filters.risk:
        return False
    if filters.site != "any" and (row.site or "not given") != filters.site:
        return False
    low, high = AGE_FILTERS.get(filters.age, AGE_FILTERS["any"])
    return low <= row.waited_ms / HOUR_MS < high


def apply(rows: Iterable[QueueRow], filters: Filters) -> list[QueueRow]:
    return [row for row in rows if matches(row, filters)]


def sites(rows: Iterable[QueueRow]) -> list[str]:
    """The body sites present, for the site filter."""
    return sorted({row.site or "not given" for row in rows})


def waited_text(ms: int) -> str:
    hours = ms / HOUR_MS
    if hours < 1:
        return f"{max(1, int(ms / 60_000))} min"
    if hours < 48:
        return f"{hours:.0f} h"
    return f"{hours / 24:.0f} days"
