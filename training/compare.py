"""Score the current and the candidate models on the same images and run the promotion gates.

Which answers are compared: the cloud model as the worker runs it (Keras, test-time views), the
device model as phones run it (TFLite int8); the device float model only for the int8 parity gate.
Figures are for the benchmark (never trained on) and the held-out new labels (advisory).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dermaloop.model_dir import ModelDir
from dermaloop.taxonomy import Taxonomy
from training import gates
from training.candidate import Row
from training.metrics import compute_metrics as _compute_metrics
from training.refit import EmbeddingCache
from training.report import write_report
from training.scoring import Image, Scores, load_keras, runtime_for, score_float, score_int8

__all__ = ["GateConfig", "Evaluation", "evaluate_pair", "run_gates", "summary", "write_candidate_reports",
           "SPLITS"]

SPLITS = ("benchmark", "new_holdout")
SUMMARY_KEYS = ("n", "balanced_accuracy", "accuracy", "macro_f1", "auc_ovr", "malignant_auc", "malignant_threshold",
                "malignant_sensitivity", "malignant_specificity", "ece", "per_class_recall")


@dataclass
class GateConfig:
    ba_tolerance: float = gates.BA_TOLERANCE
    sensitivity_tolerance: float = gates.SENSITIVITY_TOLERANCE
    ece_bound: float = gates.ECE_BOUND
    ece_slack: float = gates.ECE_SLACK
    int8_max_drop: float = gates.INT8_DROP_POINTS
    # which device file the device gates compare: phones run int8. "fp32" only where int8 is known to
    # be meaningless (the seeded "tiny" test backbone agrees with its float model on few images)
    device_answer: str = "int8"


@dataclass
class Evaluation:
    """Scores per split and per answer ("cloud", "device" = int8, "device_float") for both models."""

    labels: dict[str, np.ndarray]
    ids: dict[str, list[str]]
    current: dict[str, dict[str, Scores]] = field(default_factory=dict)
    candidate: dict[str, dict[str, Scores]] = field(default_factory=dict)

    def seconds(self) -> float:
        return float(sum(s.seconds for side in (self.current, self.candidate) for split in side.values()
                         for s in split.values()))


def evaluate_pair(current: dict[str, ModelDir], candidate: ModelDir, rows: list[Row], cache: EmbeddingCache, *,
                  progress: bool = True, device_answer: str = "int8") -> Evaluation:
    """Both models' answers on the benchmark and new_holdout rows (each Keras model loaded once):
    "cloud", "device" (the file ``device_answer`` names) and the candidate's "device_float"."""
    if device_answer not in ("int8", "fp32"):
        raise ValueError(f"device_answer must be int8 or fp32, not {device_answer!r}")
    parts = {s: [r for r in rows if r.split == s] for s in SPLITS}
    ev = Evaluation({s: np.array([r.label for r in p], np.int64) for s, p in parts.items()},
                    {s: [r.id for r in p] for s, p in parts.items()})
    images = {s: [Image(r.sha256, r.path) for r in p] for s, p in parts.items()}
    for side, dirs, store in (("current", current, ev.current), ("candidate", {"device": candidate,
                                                                                "cloud": candidate}, ev.candidate)):
        for s in SPLITS:
            store[s] = {}
        for kind in ("cloud", "device"):
            need_float = kind == "cloud" or side == "candidate" or device_answer == "fp32"
            model = load_keras(dirs[kind], kind) if need_float else None
            runtime = runtime_for(dirs[kind], kind) if need_float else None  # one load, for the spot checks
            for s in SPLITS:
                if kind == "cloud":
                    store[s]["cloud"] = score_float(dirs[kind], "cloud", images[s], cache, model=model,
                                                    runtime=runtime, progress=progress)
                    continue
                floats = score_float(dirs[kind], "device", images[s], cache, model=model, runtime=runtime,
                                     progress=progress) if need_float else None
                if side == "candidate" or device_answer == "int8":
                    int8 = score_int8(dirs[kind], images[s], cache, progress=progress)
                store[s]["device"] = int8 if device_answer == "int8" else floats
                if side == "candidate":
                    store[s]["device_float"] = floats
                    store[s]["device_int8"] = int8
    return ev


