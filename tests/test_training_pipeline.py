"""End-to-end plumbing of training on tiny synthetic data with the 64 px "tiny" backbone.

Correctness of the real backbones is tested in test_backbones.py; here every step runs on real
files: dataset -> cached features -> fine-tuning -> calibration -> TFLite export -> runtimes ->
reports -> model card, plus the CLIs.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from dermaloop.cli import main
from dermaloop.model_dir import ModelDir, ModelError, load_cloud_model, load_device_model, sha256_file
from dermaloop.preprocess import load_image, to_model_input
from dermaloop.risk import RISK_TIERS
from dermaloop.taxonomy import load_taxonomy
from training.datasets import open_dataset
from training.embeddings import extract_features, extractor, model_input
from training.synthetic import generate

HAM = load_taxonomy()
METRIC_KEYS = {"balanced_accuracy", "accuracy", "per_class_recall", "macro_f1", "auc_ovr",
               "malignant_sensitivity", "malignant_specificity", "malignant_auc", "ece"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("syn"), per_class=10, photos_per_lesion=2, seed=1)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    code = main(["train", "--data", str(data), "--out", str(root / "model"), "--device-backbone", "tiny",
                 "--cloud-backbone", "tiny", "--epochs", "1", "--views", "orig,flip",
                 "--cache-dir", str(root / "cache"), "--quiet"])
    assert code == 0
    return root / "model"


def test_model_directory_is_complete_and_hashed(trained):
    card = json.loads((trained / "card.json").read_text())
    for rel in ("device/model_int8.tflite", "device/model_fp32.tflite", "device/model.keras",
                "cloud/model.keras", "labels.json", "split.json"):
        assert card["files"][rel] == sha256_file(trained / rel)
    assert card["labels"] == HAM.ids and card["taxonomy"] == "ham10000"
    assert card["device"]["preprocess"]["size"] == 64 and card["cloud"]["tta"] == ["flip"]
    assert card["device"]["training"]["fine_tuned_epochs"] == 1
    assert card["data"]["split"] == {k: len(v) for k, v in json.loads((trained / "split.json").read_text()).items()}
    parity = card["device"]["int8_parity"]
    assert 0.0 <= parity["top1_agreement_with_float"] <= 1.0 and "val split" in parity["measured_on"]
    for kind in ("device", "cloud"):
        metrics = json.loads((trained / "reports" / kind / "metrics.json").read_text())
        assert set(metrics) >= METRIC_KEYS and metrics["data"]["split"] == "val"
        assert card[kind]["metrics"]["n"] == card["data"]["split"]["val"]
        for png in ("confusion_matrix.png", "roc.png", "reliability.png"):
            assert (trained / "reports" / kind / png).stat().st_size > 1000
    split = json.loads((trained / "split.json").read_text())
    assert not set(split["train"]) & set(split["val"])


def test_runtimes_diagnose_an_image(trained, data):
    image = sorted((data / "images").glob("*.jpg"))[0].read_bytes()
    for model in (load_device_model(trained, "int8"), load_device_model(trained, "fp32"), load_cloud_model(trained)):
        result = model.diagnose(image)
        assert sum(result["probs"].values()) == pytest.approx(1.0, abs=1e-4)
        assert [t["label"] for t in result["top"]] == sorted(result["probs"], key=result["probs"].get, reverse=True)[:3]
        assert result["risk"] in RISK_TIERS and 0.0 <= result["malignantP"] <= 1.0
        assert result["modelVersion"] == ModelDir.open(trained).card["version"]


def test_same_image_gives_the_same_tensor_and_output_on_every_path(trained, data):
    import keras

    ds = open_dataset(data, HAM)
    sample = ds.samples[3]
    device = load_device_model(trained, "fp32")
    cloud = load_cloud_model(trained)
    training_path = model_input(sample, device.preprocess)
    runtime_path = to_model_input(load_image(sample.path.read_bytes()), config=device.preprocess)
    cloud_path = to_model_input(load_image(sample.path), config=cloud.preprocess)
    np.testing.assert_array_equal(training_path, runtime_path)
    np.testing.assert_array_equal(training_path, cloud_path)
    keras_model = keras.models.load_model(trained / "device" / "model.keras", compile=False)
    expected = keras_model.predict(training_path[None], verbose=0)
    np.testing.assert_allclose(device.predict(training_path[None]), expected, atol=1e-5)


@pytest.mark.parametrize("train_stages", [2, 3])
def test_assembled_model_equals_tail_on_cached_maps(data, tmp_path, train_stages):
    """The deployed full model must compute what fine-tuning trained (weights copied by layer name),
    whichever stage's output was cached."""
    from dermaloop import backbones
    from dermaloop.preprocess import PreprocessConfig
    from training.assemble import full_classifier
    from training.embeddings import map_stage
    from training.finetune import build_tail_classifier

    ds = open_dataset(data, HAM).subset(range(6))
    cfg = PreprocessConfig(size=64)
    stage = map_stage(train_stages)
    feats = extract_features(ds, "tiny", cfg, tmp_path, with_maps=True, progress=False, stage=stage)
    start = backbones.stage_end_block("tiny", stage) + 1
    tail = build_tail_classifier("tiny", start, tuple(feats.maps.shape[1:]), 7, 0.3)
    dense = tail.get_layer("logits")
    rng = np.random.default_rng(0)
    dense.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in dense.get_weights()])
    on_maps = np.asarray(tail(np.asarray(feats.maps, np.float32), training=False))
    full = full_classifier("tiny", 7, tail_model=tail, with_probabilities=False)
    pixels = np.stack([model_input(s, cfg) for s in ds.samples])
    np.testing.assert_allclose(full.predict(pixels, verbose=0), on_maps, atol=2e-2)  # maps cached as float16
    pooled = extractor("tiny", with_maps=False).predict(pixels, verbose=0)
    np.testing.assert_allclose(feats.pooled, pooled, atol=1e-4)


