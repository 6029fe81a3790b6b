"""Run a model directory's device or cloud model over a dataset through the real runtime path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dermaloop.model_dir import CloudModel, DeviceModel, ModelDir
from dermaloop.preprocess import ImageError, load_image, to_model_input
from training.datasets import Dataset
from training.metrics import compute_metrics
from training.report import write_report


def load_runtime(model_dir: str | Path, kind: str, variant: str = "int8") -> DeviceModel | CloudModel:
    md = ModelDir.open(model_dir)
    return DeviceModel(md, variant) if kind == "device" else CloudModel(md)


def own_split(dataset: Dataset, model_dir: str | Path, part: str) -> Dataset:
    """The images of ``dataset`` that were in ``part`` (train / calib / val) of the model's own
    training run, from the model directory's ``split.json``."""
    wanted = set(json.loads((Path(model_dir) / "split.json").read_text())[part])
    subset = dataset.subset([i for i, s in enumerate(dataset.samples) if s.id in wanted])
    if not subset.samples:
        raise ValueError(f"none of the model's {part} images are in {dataset.source}")
    return subset


def predict_dataset(model: DeviceModel | CloudModel, dataset: Dataset, batch_size: int = 16,
                    progress: bool = True, desc: str = "") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Probabilities for every readable sample (file -> shared preprocessing -> model); unreadable ones listed."""
    probs, labels, failed = [], [], []
    samples = dataset.samples
    with tqdm(total=len(samples), desc=desc or f"evaluating {model.kind}", unit="img", disable=not progress) as bar:
        for i in range(0, len(samples), batch_size):
            batch, ys = [], []
            for s in samples[i:i + batch_size]:
                try:
                    batch.append(to_model_input(load_image(s.path), config=model.preprocess))
                    ys.append(s.label)
                except ImageError as exc:
                    failed.append(f"{s.id}: {exc}")
            if batch:
                probs.append(model.predict(np.stack(batch)))
                labels.extend(ys)
            bar.update(min(batch_size, len(samples) - i))
    k = len(model.taxonomy)
    return (np.concatenate(probs) if probs else np.zeros((0, k))), np.array(labels, np.int64), failed


def evaluate(model: DeviceModel | CloudModel, dataset: Dataset, out_dir: str | Path, split_name: str,
             progress: bool = True, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    if [c.id for c in dataset.taxonomy.classes] != model.taxonomy.ids:
        raise ValueError("the dataset was read with a different taxonomy than the model's labels")
    probs, labels, failed = predict_dataset(model, dataset, progress=progress)
    if len(labels) == 0:
        raise ValueError("no readable images to evaluate")
    metrics = compute_metrics(probs, labels, model.taxonomy, model.policy)
    data = {**dataset.describe(), "split": split_name, "unreadable": len(failed),
            "model_version": model.version, "model_kind": model.kind,
            "variant": getattr(model, "variant", "keras")}
    title = f"{model.kind} model {model.version} on {Path(dataset.source).name} ({split_name})"
    write_report(out_dir, title, probs, labels, model.taxonomy, metrics, data,
                 {**(extra or {}), **({"unreadable_images": failed[:20]} if failed else {})})
    metrics["_probs"] = probs
    metrics["_labels"] = labels
    return metrics
