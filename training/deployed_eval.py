"""``dermaloop evaluate --as-deployed``: the evaluation report, produced by the code paths we ship.

``dermaloop evaluate`` feeds the classifier the centre square of every photo. Patients' photos take
another road, and a figure is only worth publishing if it is that road's. Here each photo runs
through it unchanged:

* device: ``open_device_path`` exactly as ``dermaloop diagnose`` opens it, then ``DevicePath.run``
  (decode, analysis model, quality gate, not-skin check, square crop around the lesion box with the
  card's margin, the int8 classifier, the card's risk policy and decision rule);
* cloud: the worker's own ``load_checks``, ``load_model``, ``prepare``, ``infer`` and ``record``
  (the same checks and crop, ``KerasCloudModel`` with its test-time augmentation and the card's
  decision rule), without Firebase. Grad-CAM is skipped: it never changes a probability (the test
  compares with the worker's heatmap path).

Photos the gates decline are never dropped: they are counted per class and why, and the report
gives the metrics twice, on the classified photos and with every declined photo counted as wrong.
The same photos also go through the centre-square path of ``dermaloop evaluate`` (same loaded
model), so the two are compared photo for photo. Each photo's answer, as the deployed path gave it,
goes to ``photos.jsonl`` (what ``diagnose --json`` prints, or the worker's ``cloud`` record, minus
timings).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dermaloop.risk import RiskPolicy
from dermaloop.taxonomy import Taxonomy
from training.datasets import Dataset, Sample
from training.metrics import compute_metrics

STATUSES = ("classified", "declined", "unreadable")


@dataclass
class Photo:
    """One photo's fate on the deployed path."""

    id: str
    file: str
    label: int
    status: str  # classified | declined | unreadable
    reason: str | None  # why not classified: low_resolution, blurry, not_skin, unreadable, ...
    probs: np.ndarray | None  # the full calibrated probability vector the path computed
    called: int | None  # the class the path names first (its decision rule, offsets included)
    cropped: bool | None  # True: crop around the lesion box; False: centre square
    answer: dict[str, Any]  # the path's own output (diagnose --json / the worker's record), no timings

    def to_json(self, taxonomy: Taxonomy) -> dict[str, Any]:
        return {"id": self.id, "file": self.file, "label": taxonomy.ids[self.label], "status": self.status,
                "reason": self.reason, "called": None if self.called is None else taxonomy.ids[self.called],
                "cropped": self.cropped,
                "probs": None if self.probs is None else [round(float(p), 6) for p in self.probs],
                "answer": self.answer}


def decline_reason(issues: Sequence[str], is_lesion: bool | None) -> str:
    """A one-word reason for a declined photo, in the order ``device_path.decide`` applies them."""
    for issue in ("low_resolution", "blurry"):
        if issue in issues:
            return issue
    return "not_skin" if is_lesion is False else "declined"


def _index(taxonomy: Taxonomy, label: str) -> int:
    return taxonomy.ids.index(label)


# ---- device: the path ``dermaloop diagnose`` runs -------------------------------------------------

