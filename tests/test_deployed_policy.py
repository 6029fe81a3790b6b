"""Risk thresholds and class offsets refitted on calib photos as deployed (training.deployed_policy):
the targets hold on the photos they were fitted on, the runtime follows the card written, and a
report that is not this model's calib split is refused with the card untouched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dermaloop.risk import RiskPolicy, policy_from_probabilities
from dermaloop.taxonomy import load_taxonomy
from training.deployed_policy import fit_deployed_policy, main, policy_figures, refit_model_dir

TAXONOMY = load_taxonomy("ham10000")
IDS = list(TAXONOMY.ids)
MEL = IDS.index("mel")


def shifted(n: int, seed: int, shrink: float) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities whose true class is favoured, with the malignant classes' mass shrunk by ``shrink``:
    what a crop the model was not fitted on does to a model's confidence in melanoma."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(IDS), n)
    logits = rng.normal(0, 1, (n, len(IDS)))
    logits[np.arange(n), labels] += 1.6
    logits[:, np.array(TAXONOMY.malignant_mask, bool)] -= shrink
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True), labels


def test_the_refitted_policy_meets_its_targets_where_the_old_one_missed():
    centre_p, centre_y = shifted(3000, 1, 0.0)
    old = policy_from_probabilities(0.8, centre_p, centre_y, TAXONOMY.malignant_mask)
    deployed_p, deployed_y = shifted(3000, 2, 1.0)
    before = policy_figures(old, deployed_p, deployed_y, IDS)
    assert before["malignant_sensitivity"] < 0.85  # fitted elsewhere, it misses here
    new = fit_deployed_policy(deployed_p, deployed_y, old, {MEL: 0.75})
    after = policy_figures(new, deployed_p, deployed_y, IDS)
    assert after["malignant_sensitivity"] >= 0.9 and after["per_class_recall"]["mel"] >= 0.75
    assert before["per_class_recall"]["mel"] < 0.75
    assert new.temperature == old.temperature  # folded into the model files: never refitted here
    assert new.moderate_threshold < old.moderate_threshold and new.class_offsets[MEL] > 0
    assert new.high_threshold >= new.moderate_threshold
    # on fresh photos from the same distribution the targets hold within sampling error
    fresh = policy_figures(new, *shifted(3000, 3, 1.0), IDS)
    assert fresh["malignant_sensitivity"] > 0.87 and fresh["per_class_recall"]["mel"] > 0.70
    assert fit_deployed_policy(deployed_p, deployed_y, old, {}).class_offsets == ()


def _model(tmp_path: Path, abstain: bool) -> tuple[Path, list[str]]:
    """A model directory (card, labels, split.json) whose calib split is 200 photo ids."""
    model = tmp_path / "model"
    model.mkdir()
    TAXONOMY.save(model / "labels.json")
    policy = RiskPolicy(0.8, tuple(TAXONOMY.malignant_mask), 0.5, 0.8, class_offsets=(0.0,) * len(IDS))
    card = {"version": "v-1", "device": {"risk": {**policy.to_dict(), "temperature_in_model": True},
                                         "decision": {"rule": "argmax of log-probability + class offset",
                                                      "calib_recall_targets": {"mel": 0.75}}}}
    if abstain:
        card["device"]["abstain"] = {"method": "lac", "coverage": 0.8, "qhat": 0.5, "n_calib": 9,
                                     "val": {"coverage": 0.1}}
    (model / "card.json").write_text(json.dumps(card))
    calib = [f"ISIC_{i:07d}" for i in range(200)]
    (model / "split.json").write_text(json.dumps({"train": [], "calib": calib, "val": ["ISIC_9999999"]}))
    return model, calib


def _report(tmp_path: Path, ids: list[str], version: str = "v-1", kind: str = "device") -> Path:
    """An as-deployed report folder: metrics.json's data and one photos.jsonl row per photo, the
    first five declined by the gates."""
    probs, labels = shifted(len(ids), 7, 1.0)
    out = tmp_path / f"report-{version}-{len(ids)}"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"data": {"path": "as deployed", "split": "calib split",
                                                           "model_version": version, "model_kind": kind}}))
    with open(out / "photos.jsonl", "w") as f:
        for i, (pid, p, y) in enumerate(zip(ids, probs, labels, strict=True)):
            declined = i < 5
            f.write(json.dumps({"id": pid, "label": IDS[y], "status": "declined" if declined else "classified",
                                "probs": None if declined else [round(float(v), 6) for v in p]}) + "\n")
    return out


def test_a_calib_report_refits_the_card_and_the_runtime_follows_it(tmp_path, capsys):
    from dermaloop.model_dir import ModelDir

    model, calib = _model(tmp_path, abstain=True)
    report = _report(tmp_path, calib)
    assert main([str(model), "--kind", "device", "--report", str(report), "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "moderate threshold 0.5000 ->" in said and "abstain rule refitted" in said
    section = json.loads((model / "card.json").read_text())["device"]
    fit = section["policy_fit"]
    assert "classified': 195" in fit["fitted_on"] and "declined': 5" in fit["fitted_on"]
    assert fit["previous"]["risk"]["moderate_threshold"] == 0.5
    assert fit["calib_after"]["malignant_sensitivity"] >= 0.9 > fit["calib_before"]["malignant_sensitivity"]
    assert fit["calib_after"]["per_class_recall"]["mel"] >= 0.75 == section["decision"]["calib_recall_targets"]["mel"]
    runtime = ModelDir.open(model).section("device")
    policy = RiskPolicy.from_dict(runtime["risk"])
    assert policy.temperature == 0.8 and runtime["risk"]["temperature_in_model"] is True
    assert policy.class_offsets[MEL] == section["decision"]["class_offsets"]["mel"] > 0
    assert section["abstain"]["n_calib"] == 195 and section["abstain"]["coverage"] == 0.8
    assert "val" not in section["abstain"]  # measured with the old calls: dropped, not left standing
    assert section["abstain"]["calib"]["coverage"] >= 0.8


def test_an_abstain_rule_is_fitted_from_the_same_photos_when_asked(tmp_path):
    model, calib = _model(tmp_path, abstain=False)
    assert main([str(model), "--kind", "device", "--report", str(_report(tmp_path, calib)), "--abstain", "0.9",
                 "--quiet"]) == 0
    abstain = json.loads((model / "card.json").read_text())["device"]["abstain"]
    assert abstain["method"] == "lac" and abstain["coverage"] == 0.9 and abstain["n_calib"] == 195
    assert abstain["calib"]["coverage"] >= 0.9 and "calib split as deployed" in abstain["fitted_on"]


def test_a_confidence_bound_rule_is_written_to_the_card_and_kept_by_the_next_refit(tmp_path, capsys):
    from dermaloop.risk import sensitivity_lower_bound

    model, calib = _model(tmp_path, abstain=False)
    report = _report(tmp_path, calib)
    assert main([str(model), "--kind", "device", "--report", str(report), "--quiet"]) == 0
    point = RiskPolicy.from_dict(json.loads((model / "card.json").read_text())["device"]["risk"])
    assert point.sensitivity_confidence is None
    assert main([str(model), "--kind", "device", "--report", str(report), "--sensitivity-confidence", "0.95",
                 "--quiet"]) == 0
    assert "lower 95% confidence bound" in capsys.readouterr().out
    section = json.loads((model / "card.json").read_text())["device"]
    bound = RiskPolicy.from_dict(section["risk"])
    assert bound.sensitivity_confidence == 0.95 and bound.moderate_threshold < point.moderate_threshold
    probs, labels = shifted(200, 7, 1.0)  # the report's classified photos are rows 5..199
    malignant = np.array(TAXONOMY.malignant_mask)[labels[5:]]
    flagged = int((bound.malignant_probability(probs[5:])[malignant] >= bound.moderate_threshold - 1e-6).sum())
    assert sensitivity_lower_bound(flagged, int(malignant.sum()), 0.95) >= 0.9
    # a later refit without the option keeps the card's rule: a promise does not silently weaken
    assert main([str(model), "--kind", "device", "--report", str(report), "--quiet"]) == 0
    again = RiskPolicy.from_dict(json.loads((model / "card.json").read_text())["device"]["risk"])
    assert again.sensitivity_confidence == 0.95 and again.moderate_threshold == bound.moderate_threshold
    for bad in ("1", "high"):
        assert main([str(model), "--kind", "device", "--report", str(report), "--sensitivity-confidence", bad,
                     "--quiet"]) == 2
        assert "strictly between 0 and 1" in capsys.readouterr().err
    # asked for, the point estimate comes back, threshold and all
    assert main([str(model), "--kind", "device", "--report", str(report), "--sensitivity-confidence", "point",
                 "--quiet"]) == 0
    back = RiskPolicy.from_dict(json.loads((model / "card.json").read_text())["device"]["risk"])
    assert back.sensitivity_confidence is None and back.moderate_threshold == point.moderate_threshold


def test_reports_that_are_not_this_models_calib_split_are_refused_and_nothing_is_written(tmp_path, capsys):
    model, calib = _model(tmp_path, abstain=False)
    before = (model / "card.json").read_text()
    with pytest.raises(ValueError, match="made with the device model v-0, not this device model v-1"):
        refit_model_dir(model, None, "device", report=_report(tmp_path, calib, version="v-0"))
    with pytest.raises(ValueError, match="are not all of this model's calib split"):
        refit_model_dir(model, None, "device", report=_report(tmp_path, calib[:150]))
    with pytest.raises(ValueError, match=r"\['melanoma'\] are not classes of this model"):
        refit_model_dir(model, None, "device", class_recall={"melanoma": 0.75}, report=_report(tmp_path, calib[:199]))
    assert main([str(model), "--kind", "device", "--quiet"]) == 2
    assert "no --report for the device model and no --data" in capsys.readouterr().err
    assert main([str(model), "--kind", "device", "--report", str(tmp_path), "--quiet"]) == 2
    assert "not a `dermaloop evaluate --as-deployed` folder" in capsys.readouterr().err
    assert main([str(model), "--kind", "device", "--class-recall", "mel", "--quiet"]) == 2
    assert (model / "card.json").read_text() == before


def test_the_deployed_path_and_its_report_give_the_same_policy_and_diagnose_follows_it(tmp_path,
                                                                                      analysis_models_dir):
    """End to end on real photos: the calib photos through the real deployed path (analysis model,
    gates, crop, TFLite classifier), the card refitted from the path and, separately, from the
    as-deployed report of the same photos; both give the same policy, and the runtime uses it."""
    import csv
    import shutil

    from tests.conftest import HAM10000
    from tests.worker_support import tiny_device_model_dir
    from training.datasets import open_dataset
    from training.deployed_eval import evaluate_deployed

    if not (HAM10000 / "metadata.csv").is_file():
        pytest.skip(f"needs real photos the gates accept: HAM10000 is not at {HAM10000}")
    data = tmp_path / "photos"
    with open(HAM10000 / "metadata.csv") as f:
        taken: dict[str, int] = {}
        for row in csv.DictReader(f):
            if taken.get(row["dx"], 0) < 3:  # three per class: nine malignant photos
                taken[row["dx"]] = taken.get(row["dx"], 0) + 1
                (data / row["dx"]).mkdir(parents=True, exist_ok=True)
                shutil.copy(HAM10000 / "images" / f"{row['image_id']}.jpg", data / row["dx"])
    dataset = open_dataset(data, TAXONOMY)
    models = {}
    for name in ("path", "report"):
        model = tiny_device_model_dir(tmp_path / name)
        (model / "split.json").write_text(json.dumps({"train": [], "calib": [s.id for s in dataset.samples],
                                                      "val": []}))
        models[name] = model
    report = tmp_path / "calib-report"
    evaluate_deployed("device", models["report"], dataset, report, "calib split", models_dir=analysis_models_dir,
                      centre=False, progress=False)
    by_path = refit_model_dir(models["path"], data, "device", class_recall={}, models_dir=analysis_models_dir,
                              progress=False)
    by_report = refit_model_dir(models["report"], None, "device", class_recall={}, report=report)
    a, b = by_path["policy"], by_report["policy"]  # the report stores probabilities to 6 decimals
    assert (a.moderate_threshold, a.high_threshold) == pytest.approx((b.moderate_threshold, b.high_threshold), abs=1e-5)
    assert by_path["fit"]["calib_after"] == by_report["fit"]["calib_after"]
    fit = by_path["fit"]
    assert fit["calib_after"]["malignant_sensitivity"] >= 0.9 and "classified" in fit["fitted_on"]
    from dermaloop.model_dir import load_device_model

    runtime = load_device_model(models["path"], "fp32").policy
    assert runtime.moderate_threshold == by_path["policy"].moderate_threshold != 0.3  # the tiny card's own
