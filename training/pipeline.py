"""``dermaloop train``: one run from a dataset to a complete model directory.

Steps: read the dataset -> lesion-grouped train / calib / val split -> frozen-backbone features
(cached) -> either the fast path (linear head on pooled embeddings) or fine-tuning of the top blocks
(``epochs > 0``) -> temperature and risk thresholds on the calib split -> full Keras models ->
device TFLite int8 (calibrated on training images) and fp32, cloud Keras -> evaluation of the
exported runtimes on the untouched val split -> model card.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dermaloop import backbones
from dermaloop.model_dir import (
    CARD,
    CLOUD_KERAS,
    DEVICE_FP32,
    DEVICE_INT8,
    DEVICE_KERAS,
    LABELS,
    DeviceModel,
    ModelDir,
    sha256_file,
)
from dermaloop.preprocess import SYMMETRIES, PreprocessConfig
from dermaloop.risk import (
    RiskPolicy,
    fit_class_offsets,
    fit_policy,
    fit_temperature,
    policy_from_probabilities,
    softmax,
)
from dermaloop.taxonomy import load_taxonomy
from training.assemble import ensemble_classifier, full_classifier
from training.datasets import Dataset, grouped_split, open_dataset
from training.embeddings import TAIL_STAGE, extract_features, map_stage, model_input, view_for_crop
from training.finetune import FinetuneConfig, finetune, predict_logits
from training.finetune_images import FullFinetuneConfig, checkpoint_dir, finetune_full, image_logits
from training.heads import fit_linear_head


@dataclass
class TrainOptions:
    data: Path
    out: Path
    taxonomy: str = "ham10000"
    device_backbone: str = "lite0"
    cloud_backbone: str = "lite2"
    epochs: int = 0  # 0: fast path (linear head); > 0: fine-tune the top blocks this many epochs
    views: tuple[str, ...] = ("orig",)  # cached augmented views used by fine-tuning and cloud TTA
    cloud_views: tuple[str, ...] | None = None  # None: same as views
    # the symmetries the cloud runtime averages over at test time; None: the symmetric views in views
    cloud_tta: tuple[str, ...] | None = None
    colour_constancy: bool = False
    # what the classifier sees: "centre" = the centre square of the photo (the views as named), "box" =
    # the runtime's crop around the lesion box, each view applied to that crop (serving-matched, issue 20)
    crop: str = "centre"
    cache_dir: Path | None = None
    val_fraction: float = 0.2
    calib_fraction: float = 0.1
    seed: int = 0
    target_sensitivity: float = 0.90
    # None: the moderate threshold meets target_sensitivity on calib; a confidence (e.g. 0.95): its
    # one-sided lower confidence bound does (dermaloop.risk.threshold_for_sensitivity)
    sensitivity_confidence: float | None = None
    calibration_images: int = 500  # 200 gave a 1.74-point int8 drop on HAM10000, 500 gave 1.30
    limit: int | None = None
    head_c: float = 0.01
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    cloud_finetune: FinetuneConfig | None = None  # None: the same recipe as the device model
    # whole-network fine-tuning on augmented images after the top-block phase (epochs 0: none)
    full_finetune: FullFinetuneConfig = field(default_factory=FullFinetuneConfig)  # device model
    cloud_full_finetune: FullFinetuneConfig = field(default_factory=FullFinetuneConfig)
    progress: bool = True
    skip_cloud: bool = False
    cloud_ensemble: bool = False  # cloud model = average of the cloud and the device networks
    # extra cloud-backbone members: the whole-network phase again with these seeds (same warm start)
    cloud_seeds: tuple[int, ...] = ()
    # class id -> recall the call must reach on the calib split (per-class decision offsets, risk.py)
    class_recall: dict[str, float] = field(default_factory=dict)
    # knowledge distillation of the device network (training/distill.py): a model directory whose cloud
    # model is the teacher, and the weight and temperature of its soft labels in the device's loss
    distill_from: Path | None = None
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0


def _log(opts: TrainOptions, msg: str) -> None:
    if opts.progress:
        tqdm.write(msg)


def _subsample(ds: Dataset, limit: int | None, seed: int) -> Dataset:
    if not limit or limit >= len(ds):
        return ds
    # keep whole groups, so a limited run still splits honestly
    rng = np.random.default_rng(seed)
    groups = rng.permutation(sorted(set(ds.groups.tolist())))
    keep, n = set(), 0
    for g in groups:
        keep.add(g)
        n += int((ds.groups == g).sum())
        if n >= limit:
            break
    return ds.subset([i for i, s in enumerate(ds.samples) if s.group in keep])


def _tta_views(opts: TrainOptions) -> list[str]:
    """The symmetries the cloud runtime averages over at test time: ``cloud_tta`` if given, else the
    symmetric training views (augmented views only serve training)."""
    if opts.cloud_tta is not None:
        return [v for v in opts.cloud_tta if v != "orig"]
    return [v for v in (opts.cloud_views or opts.views)[1:] if v in SYMMETRIES]


def _train_kind(kind: str, backbone: str, ds: Dataset, split: dict[str, np.ndarray], opts: TrainOptions,
                extra_views: tuple[str, ...] = (), seeds: tuple[int, ...] = ()) -> dict[str, Any]:
    """Train one model (device or cloud); returns the Keras model, policy, calib logits per view and
    timings. ``extra_views``: symmetries whose calib logits are needed beyond the training views (the
    cloud ensemble's test-time views, for its device member). ``seeds``: the whole-network phase is
    run again from the same warm start with each of these seeds; those networks come back under
    ``seed_members`` (their own temperature and calib logits) for the ensemble."""
    t0 = time.perf_counter()
    cfg = PreprocessConfig(size=backbones.input_size(backbone), colour_constancy=opts.colour_constancy)
    fine = opts.epochs > 0
    chosen = opts.cloud_views if kind == "cloud" and opts.cloud_views else opts.views
    views = list(chosen if fine or kind == "cloud" else ("orig",))
    recipe_cfg = opts.cloud_finetune if kind == "cloud" and opts.cloud_finetune else opts.finetune
    soft, distill_tag, distilled = None, "", None
    if kind == "device" and opts.distill_from is not None:
        soft, distill_tag, distilled = _teacher(ds, split, opts)
        recipe_cfg = replace(recipe_cfg, distill_alpha=opts.distill_alpha, distill_temperature=opts.distill_temperature)
    stage = map_stage(recipe_cfg.train_stages)
    base_view = view_for_crop(opts.crop, "orig")  # the photo as the runtime crops it; symmetries apply to it
    feats = [extract_features(ds, backbone, cfg, opts.cache_dir, view=view_for_crop(opts.crop, v), with_maps=fine,
                              progress=opts.progress, stage=stage) for v in views]
    t_features = time.perf_counter() - t0
    y = ds.labels
    k = len(ds.taxonomy)
    history: list[dict] = []
    full_history: list[dict] = []
    seed_members: list[dict[str, Any]] = []
    calib = split["calib"]
    if fine:
        # One checkpoint folder per (backbone, data, views, preprocessing): resuming never mixes recipes.
        recipe = ("box-" if opts.crop == "box" else "") + "+".join(views) + ("-cc" if opts.colour_constancy else "") + \
            (f"-top{recipe_cfg.train_stages}" if stage != TAIL_STAGE else "") + distill_tag
        base = opts.cache_dir or opts.out / "checkpoints"
        ckpt = base / f"finetune-{backbone}-{ds.fingerprint()}-{recipe}"
        tail, history = finetune(backbone, [f.maps for f in feats], y, split["train"], split["calib"], k,
                                 recipe_cfg, ckpt, progress=opts.progress, soft_targets=soft)
        full_cfg = opts.cloud_full_finetune if kind == "cloud" else opts.full_finetune
        if soft is not None:
            full_cfg = replace(full_cfg, distill_alpha=opts.distill_alpha, distill_temperature=opts.distill_temperature)
        if full_cfg.epochs > 0:
            warm = tail
            tail, full_history = _finetune_full_seed(backbone, ds, split, full_cfg, cfg, base, recipe, warm, opts,
                                                     soft)
            calib_logits = [image_logits(tail, ds, calib, cfg, view_for_crop(opts.crop, v)) for v in views]
            seed_members = [{"seed": s, "network": _finetune_full_seed(backbone, ds, split, replace(full_cfg, seed=s),
                                                                       cfg, base, recipe, warm, opts)[0]}
                            for s in seeds]
        else:
            calib_logits = [predict_logits(tail, f.maps[calib]) for f in feats]
        head = None
    else:
        tail = None
        head = fit_linear_head(feats[0].pooled[split["train"]], y[split["train"]], k, c=opts.head_c, seed=opts.seed)
        calib_logits = [f.pooled[calib] @ head[0] + head[1] for f in feats]
    tta = _tta_views(opts) if kind == "cloud" else []
    missing = [v for v in dict.fromkeys([*tta, *extra_views]) if v not in views]
    if missing:  # views used only at test time: the whole network on the calib images, as the runtime sees them
        net = tail if full_history else full_classifier(backbone, k, tail_model=tail, head=head,
                                                        with_probabilities=False)
        calib_logits += [image_logits(net, ds, calib, cfg, base_view, symmetry=v) for v in missing]
        views += missing
    for member in seed_members:  # logits as the runtime computes them: training views as photos, the rest on inputs
        net = member.pop("network")
        logits = {v: image_logits(net, ds, calib, cfg, view_for_crop(opts.crop, v)) if v in chosen
                  else image_logits(net, ds, calib, cfg, base_view, symmetry=v) for v in views}
        t = fit_temperature(logits["orig"], y[calib])
        member.update(model=full_classifier(backbone, k, t, tail_model=net), calib_logits=logits,
                      temperature=t)
    t_train = time.perf_counter() - t0 - t_features
    yc = y[calib]
    try:
        policy = fit_policy(calib_logits[0], yc, ds.taxonomy.malignant_mask, opts.target_sensitivity,
                            sensitivity_confidence=opts.sensitivity_confidence)
    except ValueError as exc:  # calib split lacks malignant or benign cases (tiny datasets): say so in the card
        _log(opts, f"warning: risk thresholds not fitted ({exc}); using 0.3 / 0.6")
        policy = RiskPolicy(fit_temperature(calib_logits[0], yc), tuple(ds.taxonomy.malignant_mask),
                            0.3, 0.6, opts.target_sensitivity, sensitivity_confidence=opts.sensitivity_confidence)
        tta_refit = False
    else:
        tta_refit = True
    runtime_views = [calib_logits[0]] + [calib_logits[views.index(v)] for v in tta]
    probs_c = np.mean([softmax(lv, policy.temperature) for lv in runtime_views], axis=0)
    if tta and tta_refit:  # thresholds must be chosen on the probabilities the runtime produces (mean over views)
        policy = policy_from_probabilities(policy.temperature, probs_c, yc, ds.taxonomy.malignant_mask,
                                           opts.target_sensitivity,
                                           sensitivity_confidence=opts.sensitivity_confidence)
    policy, decision = _decision(policy, probs_c, yc, ds, opts)
    model = full_classifier(backbone, k, policy.temperature, tail_model=tail, head=head)
    return {"model": model, "policy": policy, "preprocess": cfg, "tta": tta, "history": history,
            "full_history": full_history, "calib_logits": dict(zip(views, calib_logits, strict=True)),
            "seed_members": seed_members, "decision": decision, "distillation": distilled,
            "calib": _calib_scores(yc, softmax(calib_logits[0], policy.temperature), probs_c, policy),
            "features_seconds": t_features, "train_seconds": t_train,
            "images_per_second": feats[0].images_per_second, "features_cached": feats[0].cached}


def _teacher(ds: Dataset, split: dict[str, np.ndarray], opts: TrainOptions) -> tuple[np.ndarray, str, dict[str, Any]]:
    """The teacher's probabilities on the training rows, the checkpoint-name tag that keeps a distilled
    recipe from resuming an undistilled one (or another teacher's), and what the card says."""
    from training.distill import teacher_probabilities

    md = ModelDir.open(opts.distill_from)
    soft = teacher_probabilities(opts.distill_from, ds, split["train"], opts.crop, opts.cache_dir, progress=opts.progress)
    card_sha256 = sha256_file(md.root / CARD)
    tag = f"-distill{opts.distill_alpha:g}T{opts.distill_temperature:g}-{card_sha256[:8]}"
    info = {"teacher": str(opts.distill_from), "teacher_version": md.card.get("version"),
            "teacher_card_sha256": card_sha256, "alpha": opts.distill_alpha,
            "temperature": opts.distill_temperature,
            "how": "loss = (1 - alpha) * label cross-entropy + alpha * T^2 * KL(teacher || student) at T, "
                   "the teacher's cloud model run once on each training image as the student's crop sees it"}
    return soft, tag, info


def _finetune_full_seed(backbone: str, ds: Dataset, split: dict[str, np.ndarray], full_cfg: FullFinetuneConfig,
                        cfg: PreprocessConfig, base: Path, recipe: str, warm, opts: TrainOptions,
                        soft: np.ndarray | None = None):
    """The whole-network phase with ``full_cfg.seed``; each seed has its own checkpoint folder (seed 0
    keeps the unsuffixed name, so earlier checkpoints stay valid)."""
    suffix = f"-seed{full_cfg.seed}" if full_cfg.seed else ""
    full_cfg = replace(full_cfg, crop=opts.crop)
    return finetune_full(backbone, ds, split["train"], split["calib"], full_cfg, cfg,
                         checkpoint_dir(base, backbone, ds, recipe + suffix, warm), start=warm, progress=opts.progress,
                         soft_targets=soft)


def _ensemble(cloud: dict[str, Any], device: dict[str, Any] | None, ds: Dataset, split: dict[str, np.ndarray],
              opts: TrainOptions) -> dict[str, Any]:
    """Average the cloud network, its extra-seed networks and (``device`` given) the device network,
    all already trained, into the cloud model. The ensemble's temperature and thresholds come from
    the calib split, as for a single model."""
    views = ["orig", *cloud["tta"]]
    calib, y = split["calib"], ds.labels
    members = [(cloud["calib_logits"], cloud["policy"].temperature)]
    members += [(m["calib_logits"], m["temperature"]) for m in cloud["seed_members"]]
    if device is not None:
        members.append((device["calib_logits"], device["policy"].temperature))

    def mean_scaled(view: str) -> np.ndarray:
        return np.mean([logits[view] / t for logits, t in members], axis=0)

    t = fit_temperature(mean_scaled("orig"), y[calib])
    probs = np.mean([softmax(mean_scaled(v), t) for v in views], axis=0)
    policy = policy_from_probabilities(t, probs, y[calib], ds.taxonomy.malignant_mask, opts.target_sensitivity,
                                       sensitivity_confidence=opts.sensitivity_confidence)
    policy, decision = _decision(policy, probs, y[calib], ds, opts)
    others = [m["model"] for m in cloud["seed_members"]] + ([device["model"]] if device is not None else [])
    model = ensemble_classifier(cloud["model"], others, t)
    return {**cloud, "model": model, "policy": policy, "decision": decision,
            "calib": _calib_scores(y[calib], softmax(mean_scaled("orig"), t), probs, policy)}


def _decision(policy: RiskPolicy, probs: np.ndarray, labels: np.ndarray, ds: Dataset,
              opts: TrainOptions) -> tuple[RiskPolicy, dict[str, Any]]:
    """The policy with class offsets fitted for ``opts.class_recall`` on the runtime's calib
    probabilities, and what the card says about it (targets, offsets, calib recall, or why not)."""
    if not opts.class_recall:
        return policy, {"rule": "most probable class"}
    ids = ds.taxonomy.ids
    info: dict[str, Any] = {"rule": "argmax of log-probability + class offset",
                            "calib_recall_targets": dict(opts.class_recall)}
    try:
        offsets = fit_class_offsets(probs, labels, {ids.index(c): r for c, r in opts.class_recall.items()})
    except ValueError as exc:  # e.g. a tiny dataset whose calib split lacks the class: say so, keep argmax
        _log(opts, f"warning: class offsets not fitted ({exc}); the call stays the most probable class")
        return policy, {**info, "rule": "most probable class", "not_fitted": str(exc)}
    policy = replace(policy, class_offsets=offsets)
    called = policy.decide(probs)
    info["class_offsets"] = {c: v for c, v in zip(ids, offsets, strict=True) if v}
    info["calib_recall"] = {c: float((called[labels == ids.index(c)] == ids.index(c)).mean())
                            for c in opts.class_recall}
    return policy, info


def _calib_scores(labels: np.ndarray, plain: np.ndarray, runtime: np.ndarray, policy: RiskPolicy) -> dict[str, Any]:
    """Balanced accuracy of the call on the calib split, with and without the test-time views: the
    figure to compare recipes and TTA choices by without looking at the validation split. (With
    class offsets it is optimistic: the offsets were fitted on these images.)"""
    from sklearn.metrics import balanced_accuracy_score

    return {"n": len(labels), "balanced_accuracy": float(balanced_accuracy_score(labels, policy.decide(runtime))),
            "balanced_accuracy_without_tta": float(balanced_accuracy_score(labels, policy.decide(plain)))}


def _section(kind: str, backbone: str, r: dict[str, Any]) -> dict[str, Any]:
    policy: RiskPolicy = r["policy"]
    return {"backbone": backbone, "input": {"shape": [r["preprocess"].size, r["preprocess"].size, 3],
                                            "dtype": "uint8 (int8 model) / float32 pixel values 0..255"},
            "output": "calibrated class probabilities (temperature folded into the model)",
            "preprocess": r["preprocess"].to_dict(), "risk": {**policy.to_dict(), "temperature_in_model": True},
            "tta": r["tta"], "calib": r["calib"], "decision": r["decision"],
            **({"distillation": r["distillation"]} if r.get("distillation") else {}), "training": {"fine_tuned_epochs": len(r["history"]), "history": r["history"],
                                          **({"whole_network_epochs": len(r["full_history"]),
                                              "whole_network_history": r["full_history"]}
                                             if r["full_history"] else {}),
                                          "features_seconds": round(r["features_seconds"], 1),
                                          "train_seconds": round(r["train_seconds"], 1),
                                          "embedding_images_per_second": round(r["images_per_second"], 1)}}


def train(opts: TrainOptions) -> Path:
    """Write a complete model directory to ``opts.out``; returns it."""
    import keras

    started = time.perf_counter()
    taxonomy = load_taxonomy(opts.taxonomy)
    if max(opts.full_finetune.epochs, opts.cloud_full_finetune.epochs) > 0 and opts.epochs == 0:
        raise ValueError("--full-epochs continues from the top-block fine-tuning: give --epochs > 0 too")
    if opts.cloud_seeds and (opts.cloud_full_finetune.epochs == 0 or opts.skip_cloud):
        raise ValueError("--cloud-seeds repeats the cloud model's whole-network phase: give --cloud-full-epochs too")
    if len(set(opts.cloud_seeds)) < len(opts.cloud_seeds) or opts.cloud_full_finetune.seed in opts.cloud_seeds:
        raise ValueError(f"--cloud-seeds must differ from each other and from the first member's seed "
                         f"({opts.cloud_full_finetune.seed}): the same seed trains the same network")
    bad = {c: r for c, r in opts.class_recall.items() if c not in taxonomy.ids or not 0 < r <= 1}
    if bad:
        raise ValueError(f"--class-recall takes class ids of the {taxonomy.name} taxonomy ({', '.join(taxonomy.ids)}) "
                         f"with recalls in (0, 1]; got {bad}")
    unknown = [v for v in opts.cloud_tta or () if v not in SYMMETRIES]
    if unknown:
        raise ValueError(f"test-time views must be symmetries ({', '.join(SYMMETRIES)}), not {', '.join(unknown)}")
    view_for_crop(opts.crop, "orig")  # refuses an unknown crop before any work
    if opts.sensitivity_confidence is not None and not 0 < opts.sensitivity_confidence < 1:
        raise ValueError(f"--sensitivity-confidence must lie strictly between 0 and 1, got {opts.sensitivity_confidence}")
    if opts.distill_from is not None:
        if opts.epochs == 0:
            raise ValueError("--distill-from teaches a fine-tuned device network: give --epochs > 0 too")
        if not 0.0 < opts.distill_alpha <= 1.0 or opts.distill_temperature <= 0:
            raise ValueError(f"--distill-alpha must be in (0, 1] and --distill-temperature positive; got "
                             f"{opts.distill_alpha} and {opts.distill_temperature}")
        teacher = ModelDir.open(opts.distill_from)  # a ModelError says what is wrong with it
        if "cloud" not in teacher.card:
            raise ValueError(f"{opts.distill_from} has no cloud model to learn from")
    keras.utils.set_random_seed(opts.seed)
    ds = _subsample(open_dataset(opts.data, taxonomy), opts.limit, opts.seed)
    split = grouped_split(ds, opts.val_fraction, opts.calib_fraction, opts.seed)
    _log(opts, f"data: {len(ds)} images, {len(set(ds.groups.tolist()))} groups; split "
               + ", ".join(f"{k} {len(v)}" for k, v in split.items()))
    out = Path(opts.out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "device").mkdir(parents=True)
    (tmp / "cloud").mkdir(parents=True)
    taxonomy.save(tmp / LABELS)
    (tmp / "split.json").write_text(json.dumps(
        {k: [ds.samples[i].id for i in v] for k, v in split.items()}, indent=0))

    device = _train_kind("device", opts.device_backbone, ds, split, opts,
                         extra_views=tuple(_tta_views(opts)) if opts.cloud_ensemble and not opts.skip_cloud else ())
    device["model"].save(tmp / DEVICE_KERAS)
    rng = np.random.default_rng(opts.seed)
    calib_rows = rng.choice(split["train"], size=min(opts.calibration_images, len(split["train"])), replace=False)
    images = [model_input(ds.samples[i], device["preprocess"], view_for_crop(opts.crop, "orig")) for i in calib_rows]
    _log(opts, "exporting device model to TFLite (fp32 and int8)")
    from training.export import export_fp32, export_int8

    export_fp32(device["model"], tmp / DEVICE_FP32)
    export_int8(device["model"], tmp / DEVICE_INT8, images)
    card: dict[str, Any] = {
        "format": 1, "version": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + f"-{ds.fingerprint()[:6]}",
        "created": datetime.now(UTC).isoformat(timespec="seconds"), "taxonomy": taxonomy.name,
        "labels": taxonomy.ids, "disclaimer": "Decision support for triage only; not a diagnosis.",
        "data": {**ds.describe(), "split": {k: len(v) for k, v in split.items()},
                 "split_method": f"StratifiedGroupKFold by group (lesion), seed {opts.seed}",
                 "int8_calibration": f"{len(images)} random training-split images"},
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "device": _section("device", opts.device_backbone, device),
    }
    if not opts.skip_cloud:
        cloud = _train_kind("cloud", opts.cloud_backbone, ds, split, opts, seeds=opts.cloud_seeds)
        if opts.cloud_ensemble or opts.cloud_seeds:
            cloud = _ensemble(cloud, device if opts.cloud_ensemble else None, ds, split, opts)
        cloud["model"].save(tmp / CLOUD_KERAS)
        card["cloud"] = _section("cloud", opts.cloud_backbone, cloud)
        if opts.cloud_ensemble or opts.cloud_seeds:
            card["cloud"]["ensemble"] = {
                "members": [opts.cloud_backbone] * (1 + len(opts.cloud_seeds))
                + ([opts.device_backbone] if opts.cloud_ensemble else []),
                "whole_network_seeds": [opts.cloud_full_finetune.seed, *opts.cloud_seeds],
                "how": "mean of each member's temperature-scaled logits, then one temperature (calib split); "
                       "extra seeds repeat the whole-network phase from the same warm start; "
                       f"a {opts.device_backbone} member gets the input resized inside the model"}
    card["files"] = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()
                     and p.name not in (CARD,)}
    card["file_bytes"] = {rel: (tmp / rel).stat().st_size for rel in card["files"]}
    (tmp / CARD).write_text(json.dumps(card, indent=2))

    # Evaluate the exported runtimes on the untouched validation split (real files, real preprocessing).
    from training.evaluate import evaluate

    val = ds.subset(split["val"])
    md = ModelDir.open(tmp)
    fp32 = evaluate(DeviceModel(md, "fp32"), val, tmp / "reports" / "device_fp32", "val", opts.progress)
    int8 = evaluate(DeviceModel(md, "int8"), val, tmp / "reports" / "device", "val", opts.progress)
    agreement = float((int8["_probs"].argmax(1) == fp32["_probs"].argmax(1)).mean())
    card["device"]["metrics"] = _summary(int8)
    card["device"]["metrics_fp32"] = _summary(fp32)
    card["device"]["int8_parity"] = {
        "top1_agreement_with_float": agreement,
        "balanced_accuracy_drop_points": 100 * (fp32["balanced_accuracy"] - int8["balanced_accuracy"]),
        "measured_on": f"val split, {len(int8['_labels'])} images"}
    if not opts.skip_cloud:
        from dermaloop.model_dir import CloudModel

        cl = evaluate(CloudModel(md), val, tmp / "reports" / "cloud", "val", opts.progress)
        card["cloud"]["metrics"] = _summary(cl)
    card["train_seconds_total"] = round(time.perf_counter() - started, 1)
    (tmp / CARD).write_text(json.dumps(card, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    _log(opts, f"model directory {out} written in {card['train_seconds_total']:.0f} s")
    return out


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("n", "balanced_accuracy", "accuracy", "macro_f1", "auc_ovr", "malignant_auc", "malignant_threshold",
            "malignant_sensitivity", "malignant_specificity", "ece", "per_class_recall")
    return {k: m.get(k) for k in keys}
