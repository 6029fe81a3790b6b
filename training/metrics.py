"""Evaluation metrics (scikit-learn) for a classifier's calibrated probabilities."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from dermaloop.risk import RiskPolicy
from dermaloop.taxonomy import Taxonomy


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins (Guo et al. 2017)."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return float(ece)


def reliability_curve(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> list[dict[str, float]]:
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            out.append({"confidence": float(conf[inside].mean()), "accuracy": float(correct[inside].mean()),
                        "count": int(inside.sum())})
    return out


def _safe_auc(y: np.ndarray, score: np.ndarray) -> float | None:
    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else None


def compute_metrics(probs: np.ndarray, labels: np.ndarray, taxonomy: Taxonomy,
                    policy: RiskPolicy | None = None) -> dict[str, Any]:
    """Every figure of the evaluation report; classes absent from ``labels`` get None where undefined."""
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels, np.int64)
    k = len(taxonomy)
    pred = policy.decide(probs) if policy is not None else probs.argmax(axis=1)
    classes = list(range(k))
    present = sorted(set(labels.tolist()))
    precision, recall, f1, support = precision_recall_fscore_support(labels, pred, labels=classes, zero_division=0)
    per_class_auc = {taxonomy.ids[c]: _safe_auc((labels == c).astype(int), probs[:, c]) for c in classes}
    aucs = [v for v in per_class_auc.values() if v is not None]
    mask = np.array(taxonomy.malignant_mask, bool)
    p_mal = probs[:, mask].sum(axis=1)
    is_mal = mask[labels]
    metrics: dict[str, Any] = {
        "n": int(len(labels)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)) if present else None,
        "accuracy": float(accuracy_score(labels, pred)),
        "macro_f1": float(f1_score(labels, pred, labels=present, average="macro", zero_division=0)),
        "per_class_recall": {taxonomy.ids[c]: (float(recall[c]) if support[c] else None) for c in classes},
        "per_class_precision": {taxonomy.ids[c]: float(precision[c]) for c in classes},
        "per_class_f1": {taxonomy.ids[c]: float(f1[c]) for c in classes},
        "support": {taxonomy.ids[c]: int(support[c]) for c in classes},
        "auc_ovr": float(np.mean(aucs)) if aucs else None,
        "per_class_auc": per_class_auc,
        "malignant_auc": _safe_auc(is_mal.astype(int), p_mal),
        "ece": expected_calibration_error(probs, labels),
        "confusion_matrix": confusion_matrix(labels, pred, labels=classes).tolist(),
        # what the class-level figures count as the model's answer (dermaloop.risk.decide)
        "decision_rule": "most probable class" if policy is None or not any(policy.class_offsets) else
        "log-probability + class offsets " + json.dumps({taxonomy.ids[c]: v for c, v in enumerate(policy.class_offsets)
                                                         if v}),
    }
    if policy is not None and mask.any():
        flagged = p_mal >= policy.moderate_threshold
        metrics["malignant_threshold"] = policy.moderate_threshold
        metrics["malignant_sensitivity"] = float(flagged[is_mal].mean()) if is_mal.any() else None
        metrics["malignant_specificity"] = float((~flagged[~is_mal]).mean()) if (~is_mal).any() else None
        tiers = np.array([policy.tier(float(p)) for p in p_mal])
        metrics["risk_tiers"] = {
            t: {"benign": int(((tiers == t) & ~is_mal).sum()), "malignant": int(((tiers == t) & is_mal).sum())}
            for t in ("low", "moderate", "high")}
    return metrics
