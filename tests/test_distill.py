"""Knowledge distillation (issue 20): the device network learns from the cloud model's probabilities."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dermaloop.cli import main
from dermaloop.model_dir import load_cloud_model
from dermaloop.taxonomy import load_taxonomy
from training.datasets import open_dataset
from training.distill import distillation_loss, soften, teacher_probabilities
from training.embeddings import model_input
from training.synthetic import generate

HAM = load_taxonomy()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("syn"), per_class=10, photos_per_lesion=2, seed=5)


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    assert main(["train", "--data", str(data), "--out", str(root / "model"), "--device-backbone", "tiny",
                 "--cloud-backbone", "tiny", "--epochs", "1", "--views", "orig,flip",
                 "--cache-dir", str(root / "cache"), "--quiet"]) == 0
    return root / "model"


def test_soften_is_softmax_of_log_probabilities_at_the_temperature():
    p = np.array([[0.7, 0.2, 0.1], [0.01, 0.01, 0.98]], np.float32)
    np.testing.assert_allclose(soften(p, 1.0), p, rtol=1e-5)
    hot = soften(p, 4.0)
    np.testing.assert_allclose(hot.sum(axis=1), 1.0, rtol=1e-6)
    entropy = lambda q: -(q * np.log(q)).sum(axis=1)  # noqa: E731
    assert (entropy(hot) > entropy(p)).all()  # a higher temperature shows more of the "dark knowledge"
    assert (hot.argmax(1) == p.argmax(1)).all()
    with pytest.raises(ValueError):
        soften(p, 0.0)


def test_loss_is_the_label_loss_at_alpha_0_and_pulls_towards_the_teacher_at_alpha_1():
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(0)
    logits = tf.constant(rng.normal(size=(6, 4)), tf.float32)
    labels = tf.constant([0, 1, 2, 3, 0, 1])
    cw = tf.constant([1.0, 2.0, 0.5, 1.5])
    teacher = tf.constant(soften(rng.dirichlet(np.ones(4), size=6), 2.0))
    plain = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1, reduction="none")
    expected = tf.reduce_mean(plain(tf.one_hot(labels, 4), logits) * tf.gather(cw, labels))
    got = distillation_loss(logits, labels, teacher, cw, 0.0, 2.0, 0.1)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    # at alpha 1 the loss is zero exactly where the student's softened probabilities are the teacher's
    matching = tf.math.log(teacher) * 2.0
    assert float(distillation_loss(matching, labels, teacher, cw, 1.0, 2.0, 0.1)) == pytest.approx(0.0, abs=1e-5)
    assert float(distillation_loss(logits, labels, teacher, cw, 1.0, 2.0, 0.1)) > 0.01


def test_a_distilled_network_follows_the_teacher_more_than_an_undistilled_one(tmp_path):
    """Cached-map fine-tuning: the same data and seed, with the teacher's soft labels (alpha 1) or
    without (alpha 0). The teacher here is a fixed function of the inputs that ignores the labels
    (which are random), so only a network that learns from the teacher ends up close to it."""
    from training.finetune import FinetuneConfig, finetune, predict_logits

    rng = np.random.default_rng(2)
    maps = rng.normal(0, 1, (60, 4, 4, 32)).astype(np.float16)
    labels = np.arange(60) % 3
    idx = np.arange(60)
    z = 4.0 * maps.astype(np.float32).mean(axis=(1, 2)) @ rng.normal(size=(32, 3))
    soft = (np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    soft = soft.astype(np.float32)

    def kl_to_teacher(alpha: float) -> float:
        cfg = FinetuneConfig(epochs=10, batch_size=12, dropout=0.0, label_smoothing=0.0, distill_alpha=alpha,
                             distill_temperature=1.0, cycle_epochs=10)
        model, _ = finetune("tiny", [maps], labels, idx[:48], idx[48:], 3, cfg, tmp_path / f"a{alpha}",
                            progress=False, soft_targets=soft)
        z = predict_logits(model, maps[:48])
        q = np.exp(z - z.max(1, keepdims=True))
        q /= q.sum(1, keepdims=True)
        return float(np.mean(np.sum(soft[:48] * (np.log(soft[:48]) - np.log(q)), axis=1)))

    assert kl_to_teacher(1.0) < 0.8 * kl_to_teacher(0.0)


def test_distillation_without_a_teacher_or_out_of_range_is_refused(tmp_path):
    from training.finetune import FinetuneConfig, distill_targets

    idx = np.arange(4)
    assert distill_targets(None, idx, FinetuneConfig()) is None  # alpha 0: labels only
    with pytest.raises(ValueError, match="teacher"):
        distill_targets(None, idx, FinetuneConfig(distill_alpha=0.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        distill_targets(np.ones((4, 3)) / 3, idx, FinetuneConfig(distill_alpha=1.5))
    partial = np.full((4, 3), np.nan)
    partial[:2] = 1 / 3
    with pytest.raises(ValueError, match="every training image"):
        distill_targets(partial, idx, FinetuneConfig(distill_alpha=0.5))


def test_teacher_probabilities_are_the_cloud_model_on_the_students_crop_and_are_cached(teacher, data, tmp_path):
    ds = open_dataset(data, HAM)
    rows = np.array([3, 0, 5])
    cache = tmp_path / "cache"
    probs = teacher_probabilities(teacher, ds, rows, crop="box", cache_dir=cache, progress=False)
    cloud = load_cloud_model(teacher)
    expected = cloud.predict(np.stack([model_input(ds.samples[r], cloud.preprocess, "box") for r in sorted(rows)]))
    np.testing.assert_allclose(probs[np.sort(rows)], expected, atol=1e-5)
    assert np.isnan(probs[[1, 2, 4]]).all()
    cached = list(cache.glob("teacher-*.npy"))
    assert len(cached) == 1
    np.save(cached[0], np.full((3, len(HAM)), 0.5, np.float32))  # the second call reads the cache, not the model
    assert (teacher_probabilities(teacher, ds, rows, crop="box", cache_dir=cache, progress=False)[rows] == 0.5).all()
    centre = teacher_probabilities(teacher, ds, rows, crop="centre", cache_dir=cache, progress=False)
    assert not np.allclose(centre[rows], 0.5)  # another crop is another cache entry


def test_train_distils_the_device_network_and_says_so_in_the_card(teacher, data, tmp_path):
    out = tmp_path / "student"
    assert main(["train", "--data", str(data), "--out", str(out), "--device-backbone", "tiny",
                 "--cloud-backbone", "tiny", "--epochs", "1", "--views", "orig,flip", "--distill-from", str(teacher),
                 "--distill-alpha", "0.7", "--distill-temperature", "3", "--cache-dir", str(tmp_path / "cache"),
                 "--quiet"]) == 0
    card = json.loads((out / "card.json").read_text())
    teacher_card = json.loads((teacher / "card.json").read_text())
    d = card["device"]["distillation"]
    assert (d["teacher_version"], d["alpha"], d["temperature"]) == (teacher_card["version"], 0.7, 3.0)
    assert "distillation" not in card["cloud"]  # the cloud model learns from labels only
    names = [p.name for p in (tmp_path / "cache").iterdir()]
    assert any("-distill0.7T3-" in n for n in names)  # never resumes an undistilled checkpoint
    assert any(n.startswith("finetune-tiny-") and "distill" not in n for n in names)


def test_train_refuses_a_teacher_it_cannot_use(teacher, data, tmp_path, capsys):
    def run(*extra: str) -> int:
        return main(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--device-backbone", "tiny",
                     "--cloud-backbone", "tiny", "--cache-dir", str(tmp_path / "cache"), "--quiet", *extra])

    assert run("--distill-from", str(teacher)) == 2  # the fast path has no network to distil into
    assert "--epochs > 0" in capsys.readouterr().out
    assert run("--epochs", "1", "--distill-from", str(tmp_path / "nowhere")) == 2
    assert "not a model directory" in capsys.readouterr().out
    assert run("--epochs", "1", "--distill-from", str(teacher), "--distill-alpha", "0") == 2
    assert "--distill-alpha" in capsys.readouterr().out
    assert not (tmp_path / "m").exists()
