"""Build a retraining candidate: a complete model directory for the device and the cloud model.

Two recipes:

* ``refit`` (the fast path, default): the serving versions' networks are kept and only their last
  linear layer is refitted on the dataset version's ``train`` rows, starting from the current
  weights (``training.refit``); temperature, risk thresholds and class offsets are refitted on its
  ``calib`` rows as the runtime computes probabilities (the cloud's test-time views included); the
  device model is exported again to TFLite fp32 and int8.
* ``train``: any ``dermaloop train`` recipe (its options passed through) on the ``train`` and
  ``calib`` rows of the dataset version, from ImageNet weights; the training pipeline carves its own
  calibration and report parts out of them and never sees the benchmark or the new-label holdout.

Either way the directory is written under a temporary name and renamed only by
:func:`finish_candidate`, after its benchmark reports are in and every file is hashed into the card.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dermaloop.model_dir import (
    CARD,
    CLOUD_KERAS,
    DEVICE_FP32,
    DEVICE_INT8,
    DEVICE_KERAS,
    LABELS,
    ModelDir,
    sha256_file,
)
from dermaloop.preprocess import PreprocessConfig, load_image, to_model_input
from dermaloop.risk import RiskPolicy, fit_class_offsets, fit_temperature, policy_from_probabilities
from dermaloop.taxonomy import Taxonomy
from training.refit import EmbeddingCache, fit_head, probabilities
from training.scoring import Image, head_features, load_keras

__all__ = ["RECIPES", "Row", "RefitConfig", "CandidateError", "refit_candidate", "recipe_candidate",
           "finish_candidate", "shuffled"]

RECIPES = ("refit", "train")
SHUFFLE_SEED = 12345


class CandidateError(RuntimeError):
    """The candidate cannot be built from these inputs (the message says why)."""


@dataclass(frozen=True)
class Row:
    """One image of the dataset version: id, local file, class index, split, group, sha256."""

    id: str
    path: Path
    label: int
    split: str
    group: str
    source: str
    sha256: str


@dataclass
class RefitConfig:
    c: float = 0.01  # inverse strength of the pull toward the current layer (training.refit.fit_head)
    calibration_images: int = 500  # int8 calibration, as training.pipeline (500 gave 1.30 points on HAM10000)
    shuffle_labels: bool = False  # deliberately break the labels: the gates must refuse the result
    progress: bool = True
    seed: int = 0
    train_args: tuple[str, ...] = ()  # recipe "train": options of `dermaloop train`
    extra: dict[str, Any] = field(default_factory=dict)


def shuffled(labels: np.ndarray, seed: int = SHUFFLE_SEED) -> np.ndarray:
    """The same labels in a fixed random order: a model trained on them learns nothing true."""
    return np.random.default_rng(seed).permutation(np.asarray(labels))


def _images(rows: list[Row]) -> list[Image]:
    return [Image(r.sha256, r.path) for r in rows]


def _log(cfg: RefitConfig, msg: str) -> None:
    if cfg.progress:
        from tqdm import tqdm

        tqdm.write(msg)


# ---- the fast path: refit the last layer of the serving networks ----------------------------------


def _refit_policy(current: RiskPolicy, probs: np.ndarray, labels: np.ndarray, temperature: float,
                  decision: dict[str, Any], taxonomy: Taxonomy) -> tuple[RiskPolicy, dict[str, Any], str | None]:
    """Thresholds (same targets) and class offsets (same recall targets) on the calib probabilities."""
    note = None
    try:
        policy = policy_from_probabilities(temperature, probs, labels, current.malignant_mask,
                                           current.target_sensitivity, current.target_specificity,
                                           current.sensitivity_confidence)
    except ValueError as exc:  # calib without malignant or benign images (tiny data): keep the thresholds
        note = f"risk thresholds kept from the current version ({exc})"
        policy = RiskPolicy(temperature, current.malignant_mask, current.moderate_threshold, current.high_threshold,
                            current.target_sensitivity, current.target_specificity,
                            sensitivity_confidence=current.sensitivity_confidence)
    targets = decision.get("calib_recall_targets") or {}
    info: dict[str, Any] = {"rule": "most probable class"}
    if targets:
        info = {"rule": "argmax of log-probability + class offset", "calib_recall_targets": dict(targets)}
        try:
            offsets = fit_class_offsets(probs, labels, {taxonomy.ids.index(c): r for c, r in targets.items()})
        except ValueError as exc:
            info = {**info, "rule": "most probable class", "not_fitted": str(exc)}
        else:
            policy = replace(policy, class_offsets=offsets)
            called = policy.decide(probs)
            info["class_offsets"] = {c: v for c, v in zip(taxonomy.ids, offsets, strict=True) if v}
            info["calib_recall"] = {c: float((called[labels == taxonomy.ids.index(c)] == taxonomy.ids.index(c)).mean())
                                    for c in targets}
    return policy, info, note


def _refit_kind(current: ModelDir, kind: str, train: list[Row], calib: list[Row], taxonomy: Taxonomy,
                cache: EmbeddingCache, cfg: RefitConfig) -> dict[str, Any]:
    from training.gates import balanced_accuracy

    t0 = time.perf_counter()
    model = load_keras(current, kind)
    head, digest, feats_train = head_features(model, current, kind, _images(train), cache, cfg.progress)
    _, _, feats_calib = head_features(model, current, kind, _images(calib), cache, cfg.progress)
    t_features = time.perf_counter() - t0
    y = np.array([r.label for r in train], np.int64)
    if cfg.shuffle_labels:
        y = shuffled(y)
    yc = np.array([r.label for r in calib], np.int64)
    if len(yc) == 0:
        raise CandidateError("the dataset version has no calib images: temperature and thresholds cannot be refitted")
    a0, c0 = head.linear()
    a, c = fit_head(feats_train["orig"], y, a0, c0, c=cfg.c)
    t = fit_temperature(feats_calib["orig"] @ a + c, yc)
    views = list(feats_calib)
    probs = probabilities([feats_calib[v] for v in views], a, c, t)
    section = current.section(kind)
    old = RiskPolicy.from_dict(section["risk"])
    policy, decision, note = _refit_policy(old, probs, yc, t, section.get("decision") or {}, taxonomy)
    head.set_linear(a, c, t)
    info = {"method": "last linear layer refitted from the current version; network unchanged",
            "from_version": current.card.get("version"), "network_digest": digest,
            "inverse_pull_toward_current_c": cfg.c, "train_images": len(train),
            "train_new_labels": sum(r.source == "case" for r in train), "calib_images": len(calib),
            "labels_shuffled": cfg.shuffle_labels or None,
            "weight_change_relative": float(np.linalg.norm(a - a0) / max(np.linalg.norm(a0), 1e-12)),
            "features_seconds": round(t_features, 1), "fit_seconds": round(time.perf_counter() - t0 - t_features, 1)}
    calib_scores = {"n": len(yc), "balanced_accuracy": balanced_accuracy(yc, policy.decide(probs))}
    return {"model": model, "policy": policy, "decision": decision, "training": {k: v for k, v in info.items()
                                                                                 if v is not None},
            "calib": calib_scores, "note": note}


def _risk(policy: RiskPolicy) -> dict[str, Any]:
    d = policy.to_dict()
    d.pop("demonstration", None)
    return {**d, "temperature_in_model": True}


def _int8_images(train: list[Row], preprocess: PreprocessConfig, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(train), size=min(n, len(train)), replace=False) if train else []
    return [to_model_input(load_image(train[i].path), config=preprocess) for i in pick]


def _write_split(tmp: Path, rows: list[Row]) -> dict[str, int]:
    parts = {"train": "train", "calib": "calib", "benchmark": "val", "new_holdout": "new_holdout"}
    split = {name: [r.id for r in rows if r.split == part] for part, name in parts.items()}
    (tmp / "split.json").write_text(json.dumps(split, indent=0))
    return {k: len(v) for k, v in split.items()}


def refit_candidate(current: dict[str, ModelDir], rows: list[Row], *, version: str, tmp: Path, taxonomy: Taxonomy,
                    cache: EmbeddingCache, cfg: RefitConfig, lineage: dict[str, Any]) -> Path:
    """Write the fast-path candidate into ``tmp`` (replaced if present); returns ``tmp``."""
    from training.export import export_fp32, export_int8

    train = [r for r in rows if r.split == "train"]
    calib = [r for r in rows if r.split == "calib"]
    if not train:
        raise CandidateError("the dataset version has no train images")
    for kind, md in current.items():
        if md.card.get("labels") and list(md.card["labels"]) != taxonomy.ids:
            raise CandidateError(f"the current {kind} model has classes {md.card['labels']}, the dataset "
                                 f"{taxonomy.ids}: a head refit cannot change the classes (use --recipe train)")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "device").mkdir(parents=True)
    (tmp / "cloud").mkdir(parents=True)
    taxonomy.save(tmp / LABELS)
    split_counts = _write_split(tmp, rows)
    results = {}
    for kind in ("device", "cloud"):
        _log(cfg, f"refitting the {kind} model's last layer (from {current[kind].card.get('version')})")
        results[kind] = _refit_kind(current[kind], kind, train, calib, taxonomy, cache, cfg)
        if results[kind]["note"]:
            _log(cfg, f"warning: {kind}: {results[kind]['note']}")
    device = results["device"]["model"]
    device.save(tmp / DEVICE_KERAS)
    results["cloud"]["model"].save(tmp / CLOUD_KERAS)
    pre = PreprocessConfig.from_dict(current["device"].section("device")["preprocess"])
    _log(cfg, "exporting the device model to TFLite (fp32 and int8)")
    t0 = time.perf_counter()
    images = _int8_images(train, pre, cfg.calibration_images, cfg.seed)
    export_fp32(device, tmp / DEVICE_FP32)
    export_int8(device, tmp / DEVICE_INT8, images)
    export_seconds = time.perf_counter() - t0

    card = copy.deepcopy(current["device"].card)
    for key in ("files", "file_bytes", "train_seconds_total"):
        card.pop(key, None)
    card["cloud"] = copy.deepcopy(current["cloud"].card["cloud"])
    now = datetime.now(UTC)
    card.update(version=version, created=now.isoformat(timespec="seconds"))
    network_options = card.pop("options", None)
    card["options"] = {"recipe": "refit", "c": cfg.c, "calibration_images": cfg.calibration_images,
                       "labels_shuffled": cfg.shuffle_labels, "network_trained_with": network_options}
    card["data"] = {**lineage, "split": split_counts,
                    "split_method": "the dataset version's splits (benchmark: lesion-grouped, never trained on)",
                    "int8_calibration": f"{len(images)} random training images"}
    for kind in ("device", "cloud"):
        r = results[kind]
        section = card[kind]
        for key in ("metrics", "metrics_fp32", "int8_parity", "calib", "training", "decision"):
            section.pop(key, None)
        section.update(risk=_risk(r["policy"]), decision=r["decision"], calib=r["calib"],
                       training={**r["training"], **({"export_seconds": round(export_seconds, 1)}
                                                     if kind == "device" else {})})
    (tmp / CARD).write_text(json.dumps(card, indent=2))
    return tmp


# ---- any `dermaloop train` recipe -----------------------------------------------------------------


def _training_folder(rows: list[Row], folder: Path, taxonomy: Taxonomy, shuffle: bool) -> Path:
    """The train and calib rows as a HAM10000-layout folder of symlinks, which every reader takes."""
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "images").mkdir(parents=True)
    use = [r for r in rows if r.split in ("train", "calib")]
    labels = np.array([r.label for r in use], np.int64)
    if shuffle:
        labels = shuffled(labels)
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "lesion_id", "dx"])
        for r, label in zip(use, labels, strict=True):
            os.symlink(r.path.resolve(), folder / "images" / f"{r.id}.jpg")
            writer.writerow([r.id, r.group, taxonomy.ids[int(label)]])
    return folder


def train_arguments(train_args: tuple[str, ...] | list[str], data: Path, out: Path, taxonomy: str,
                    cache_dir: Path, progress: bool) -> argparse.Namespace:
    """``dermaloop train``'s parsed options for ``train_args`` with retraining's data and output
    folders; raises CandidateError for options that are not its own (checked before a run starts)."""
    import contextlib
    import io

    from training import train_cli

    given = list(train_args)
    if any(a in ("--data", "--out") or a.startswith(("--data=", "--out=")) for a in given):
        raise CandidateError("--train-args must not contain --data or --out: retraining gives the dataset "
                             "version's train and calib images and its own output folder")
    parser = argparse.ArgumentParser(prog="dermaloop train", exit_on_error=False)
    train_cli.add_arguments(parser)
    argv = ["--data", str(data), "--out", str(out), "--taxonomy", taxonomy]
    if not any(a == "--cache-dir" or a.startswith("--cache-dir=") for a in given):
        argv += ["--cache-dir", str(cache_dir)]
    if not progress:
        argv.append("--quiet")
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            return parser.parse_args(argv + given)
    except (argparse.ArgumentError, SystemExit) as exc:
        why = str(exc) if isinstance(exc, argparse.ArgumentError) else said.getvalue().strip().splitlines()[-1]
        raise CandidateError(f"--train-args {shlex.join(given)!r}: not options of dermaloop train ({why})") from None


def recipe_candidate(rows: list[Row], *, version: str, tmp: Path, work: Path, taxonomy: Taxonomy, cfg: RefitConfig,
                     lineage: dict[str, Any], cache_dir: Path) -> Path:
    """Train a candidate with ``dermaloop train`` options ``cfg.train_args`` into ``tmp``."""
    from training import train_cli

    given = list(cfg.train_args)
    folder = _training_folder(rows, work / "train-data", taxonomy, cfg.shuffle_labels)
    out = work / "trained"
    args = train_arguments(given, folder, out, taxonomy.name, cache_dir, cfg.progress)
    if not (out / CARD).is_file() or json.loads((out / CARD).read_text()).get("retrain_argv") != given:
        code = train_cli.run(args)
        if code != 0:
            raise CandidateError(f"dermaloop train {shlex.join(given)} failed (exit code {code})")
        card = json.loads((out / CARD).read_text())
        card["retrain_argv"] = given  # a finished training is reused after a crash, not trained again
        (out / CARD).write_text(json.dumps(card, indent=2))
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(out, tmp, symlinks=False)
    card = json.loads((tmp / CARD).read_text())
    for key in ("files", "file_bytes", "retrain_argv"):
        card.pop(key, None)
    own_split = card.get("data", {}).get("split")
    card.update(version=version)
    card["options"] = {**card.get("options", {}), "recipe": "train", "train_args": given,
                       "labels_shuffled": cfg.shuffle_labels}
    card["data"] = {**card.get("data", {}), **lineage, "pipeline_split_of_train_and_calib": own_split}
    for kind in ("device", "cloud"):
        if kind in card:  # the pipeline's own figures were on part of the training images: kept under another name
            for key in ("metrics", "metrics_fp32"):
                if key in card[kind]:
                    card[kind][f"{key}_pipeline_val"] = card[kind].pop(key)
            card[kind].pop("int8_parity", None)
    if "cloud" not in card:
        raise CandidateError("the recipe trained no cloud model (--skip-cloud?): retraining replaces both")
    shutil.rmtree(tmp / "reports", ignore_errors=True)
    _write_split(tmp, rows)
    (tmp / CARD).write_text(json.dumps(card, indent=2))
    return tmp


# ---- completing the directory -------------------------------------------------------------------------


def finish_candidate(tmp: Path, final: Path, card_updates: dict[str, dict[str, Any]]) -> Path:
    """Merge the benchmark figures into the card (``{section: {key: value}}``, section "" for the
    top level), hash every file into it, and rename ``tmp`` to ``final``: the one step after which
    the candidate exists. A crash before it leaves only ``tmp``, which the next run deletes."""
    card = json.loads((tmp / CARD).read_text())
    for section, updates in card_updates.items():
        (card if section == "" else card.setdefault(section, {})).update(updates)
    card["files"] = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*"))
                     if p.is_file() and p.name != CARD}
    card["file_bytes"] = {rel: (tmp / rel).stat().st_size for rel in card["files"]}
    (tmp / CARD).write_text(json.dumps(card, indent=2))
    with open(tmp / CARD, "rb") as f:
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final