class _Recording:
    """Stands in for the ``DeviceModel`` inside the path's classifier and keeps the full probability
    vector of its last call (the path's result lists only the top three). Everything else is the
    wrapped model's."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.last: np.ndarray | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        self.last = self._inner.predict(pixels)
        return self.last


def open_device(model_dir: str | Path, models_dir: str | Path | None, analysis_model: str | Path | None = None,
                threads: int = 1):
    """The device path as ``dermaloop diagnose --model MODEL_DIR`` opens it."""
    from dermaloop.analysis.on_device import open_device_path

    path = open_device_path(models_dir, model_dir, analysis_model=analysis_model, threads=threads)
    if path.classifier is None:
        raise ValueError(f"{model_dir}: no device model")
    return path


def run_device(path: Any, samples: Sequence[Sample], progress: bool = True, desc: str = "device path") -> list[Photo]:
    from dermaloop.preprocess import ImageError

    classifier = path.classifier
    recorder = _Recording(classifier.model)
    classifier.model = recorder
    taxonomy = recorder.taxonomy
    photos = []
    try:
        for s in tqdm(samples, desc=desc, unit="img", disable=not progress):
            recorder.last = None
            try:
                result = path.run(Path(s.path))
            except ImageError as exc:
                photos.append(Photo(s.id, str(s.path), s.label, "unreadable", "unreadable", None, None, None,
                                    {"error": str(exc)}))
                continue
            answer = result.to_json()
            answer.pop("timings_ms", None)
            if result.top:
                assert recorder.last is not None
                photos.append(Photo(s.id, str(s.path), s.label, "classified", None,
                                    np.asarray(recorder.last[0], np.float64),
                                    _index(taxonomy, result.top[0]["label"]), result.box is not None, answer))
            else:
                photos.append(Photo(s.id, str(s.path), s.label, "declined",
                                    decline_reason(result.quality.issues, result.is_lesion), None, None, None, answer))
    finally:
        classifier.model = recorder._inner
    return photos


# ---- cloud: the worker's pipeline ------------------------------------------------------------------

def open_cloud(model_dir: str | Path, models_dir: str | Path | None, analysis_model: str | Path | None = None):
    """(checks, model) as ``dermaloop worker`` loads them."""
    from cloud_worker.checks import ImageChecks, load_checks
    from cloud_worker.model import load_model

    checks = ImageChecks(Path(analysis_model)) if analysis_model is not None else load_checks(Path(models_dir or "."))
    if checks.analyser is None:
        raise ValueError(f"no analysis model under {Path(models_dir or '.') / 'localiser'}: the worker would run "
                         "without its localiser and not-skin check, which is not the deployed path")
    return checks, load_model(Path(model_dir))


def run_cloud(checks: Any, model: Any, samples: Sequence[Sample], batch_size: int = 16, progress: bool = True,
              desc: str = "cloud pipeline", explain: bool = False) -> list[Photo]:
    from cloud_worker.errors import JobError
    from cloud_worker.pipeline import infer, prepare, record

    ids = [label.id for label in model.labels]
    photos: list[Photo] = []
    with tqdm(total=len(samples), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(samples), batch_size):
            batch = samples[start:start + batch_size]
            ready, kept = [], []
            for s in batch:
                try:
                    ready.append(prepare(Path(s.path).read_bytes(), checks))
                    kept.append(s)
                except (JobError, OSError) as exc:
                    photos.append(Photo(s.id, str(s.path), s.label, "unreadable", "unreadable", None, None, None,
                                        {"error": str(exc)}))
            results = infer(model, ready, explain=explain) if ready else []
            for s, item, result in zip(kept, ready, results, strict=True):
                answer = record(item, result, None, 0)
                answer.pop("timingsMs", None)
                answer.pop("at", None)
                if result.probs is not None:
                    photos.append(Photo(s.id, str(s.path), s.label, "classified", None,
                                        np.asarray(result.probs, np.float64), ids.index(answer["top"][0]["label"]),
                                        item.box is not None, answer))
                else:
                    quality, lesion = answer.get("quality") or {}, answer.get("lesion") or {}
                    photos.append(Photo(s.id, str(s.path), s.label, "declined",
                                        decline_reason(quality.get("issues") or [], lesion.get("is_lesion")),
                                        None, None, None, answer))
            bar.update(len(batch))
    order = {s.id: i for i, s in enumerate(samples)}
    return sorted(photos, key=lambda p: order[p.id])


# ---- figures ---------------------------------------------------------------------------------------

def gate_counts(photos: Sequence[Photo], taxonomy: Taxonomy) -> dict[str, dict[str, Any]]:
    """Per class: photos, classified, declined (and why), unreadable, cropped around a box."""
    out = {}
    for c, cid in enumerate(taxonomy.ids):
        mine = [p for p in photos if p.label == c]
        out[cid] = {"n": len(mine), **{s: sum(p.status == s for p in mine) for s in STATUSES},
                    "reasons": dict(Counter(p.reason for p in mine if p.reason)),
                    "cropped": sum(bool(p.cropped) for p in mine)}
    return out


def declined_as_wrong(photos: Sequence[Photo], taxonomy: Taxonomy, policy: RiskPolicy) -> dict[str, Any]:
    """Every photo counts; a declined or unreadable one is a wrong answer (not the right class, not
    flagged when malignant, not cleared when benign)."""
    labels = np.array([p.label for p in photos], np.int64)
    ok = np.array([p.status == "classified" for p in photos])
    correct = np.array([p.called == p.label for p in photos]) & ok
    recall = {cid: (float(correct[labels == c].mean()) if (labels == c).any() else None)
              for c, cid in enumerate(taxonomy.ids)}
    present = [v for v in recall.values() if v is not None]
    out: dict[str, Any] = {"n": len(photos), "classified": int(ok.sum()),
                           "balanced_accuracy": float(np.mean(present)) if present else None,
                           "accuracy": float(correct.mean()) if len(photos) else None, "per_class_recall": recall}
    mask = np.array(policy.malignant_mask, bool)
    if mask.any() and len(photos):
        is_mal = mask[labels]
        p_mal = np.array([policy.malignant_probability(p.probs) if p.probs is not None else np.nan for p in photos])
        flagged = ok & (np.nan_to_num(p_mal, nan=-1.0) >= policy.moderate_threshold)
        out["malignant_sensitivity"] = float(flagged[is_mal].mean()) if is_mal.any() else None
        out["malignant_specificity"] = float((ok & ~flagged)[~is_mal].mean()) if (~is_mal).any() else None
    return out


def _classified(photos: Sequence[Photo]) -> tuple[np.ndarray, np.ndarray]:
    done = [p for p in photos if p.status == "classified"]
    probs = np.stack([p.probs for p in done]) if done else np.zeros((0, 0))
    return probs, np.array([p.label for p in done], np.int64)


def centre_square_probs(model: Any, dataset: Dataset, photos: Sequence[Photo], progress: bool = True) -> np.ndarray:
    """The centre-square path of ``dermaloop evaluate`` (``training.evaluate.predict_dataset``), on
    the photos the deployed path could read, rows aligned with them."""
    from training.evaluate import predict_dataset

    readable = {p.id for p in photos if p.status != "unreadable"}
    subset = dataset.subset([i for i, s in enumerate(dataset.samples) if s.id in readable])
    probs, _, failed = predict_dataset(model, subset, progress=progress, desc=f"centre square ({model.kind})")
    if failed:
        raise RuntimeError(f"the centre-square path could not read photos the deployed path read: {failed[:3]}")
    return probs


def compare(photos: Sequence[Photo], centre: np.ndarray, taxonomy: Taxonomy, policy: RiskPolicy) -> dict[str, Any]:
    """Centre square against deployed: on all readable photos (what each report says) and on the
    photos the deployed path classified (same photos, so the difference is the crop alone)."""
    readable = [p for p in photos if p.status != "unreadable"]
    labels = np.array([p.label for p in readable], np.int64)
    classified = np.array([p.status == "classified" for p in readable])
    centre_all = compute_metrics(centre, labels, taxonomy, policy)
    centre_same = compute_metrics(centre[classified], labels[classified], taxonomy, policy) if classified.any() else None
    agree = None
    if classified.any():
        calls = np.array([p.called for p in readable if p.status == "classified"])
        agree = float((policy.decide(centre[classified]) == calls).mean())
    return {"centre_all": _slim(centre_all), "centre_same_photos": _slim(centre_same) if centre_same else None,
            "call_agreement_on_classified": agree}


def crop_share(photo: Photo, config: Any) -> float | None:
    """Side of the square the classifier saw, as a share of the photo's shorter side (1.0 for the
    centre square): how far the deployed view is zoomed in from the training view."""
    from dermaloop.preprocess import crop_box, load_image

    box = photo.answer.get("box")
    if photo.status != "classified" or box is None:
        return None if photo.status != "classified" else 1.0
    width, height = load_image(photo.file).size
    left, _, right, _ = crop_box(width, height, box, config)
    return (right - left) / min(width, height)


CROP_BUCKETS = ((0.0, 0.7), (0.7, 1.01))


def by_crop(photos: Sequence[Photo], shares: Sequence[float | None], centre: np.ndarray | None,
            taxonomy: Taxonomy, policy: RiskPolicy) -> list[dict[str, Any]]:
    """Deployed against centre square on the same classified photos, split by how much the crop zooms."""
    readable = [p for p in photos if p.status != "unreadable"]
    row = {p.id: i for i, p in enumerate(readable)}
    out = []
    for lo, hi in CROP_BUCKETS:
        mine = [(p, s) for p, s in zip(photos, shares, strict=True) if s is not None and lo <= s < hi]
        if not mine:
            continue
        labels = np.array([p.label for p, _ in mine])
        calls = np.array([p.called for p, _ in mine])
        entry: dict[str, Any] = {"crop_share": f"{lo:.1f}-{min(hi, 1.0):.1f}", "n": len(mine),
                                 "deployed": _acc(labels, calls)}
        if centre is not None:
            entry["centre_square"] = _acc(labels, policy.decide(centre[[row[p.id] for p, _ in mine]]))
        out.append(entry)
    return out


def _acc(labels: np.ndarray, calls: np.ndarray) -> dict[str, float]:
    recalls = [float((calls[labels == c] == c).mean()) for c in np.unique(labels)]
    return {"accuracy": float((calls == labels).mean()), "balanced_accuracy": float(np.mean(recalls))}


def _slim(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("n", "balanced_accuracy", "accuracy", "macro_f1", "auc_ovr", "per_class_recall", "malignant_auc",
            "malignant_sensitivity", "malignant_specificity", "ece")
    return {k: m.get(k) for k in keys}


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _d(a: Any, b: Any) -> str:
    return "n/a" if a is None or b is None else f"{a - b:+.3f}"


def markdown(summary: dict[str, Any], taxonomy: Taxonomy) -> list[str]:
    """The report's deployed-path sections (gates, both ways of counting, centre square, abstain)."""
    gates, wrong, classified = summary["gates"], summary["declined_as_wrong"], summary["classified"]
    lines = ["", "## Deployed path", "", summary["path"], "",
             "### What the gates did", "",
             "| class | photos | classified | declined | unreadable | why declined | cropped around the box |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for cid, g in gates.items():
        why = ", ".join(f"{k} {v}" for k, v in sorted(g["reasons"].items()) if k != "unreadable") or "-"
        lines.append(f"| {cid} | {g['n']} | {g['classified']} | {g['declined']} | {g['unreadable']} | {why} | "
                     f"{g['cropped']} |")
    total = {k: sum(g[k] for g in gates.values()) for k in ("n", "classified", "declined", "unreadable", "cropped")}
    lines.append(f"| all | {total['n']} | {total['classified']} | {total['declined']} | {total['unreadable']} | | "
                 f"{total['cropped']} |")
    comp = summary.get("centre_square")
    lines += ["", "### Two ways of counting, and the centre square", "",
              "Declined counted as wrong: a declined or unreadable photo is a wrong answer (not its class, a "
              "missed malignancy, a benign lesion not cleared).", ""]
    head = ["metric", "deployed, classified photos", "deployed, declined = wrong"]
    if comp:
        head += ["centre square, same photos", "centre square, all readable", "deployed - centre (same photos)",
                 "deployed (declined = wrong) - centre (all)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [("photos", "n"), ("balanced accuracy", "balanced_accuracy"), ("accuracy", "accuracy"),
            ("malignant sensitivity", "malignant_sensitivity"), ("malignant specificity", "malignant_specificity")]
    rows += [(f"recall {cid}", ("per_class_recall", cid)) for cid in taxonomy.ids]

    def get(m: dict[str, Any] | None, key: Any) -> Any:
        if m is None:
            return None
        return m.get(key[0], {}).get(key[1]) if isinstance(key, tuple) else m.get(key)

    for name, key in rows:
        a, b = get(classified, key), get(wrong, key)
        cells = [name] + [str(v) if key == "n" else _f(v) for v in (a, b)]
        if comp:
            c, d = get(comp["centre_same_photos"], key), get(comp["centre_all"], key)
            cells += [str(v) if key == "n" else _f(v) for v in (c, d)]
            cells += ["" if key == "n" else _d(a, c), "" if key == "n" else _d(b, d)]
        lines.append("| " + " | ".join(cells) + " |")
    if comp and comp.get("call_agreement_on_classified") is not None:
        lines += ["", f"Same call as the centre square on {comp['call_agreement_on_classified']:.1%} of the "
                      "classified photos."]
    if summary.get("by_crop"):
        lines += ["", "### By zoom (crop side / shorter side of the photo; classified photos)", "",
                  "| crop share | photos | deployed accuracy | deployed balanced acc. | centre accuracy | "
                  "centre balanced acc. |", "|---|---:|---:|---:|---:|---:|"]
        for b in summary["by_crop"]:
            c = b.get("centre_square") or {}
            lines.append(f"| {b['crop_share']} | {b['n']} | {_f(b['deployed']['accuracy'])} | "
                         f"{_f(b['deployed']['balanced_accuracy'])} | {_f(c.get('accuracy'))} | "
                         f"{_f(c.get('balanced_accuracy'))} |")
    ab = summary.get("abstain")
    if ab:
        lines += ["", "### Abstain rule (\"unsure: a dermatologist will look\")", "",
                  f"{ab['rule']['method'].upper()} prediction sets at coverage {ab['rule']['coverage']:.2f} "
                  f"(qhat {ab['rule']['qhat']:.4f}, fitted on {ab['rule']['n_calib']} calib photos), on the "
                  "classified photos:", "",
                  "| measure | value |", "|---|---:|"]
        for key, label in (("coverage", "true class in the set"), ("abstain_rate", "unsure (abstained)"),
                           ("mean_set_size", "mean set size"), ("accuracy_sure", "accuracy of the sure calls"),
                           ("balanced_accuracy_sure", "balanced accuracy of the sure calls"),
                           ("malignant_abstained", "malignant photos abstained on"),
                           ("malignant_sensitivity_sure", "malignant sensitivity, not abstained"),
                           ("malignant_missed_sure", "malignant photos neither abstained on nor flagged")):
            v = ab.get(key)
            lines.append(f"| {label} | {v if isinstance(v, int) else _f(v)} |")
    return lines


def summarise(photos: Sequence[Photo], taxonomy: Taxonomy, policy: RiskPolicy, abstain: Any = None,
              centre: np.ndarray | None = None) -> dict[str, Any]:
    probs, labels = _classified(photos)
    out: dict[str, Any] = {
        "gates": gate_counts(photos, taxonomy),
        "declined_as_wrong": declined_as_wrong(photos, taxonomy, policy),
        "classified": _slim(compute_metrics(probs, labels, taxonomy, policy)) if len(labels) else None,
    }
    if centre is not None:
        out["centre_square"] = compare(photos, centre, taxonomy, policy)
    if abstain is not None and len(labels):
        from training.abstain import abstain_figures

        calls = np.array([p.called for p in photos if p.status == "classified"])
        out["abstain"] = {"rule": abstain.to_dict(),
                          **abstain_figures(abstain, probs, labels, calls, policy, taxonomy.ids)}
    return out


def evaluate_deployed(kind: str, model_dir: str | Path, dataset: Dataset, out_dir: str | Path, split_name: str, *,
                      models_dir: str | Path | None = None, analysis_model: str | Path | None = None,
                      centre: bool = True, progress: bool = True, batch_size: int = 16) -> dict[str, Any]:
    """Run ``dataset`` through the deployed ``kind`` path; write report.md, metrics.json, plots and
    photos.jsonl into ``out_dir``; return the summary (with ``_photos``)."""
    from training.report import write_report

    photos, model, path_text = run_path(kind, model_dir, dataset.samples, models_dir=models_dir,
                                        analysis_model=analysis_model, progress=progress, batch_size=batch_size)
    if [c.id for c in dataset.taxonomy.classes] != model.taxonomy.ids:
        raise ValueError("the dataset was read with a different taxonomy than the model's labels")
    taxonomy, policy = model.taxonomy, model.policy
    centre_probs = centre_square_probs(model, dataset, photos, progress) if centre else None
    summary = summarise(photos, taxonomy, policy, getattr(model, "abstain", None), centre_probs)
    summary["path"] = path_text
    shares = [crop_share(p, model.preprocess) for p in photos]
    summary["by_crop"] = by_crop(photos, shares, centre_probs, taxonomy, policy)
    probs, labels = _classified(photos)
    if not len(labels):
        raise ValueError("the deployed path classified none of the photos: nothing to report on")
    out = Path(out_dir)
    variant = Path(getattr(model, "path", "")).name or "keras"
    data = {**dataset.describe(), "split": split_name, "path": "as deployed", "model_version": model.version,
            "model_kind": kind, "variant": variant,
            "classified": int(len(labels)), "declined": sum(p.status == "declined" for p in photos),
            "unreadable": sum(p.status == "unreadable" for p in photos)}
    title = f"{kind} model {model.version} as deployed on {Path(dataset.source).name} ({split_name})"
    full = compute_metrics(probs, labels, taxonomy, policy)
    write_report(out, title, probs, labels, taxonomy, full, data,
                 {"metrics above": "on the photos the deployed path classified; see 'Deployed path' for the rest"})
    report = out / "report.md"
    report.write_text(report.read_text().rstrip("\n") + "\n" + "\n".join(markdown(summary, taxonomy)) + "\n")
    metrics_file = out / "metrics.json"
    stored = json.loads(metrics_file.read_text())
    stored["deployed"] = summary
    metrics_file.write_text(json.dumps(stored, indent=2) + "\n")
    centre_rows = iter(centre_probs if centre_probs is not None else [])
    with open(out / "photos.jsonl", "w") as f:
        for p, share in zip(photos, shares, strict=True):
            line = {**p.to_json(taxonomy), "crop_share": None if share is None else round(share, 4)}
            if centre_probs is not None and p.status != "unreadable":
                line["centre_probs"] = [round(float(v), 6) for v in next(centre_rows)]
            f.write(json.dumps(line) + "\n")
    summary["_photos"] = photos
    return summary


def run_path(kind: str, model_dir: str | Path, samples: Sequence[Sample], *, models_dir: str | Path | None,
             analysis_model: str | Path | None = None, progress: bool = True,
             batch_size: int = 16) -> tuple[list[Photo], Any, str]:
    """(photos, the runtime model underneath — ``DeviceModel`` or ``model_dir.CloudModel`` — and a
    sentence saying which path ran)."""
    if kind == "device":
        path = open_device(model_dir, models_dir, analysis_model)
        model = path.classifier.model
        text = (f"Device path as `dermaloop diagnose` runs it: analysis model `{path.analyser.path.name}`, "
                f"quality gate, not-skin check, crop around the lesion box (margin "
                f"{model.preprocess.box_margin:.2f}), classifier `{Path(model.path).name}`, the card's risk "
                "policy and decision rule.")
        return run_device(path, samples, progress), model, text
    if kind == "cloud":
        checks, cloud = open_cloud(model_dir, models_dir, analysis_model)
        text = (f"The worker's pipeline: {checks.description}; crop; `KerasCloudModel` with test-time "
                f"augmentation {['plain'] + list(cloud.tta)} and the card's decision rule; `record()`.")
        return run_cloud(checks, cloud, samples, batch_size, progress), cloud.inner, text
    raise ValueError(f"kind must be 'device' or 'cloud', not {kind!r}")


def limit_samples(dataset: Dataset, limit: int | None, seed: int = 0) -> Dataset:
    """A fixed random subset of ``limit`` photos (the same for every run), or the dataset itself."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise ValueError("--limit must be at least 1")
    keep = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:limit])
    return dataset.subset(keep.tolist())

