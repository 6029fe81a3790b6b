"""Whole-network fine-tuning on augmented images (training/finetune_images.py), on synthetic photos
with the 64 px "tiny" backbone: warm start, learning, exact resumption, checkpoint identity and the
``--full-epochs`` plumbing through ``dermaloop train``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dermaloop.cli import main
from dermaloop.preprocess import PreprocessConfig
from dermaloop.taxonomy import load_taxonomy
from training.datasets import open_dataset
from training.finetune_images import (
    FullFinetuneConfig,
    build_full_network,
    checkpoint_dir,
    finetune_full,
    image_logits,
)
from training.synthetic import generate

PRE = PreprocessConfig(size=64)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("syn"), per_class=8, photos_per_lesion=2, seed=3)


@pytest.fixture(scope="module")
def ds(data):
    return open_dataset(data, load_taxonomy())


def _tail(n_classes: int):
    from dermaloop import backbones
    from training.embeddings import map_stage
    from training.finetune import build_tail_classifier

    start = backbones.stage_end_block("tiny", map_stage(2)) + 1
    tail = build_tail_classifier("tiny", start, (4, 4, 32), n_classes, 0.0)
    rng = np.random.default_rng(0)
    tail.get_layer("logits").set_weights([rng.normal(0, 0.5, (tail.get_layer("logits").input.shape[-1], n_classes))
                                          .astype(np.float32), np.arange(n_classes, dtype=np.float32) * 0.1])
    return tail


def test_the_warm_start_is_the_first_phase_network(ds):
    """The second phase starts from exactly the network the top-block phase produced."""
    from training.assemble import full_classifier

    tail = _tail(len(ds.taxonomy))
    net = build_full_network("tiny", len(ds.taxonomy), 0.3, start=tail)
    reference = full_classifier("tiny", len(ds.taxonomy), tail_model=tail, with_probabilities=False)
    rows = np.arange(6)
    np.testing.assert_allclose(image_logits(net, ds, rows, PRE), image_logits(reference, ds, rows, PRE), atol=1e-4)
    with pytest.raises(ValueError, match="shares no layers"):
        import keras
        inp = keras.Input((3,))
        build_full_network("tiny", 7, 0.3, start=keras.Model(inp, keras.layers.Dense(2, name="other")(inp)))


def test_every_layer_trains_and_the_best_calib_epoch_is_kept(ds, tmp_path):
    k = len(ds.taxonomy)
    idx = np.arange(len(ds))
    tail = _tail(k)
    start = build_full_network("tiny", k, 0.0, start=tail).get_weights()
    cfg = FullFinetuneConfig(epochs=2, batch_size=16, lr_head=1e-3, lr_body=1e-3)
    net, history = finetune_full("tiny", ds, idx[:-16], idx[-16:], cfg, PRE, tmp_path, start=tail, progress=False)
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["loss"]) and 0.0 <= h["calib_balanced_accuracy"] <= 1.0 for h in history)
    changed = [not np.allclose(a, b) for a, b in zip(start, net.get_weights(), strict=True)]
    assert changed[0] and changed[-1]  # the stem convolution and the classifier both moved
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["best"] == max(h["calib_balanced_accuracy"] for h in history)
    net_best = build_full_network("tiny", k, 0.0)
    net_best.load_weights(tmp_path / "best.weights.h5")
    for a, b in zip(net.get_weights(), net_best.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # what is returned is the best calib epoch


def test_a_resumed_whole_network_run_equals_an_uninterrupted_one(ds, tmp_path, monkeypatch):
    """A run killed in epoch 2 and started again continues from its epoch-1 checkpoint (weights, Adam
    moments, step counts) with epoch 2's own order and augmentations: the result equals an
    uninterrupted run."""
    import training.finetune_images as fi

    k = len(ds.taxonomy)
    idx = np.arange(len(ds))
    train, calib = idx[:-16], idx[-16:]
    tail = _tail(k)
    cfg = FullFinetuneConfig(epochs=2, batch_size=16, dropout=0.0, lr_head=1e-3, lr_body=1e-3)
    finetune_full("tiny", ds, train, calib, cfg, PRE, tmp_path / "a", start=tail, progress=False)

    real, calls = fi.to_model_input, []

    def dies_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) > len(train) + 20:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fi, "to_model_input", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        finetune_full("tiny", ds, train, calib, cfg, PRE, tmp_path / "b", start=tail, progress=False)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["epoch"] == 0  # epoch 1 was checkpointed
    monkeypatch.setattr(fi, "to_model_input", real)
    _, history = finetune_full("tiny", ds, train, calib, cfg, PRE, tmp_path / "b", start=tail, progress=False)
    assert len(history) == 2
    a, b = build_full_network("tiny", k, 0.0), build_full_network("tiny", k, 0.0)
    a.load_weights(tmp_path / "a" / "last.weights.h5")
    b.load_weights(tmp_path / "b" / "last.weights.h5")
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, atol=1e-5)


def test_a_longer_schedule_is_a_new_run_not_a_continuation(ds, tmp_path):
    """The cosine decay spans all epochs, so epoch 1 of a 2-epoch run differs from epoch 1 of a
    1-epoch run: resuming the shorter run's checkpoint would follow neither schedule."""
    k = len(ds.taxonomy)
    idx = np.arange(len(ds))
    cfg = {"batch_size": 4,  # 10 steps: the decay differs within epoch 1
           "dropout": 0.0, "lr_head": 1e-3, "lr_body": 1e-3}
    tail = _tail(k)
    _, one = finetune_full("tiny", ds, idx[:-16], idx[-16:], FullFinetuneConfig(epochs=1, **cfg), PRE, tmp_path,
                           start=tail, progress=False)
    _, two = finetune_full("tiny", ds, idx[:-16], idx[-16:], FullFinetuneConfig(epochs=2, **cfg), PRE, tmp_path,
                           start=tail, progress=False)
    assert len(two) == 2 and two[0]["loss"] != one[0]["loss"]  # epoch 1 was trained again