def compute_metrics(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """training.metrics.compute_metrics without scikit-learn's warning that a class was called that
    the (small) benchmark lacks: expected, and it would bury the run's own lines."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return _compute_metrics(*args, **kwargs)


def _called(s: Scores) -> np.ndarray:
    return s.policy.decide(s.probs) if len(s.probs) else np.zeros(0, np.int64)


def _flagged(s: Scores) -> np.ndarray:
    return s.policy.malignant_probability(s.probs) >= s.policy.moderate_threshold if len(s.probs) else np.zeros(0, bool)


def run_gates(ev: Evaluation, taxonomy: Taxonomy, cfg: GateConfig, *,
              benchmark_seen: dict[str, list[str] | str] | None = None) -> list[gates.GateVerdict]:
    """Every gate of training.gates on the benchmark (blocking) and the new-label holdout (advisory)."""
    from training.metrics import expected_calibration_error

    mask = np.array(taxonomy.malignant_mask, bool)
    y = ev.labels["benchmark"]
    verdicts: list[gates.GateVerdict] = []
    for kind in ("cloud", "device"):
        cur, cand = ev.current["benchmark"][kind], ev.candidate["benchmark"][kind]
        what = "cloud model" if kind == "cloud" else (
            "device model (int8, as phones run it)" if cfg.device_answer == "int8" else
            "device model (fp32 file: int8 not compared, by request)")
        v = gates.balanced_accuracy_gate(y, _called(cur), _called(cand), tolerance=cfg.ba_tolerance,
                                         name=f"{kind}.balanced_accuracy")
        verdicts.append(gates.GateVerdict(v.gate, v.passed, f"{what}: {v.reason}", v.numbers))
        v = gates.sensitivity_gate(y, mask, _flagged(cur), _flagged(cand), tolerance=cfg.sensitivity_tolerance,
                                   name=f"{kind}.malignant_sensitivity")
        verdicts.append(gates.GateVerdict(v.gate, v.passed, f"{what}: {v.reason}", v.numbers))
        ece_cur = expected_calibration_error(cur.probs, y) if len(y) else None
        ece_cand = expected_calibration_error(cand.probs, y) if len(y) else float("nan")
        v = gates.ece_gate(ece_cur, ece_cand, bound=cfg.ece_bound, slack=cfg.ece_slack, name=f"{kind}.calibration")
        verdicts.append(gates.GateVerdict(v.gate, v.passed, f"{what}: {v.reason}", v.numbers))
    v = gates.int8_gate(y, _called(ev.candidate["benchmark"]["device_float"]),
                        _called(ev.candidate["benchmark"]["device_int8"]),
                        max_drop_points=cfg.int8_max_drop, name="device.int8_parity")
    verdicts.append(v)
    if benchmark_seen is not None:
        seen = {k: ids for k, ids in benchmark_seen.items() if ids}
        n = len(y)
        if seen:
            said = "; ".join(f"the current {k} model: {ids}" if isinstance(ids, str) else
                             f"the current {k} model trained or calibrated on {len(ids)} of the {n} benchmark images "
                             f"(e.g. {', '.join(ids[:3])})" for k, ids in seen.items())
            verdicts.append(gates.GateVerdict(
                "benchmark_unseen", False, f"{said}: its figures on them are optimistic and the comparison is not "
                "on unseen images. Train the base model with dermaloop train's default split on the same base "
                "dataset, or start a new line of dataset versions",
                {k: (ids if isinstance(ids, str) else len(ids)) for k, ids in seen.items()}))
        else:
            verdicts.append(gates.GateVerdict("benchmark_unseen", True, f"neither current model trained or "
                                              f"calibrated on any of the {n} benchmark images (their split.json)",
                                              {"benchmark_images": n}))
    yh = ev.labels["new_holdout"]
    for kind in ("cloud", "device"):
        if len(yh) == 0:
            verdicts.append(gates.GateVerdict(f"{kind}.new_labels_balanced_accuracy", True,
                                              "no held-out new labels yet: nothing to compare on", {"n": 0},
                                              advisory=True))
            continue
        cur, cand = ev.current["new_holdout"][kind], ev.candidate["new_holdout"][kind]
        verdicts.append(gates.balanced_accuracy_gate(yh, _called(cur), _called(cand), tolerance=cfg.ba_tolerance,
                                                     name=f"{kind}.new_labels_balanced_accuracy", advisory=True))
    return verdicts


def summary(s: Scores, labels: np.ndarray, taxonomy: Taxonomy) -> dict[str, Any] | None:
    if len(labels) == 0:
        return None
    m = compute_metrics(s.probs, labels, taxonomy, s.policy)
    return {k: m.get(k) for k in SUMMARY_KEYS}


def metrics_table(ev: Evaluation, taxonomy: Taxonomy) -> dict[str, Any]:
    """{split: {answer: {current, candidate}}} of summary figures, for the decision record."""
    out: dict[str, Any] = {}
    for s in SPLITS:
        out[s] = {}
        for answer in ("cloud", "device"):
            out[s][answer] = {"current": summary(ev.current[s][answer], ev.labels[s], taxonomy),
                              "candidate": summary(ev.candidate[s][answer], ev.labels[s], taxonomy)}
        for answer in ("device_float", "device_int8"):
            out[s][answer] = {"candidate": summary(ev.candidate[s][answer], ev.labels[s], taxonomy)}
        out[s]["n"] = int(len(ev.labels[s]))
    return out


def write_candidate_reports(ev: Evaluation, tmp: Path, taxonomy: Taxonomy, version: str,
                            dataset_version: str) -> dict[str, dict[str, Any]]:
    """The candidate's benchmark reports (reports/device, reports/device_fp32, reports/cloud) and
    the card updates that go with them."""
    y = ev.labels["benchmark"]
    if len(y) == 0:
        return {}
    answers = {"device": ("device_int8", "int8"), "device_fp32": ("device_float", "float"), "cloud": ("cloud", "keras")}
    updates: dict[str, dict[str, Any]] = {"device": {}, "cloud": {}}
    found: dict[str, dict[str, Any]] = {}
    for folder, (answer, variant) in answers.items():
        s = ev.candidate["benchmark"][answer]
        m = compute_metrics(s.probs, y, taxonomy, s.policy)
        kind = "cloud" if answer == "cloud" else "device"
        data = {"source": f"dataset version {dataset_version}", "split": "benchmark", "images": int(len(y)),
                "model_version": version, "model_kind": kind, "variant": variant, "scored": s.how}
        write_report(tmp / "reports" / folder, f"{kind} model {version} ({variant}) on the benchmark of "
                     f"{dataset_version}", s.probs, y, taxonomy, m, data)
        found[folder] = m
    updates["device"]["metrics"] = {k: found["device"].get(k) for k in SUMMARY_KEYS}
    updates["device"]["metrics_fp32"] = {k: found["device_fp32"].get(k) for k in SUMMARY_KEYS}
    updates["cloud"]["metrics"] = {k: found["cloud"].get(k) for k in SUMMARY_KEYS}
    f = _called(ev.candidate["benchmark"]["device_float"])
    q = _called(ev.candidate["benchmark"]["device_int8"])
    updates["device"]["int8_parity"] = {
        "top1_agreement_with_float": float((f == q).mean()),
        "balanced_accuracy_drop_points": 100 * (found["device_fp32"]["balanced_accuracy"]
                                                - found["device"]["balanced_accuracy"]),
        "measured_on": f"benchmark of {dataset_version}, {len(y)} images"}
    return updates
