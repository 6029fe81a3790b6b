"""The triage score that orders the dermatologists' queue (``/queue/{caseId}.score``, higher = sooner).

Points for what makes a case urgent: the calibrated risk tier and malignant probability, the
device and cloud models disagreeing (one of them is wrong, a human should look), and the cloud
model being unsure (entropy). Waiting time enters as ageing: every ``AGEING_HOURS_PER_POINT`` hours
a case has waited is worth one point. A stored score cannot grow by itself, so ageing is folded in
by subtracting the creation time: comparing two stored scores is then the same as comparing
"urgency + hours waited" for both at any moment, and the queue order stays right without rewrites.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

RISK_POINTS = {"high": 6.0, "moderate": 3.0, "low": 0.0, None: 1.0}
DISAGREEMENT_POINTS = 2.0  # device and cloud top-1 differ, or their risk tiers differ
UNCERTAINTY_POINTS = 2.0  # times the normalised entropy of the cloud probabilities
MALIGNANT_POINTS = 3.0  # times the malignant probability
AGEING_HOURS_PER_POINT = 12.0
_EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z keeps the numbers small


def entropy(probs: np.ndarray) -> float:
    """Entropy normalised to [0, 1] (1 = uniform: the model has no idea)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    return float(-(p * np.log(p)).sum() / math.log(len(p))) if len(p) > 1 else 0.0


def disagrees(device: Any, cloud_top: str, cloud_risk: str | None) -> bool:
    if not isinstance(device, dict):
        return False
    top = device.get("top")
    device_top = top[0].get("label") if isinstance(top, list) and top and isinstance(top[0], dict) else None
    device_risk = device.get("risk")
    return (device_top is not None and device_top != cloud_top) or (
        device_risk is not None and cloud_risk is not None and device_risk != cloud_risk
    )


def urgency(risk: str | None, malignant_p: float, probs: np.ndarray, disagreement: bool) -> float:
    return (
        RISK_POINTS.get(risk, 1.0)
        + MALIGNANT_POINTS * malignant_p
        + UNCERTAINTY_POINTS * entropy(probs)
        + (DISAGREEMENT_POINTS if disagreement else 0.0)
    )


def score(urgency_points: float, created_at_ms: float | None, now_ms: int) -> float:
    """Urgency plus ageing, as a number whose order never changes as time passes."""
    created = created_at_ms if isinstance(created_at_ms, (int, float)) else now_ms
    waited_hours_since_epoch = (created - _EPOCH_MS) / 3_600_000.0
    return round(urgency_points - waited_hours_since_epoch / AGEING_HOURS_PER_POINT, 4)
