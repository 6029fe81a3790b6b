"""A retraining candidate's thresholds are refitted with the serving model's sensitivity rule
(training.candidate._refit_policy): once a release promises its sensitivity at a confidence bound,
every candidate keeps the same kind of promise, and the gates compare like with like."""

from __future__ import annotations

import numpy as np

from dermaloop.risk import RiskPolicy, sensitivity_lower_bound
from dermaloop.taxonomy import load_taxonomy
from training.candidate import _refit_policy

TAXONOMY = load_taxonomy("ham10000")


def _calib(seed: int = 0, n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(TAXONOMY.ids), n)
    logits = rng.normal(0, 1, (n, len(TAXONOMY.ids)))
    logits[np.arange(n), labels] += 1.5
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True), labels


def test_the_candidate_keeps_the_serving_models_sensitivity_rule():
    probs, labels = _calib()
    mask = tuple(TAXONOMY.malignant_mask)
    decision = {"calib_recall_targets": {"mel": 0.75}}
    point, _, _ = _refit_policy(RiskPolicy(1.0, mask, 0.5, 0.8), probs, labels, 1.0, decision, TAXONOMY)
    bound, info, note = _refit_policy(RiskPolicy(1.0, mask, 0.5, 0.8, sensitivity_confidence=0.95), probs, labels,
                                      1.0, decision, TAXONOMY)
    assert note is None and point.sensitivity_confidence is None and bound.sensitivity_confidence == 0.95
    assert bound.class_offsets == point.class_offsets and info["calib_recall"]["mel"] >= 0.75
    assert bound.moderate_threshold < point.moderate_threshold
    malignant = np.array(mask)[labels]
    p_mal = bound.malignant_probability(probs)[malignant]
    assert sensitivity_lower_bound(int((p_mal >= bound.moderate_threshold).sum()), int(malignant.sum()), 0.95) >= 0.9
    # a calib split without malignant photos keeps the thresholds, and the rule with them
    benign = ~malignant
    kept, _, note = _refit_policy(RiskPolicy(1.0, mask, 0.5, 0.8, sensitivity_confidence=0.95), probs[benign],
                                  labels[benign], 1.0, {}, TAXONOMY)
    assert "kept from the current version" in note and kept.sensitivity_confidence == 0.95
