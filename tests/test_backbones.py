"""The Keras EfficientNet-Lite backbones must reproduce the PyTorch checkpoints' ImageNet logits."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermaloop import backbones
from dermaloop.preprocess import PreprocessConfig, to_model_input

DATA = Path(__file__).parent / "data"


def reference_inputs(size: int) -> np.ndarray:
    """Same formula as bench/make_backbone_reference.py (which made the stored logits with torch)."""
    i = np.arange(size, dtype=np.int64)[:, None, None]
    j = np.arange(size, dtype=np.int64)[None, :, None]
    c = np.arange(3, dtype=np.int64)[None, None, :]
    a = (i * 7 + j * 13 + c * 101 + (i * j) % 17) % 256
    b = (128 + 100 * np.sin(i / 9.0 + c) * np.cos(j / 13.0 - c)).astype(np.int64)
    return np.stack([a, b]).astype(np.float32)


@pytest.fixture(scope="module", params=["lite0", "lite2"])
def classifier(request):
    return request.param, backbones.build_backbone(request.param, include_top=True)


def test_logits_match_independent_torch_reference(classifier):
    name, model = classifier
    ref = np.load(DATA / f"backbone_reference_{name}.npz")
    assert str(ref["checkpoint"]) == backbones.checkpoint_path(name).name
    logits = model.predict(reference_inputs(backbones.input_size(name)), verbose=0)
    assert logits.shape == (2, 1000)
    assert np.abs(logits - ref["logits"]).max() < 1e-4


def test_chelsea_is_a_cat(classifier):
    from skimage import data

    name, model = classifier
    size = backbones.input_size(name)
    # ImageNet evaluation crop: centre size/(size+32) of the shorter side.
    config = PreprocessConfig(size=size, crop_fraction=size / (size + 32))
    x = to_model_input(Image.fromarray(data.chelsea()), config=config)
    top1 = int(model.predict(x[None], verbose=0)[0].argmax())
    assert 281 <= top1 <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_feature_outputs_and_sizes():
    assert backbones.input_size("lite0") == 224 and backbones.input_size("lite2") == 260
    pooled = backbones.build_backbone("lite0", weights=None)
    assert pooled.input_shape == (None, 224, 224, 3) and pooled.output_shape == (None, 1280)
    fmap = backbones.build_backbone("lite0", weights=None, pooling=None)
    assert fmap.output_shape == (None, 7, 7, 1280) and fmap.layers[-1].name == backbones.FEATURE_LAYER
    with pytest.raises(ValueError, match="unknown backbone"):
        backbones.input_size("resnet50")


def test_another_input_size_keeps_the_same_network():
    """``size`` only changes the input side (bench/probe_test_resolution.py): same layers, same weights, and
    a photo fed at the native size gives the same features as before."""
    native = backbones.build_backbone("tiny")
    larger = backbones.build_backbone("tiny", size=96)
    assert larger.input_shape == (None, 96, 96, 3) and larger.output_shape == native.output_shape
    for a, b in zip(native.get_weights(), larger.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    same = backbones.build_backbone("tiny", size=backbones.input_size("tiny"))
    x = reference_inputs(64)
    np.testing.assert_allclose(np.asarray(same(x)), np.asarray(native(x)), atol=1e-6)
    assert np.asarray(larger(reference_inputs(96))).shape == (2, native.output_shape[-1])


def test_trainable_parameter_counts_match_the_published_architecture():
    model = backbones.build_backbone("lite0", weights=None, include_top=True)
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == 4_652_008


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_reader_refuses_code_in_a_checkpoint(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump({"little_endian": True}, f, protocol=2)
        pickle.dump(_Evil(), f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="never needs"):
        backbones.read_torch_checkpoint(path)


def test_reader_rejects_non_checkpoints(tmp_path):
    path = tmp_path / "x.pth"
    buf = io.BytesIO()
    pickle.dump(12345, buf, protocol=2)
    path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="magic"):
        backbones.read_torch_checkpoint(path)


def test_reader_reads_every_tensor_of_the_wheel():
    state = backbones.read_torch_checkpoint(backbones.checkpoint_path("lite0"))
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3) and state["_conv_stem.weight"].dtype == np.float32
    assert state["_fc.weight"].shape == (1000, 1280)