def test_the_checkpoint_folder_depends_on_the_warm_start(ds, tmp_path):
    one, two = _tail(len(ds.taxonomy)), _tail(len(ds.taxonomy))
    assert checkpoint_dir(tmp_path, "tiny", ds, "orig", one) == checkpoint_dir(tmp_path, "tiny", ds, "orig", two)
    two.get_layer("logits").set_weights([w + 1 for w in two.get_layer("logits").get_weights()])
    assert checkpoint_dir(tmp_path, "tiny", ds, "orig", one) != checkpoint_dir(tmp_path, "tiny", ds, "orig", two)


def test_train_cli_runs_the_whole_network_phase_for_the_device_model(data, tmp_path):
    out = tmp_path / "model"
    assert main(["train", "--data", str(data), "--out", str(out), "--device-backbone", "tiny",
                 "--cloud-backbone", "tiny", "--epochs", "1", "--full-epochs", "1", "--views", "orig,flip",
                 "--cloud-ensemble", "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["device"]["training"]["whole_network_epochs"] == 1
    assert "whole_network_epochs" not in card["cloud"]["training"]  # the cloud network keeps the top-block recipe
    assert card["options"]["full_finetune"]["epochs"] == 1
    assert len(list((tmp_path / "cache").glob("full-tiny-*"))) == 1
    assert main(["train", "--data", str(data), "--out", str(out), "--device-backbone", "tiny",
                 "--cloud-backbone", "tiny", "--epochs", "1", "--full-epochs", "1", "--cloud-full-epochs", "1",
                 "--views", "orig,flip", "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["cloud"]["training"]["whole_network_epochs"] == 1
    assert card["device"]["training"]["whole_network_history"][0]["seconds"] > 0
    assert card["device"]["metrics"]["n"] == card["data"]["split"]["val"]


def test_whole_network_phase_needs_the_first_phase(data, tmp_path, capsys):
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--device-backbone", "tiny",
                 "--cloud-backbone", "tiny", "--full-epochs", "2", "--quiet"]) == 2
    assert "--full-epochs" in capsys.readouterr().out
    assert not (tmp_path / "m").exists()


def test_cloud_seeds_add_whole_network_members_to_the_cloud_ensemble(data, tmp_path):
    """``--cloud-seeds 1``: the cloud network's whole-network phase runs again with seed 1 from the
    same warm start, in its own checkpoint folder, and that network is a real, different member of
    the one cloud Keras file, averaged with the first member and the device network."""
    import keras

    from dermaloop.risk import softmax
    from training.embeddings import model_input

    out, cache = tmp_path / "seeds", tmp_path / "cache"
    assert main(["train", "--data", str(data), "--out", str(out), "--device-backbone", "tiny",
                 "--cloud-backbone", "tiny", "--epochs", "1", "--full-epochs", "1", "--cloud-full-epochs", "1",
                 "--cloud-seeds", "1", "--cloud-ensemble", "--views", "orig,flip", "--cache-dir", str(cache),
                 "--quiet"]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["cloud"]["ensemble"]["members"] == ["tiny", "tiny", "tiny"]
    assert card["cloud"]["ensemble"]["whole_network_seeds"] == [0, 1]
    full = sorted(p.name for p in cache.glob("full-tiny-*"))
    # with one backbone for both, the device and seed-0 cloud networks are one run and share a folder
    assert len(full) == 2 and sum("-seed1-" in name for name in full) == 1
    ensemble = keras.models.load_model(out / "cloud" / "model.keras", compile=False)
    members = [layer for layer in ensemble.layers if layer.name.startswith("member")]
    assert len(members) == 2
    rows = open_dataset(data, load_taxonomy()).samples[:4]
    x = np.stack([model_input(s, PRE) for s in rows]).astype(np.float32)
    primary = np.asarray(keras.Model(ensemble.input, ensemble.get_layer("temperature").output)(x))
    seed1, dev = (np.asarray(m(x)) for m in members)
    assert np.abs(seed1 - primary).max() > 1e-3  # a different network, not a copy of the first member
    t = card["cloud"]["risk"]["temperature"]
    np.testing.assert_allclose(np.asarray(ensemble(x)), softmax((primary + seed1 + dev) / 3, t), atol=1e-4)


@pytest.mark.parametrize("extra, message", [(["--cloud-seeds", "0"], "differ"),
                                            (["--cloud-seeds", "1,1"], "differ")])
def test_cloud_seeds_refuse_a_repeated_seed(data, tmp_path, capsys, extra, message):
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--device-backbone", "tiny",
                 "--cloud-backbone", "tiny", "--epochs", "1", "--cloud-full-epochs", "1", *extra, "--quiet"]) == 2
    assert message in capsys.readouterr().out and not (tmp_path / "m").exists()


def test_cloud_seeds_need_the_cloud_whole_network_phase(data, tmp_path, capsys):
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--device-backbone", "tiny",
                 "--cloud-backbone", "tiny", "--epochs", "1", "--cloud-seeds", "1", "--quiet"]) == 2
    assert "--cloud-full-epochs" in capsys.readouterr().out
