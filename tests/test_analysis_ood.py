"""Not-skin rejection on fixed not-skin examples and on real lesion photos (where present)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dermaloop.analysis import ood
from tests.example_photos import blank_photo, document_photo, noise_photo


@pytest.fixture(scope="module")
def analysis_model():
    pytest.importorskip("keras")
    from training.analysis_model import HEAD_WEIGHTS, build_analysis_model

    if not HEAD_WEIGHTS.is_file() or not ood.OOD_FILE.is_file():
        pytest.skip("analysis heads not trained (training/localiser_train.py, training/ood_train.py)")
    return build_analysis_model()


def _p_lesion(model, img: Image.Image) -> float:
    from dermaloop.analysis.features import frame_input

    return ood.untemper(float(np.asarray(model(frame_input(img)[None], training=False))[0, 5]))


def test_head_file_is_consistent():
    head = ood.load_head()
    assert head["w"].shape == (1280,)
    assert 0.0 < head["threshold"] < 1.0
    m = head["metrics"]
    assert m["n_held_out"] > 0 and m["held_out_sources"]
    # Held-out sources never appear among training sources.
    assert not set(m["held_out_sources"]) & set(m["train"]["negative_sources"])


def test_probability_function_matches_logistic_formula():
    head = {"w": np.ones(1280) / 1280, "b": -0.5, "threshold": 0.5}
    assert ood.lesion_probability(np.zeros(1280), head) == pytest.approx(1 / (1 + np.exp(0.5)))
    probs = ood.lesion_probability(np.ones((3, 1280)), head)
    assert probs.shape == (3,) and np.allclose(probs, 1 / (1 + np.exp(-0.5)))
    assert ood.is_lesion(0.5, head) and not ood.is_lesion(0.49, head)
    # The device model's tempered output maps back to the same probability.
    for z in (-6.0, 0.0, 3.0, 5.5):
        tempered = 1 / (1 + np.exp(-z / ood.TEMPER))
        assert ood.untemper(tempered) == pytest.approx(1 / (1 + np.exp(-z)), rel=1e-5)


@pytest.mark.parametrize(("name", "img"), [
    ("document", document_photo()),
    ("noise", noise_photo()),
    ("dark frame", blank_photo(colour=(8, 8, 8))),
    ("white frame", blank_photo(colour=(250, 250, 250))),
])
def test_not_skin_examples_are_rejected(analysis_model, name, img):
    p = _p_lesion(analysis_model, img)
    assert not ood.is_lesion(p), (name, p)


def test_everyday_photo_is_rejected(analysis_model):
    from skimage.data import chelsea, coffee

    for arr in (chelsea(), coffee()):
        assert not ood.is_lesion(_p_lesion(analysis_model, Image.fromarray(arr)))


@pytest.mark.ham10000
def test_real_lesions_are_kept(analysis_model, ham10000):
    from training.hamdata import lesion_split, read_records

    records = read_records(ham10000)
    _, val = lesion_split(records)
    kept = [ood.is_lesion(_p_lesion(analysis_model, Image.open(records[i].path).convert("RGB")))
            for i in val[::67][:30]]
    assert sum(kept) >= 29, kept