def test_features_come_from_cache_the_second_time(data, tmp_path):
    from dermaloop.preprocess import PreprocessConfig

    ds = open_dataset(data, HAM).subset(range(4))
    first = extract_features(ds, "tiny", PreprocessConfig(size=64), tmp_path, progress=False)
    second = extract_features(ds, "tiny", PreprocessConfig(size=64), tmp_path, progress=False)
    assert not first.cached and second.cached
    np.testing.assert_array_equal(first.pooled, second.pooled)


def test_finetuning_resumes_from_its_checkpoint(tmp_path):
    from training.finetune import FinetuneConfig, finetune

    rng = np.random.default_rng(0)
    maps = rng.normal(0, 1, (40, 4, 4, 32)).astype(np.float16)
    labels = np.arange(40) % 3
    idx = np.arange(40)
    cfg = FinetuneConfig(epochs=1, batch_size=16)
    _, first = finetune("tiny", [maps], labels, idx[:30], idx[30:], 3, cfg, tmp_path, progress=False)
    cfg2 = FinetuneConfig(epochs=2, batch_size=16)
    _, both = finetune("tiny", [maps], labels, idx[:30], idx[30:], 3, cfg2, tmp_path, progress=False)
    assert len(first) == 1 and len(both) == 2 and both[0] == first[0]  # epoch 1 was not redone


