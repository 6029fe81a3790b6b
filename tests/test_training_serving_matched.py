"""Serving-matched training (issue 20): the classifier trained and calibrated on the crop the runtimes make.

The runtimes crop a square around the lesion box with the card's margin (``preprocess.crop_box``);
``--crop box`` trains, selects epochs, fits temperature, thresholds and int8 calibration on that crop
of the dataset's boxes, and ``boxjK`` views add scale and position jitter around it.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from dermaloop.cli import main
from dermaloop.model_dir import load_cloud_model
from dermaloop.preprocess import PreprocessConfig, crop_box, load_image, symmetric_pixels, to_model_input
from dermaloop.taxonomy import load_taxonomy
from training.datasets import open_dataset
from training.embeddings import (
    BOX_MARGIN_JITTER,
    BOX_SHIFT,
    _key,
    jittered_box,
    model_input,
    view_for_crop,
)
from training.synthetic import generate

HAM = load_taxonomy()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("syn"), per_class=10, photos_per_lesion=2, seed=3)


@pytest.fixture(scope="module")
def ds(data):
    return open_dataset(data, HAM)


def test_views_map_to_the_box_crop_only_when_asked():
    assert [view_for_crop("centre", v) for v in ("orig", "flip", "aug3")] == ["orig", "flip", "aug3"]
    assert [view_for_crop("box", v) for v in ("orig", "flip", "rot90", "aug3")] == ["box", "box-flip", "box-rot90",
                                                                                   "boxj3"]
    with pytest.raises(ValueError, match="crop must be"):
        view_for_crop("zoom", "orig")


def test_the_box_view_is_exactly_the_runtime_crop_of_the_dataset_box(ds):
    cfg = PreprocessConfig(size=64)
    sample = next(s for s in ds.samples if s.box is not None)
    runtime = to_model_input(load_image(sample.path), box=sample.box, config=cfg)
    np.testing.assert_array_equal(model_input(sample, cfg, "box"), runtime)
    np.testing.assert_array_equal(model_input(sample, cfg, "box-flip"), symmetric_pixels(runtime[None], "flip")[0])
    assert not np.array_equal(runtime, model_input(sample, cfg, "orig"))  # the centre square is another picture


def test_jittered_boxes_stay_in_the_photo_and_within_the_stated_ranges():
    box = (0.05, 0.6, 0.25, 0.98)  # near the left and bottom edges
    side_x, side_y = box[2] - box[0], box[3] - box[1]
    margins = []
    for seed in range(300):
        (x0, y0, x1, y1), margin = jittered_box(box, seed)
        assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
        assert (x1 - x0, y1 - y0) == pytest.approx((side_x, side_y))  # shifted, never resized
        assert abs(x0 - box[0]) <= BOX_SHIFT * side_x + 1e-9 and abs(y0 - box[1]) <= BOX_SHIFT * side_y + 1e-9
        margins.append(margin)
    assert BOX_MARGIN_JITTER[0] <= min(margins) < 0.1 and 0.5 < max(margins) <= BOX_MARGIN_JITTER[1]
    assert jittered_box(box, 7) == jittered_box(box, 7)  # fixed per seed: a cache can be rebuilt exactly
    assert jittered_box(None, 7)[0] is None


def test_jittered_views_are_reproducible_and_zoom_around_the_lesion(ds):
    cfg = PreprocessConfig(size=64)
    sample = next(s for s in ds.samples if s.box is not None)
    img = load_image(sample.path)
    a, b = model_input(sample, cfg, "boxj1"), model_input(sample, cfg, "boxj1")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, model_input(sample, cfg, "boxj2"))
    # every jittered crop is the runtime's crop of a box within the jitter: its side lies between the
    # tight and the widest margin's (clipped to the photo)
    side = crop_box(img.width, img.height, sample.box, cfg)
    tight = crop_box(img.width, img.height, sample.box, replace(cfg, box_margin=BOX_MARGIN_JITTER[0]))
    wide = crop_box(img.width, img.height, sample.box, replace(cfg, box_margin=BOX_MARGIN_JITTER[1]))
    assert tight[2] - tight[0] <= side[2] - side[0] <= wide[2] - wide[0]


def test_box_views_are_cached_per_box(ds):
    cfg = PreprocessConfig(size=64)
    moved = ds.subset(range(len(ds)))
    moved.samples[0] = replace(moved.samples[0], box=(0.1, 0.1, 0.2, 0.2))
    assert _key("tiny", cfg, "box", ds) != _key("tiny", cfg, "box", moved)
    assert _key("tiny", cfg, "orig", ds) == _key("tiny", cfg, "orig", moved)  # the centre square ignores boxes


def test_crop_box_run_selects_and_calibrates_on_the_runtime_crop(data, ds, tmp_path):
    """The card's calib figures are those of the runtime's crop, so epoch choice, temperature, thresholds
    and the melanoma offset were fitted on what the runtime will see."""
    from sklearn.metrics import balanced_accuracy_score

    out = tmp_path / "box"
    assert main(["train", "--data", str(data), "--out", str(out), "--device-backbone", "tiny",
                 "--cloud-backbone", "tiny", "--epochs", "1", "--views", "orig,flip,aug1", "--crop", "box",
                 "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["options"]["crop"] == "box"
    assert card["cloud"]["tta"] == ["flip"]
    assert any(p.name.startswith("finetune-tiny-") and "-box-orig+flip+aug1" in p.name
               for p in (tmp_path / "cache").iterdir())
    cloud = load_cloud_model(out)
    rows = {s.id: i for i, s in enumerate(ds.samples)}
    calib = [rows[i] for i in json.loads((out / "split.json").read_text())["calib"]]
    policy = cloud.policy
    on_box = cloud.predict(np.stack([model_input(ds.samples[i], cloud.preprocess, "box") for i in calib]))
    on_centre = cloud.predict(np.stack([model_input(ds.samples[i], cloud.preprocess) for i in calib]))
    assert not np.allclose(on_box, on_centre)
    assert card["cloud"]["calib"]["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(ds.labels[calib], policy.decide(on_box)))


def test_unknown_crop_is_refused(data, tmp_path):
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--crop", "zoom"])
    with pytest.raises(SystemExit, match="views must start"):  # box views are chosen by --crop, not by name
        main(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--views", "box,box-flip"])
    assert not (tmp_path / "m").exists()
