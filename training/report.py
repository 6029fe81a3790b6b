"""Evaluation report: Markdown with matplotlib PNGs, plus metrics.json, for one model on one dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dermaloop.taxonomy import Taxonomy

METRICS_KEYS = ("balanced_accuracy", "accuracy", "per_class_recall", "macro_f1", "auc_ovr",
                "malignant_sensitivity", "malignant_specificity", "malignant_auc", "ece")


def _plots(out: Path, probs: np.ndarray, labels: np.ndarray, taxonomy: Taxonomy, metrics: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

    files = []
    cm = np.array(metrics["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(6, 5))
    ConfusionMatrixDisplay(cm, display_labels=taxonomy.ids).plot(ax=ax, colorbar=False, cmap="Blues")
    ax.set_title("Confusion matrix (rows: true class)")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=110)
    plt.close(fig)
    files.append("confusion_matrix.png")

    fig, ax = plt.subplots(figsize=(6, 5))
    mask = np.array(taxonomy.malignant_mask, bool)
    is_mal = mask[labels]
    if 0 < is_mal.sum() < len(is_mal):
        RocCurveDisplay.from_predictions(is_mal, probs[:, mask].sum(axis=1), ax=ax, name="malignant vs benign",
                                         plot_chance_level=True)
    for c, cid in enumerate(taxonomy.ids):
        y = labels == c
        if 0 < y.sum() < len(y):
            RocCurveDisplay.from_predictions(y, probs[:, c], ax=ax, name=cid)
    if metrics.get("malignant_sensitivity") is not None:
        ax.plot(1 - metrics["malignant_specificity"], metrics["malignant_sensitivity"], "k*", ms=12,
                label="chosen malignancy threshold")
        ax.legend(fontsize=7)
    ax.set_title("ROC (one-vs-rest)")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=110)
    plt.close(fig)
    files.append("roc.png")

    fig, ax = plt.subplots(figsize=(5, 5))
    curve = metrics.get("reliability", [])
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    if curve:
        ax.plot([b["confidence"] for b in curve], [b["accuracy"] for b in curve], "o-", label="model")
    ax.set_xlabel("confidence (top class)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {metrics['ece']:.3f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    plt.close(fig)
    files.append("reliability.png")
    return files


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_report(out_dir: str | Path, title: str, probs: np.ndarray, labels: np.ndarray, taxonomy: Taxonomy,
                 metrics: dict[str, Any], data: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """``report.md`` + PNG plots + ``metrics.json`` in ``out_dir``; returns the report path."""
    from training.metrics import reliability_curve

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = dict(metrics)
    metrics["reliability"] = reliability_curve(np.asarray(probs), np.asarray(labels))
    plots = _plots(out, np.asarray(probs), np.asarray(labels), taxonomy, metrics)
    summary = {k: metrics.get(k) for k in METRICS_KEYS}
    (out / "metrics.json").write_text(json.dumps({**summary, "details": metrics, "data": data,
                                                  **({"extra": extra} if extra else {})}, indent=2) + "\n")
    lines = [f"# {title}", "", "Not a diagnosis: figures describe this model on this data only.", "",
             "## Data", ""]
    lines += [f"- {k}: {_fmt(v) if not isinstance(v, dict) else json.dumps(v)}" for k, v in data.items()]
    lines += ["", "## Summary", "", "| metric | value |", "|---|---|"]
    for k in ("n", "balanced_accuracy", "accuracy", "macro_f1", "auc_ovr", "malignant_auc",
              "malignant_threshold", "malignant_sensitivity", "malignant_specificity", "ece"):
        lines.append(f"| {k} | {_fmt(metrics.get(k))} |")
    if metrics.get("decision_rule"):
        lines += ["", f"Class-level figures (accuracy, recall, F1, confusion matrix) count the model's call: "
                      f"{metrics['decision_rule']}."]
    lines += ["", "## Per class", "", "| class | support | precision | recall | F1 | AUC |", "|---|---|---|---|---|---|"]
    for cid in taxonomy.ids:
        lines.append(f"| {cid} | {metrics['support'][cid]} | {_fmt(metrics['per_class_precision'][cid])} | "
                     f"{_fmt(metrics['per_class_recall'][cid])} | {_fmt(metrics['per_class_f1'][cid])} | "
                     f"{_fmt(metrics['per_class_auc'][cid])} |")
    if "risk_tiers" in metrics:
        lines += ["", "## Risk tiers", "", "| tier | benign | malignant |", "|---|---|---|"]
        lines += [f"| {t} | {v['benign']} | {v['malignant']} |" for t, v in metrics["risk_tiers"].items()]
    if extra:
        lines += ["", "## Notes", ""] + [f"- {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}"
                                         for k, v in extra.items()]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"
