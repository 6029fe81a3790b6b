"""From class probabilities to a patient-facing risk tier, with calibrated numbers.

Raw network probabilities are over-confident. ``fit_temperature`` learns one temperature on a
held-out calibration split (it changes confidence, never the ranking or top-1). The malignancy
probability is the sum over malignant/pre-malignant classes; two thresholds chosen on the same
calibration split turn it into tiers:

* ``low``      p_malignant <  moderate_threshold (chosen for a target sensitivity, e.g. 0.90: few
               cancers fall below it);
* ``high``     p_malignant >= high_threshold (chosen for a target specificity, e.g. 0.95, and never
               above ``HIGH_AT_MOST``: a spot the calibrated model finds more likely malignant
               than not is never told "moderate");
* ``moderate`` in between.

The model's *call* (the one class it names) is the argmax of log-probability plus a per-class
offset (``class_offsets``, 0 by default). A positive offset is a cost-sensitive Bayes decision: a
missed melanoma costs more than an over-called nevus, so melanoma is named whenever its probability
is within a factor ``exp(offset)`` of the largest. ``fit_class_offsets`` chooses the smallest
offsets that reach a target recall on the calibration split. Probabilities, the malignancy
probability and the tiers are untouched by offsets.

A ``RiskPolicy`` is stored in the model card so the device, the cloud worker and reports agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["RiskPolicy", "softmax", "fit_temperature", "threshold_for_sensitivity",
           "threshold_for_specificity", "sensitivity_lower_bound", "fit_policy", "policy_from_probabilities",
           "fit_class_offsets",
           "decide", "RISK_TIERS", "HIGH_AT_MOST", "AbstainRule", "ABSTAIN_METHODS", "conformal_scores"]

RISK_TIERS = ("low", "moderate", "high")
# The calibrated probabilities are shown to patients and dermatologists: "Melanoma 74 %" beside
# "Moderate risk: within a few weeks" reads as a contradiction, and is one. At or above this
# malignancy probability a fitted policy says "high" whatever the specificity target allows.
HIGH_AT_MOST = 0.5


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    p = softmax(logits, temperature)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1.0))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising negative log-likelihood on held-out data (Guo et al. 2017)."""
    from scipy.optimize import minimize_scalar

    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.int64)
    if len(labels) == 0:
        raise ValueError("cannot calibrate on an empty set")
    res = minimize_scalar(lambda t: _nll(logits, labels, np.exp(t)), bounds=(np.log(0.05), np.log(20.0)),
                          method="bounded")
    return float(np.exp(res.x))


def sensitivity_lower_bound(flagged: int, positives: int, confidence: float) -> float:
    """One-sided Clopper-Pearson lower bound of a sensitivity of ``flagged`` out of ``positives``:
    with probability ``confidence`` the sensitivity on new cases is at least this. Exact (beta
    quantile), so it stays honest with the 100-200 malignant photos a calib split holds."""
    from scipy.stats import beta

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if not 0 <= flagged <= positives or positives == 0:
        raise ValueError(f"need 0 <= flagged <= positives and positives > 0, got {flagged} of {positives}")
    return 0.0 if flagged == 0 else float(beta.ppf(1.0 - confidence, flagged, positives - flagged + 1))


def threshold_for_sensitivity(scores: np.ndarray, positive: np.ndarray, target: float,
                              confidence: float | None = None) -> float:
    """Largest threshold t with sensitivity (scores >= t among positives) >= target.

    With ``confidence`` (e.g. 0.95) the sensitivity's one-sided lower confidence bound must reach
    the target, not its point estimate: a threshold fitted at the point estimate lands below the
    target on new cases about half the time (it is a quantile of the calib positives), which is not a
    promise a cancer-triage tier can make. When even flagging every positive cannot show the target
    at that confidence (too few positives), every positive is flagged: the most the data allows."""
    pos = np.sort(np.asarray(scores, np.float64)[np.asarray(positive, bool)])
    if len(pos) == 0:
        raise ValueError("no positive examples to choose a sensitivity threshold from")
    n = len(pos)
    if confidence is None:
        k = int(np.floor((1.0 - target) * n + 1e-9))  # positives allowed below the threshold
    else:
        k = 0
        while k + 1 < n and sensitivity_lower_bound(n - k - 1, n, confidence) >= target - 1e-12:
            k += 1
    return float(pos[min(k, n - 1)])


