"""Not-skin rejection: decline photos that are not skin lesions before the classifier guesses.

A classifier trained only on lesions gives a confident lesion label to a cat. This check is a
logistic regression on the analysis trunk's pooled ImageNet features (the whole frame), trained on
HAM10000 lesion photos against everyday photos, documents, noise and blank frames
(``training/ood_train.py``); its threshold keeps the false rejection of real lesions near 1% on
training data, and rejection/false rejection are measured on held-out lesions and held-out sources.
The weights (standardisation folded in) are a small JSON file in ``weights/``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

OOD_FILE = Path(__file__).with_name("weights") / "ood_head.json"

# The device model outputs sigmoid(logit / TEMPER): int8 outputs have 1/256 steps, and the decision
# threshold sits near p = 0.99 where untempered steps would be too coarse to place it.
TEMPER = 8.0

MESSAGE = ("This does not look like a close-up photo of a skin spot. Photograph the spot itself, "
           "in focus and filling the middle of the picture.")


@lru_cache(maxsize=2)
def load_head(path: str | None = None) -> dict[str, Any]:
    p = Path(path) if path else OOD_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{p} missing: run `python -m training.ood_train --data DIR`")
    head = json.loads(p.read_text())
    head["w"] = np.asarray(head["w"], np.float64)
    return head


def lesion_probability(pooled: np.ndarray, head: dict[str, Any] | None = None) -> np.ndarray | float:
    """P(lesion photo) for pooled trunk features (1280,) or (n, 1280)."""
    h = head or load_head()
    z = np.asarray(pooled, np.float64) @ h["w"] + h["b"]
    p = 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))
    return float(p) if np.ndim(p) == 0 else p


def is_lesion(score: float, head: dict[str, Any] | None = None) -> bool:
    return bool(score >= (head or load_head())["threshold"])


def untemper(p_tempered: float) -> float:
    """P(lesion) from the device model's tempered output."""
    q = float(np.clip(p_tempered, 1e-6, 1 - 1e-6))
    return float(1.0 / (1.0 + np.exp(-TEMPER * np.log(q / (1 - q)))))
