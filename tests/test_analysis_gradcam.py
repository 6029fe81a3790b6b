"""Grad-CAM on a small Keras classifier built on the project's Lite0 backbone (flat and nested)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dermaloop.analysis import gradcam
from tests.example_photos import lesion_photo

keras = pytest.importorskip("keras")


@pytest.fixture(scope="module")
def backbone():
    from dermaloop.backbones import build_backbone

    return build_backbone("lite0", weights="imagenet", include_top=False, pooling=None)


@pytest.fixture(scope="module")
def nested_classifier(backbone):
    """The usual layout: the backbone as one layer inside a classifier, softmax output."""
    inputs = keras.Input((224, 224, 3))
    x = backbone(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(7, activation="softmax", kernel_initializer=keras.initializers.GlorotUniform(seed=1))(x)
    return keras.Model(inputs, x)


@pytest.fixture(scope="module")
def flat_classifier():
    """Backbone layers at top level (ImageNet logits head)."""
    from dermaloop.backbones import build_backbone

    return build_backbone("lite0", weights="imagenet", include_top=True)


@pytest.fixture(scope="module")
def photo():
    img, box = lesion_photo((224, 224), (0.3, 0.3, 0.7, 0.7))
    return img, box, np.asarray(img, np.float32)


def test_nested_model_heatmap_shape_range_and_class(nested_classifier, photo):
    _, _, x = photo
    cam = gradcam.grad_cam(nested_classifier, x)
    assert cam.heatmap.shape == (7, 7)
    assert cam.heatmap.dtype == np.float32
    assert cam.heatmap.min() >= 0.0 and cam.heatmap.max() <= 1.0
    assert cam.probabilities.shape == (7,)
    assert cam.class_index == int(np.argmax(nested_classifier(x[None]).numpy()[0]))
    # Any class on request, and a different class gives a different map.
    other = (cam.class_index + 1) % 7
    cam_other = gradcam.grad_cam(nested_classifier, x, class_index=other)
    assert cam_other.class_index == other
    assert not np.allclose(cam.heatmap, cam_other.heatmap)


def test_flat_model_matches_imagenet_logits_path(flat_classifier):
    """On the cat photo the predicted ImageNet class is a cat and the heat sits on the cat's face."""
    from skimage.data import chelsea

    img = Image.fromarray(chelsea()).resize((224, 224), Image.Resampling.BICUBIC)
    cam = gradcam.grad_cam(flat_classifier, np.asarray(img, np.float32))
    assert 281 <= cam.class_index <= 285
    assert cam.heatmap.max() == pytest.approx(1.0)
    # The cat's head is in the left-centre of the photo; the right third is mostly background.
    up = gradcam.upsample(cam.heatmap, (224, 224))
    assert up[:, :150].sum() > up[:, 150:].sum()


def test_bad_requests_raise_clear_errors(nested_classifier, photo):
    _, _, x = photo
    with pytest.raises(ValueError, match="out of range"):
        gradcam.grad_cam(nested_classifier, x, class_index=7)
    with pytest.raises(ValueError, match="not found"):
        gradcam.grad_cam(nested_classifier, x, layer_name="no_such_layer")
    with pytest.raises(ValueError, match="one \\(H, W, 3\\)"):
        gradcam.grad_cam(nested_classifier, x[None])


def test_overlay_png_and_frame_placement(photo):
    img, box, _ = photo
    heat = np.zeros((7, 7), np.float32)
    heat[2:5, 2:5] = 1.0
    png = gradcam.overlay_png(img, heat)
    out = Image.open(io.BytesIO(png))
    assert out.format == "PNG" and out.size == img.size and out.mode == "RGB"
    # Where the map is zero the photo is unchanged; where it is hot, it is not.
    arr, base = np.asarray(out, np.int16), np.asarray(img, np.int16)
    assert np.abs(arr[5, 5] - base[5, 5]).max() <= 1
    assert np.abs(arr[112, 112] - base[112, 112]).max() > 20
    # A crop's heatmap put back into the whole photo lands inside the crop region only.
    framed = gradcam.place_in_frame(heat, (400, 300), (100, 50, 300, 250))
    assert framed.shape == (300, 400)
    assert framed[:50].sum() == 0 and framed[:, :100].sum() == 0 and framed[150, 200] > 0.9


def test_mass_in_box_against_uniform():
    uniform = np.ones((70, 70), np.float32)
    box = (0.2, 0.2, 0.6, 0.7)
    assert gradcam.mass_in_box(uniform, box) == pytest.approx(0.4 * 0.5, abs=0.02)
    focused = np.zeros((70, 70), np.float32)
    focused[20:40, 20:35] = 1.0
    assert gradcam.mass_in_box(focused, box) == pytest.approx(1.0)
    assert gradcam.mass_in_box(np.zeros((7, 7)), box) == 0.0