def threshold_for_specificity(scores: np.ndarray, positive: np.ndarray, target: float) -> float:
    """Smallest threshold t with specificity (scores < t among negatives) >= target."""
    neg = np.sort(np.asarray(scores, np.float64)[~np.asarray(positive, bool)])
    if len(neg) == 0:
        raise ValueError("no negative examples to choose a specificity threshold from")
    k = int(np.ceil(target * len(neg) - 1e-9))  # negatives that must lie below the threshold
    return float(np.nextafter(neg[k - 1], np.inf)) if k >= 1 else float(neg[0])


def decide(probs: np.ndarray, offsets: tuple[float, ...] | np.ndarray | None = None) -> np.ndarray:
    """The called class of each row of ``probs`` (or of one probability vector): argmax of
    log-probability plus ``offsets``; no offsets is plain argmax."""
    if offsets is None or not np.any(offsets):
        return np.asarray(probs).argmax(axis=-1)
    return _call_scores(probs, offsets).argmax(axis=-1)


def _call_scores(probs: np.ndarray, offsets: tuple[float, ...] | np.ndarray) -> np.ndarray:
    """Log-probability plus the class offsets: the score the call and the listed order follow."""
    p = np.asarray(probs, np.float64)
    offsets = np.asarray(offsets, np.float64)
    if offsets.size and offsets.shape != p.shape[-1:]:
        raise ValueError(f"{offsets.size} class offsets for {p.shape[-1]} classes")
    return np.log(np.clip(p, 1e-12, 1.0)) + (offsets if offsets.size else 0.0)


def fit_class_offsets(probs: np.ndarray, labels: np.ndarray, targets: dict[int, float], step: float = 0.05,
                      largest: float = 3.0) -> tuple[float, ...]:
    """Per-class offsets for :func:`decide`: for each class in ``targets`` (class index -> recall),
    the smallest multiple of ``step`` whose call reaches that recall on ``labels``, the other offsets
    held as already chosen. Smallest, because every step up trades the other classes' recall away.

    Raises ValueError when a class has no examples or cannot reach its target below ``largest``:
    a silent best effort would put a promise in the card that the data never kept."""
    p = np.asarray(probs, np.float64)
    labels = np.asarray(labels, np.int64)
    offsets = np.zeros(p.shape[1])
    for c, target in sorted(targets.items()):
        rows = labels == c
        if not rows.any():
            raise ValueError(f"class {c} has no calibration examples to choose its recall offset on")
        for value in np.arange(0.0, largest + step / 2, step):
            offsets[c] = value
            if (decide(p[rows], offsets) == c).mean() >= target - 1e-12:
                break
        else:
            raise ValueError(f"class {c} does not reach recall {target:.2f} with an offset up to {largest}")
    return tuple(round(float(v), 6) for v in offsets)


