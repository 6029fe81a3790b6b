"""Promotion gates: may a retrained candidate replace the model that is serving?

Every gate compares the current and the candidate model on the SAME benchmark images (a paired
design: both models see every image, so image difficulty cancels and the uncertainty that is left is
only about where they disagree). A gate is a non-inferiority test, not a "better" test: the
candidate passes when the lower bound of the 95 % confidence interval of (candidate - current) is
above ``-tolerance``. The burden of proof is on the candidate: a small benchmark gives a wide
interval, so it refuses rather than waves through.

* balanced accuracy: paired bootstrap, images resampled within each true class (the class mix of
  the benchmark is fixed, as balanced accuracy assumes); tolerance 0.02 (two points). The same
  recipe run twice moved HAM10000 val balanced accuracy by about one point (docs/MODEL_REPORT.md,
  recipes B and E), so a loss within two points is run-to-run noise; beyond it, a regression.
* malignant sensitivity (share of malignant images flagged at the model's own moderate threshold,
  i.e. not told "low risk"): paired bootstrap over the malignant images (within each malignant
  class), McNemar's exact test on the discordant images reported beside it; tolerance 0.03 (the
  threshold is re-chosen on the calib split for 90 % sensitivity each time, so a few points of
  movement are expected; a larger loss means more cancers told "low").
* calibration: the candidate's ECE at most ``max(0.05, current ECE + 0.01)``; the probabilities are
  shown to patients and dermatologists, so a model that got more over-confident must not ship.
* int8 parity: the device int8 model within 1.5 balanced-accuracy points of its float model on the
  benchmark (quantisation must not eat the gain; 1.3 points is what 500 calibration images give on
  HAM10000).
* new labels (advisory): the same comparison on the held-out part of the new labels is reported but
  does not block: it is usually a few dozen images, too few for a bound that means anything.

Pure functions of arrays, no I/O: tests/test_retrain_gates.py checks each against known answers.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import balanced_accuracy_score

__all__ = ["GateVerdict", "Decision", "BA_TOLERANCE", "SENSITIVITY_TOLERANCE", "ECE_BOUND", "ECE_SLACK",
           "INT8_DROP_POINTS", "N_BOOTSTRAP", "balanced_accuracy", "CONFIDENCE", "paired_bootstrap", "mcnemar_exact",
           "balanced_accuracy_gate", "sensitivity_gate", "ece_gate", "int8_gate", "decide"]

BA_TOLERANCE = 0.02
SENSITIVITY_TOLERANCE = 0.03
ECE_BOUND = 0.05
ECE_SLACK = 0.01
INT8_DROP_POINTS = 1.5
N_BOOTSTRAP = 2000
CONFIDENCE = 0.95
SEED = 20240611


@dataclass(frozen=True)
class GateVerdict:
    """One gate's answer: ``passed``, the figures it was decided on and a sentence saying why.
    ``advisory`` verdicts are reported but never block a promotion."""

    gate: str
    passed: bool
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)
    advisory: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    verdicts: tuple[GateVerdict, ...]

    def to_json(self) -> dict[str, Any]:
        return {"promote": self.promote, "reason": self.reason, "gates": [v.to_json() for v in self.verdicts]}


def balanced_accuracy(labels: np.ndarray, called: np.ndarray) -> float:
    """Balanced accuracy over the classes present in ``labels`` (scikit-learn's; its warning that a
    model called a class absent from a small benchmark is expected here, not news)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(labels, called))


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), digits)


def paired_bootstrap(correct_current: np.ndarray, correct_candidate: np.ndarray, strata: np.ndarray, *,
                     n_boot: int = N_BOOTSTRAP, confidence: float = CONFIDENCE,
                     seed: int = SEED) -> tuple[float, float, float]:
    """(observed difference, CI low, CI high) of the mean-over-strata of per-stratum accuracy,
    candidate minus current, by a percentile bootstrap that resamples images with replacement
    within each stratum (the same images for both models in each replicate: paired).

    With strata = true classes this is balanced accuracy; with one stratum it is plain accuracy
    (e.g. sensitivity on the malignant images). Fixed ``seed``: the same inputs give the same CI."""
    a = np.asarray(correct_current, np.float64)
    b = np.asarray(correct_candidate, np.float64)
    strata = np.asarray(strata)
    if not (len(a) == len(b) == len(strata)) or len(a) == 0:
        raise ValueError("paired bootstrap needs two equally long, non-empty correctness vectors")
    rng = np.random.default_rng(seed)
    observed, replicates = [], []
    for s in np.unique(strata):
        rows = np.flatnonzero(strata == s)
        diff = b[rows] - a[rows]
        observed.append(diff.mean())
        draw = rng.integers(0, len(rows), size=(n_boot, len(rows)))
        replicates.append(diff[draw].mean(axis=1))
    boot = np.mean(replicates, axis=0)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(boot, [tail, 1.0 - tail])
    return float(np.mean(observed)), float(lo), float(hi)


