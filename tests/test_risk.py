"""Calibration by temperature, thresholds for a target sensitivity, risk tiers."""

from __future__ import annotations

import numpy as np
import pytest

from dermaloop.risk import (
    RiskPolicy,
    decide,
    fit_class_offsets,
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


def _confusable(seed: int = 3, n: int = 900):
    """Three classes; class 0 is often mistaken for class 1 (as melanoma for nevus)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3)) + 1.5 * np.eye(3)[labels]
    logits[labels == 0, 1] += 1.2
    return softmax(logits), labels


def test_class_offsets_are_the_smallest_that_reach_the_target_recall():
    probs, labels = _confusable()
    plain = (probs.argmax(1)[labels == 0] == 0).mean()
    assert plain < 0.6  # the premise: class 0 is under-called without an offset
    offsets = fit_class_offsets(probs, labels, {0: 0.75})
    assert offsets[1:] == (0.0, 0.0) and offsets[0] > 0
    assert (decide(probs, offsets)[labels == 0] == 0).mean() >= 0.75
    smaller = (offsets[0] - 0.05, 0.0, 0.0)
    assert (decide(probs, smaller)[labels == 0] == 0).mean() < 0.75  # one step less misses the target
    # other classes pay: class 1's recall falls, which is why the offset is the smallest that works
    assert (decide(probs, offsets)[labels == 1] == 1).mean() < (probs.argmax(1)[labels == 1] == 1).mean()


def test_class_offsets_refuse_what_the_data_cannot_keep():
    probs, labels = _confusable()
    with pytest.raises(ValueError, match="no calibration examples"):
        fit_class_offsets(probs[labels != 2], labels[labels != 2], {2: 0.8})
    with pytest.raises(ValueError, match="does not reach"):
        fit_class_offsets(probs, labels, {0: 1.0}, largest=0.2)


def test_the_call_leads_the_ranking_and_zero_offsets_are_argmax():
    probs, labels = _confusable()
    np.testing.assert_array_equal(decide(probs), probs.argmax(1))
    np.testing.assert_array_equal(decide(probs, (0.0, 0.0, 0.0)), probs.argmax(1))
    policy = RiskPolicy(1.0, (True, False, False), 0.2, 0.6, class_offsets=(0.7, 0.0, 0.0))
    row = np.array([0.35, 0.55, 0.10])  # 0.35 * e^0.7 = 0.70 > 0.55: class 0 is called
    assert int(policy.decide(row)) == 0 and policy.rank(row).tolist() == [0, 1, 2]
    assert RiskPolicy(1.0, (True, False, False), 0.2, 0.6).rank(row).tolist() == [1, 0, 2]
    assert policy.assess(row)["malignantP"] == pytest.approx(0.35)  # offsets never touch the probabilities
    with pytest.raises(ValueError, match="offsets for"):
        decide(probs, (0.5, 0.0))


def test_class_offsets_round_trip_and_old_cards_have_none():
    policy = RiskPolicy(1.0, (True, False, False), 0.2, 0.6, class_offsets=(0.55, 0.0, 0.0))
    assert RiskPolicy.from_dict(policy.to_dict()) == policy
    old = policy.to_dict()
    del old["class_offsets"]
    assert RiskPolicy.from_dict(old).class_offsets == ()
    for bogus in ([0.5], [0.5, "x", 0.0], [None, 0.0, 0.0], [float("nan"), 0.0, 0.0], 7):
        with pytest.raises(ValueError, match="class_offsets"):
            RiskPolicy.from_dict({**old, "class_offsets": bogus})
