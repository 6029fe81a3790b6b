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


def test_the_sensitivity_lower_bound_is_clopper_pearsons():
    from dermaloop.risk import sensitivity_lower_bound

    # every one of n flagged: the exact bound is (1 - confidence) ** (1 / n)
    assert sensitivity_lower_bound(29, 29, 0.95) == pytest.approx(0.05 ** (1 / 29))
    assert sensitivity_lower_bound(0, 10, 0.95) == 0.0
    # 176 of 187 (point estimate 0.941): about 0.904, so 0.941 is what 187 malignant photos need to show 0.90
    assert sensitivity_lower_bound(176, 187, 0.95) == pytest.approx(0.9042, abs=2e-3)
    for bad in ((5, 4, 0.95), (1, 0, 0.95), (3, 4, 1.0), (3, 4, 0.0)):
        with pytest.raises(ValueError):
            sensitivity_lower_bound(*bad)


def test_a_confidence_bound_threshold_is_the_largest_whose_bound_reaches_the_target():
    from dermaloop.risk import sensitivity_lower_bound

    rng = np.random.default_rng(3)
    scores = rng.random(200)
    positive = np.ones(200, bool)
    t = threshold_for_sensitivity(scores, positive, 0.9, confidence=0.95)
    flagged = int((scores >= t).sum())
    assert sensitivity_lower_bound(flagged, 200, 0.95) >= 0.9
    assert sensitivity_lower_bound(flagged - 1, 200, 0.95) < 0.9  # one positive fewer would not show it
    assert t < threshold_for_sensitivity(scores, positive, 0.9)  # the promise costs a lower threshold
    # too few positives to show 0.9 at 95 % even flagging them all: flag them all, the most the data allows
    few = rng.random(20)
    assert threshold_for_sensitivity(few, np.ones(20, bool), 0.9, confidence=0.95) == few.min()


def test_the_confidence_rule_keeps_its_promise_on_new_cases_and_the_point_rule_does_not():
    """Draw many calib splits of 187 malignant photos whose scores are uniform, so a threshold t has a
    true sensitivity of exactly 1 - t. Fitted at the point estimate, the true sensitivity falls below
    90 % about half the time; with the 95 % bound, in at most about 5 % of the splits."""
    rng = np.random.default_rng(4)
    below = {"point": 0, "bound": 0}
    draws = 400
    for _ in range(draws):
        scores = rng.random(187)
        positive = np.ones(187, bool)
        below["point"] += (1 - threshold_for_sensitivity(scores, positive, 0.9)) < 0.9
        below["bound"] += (1 - threshold_for_sensitivity(scores, positive, 0.9, confidence=0.95)) < 0.9
    assert below["point"] / draws > 0.3
    assert below["bound"] / draws <= 0.08


def test_the_sensitivity_rule_travels_with_the_policy():
    labels = np.array([0] * 60 + [1] * 140)
    probs = np.where(labels[:, None] == 0, [0.7, 0.3], [0.2, 0.8]) + np.random.default_rng(5).normal(0, 0.1, (200, 2))
    probs = np.clip(probs, 0.01, None)
    probs /= probs.sum(axis=1, keepdims=True)
    from dermaloop.risk import policy_from_probabilities

    policy = policy_from_probabilities(1.0, probs, labels, [True, False], sensitivity_confidence=0.95)
    assert policy.sensitivity_confidence == 0.95
    assert RiskPolicy.from_dict(policy.to_dict()) == policy
    plain = policy_from_probabilities(1.0, probs, labels, [True, False])
    assert "sensitivity_confidence" not in plain.to_dict()  # cards without the rule read as before
    assert plain.moderate_threshold >= policy.moderate_threshold
    for bad in (1.5, 0, "high", [0.9]):
        with pytest.raises(ValueError, match="sensitivity_confidence"):
            RiskPolicy.from_dict({**policy.to_dict(), "sensitivity_confidence": bad})


def test_a_spot_more_likely_malignant_than_not_is_never_told_moderate():
    """At 95 % specificity the fitted high threshold can sit well above 0.5 (the release's was 0.76),
    and the portal showed "Risk: moderate · malignant p 75 %". A fitted policy caps it at 0.5."""
    from dermaloop.risk import HIGH_AT_MOST, policy_from_probabilities

    rng = np.random.default_rng(6)
    labels = np.array([0] * 300 + [1] * 700)  # class 0 is the malignant one
    malignant = labels == 0

    def policy_for(p_mal: np.ndarray):
        return policy_from_probabilities(1.0, np.stack([p_mal, 1 - p_mal], axis=1), labels, [True, False])

    # benign spots that often look suspicious: the 95 % specificity point is high
    p_mal = np.where(malignant, rng.beta(2, 2, 1000), rng.beta(3, 2, 1000))
    assert threshold_for_specificity(p_mal, malignant, 0.95) > 0.7  # uncapped, "high" would start above 0.7
    policy = policy_for(p_mal)
    assert policy.high_threshold == HIGH_AT_MOST == 0.5 and policy.tier(0.75) == "high"
    assert policy.moderate_threshold < policy.high_threshold
    # a model whose specificity point is already below 0.5 keeps it
    calm = np.where(malignant, rng.beta(2, 8, 1000), rng.beta(1, 12, 1000))
    assert policy_for(calm).high_threshold == threshold_for_specificity(calm, malignant, 0.95) < 0.5