def mcnemar_exact(flag_current: np.ndarray, flag_candidate: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test on paired binary outcomes (here: a malignant image flagged or not).
    ``lost``: images the current model flagged and the candidate misses; ``gained``: the reverse.
    ``p_worse`` is the one-sided p-value of "the candidate misses more" (binomial, p = 1/2 on the
    discordant images); ``p_value`` the two-sided one."""
    cur = np.asarray(flag_current, bool)
    cand = np.asarray(flag_candidate, bool)
    lost, gained = int((cur & ~cand).sum()), int((~cur & cand).sum())
    n = lost + gained
    if n == 0:
        return {"lost": 0, "gained": 0, "p_value": 1.0, "p_worse": 1.0}
    return {"lost": lost, "gained": gained, "p_value": float(binomtest(lost, n, 0.5).pvalue),
            "p_worse": float(binomtest(lost, n, 0.5, alternative="greater").pvalue)}


def _check_pair(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    if not (len(labels) == len(a) == len(b)):
        raise ValueError(f"the two models were not scored on the same images ({len(a)} and {len(b)} answers "
                         f"for {len(labels)} labels)")


def balanced_accuracy_gate(labels: np.ndarray, called_current: np.ndarray, called_candidate: np.ndarray, *,
                           tolerance: float = BA_TOLERANCE, name: str = "balanced_accuracy",
                           advisory: bool = False, seed: int = SEED) -> GateVerdict:
    """Non-inferiority of the candidate's balanced accuracy (its called classes against ``labels``)."""
    labels, cur, cand = (np.asarray(v, np.int64) for v in (labels, called_current, called_candidate))
    _check_pair(labels, cur, cand)
    if len(labels) == 0:
        return GateVerdict(name, False, "no benchmark images: nothing shows the candidate is not worse",
                           {"n": 0}, advisory)
    ba_cur = balanced_accuracy(labels, cur)
    ba_cand = balanced_accuracy(labels, cand)
    delta, lo, hi = paired_bootstrap(cur == labels, cand == labels, labels, seed=seed)
    numbers = {"n": int(len(labels)), "classes": int(len(np.unique(labels))), "current": _r(ba_cur),
               "candidate": _r(ba_cand), "difference": _r(delta), "ci_low": _r(lo), "ci_high": _r(hi),
               "confidence": CONFIDENCE, "tolerance": tolerance, "method": "paired bootstrap, stratified by class",
               "disagreements": int((cur != cand).sum())}
    passed = lo > -tolerance
    what = "balanced accuracy"
    if passed:
        reason = (f"{what} {ba_cand:.3f} vs {ba_cur:.3f} now: the difference {delta:+.3f} is at worst "
                  f"{lo:+.3f} (95% CI), within the tolerated -{tolerance:.2f}")
    else:
        reason = (f"{what} {ba_cand:.3f} vs {ba_cur:.3f} now: the difference {delta:+.3f} may be as bad as "
                  f"{lo:+.3f} (95% CI), beyond the tolerated -{tolerance:.2f}"
                  + (" (too few images to show it is not worse)" if delta > -tolerance else ""))
    return GateVerdict(name, passed, reason, numbers, advisory)


def sensitivity_gate(labels: np.ndarray, malignant_mask: np.ndarray, flagged_current: np.ndarray,
                     flagged_candidate: np.ndarray, *, tolerance: float = SENSITIVITY_TOLERANCE,
                     name: str = "malignant_sensitivity", advisory: bool = False, seed: int = SEED) -> GateVerdict:
    """Non-inferiority of the share of malignant images each model flags (p_malignant at or over its
    own moderate threshold). ``malignant_mask``: per class, whether it is malignant."""
    labels = np.asarray(labels, np.int64)
    cur, cand = np.asarray(flagged_current, bool), np.asarray(flagged_candidate, bool)
    _check_pair(labels, cur, cand)
    is_mal = np.asarray(malignant_mask, bool)[labels] if len(labels) else np.zeros(0, bool)
    n = int(is_mal.sum())
    if n == 0:
        return GateVerdict(name, False, "no malignant images in the benchmark: sensitivity cannot be checked",
                           {"n_malignant": 0}, advisory)
    sens_cur, sens_cand = float(cur[is_mal].mean()), float(cand[is_mal].mean())
    delta, lo, hi = paired_bootstrap(cur[is_mal], cand[is_mal], labels[is_mal], seed=seed)
    # per-class strata weigh each malignant class equally; report the pooled figure too
    test = mcnemar_exact(cur[is_mal], cand[is_mal])
    numbers = {"n_malignant": n, "current": _r(sens_cur), "candidate": _r(sens_cand),
               "difference_pooled": _r(sens_cand - sens_cur), "difference": _r(delta), "ci_low": _r(lo),
               "ci_high": _r(hi), "confidence": CONFIDENCE, "tolerance": tolerance,
               "method": "paired bootstrap over malignant images, stratified by class (mean of class recalls)",
               "mcnemar": {k: (_r(v, 6) if isinstance(v, float) else v) for k, v in test.items()}}
    passed = lo > -tolerance
    detail = (f"{test['lost']} malignant images flagged now would be missed, {test['gained']} missed now would "
              f"be flagged (McNemar exact p={test['p_value']:.3g})")
    if passed:
        reason = (f"malignant sensitivity {sens_cand:.3f} vs {sens_cur:.3f} now on {n} images; the difference is "
                  f"at worst {lo:+.3f} (95% CI), within -{tolerance:.2f}; {detail}")
    else:
        reason = (f"malignant sensitivity {sens_cand:.3f} vs {sens_cur:.3f} now on {n} images; the difference may "
                  f"be as bad as {lo:+.3f} (95% CI), beyond -{tolerance:.2f}; {detail}")
    return GateVerdict(name, passed, reason, numbers, advisory)


def ece_gate(ece_current: float | None, ece_candidate: float, *, bound: float = ECE_BOUND, slack: float = ECE_SLACK,
             name: str = "calibration") -> GateVerdict:
    """The candidate's expected calibration error within ``max(bound, current + slack)``."""
    limit = bound if ece_current is None else max(bound, float(ece_current) + slack)
    passed = bool(np.isfinite(ece_candidate) and ece_candidate <= limit)
    numbers = {"current": _r(ece_current), "candidate": _r(ece_candidate), "limit": _r(limit), "bound": bound,
               "slack": slack}
    now = "n/a" if ece_current is None else f"{ece_current:.3f}"
    reason = (f"ECE {ece_candidate:.3f} (now {now}) is {'within' if passed else 'over'} the limit {limit:.3f} "
              f"(the larger of {bound:.2f} and the current ECE + {slack:.2f})")
    return GateVerdict(name, passed, reason, numbers)


def int8_gate(labels: np.ndarray, called_float: np.ndarray, called_int8: np.ndarray, *,
              max_drop_points: float = INT8_DROP_POINTS, name: str = "int8_parity") -> GateVerdict:
    """The device int8 model's balanced accuracy at most ``max_drop_points`` below its float model's
    on the same images (points: percent)."""
    labels, f, q = (np.asarray(v, np.int64) for v in (labels, called_float, called_int8))
    _check_pair(labels, f, q)
    if len(labels) == 0:
        return GateVerdict(name, False, "no benchmark images to compare int8 with float on", {"n": 0})
    ba_f, ba_q = balanced_accuracy(labels, f), balanced_accuracy(labels, q)
    drop = 100.0 * (ba_f - ba_q)
    passed = drop <= max_drop_points
    numbers = {"n": int(len(labels)), "float": _r(ba_f), "int8": _r(ba_q), "drop_points": _r(drop, 2),
               "max_drop_points": max_drop_points, "top1_agreement": _r(float((f == q).mean()))}
    reason = (f"int8 balanced accuracy {ba_q:.3f} vs float {ba_f:.3f}: {drop:.2f} points "
              f"{'within' if passed else 'over'} the allowed {max_drop_points:.1f}")
    return GateVerdict(name, passed, reason, numbers)


def decide(verdicts: list[GateVerdict] | tuple[GateVerdict, ...]) -> Decision:
    """Promote only if every blocking gate passed; the reason names each one that did not."""
    verdicts = tuple(verdicts)
    blocking = [v for v in verdicts if not v.advisory]
    if not blocking:
        return Decision(False, "no gate was run: nothing shows the candidate is safe to serve", verdicts)
    failed = [v for v in blocking if not v.passed]
    if failed:
        return Decision(False, "refused: " + "; ".join(f"{v.gate}: {v.reason}" for v in failed), verdicts)
    return Decision(True, f"all {len(blocking)} gates passed", verdicts)
