"""The shared preprocessing: safe decoding, orientation, crops, colour constancy, identical tensors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dermaloop.preprocess import (
    SYMMETRIES,
    ImageError,
    PreprocessConfig,
    crop_box,
    load_image,
    preprocess_file,
    shades_of_grey,
    symmetric_image,
    symmetric_pixels,
    to_model_input,
)


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


def _two_tone(w: int = 64, h: int = 48) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (200, 40, 40)  # left half red
    a[:, w // 2 :] = (40, 40, 200)  # right half blue
    return Image.fromarray(a)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    img = load_image(_jpeg(_two_tone(), exif=exif))
    assert img.size == (48, 64) and img.mode == "RGB"
    top = np.asarray(img)[2, 24]
    assert top[0] > 150 and top[2] < 100  # the red half is on top once upright


def test_path_and_bytes_give_the_same_tensor(tmp_path):
    data = _jpeg(_two_tone(300, 200))
    (tmp_path / "a.jpg").write_bytes(data)
    cfg = PreprocessConfig(size=32, colour_constancy=True)
    a, b = preprocess_file(tmp_path / "a.jpg", cfg), preprocess_file(data, cfg)
    assert a.dtype == np.float32 and a.shape == (32, 32, 3)
    np.testing.assert_array_equal(a, b)
    # integer-valued pixels: the uint8 TFLite input is the same numbers
    np.testing.assert_array_equal(a.astype(np.uint8).astype(np.float32), a)


@pytest.mark.parametrize("bad", [b"", b"not an image", _jpeg(_two_tone())[:200]])
def test_unreadable_input_is_a_clear_error(bad):
    with pytest.raises(ImageError):
        load_image(bad)


def test_missing_file_and_wrong_type(tmp_path):
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(TypeError):
        load_image(12345)  # type: ignore[arg-type]


def test_unsupported_format():
    buf = io.BytesIO()
    _two_tone().save(buf, "GIF")
    with pytest.raises(ImageError, match="unsupported"):
        load_image(buf.getvalue())


def test_decompression_bomb_is_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("1", (11000, 11000)).save(buf, "PNG")  # 121 MP of zeros: a few kB on disk
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(ImageError, match="too many pixels|MP"):
        load_image(buf.getvalue())
    with pytest.raises(ImageError, match="limit"):
        load_image(_jpeg(_two_tone(300, 200)), max_pixels=10_000)


def test_large_jpeg_decodes_in_draft_mode():
    big = Image.new("RGB", (4000, 3000), (120, 80, 60))
    img = load_image(_jpeg(big))
    assert 1024 <= min(img.size) < 3000 and img.size[0] / img.size[1] == pytest.approx(4 / 3, rel=0.01)
    full = load_image(_jpeg(big), draft_min_side=None)
    assert full.size == (4000, 3000)


def test_alpha_and_sixteen_bit_become_sensible_rgb():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    assert np.asarray(load_image(buf.getvalue())).min() == 255  # transparent -> white, not black
    grey16 = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    buf = io.BytesIO()
    grey16.save(buf, "PNG")
    assert np.asarray(load_image(buf.getvalue())).min() == 255


def test_centre_crop_and_box_crop():
    assert crop_box(200, 100) == (50.0, 0.0, 150.0, 100.0)
    left, top, right, bottom = crop_box(200, 100, box=(0.0, 0.0, 0.1, 0.2))
    assert left == 0.0 and top == 0.0 and right - left == pytest.approx(bottom - top)
    x = to_model_input(_two_tone(200, 100), 16, box=(0.6, 0.2, 0.9, 0.8))
    assert x[..., 2].mean() > 150 and x[..., 0].mean() < 60  # inside the blue half
    with pytest.raises(ValueError, match="fractions"):
        to_model_input(_two_tone(), 16, box=(10, 10, 50, 40))


def test_shades_of_grey_removes_a_colour_cast():
    rng = np.random.default_rng(0)
    scene = rng.uniform(40, 200, size=(32, 32, 1)) * np.ones((1, 1, 3))
    cast = scene * np.array([1.0, 0.8, 0.6])
    balanced = shades_of_grey(cast)
    means = balanced.mean(axis=(0, 1))
    assert means.max() - means.min() < 0.02 * means.mean()
    assert np.ptp(cast.mean(axis=(0, 1))) > 0.3 * cast.mean()


@pytest.mark.parametrize("name", SYMMETRIES)
def test_each_symmetry_means_the_same_on_images_and_on_model_inputs(name):
    """Training views are PIL transposes of the photo; the cloud runtime's test-time views transform
    the model input array. Both must be the same symmetry, or TTA averages over something the
    thresholds were never fitted on."""
    rng = np.random.default_rng(7)
    photo = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    cfg = PreprocessConfig(size=48)
    via_photo = to_model_input(symmetric_image(photo, name), config=cfg)
    model_input = to_model_input(photo, config=cfg)[None]
    # Resizing runs one axis then the other, rounding in between, so the four axis-swapping symmetries
    # differ by rounding (mean 0.2 of 255 on pure noise); any other symmetry differs by ~85.
    for other in SYMMETRIES:
        gap = np.abs(via_photo - symmetric_pixels(model_input, other)[0]).mean()
        assert (gap < 0.5) if other == name else (gap > 20), (other, gap)


def test_the_eight_symmetries_are_distinct_and_unknown_names_are_refused():
    a = np.arange(2 * 3 * 3 * 1).reshape(2, 3, 3, 1)
    outs = {symmetric_pixels(a, n).tobytes() for n in SYMMETRIES}
    assert len(outs) == 8
    with pytest.raises(ValueError, match="unknown symmetry"):
        symmetric_pixels(a, "rot45")
    with pytest.raises(ValueError, match="unknown symmetry"):
        symmetric_image(Image.new("RGB", (2, 2)), "rot45")