def test_a_resumed_run_continues_exactly_like_an_uninterrupted_one(tmp_path):
    """Weights, Adam moments and step counts are checkpointed, and each epoch's shuffle depends only on
    (seed, epoch): stopping after epoch 1 and resuming gives the uninterrupted run's weights."""
    from training.finetune import FinetuneConfig, finetune

    rng = np.random.default_rng(1)
    maps = rng.normal(0, 1, (48, 4, 4, 32)).astype(np.float16)
    labels = np.arange(48) % 3
    idx = np.arange(48)
    cfg = {"batch_size": 8, "dropout": 0.0, "cycle_epochs": 4}
    straight, _ = finetune("tiny", [maps], labels, idx[:36], idx[36:], 3, FinetuneConfig(epochs=2, **cfg),
                           tmp_path / "a", progress=False)
    finetune("tiny", [maps], labels, idx[:36], idx[36:], 3, FinetuneConfig(epochs=1, **cfg), tmp_path / "b",
             progress=False)
    resumed, history = finetune("tiny", [maps], labels, idx[:36], idx[36:], 3, FinetuneConfig(epochs=2, **cfg),
                                tmp_path / "b", progress=False)
    assert len(history) == 2
    straight.load_weights(tmp_path / "a" / "last.weights.h5")
    resumed.load_weights(tmp_path / "b" / "last.weights.h5")
    for a, b in zip(straight.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_deeper_finetuning_trains_more_stages(data, tmp_path):
    """``--train-stages 3`` caches the stage-4 maps and trains stage 5 as well (its own cache and
    checkpoint); the cloud model can keep another recipe."""
    out = tmp_path / "deep"
    assert main(["train", "--data", str(data), "--out", str(out), "--device-backbone", "tiny",
                 "--cloud-backbone", "tiny", "--epochs", "1", "--train-stages", "3", "--lr-body", "1e-4",
                 "--cloud-train-stages", "2", "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["options"]["finetune"]["train_stages"] == 3 and card["options"]["finetune"]["lr_body"] == 1e-4
    assert card["options"]["cloud_finetune"]["train_stages"] == 2  # the cloud model has its own recipe
    assert card["options"]["cloud_finetune"]["lr_body"] == 1e-4  # ... inheriting what it does not override
    assert sorted(p.name.endswith("-top3") for p in (tmp_path / "cache").glob("finetune-tiny-*")) == [False, True]
    maps = [np.load(p, mmap_mode="r") for p in (tmp_path / "cache").glob("tiny-orig-*/maps.npy")]
    assert sorted(m.shape[-1] for m in maps) == [24, 32]  # tiny's stage-4 width (device), stage-5 (cloud)


def test_linear_head_reproduces_logistic_regression():
    from training.heads import fit_linear_head

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 16))
    y = np.repeat([0, 2, 3], 40)  # class 1 absent
    x = centres[np.searchsorted([0, 2, 3], y)] + rng.normal(0, 1, (120, 16)) + 50.0
    kernel, bias = fit_linear_head(x, y, n_classes=4)
    pred = (x @ kernel + bias).argmax(1)
    assert (pred == y).mean() > 0.95 and not (pred == 1).any()
    assert bias[1] < -10


def test_evaluate_and_export_cli(trained, data, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(trained), "--kind", "device", "--data", str(data),
                 "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= METRIC_KEYS and metrics["data"]["images"] == 70
    assert (out / "report.md").read_text().startswith("# device model")
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    assert main(["export", "--model", str(copy), "--data", str(data), "--calibration-images", "8", "--quiet"]) == 0
    card = json.loads((copy / "card.json").read_text())
    assert card["files"]["device/model_int8.tflite"] == sha256_file(copy / "device" / "model_int8.tflite")
    load_device_model(copy, "int8")  # the updated hashes verify


def test_evaluate_on_the_models_own_split_repeats_the_cards_figures(trained, data, tmp_path, capsys):
    """``--split val`` picks the training run's val images by id, so it reproduces what training
    measured; a dataset holding none of them is a clear error, not an empty report."""
    out = tmp_path / "val"
    assert main(["evaluate", "--model", str(trained), "--kind", "device", "--data", str(data),
                 "--split", "val", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    card = json.loads((trained / "card.json").read_text())
    assert metrics["data"]["images"] == card["data"]["split"]["val"] < 70
    assert metrics["balanced_accuracy"] == pytest.approx(card["device"]["metrics"]["balanced_accuracy"])
    other = tmp_path / "other" / "nv"
    other.mkdir(parents=True)
    shutil.copy(open_dataset(data, HAM).samples[0].path, other / "someone-else.jpg")
    assert main(["evaluate", "--model", str(trained), "--data", str(other.parent), "--split", "val",
                 "--out", str(tmp_path / "none"), "--quiet"]) == 2
    assert "none of the model's val images" in capsys.readouterr().out


def test_tampered_model_file_is_refused(trained, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(trained, copy)
    with open(copy / "device" / "model_int8.tflite", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ModelError, match="sha256"):
        load_device_model(copy, "int8")
    with pytest.raises(ModelError, match="not a model directory"):
        load_cloud_model(tmp_path / "nothing")


def test_train_cli_rejects_bad_input(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "m"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m"), "--views", "flip"])
    with pytest.raises(SystemExit):
        main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m"), "--views", "orig,aug99"])


def test_cloud_tta_beyond_the_training_views_is_fitted_on_what_the_runtime_averages(data, tmp_path):
    """``--cloud-tta``: test-time symmetries the networks never trained on (here on the fast path, with
    the ensemble). The card lists them, the runtime averages over them, and the malignancy thresholds
    are the ones the runtime's own probabilities on the calib images give."""
    from dermaloop.risk import policy_from_probabilities

    out = tmp_path / "tta"
    assert main(["train", "--data", str(data), "--out", str(out), "--device-backbone", "tiny",
                 "--cloud-backbone", "tiny", "--cloud-tta", "rot90,transpose", "--cloud-ensemble",
                 "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["cloud"]["tta"] == ["rot90", "transpose"] and card["cloud"]["ensemble"]
    cloud = load_cloud_model(out)
    assert cloud.tta == ["rot90", "transpose"]
    ds = open_dataset(data, HAM)
    rows = {s.id: i for i, s in enumerate(ds.samples)}
    calib = [rows[i] for i in json.loads((out / "split.json").read_text())["calib"]]
    x = np.stack([model_input(ds.samples[i], cloud.preprocess) for i in calib])
    risk = card["cloud"]["risk"]
    refit = policy_from_probabilities(risk["temperature"], cloud.predict(x), ds.labels[calib], HAM.malignant_mask,
                                      risk["target_sensitivity"])
    assert refit.moderate_threshold == pytest.approx(risk["moderate_threshold"], abs=1e-4)
    assert refit.high_threshold == pytest.approx(risk["high_threshold"], abs=1e-4)
    single = np.asarray(cloud.model(x, training=False))
    assert not np.allclose(cloud.predict(x), single, atol=1e-4)  # the views really are averaged
    from sklearn.metrics import balanced_accuracy_score

    scores = card["cloud"]["calib"]  # recorded so recipes and TTA choices can be compared off val
    assert scores["n"] == len(calib)
    assert scores["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(ds.labels[calib],
                                                                                cloud.predict(x).argmax(1)))
    assert scores["balanced_accuracy_without_tta"] == pytest.approx(balanced_accuracy_score(ds.labels[calib],
                                                                                            single.argmax(1)))


def test_unknown_cloud_tta_is_refused(data, tmp_path):
    with pytest.raises(SystemExit, match="--cloud-tta takes"):
        main(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--cloud-tta", "rot45"])
    assert not (tmp_path / "m").exists()


def test_lr_range_test_suggests_a_rate_in_range():
    from training.finetune import build_tail_classifier
    from training.lr_find_cli import lr_range_test

    rng = np.random.default_rng(0)
    maps = rng.normal(0, 1, (64, 4, 4, 32)).astype(np.float16)
    labels = np.arange(64) % 3
    model = build_tail_classifier("tiny", 7, (4, 4, 32), 3, 0.0)
    result = lr_range_test(model, maps, labels, np.arange(64), 3, 1e-5, 1.0, 15, 16, 0, progress=False)
    assert 1e-5 <= result["suggested_lr_head"] <= 1.0 and len(result["loss"]) == len(result["lr"]) >= 3


def test_cloud_ensemble_averages_the_cloud_and_device_networks(data, tmp_path):
    """``--cloud-ensemble``: one cloud Keras file whose nested member is exactly the device network,
    combined as the mean of temperature-scaled logits; Grad-CAM still finds the primary's features."""
    import keras

    from cloud_worker.model import load_model
    from dermaloop.risk import softmax

    out = tmp_path / "ens"
    assert main(["train", "--data", str(data), "--out", str(out), "--device-backbone", "tiny",
                 "--cloud-backbone", "tiny", "--epochs", "1", "--views", "orig,flip", "--cloud-ensemble",
                 "--seed", "3", "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["cloud"]["ensemble"]["members"] == ["tiny", "tiny"]
    ensemble = keras.models.load_model(out / "cloud" / "model.keras", compile=False)
    device = keras.models.load_model(out / "device" / "model.keras", compile=False)
    member = next(layer for layer in ensemble.layers if layer.name.startswith("member1_"))
    x = np.stack([model_input(s, load_cloud_model(out).preprocess) for s in open_dataset(data, HAM).samples[:4]])
    device_scaled = np.asarray(keras.Model(device.input, device.get_layer("temperature").output)(x))
    np.testing.assert_allclose(np.asarray(member(x)), device_scaled, atol=1e-4)
    primary = np.asarray(keras.Model(ensemble.input, ensemble.get_layer("temperature").output)(x))
    t = card["cloud"]["risk"]["temperature"]
    np.testing.assert_allclose(np.asarray(ensemble(x)), softmax((primary + device_scaled) / 2, t), atol=1e-4)
    probs, maps = load_model(out).classify(x)
    assert probs.shape == (4, len(HAM)) and maps is not None and maps.shape[0] == 4
    assert card["cloud"]["metrics"]["n"] == card["data"]["split"]["val"]


def test_class_recall_fits_offsets_the_runtimes_and_reports_apply(tmp_path, trained):
    """``--class-recall mel=1.0``: the smallest melanoma offset whose call finds every calib
    melanoma goes into both cards' risk policies; the runtimes list the call first, and the val
    report's recalls are those of the call, not of the plain argmax."""
    from dermaloop.risk import RiskPolicy, decide
    from training.evaluate import predict_dataset

    data = generate(tmp_path / "syn", per_class=20, photos_per_lesion=1, seed=1)  # a few melanomas in calib
    out = tmp_path / "cr"
    assert main(["train", "--data", str(data), "--out", str(out), "--device-backbone", "tiny", "--cloud-backbone",
                 "tiny", "--class-recall", "mel=1.0", "--cloud-ensemble", "--cache-dir", str(tmp_path / "cache"),
                 "--quiet"]) == 0
    card = json.loads((out / "card.json").read_text())
    ds = open_dataset(data, HAM)
    mel = HAM.ids.index("mel")
    rows = {s.id: i for i, s in enumerate(ds.samples)}
    split = {k: np.array([rows[i] for i in v]) for k, v in json.loads((out / "split.json").read_text()).items()}
    cloud = load_cloud_model(out)
    decision = card["cloud"]["decision"]
    assert decision["class_offsets"]["mel"] > 0 and decision["calib_recall"] == {"mel": 1.0}
    assert cloud.policy.class_offsets[mel] == decision["class_offsets"]["mel"]
    x = np.stack([model_input(ds.samples[i], cloud.preprocess) for i in split["calib"]])
    probs = cloud.predict(x)
    is_mel = ds.labels[split["calib"]] == mel
    assert (cloud.policy.decide(probs)[is_mel] == mel).all()  # the promise, kept by the runtime
    assert not (probs.argmax(1)[is_mel] == mel).all()  # and it needed the offset
    step_less = list(cloud.policy.class_offsets)
    step_less[mel] -= 0.05
    assert not (decide(probs, step_less)[is_mel] == mel).all()  # the smallest offset that keeps it
    # the top list starts with the call: a calib melanoma the argmax misses is named first
    missed = split["calib"][np.flatnonzero(is_mel & (probs.argmax(1) != mel))[0]]
    assert cloud.diagnose(ds.samples[missed].path)["top"][0]["label"] == "mel"
    # the val report counts the call
    val_probs, val_labels, _ = predict_dataset(cloud, ds.subset(split["val"]), progress=False)
    called = RiskPolicy.from_dict(card["cloud"]["risk"]).decide(val_probs)
    for i, c in enumerate(HAM.ids):
        if (val_labels == i).any():
            assert card["cloud"]["metrics"]["per_class_recall"][c] == pytest.approx((called[val_labels == i] == i).mean())
    assert card["device"]["risk"]["class_offsets"][mel] > 0  # the device model gets its own offsets
    report = (out / "reports" / "cloud" / "report.md").read_text()
    assert "count the model's call: log-probability + class offsets" in report and '"mel"' in report
    assert "count the model's call: most probable class" in (trained / "reports" / "cloud" / "report.md").read_text()


def test_class_recall_refuses_unknown_classes(data, tmp_path, capsys):
    for bad in ("melanoma=0.8", "mel=1.5"):
        assert main(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--device-backbone", "tiny",
                     "--cloud-backbone", "tiny", "--class-recall", bad, "--quiet"]) == 2
        assert "--class-recall" in capsys.readouterr().out and not (tmp_path / "m").exists()
    with pytest.raises(SystemExit, match="CLASS=RECALL"):
        main(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--class-recall", "mel"])


def test_the_sensitivity_confidence_rule_reaches_both_cards_and_nonsense_is_refused(data, tmp_path, capsys):
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "bad"), "--device-backbone", "tiny",
                 "--cloud-backbone", "tiny", "--sensitivity-confidence", "1.5", "--quiet"]) == 2
    assert "--sensitivity-confidence" in capsys.readouterr().out and not (tmp_path / "bad").exists()
    out = tmp_path / "m"
    assert main(["train", "--data", str(data), "--out", str(out), "--device-backbone", "tiny",
                 "--cloud-backbone", "tiny", "--sensitivity-confidence", "0.95", "--quiet"]) == 0
    card = json.loads((out / "card.json").read_text())
    for kind in ("device", "cloud"):
        assert card[kind]["risk"]["sensitivity_confidence"] == 0.95, kind
