"""Calibration by temperature, thresholds for a target sensitivity, risk tiers."""

from __future__ import annotations

import numpy as np
import pytest

from dermaloop.risk import (
    RiskPolicy,
    fit_policy,
    fit_temperature,
    softmax,
    threshold_for_sensitivity,
    threshold_for_specificity,
)


def test_temperature_recovers_a_known_over_confidence():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, size=(4000, 5))
    p = softmax(true_logits)
    labels = np.array([rng.choice(5, p=row) for row in p])
    assert fit_temperature(true_logits * 3.0, labels) == pytest.approx(3.0, rel=0.1)
    assert fit_temperature(true_logits, labels) == pytest.approx(1.0, rel=0.1)


def test_sensitivity_and_specificity_thresholds_meet_their_targets():
    rng = np.random.default_rng(1)
    scores = rng.random(1000)
    positive = rng.random(1000) < scores  # higher score, more often positive
    for target in (0.8, 0.9, 0.95):
        t = threshold_for_sensitivity(scores, positive, target)
        assert (scores[positive] >= t).mean() >= target
        assert (scores[positive] >= np.nextafter(t, 1)).mean() < target  # the largest such threshold
        s = threshold_for_specificity(scores, positive, target)
        assert (scores[~positive] < s).mean() >= target
    with pytest.raises(ValueError):
        threshold_for_sensitivity(scores, np.zeros(1000, bool), 0.9)


def test_tiers_and_policy_round_trip():
    policy = RiskPolicy(1.5, (True, False, True), 0.2, 0.6)
    assert [policy.tier(p) for p in (0.0, 0.19, 0.2, 0.59, 0.6, 1.0)] == \
        ["low", "low", "moderate", "moderate", "high", "high"]
    assessed = policy.assess(np.array([0.1, 0.8, 0.1]))
    assert assessed == {"risk": "moderate", "malignantP": pytest.approx(0.2)}
    assert RiskPolicy.from_dict(policy.to_dict()) == policy
    with pytest.raises(ValueError):
        policy.tier(float("nan"))


def test_fit_policy_orders_thresholds():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 600)
    logits = rng.normal(0, 1, (600, 3)) + 2.0 * np.eye(3)[labels]
    policy = fit_policy(logits, labels, [True, False, False], target_sensitivity=0.9, target_specificity=0.95)
    assert 0 < policy.moderate_threshold <= policy.high_threshold <= 1
    p_mal = softmax(logits, policy.temperature)[:, 0]
    assert (p_mal[labels == 0] >= policy.moderate_threshold).mean() >= 0.9