@dataclass(frozen=True)
class RiskPolicy:
    temperature: float
    malignant_mask: tuple[bool, ...]
    moderate_threshold: float
    high_threshold: float
    target_sensitivity: float = 0.90
    target_specificity: float = 0.95
    class_offsets: tuple[float, ...] = ()  # () = no offsets: the call is the most probable class
    # A model trained on synthetic images (dermaloop.model_dir.is_demonstration): it may name classes
    # for a demonstration, but it must never speak with a risk tier's voice.
    demonstration: bool = False
    # None: the moderate threshold meets target_sensitivity on calib (point estimate); a number: the
    # sensitivity's one-sided lower confidence bound at that confidence meets it. Retraining refits
    # with the serving model's rule, so every version keeps the same kind of promise.
    sensitivity_confidence: float | None = None

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits, self.temperature)

    def malignant_probability(self, probs: np.ndarray) -> np.ndarray:
        return np.asarray(probs)[..., np.array(self.malignant_mask, bool)].sum(axis=-1)

    def tier(self, p_malignant: float) -> str:
        if not np.isfinite(p_malignant):
            raise ValueError("malignancy probability is not a number")
        if p_malignant >= self.high_threshold:
            return "high"
        return "moderate" if p_malignant >= self.moderate_threshold else "low"

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """The called class index (see :func:`decide`) of one probability vector or of each row."""
        return decide(probs, self.class_offsets or None)

    def rank(self, probs: np.ndarray) -> np.ndarray:
        """One image's class indices in the order results list them: the call first, then by the same
        offset score (plain probability order when there are no offsets)."""
        return np.argsort(-_call_scores(probs, self.class_offsets), kind="stable")

    def assess(self, probs: np.ndarray) -> dict[str, Any]:
        """Tier and malignancy probability of one image's calibrated class probabilities."""
        p = float(self.malignant_probability(np.asarray(probs, np.float64)))
        return {"risk": None if self.demonstration else self.tier(p), "malignantP": p}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["malignant_mask"] = list(self.malignant_mask)
        d["class_offsets"] = list(self.class_offsets)
        if self.sensitivity_confidence is None:  # cards written before the rule existed read the same
            del d["sensitivity_confidence"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RiskPolicy:
        raw = data.get("class_offsets") or ()
        try:
            offsets = tuple(float(v) for v in raw)
        except (TypeError, ValueError):
            offsets = None
        if offsets is None or (offsets and (len(offsets) != len(data["malignant_mask"])
                                            or not all(np.isfinite(offsets)))):
            raise ValueError(f"class_offsets must be {len(data['malignant_mask'])} finite numbers, got {raw!r}")
        return cls(float(data["temperature"]), tuple(bool(v) for v in data["malignant_mask"]),
                   float(data["moderate_threshold"]), float(data["high_threshold"]),
                   float(data.get("target_sensitivity", 0.9)), float(data.get("target_specificity", 0.95)),
                   offsets, sensitivity_confidence=_confidence(data.get("sensitivity_confidence")))


def _confidence(raw: Any) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 < value < 1:
        raise ValueError(f"sensitivity_confidence must be a number strictly between 0 and 1, got {raw!r}")
    return value


def policy_from_probabilities(temperature: float, probs: np.ndarray, labels: np.ndarray,
                              malignant_mask: list[bool] | tuple[bool, ...], target_sensitivity: float = 0.90,
                              target_specificity: float = 0.95,
                              sensitivity_confidence: float | None = None) -> RiskPolicy:
    """Thresholds from calibrated probabilities exactly as the runtime produces them (e.g. TTA means)."""
    mask = np.array(malignant_mask, bool)
    p_mal = np.asarray(probs)[:, mask].sum(axis=1)
    positive = mask[np.asarray(labels)]
    moderate = threshold_for_sensitivity(p_mal, positive, target_sensitivity, sensitivity_confidence)
    high = max(min(threshold_for_specificity(p_mal, positive, target_specificity), HIGH_AT_MOST), moderate)
    return RiskPolicy(float(temperature), tuple(bool(v) for v in mask), moderate, high, target_sensitivity,
                      target_specificity, sensitivity_confidence=sensitivity_confidence)


def fit_policy(logits: np.ndarray, labels: np.ndarray, malignant_mask: list[bool] | tuple[bool, ...],
               target_sensitivity: float = 0.90, target_specificity: float = 0.95,
               sensitivity_confidence: float | None = None) -> RiskPolicy:
    """Temperature and both thresholds from one held-out calibration split (never the report split)."""
    t = fit_temperature(logits, labels)
    return policy_from_probabilities(t, softmax(logits, t), labels, malignant_mask, target_sensitivity,
                                     target_specificity, sensitivity_confidence)


ABSTAIN_METHODS = ("lac", "aps")


def conformal_scores(probs: np.ndarray, method: str) -> np.ndarray:
    """Non-conformity score of every class of every row (same shape as ``probs``): how little the
    model believes that class. The calib fit (``training.abstain``) and the runtime use this one
    function, so a calib photo and a patient's photo are scored identically.

    * ``lac`` (least ambiguous set-valued classifier, Sadinle et al. 2019): 1 - p. Smallest sets on
      average; a set may be empty when no class is probable enough.
    * ``aps`` (adaptive prediction sets, Romano et al. 2020, without randomisation): the probability
      mass of the class and of every class ranked above it (ties broken by class index)."""
    p = np.asarray(probs, np.float64)
    if method == "lac":
        return 1.0 - p
    if method == "aps":
        order = np.argsort(-p, axis=-1, kind="stable")
        cumulative = np.cumsum(np.take_along_axis(p, order, axis=-1), axis=-1)
        scores = np.empty_like(p)
        np.put_along_axis(scores, order, cumulative, axis=-1)
        return scores
    raise ValueError(f"unknown conformal method {method!r}; expected one of {', '.join(ABSTAIN_METHODS)}")


@dataclass(frozen=True)
class AbstainRule:
    """Say "unsure: a dermatologist will look" instead of naming one class.

    A split-conformal prediction set (``qhat`` fitted on the calib split at ``coverage``) holds every
    class whose score is at most ``qhat``; on photos like the calib ones it contains the true class
    with probability at least ``coverage``. The model is *sure* only when that set is exactly the
    class it names (the call, offsets included): a set of two or more classes means it cannot tell
    them apart at that coverage, an empty set (``lac``) that no class is probable enough, and a set
    without the call that the call rests on a decision offset, not on the evidence. APS sets always
    keep the most probable class (only enlarging a set, so coverage still holds)."""

    method: str
    coverage: float
    qhat: float
    n_calib: int

    def __post_init__(self) -> None:
        if self.method not in ABSTAIN_METHODS:
            raise ValueError(f"unknown conformal method {self.method!r}; expected one of {', '.join(ABSTAIN_METHODS)}")
        if not 0.0 < self.coverage < 1.0:
            raise ValueError(f"coverage must be between 0 and 1, not {self.coverage}")
        if not np.isfinite(self.qhat):
            raise ValueError("qhat must be a finite number")
        if self.n_calib < 1:
            raise ValueError("an abstain rule needs at least one calibration photo")

    def prediction_set(self, probs: np.ndarray) -> np.ndarray:
        """Boolean mask (the shape of ``probs``): which classes are in each row's prediction set."""
        p = np.asarray(probs, np.float64)
        inside = conformal_scores(p, self.method) <= self.qhat
        if self.method == "aps":
            top = p.argmax(axis=-1)
            np.put_along_axis(inside, np.expand_dims(top, -1), True, axis=-1)
        return inside

    def unsure(self, probs: np.ndarray, called: np.ndarray | int) -> np.ndarray:
        """True where the prediction set is not exactly ``{called}`` (one image or each row)."""
        inside = self.prediction_set(probs)
        called = np.asarray(called)
        named = np.take_along_axis(inside, np.expand_dims(called, -1), axis=-1)[..., 0]
        return ~(named & (inside.sum(axis=-1) == 1))

    def judge(self, probs: np.ndarray, called: int) -> tuple[bool, list[int]]:
        """(unsure?, the prediction set as class indices, most probable first) for one image."""
        p = np.asarray(probs, np.float64)
        inside = self.prediction_set(p)
        members = [int(i) for i in np.argsort(-p, kind="stable") if inside[i]]
        return bool(self.unsure(p, int(called))), members

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "coverage": self.coverage, "qhat": self.qhat, "n_calib": self.n_calib}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AbstainRule:
        try:
            return cls(str(data["method"]), float(data["coverage"]), float(data["qhat"]), int(data["n_calib"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"an abstain rule needs method, coverage, qhat and n_calib ({exc})") from None
