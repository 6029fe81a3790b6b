"""The patient app's photo intake (``client.photos.prepare``): every kind of file a phone or a
desktop can hand over gets either a clean upright JPEG without metadata or a message in plain words."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image

from client import photos, wording
from client.photos import MAX_SIDE, KeptCopy, PhotoError, check_size, decode, prepare
from dermaloop import cases
from dermaloop.preprocess import MAX_BYTES


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _skin(size=(640, 480)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.normal(160, 20, (size[1], size[0], 3))).clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("data, expected", [
    (b"", "is empty"),
    (b"GIF89a not really", "not a photo this app can read"),
    (b"%PDF-1.4 hello", "not a photo this app can read"),
])
def test_unusable_files_get_a_plain_message(data, expected):
    with pytest.raises(PhotoError, match=expected):
        prepare(data, "spot.jpg")


@pytest.mark.parametrize("data, expected", [
    (b"", "is empty"),
    (b"GIF89a not really", "not a photo this app can read"),
])
def test_the_quick_decode_gives_the_same_messages(data, expected):
    with pytest.raises(PhotoError, match=expected):
        decode(data, "spot.jpg", draft=True)


def test_a_file_is_refused_by_its_size_before_it_is_sent():
    check_size(MAX_BYTES, "spot.jpg")
    with pytest.raises(PhotoError, match="spot.jpg is empty"):
        check_size(0, "spot.jpg")
    with pytest.raises(PhotoError, match=f"too large .*under {MAX_BYTES // 1_000_000} MB"):
        check_size(MAX_BYTES + 1, "spot.jpg")


def test_the_quick_decode_of_a_12_mp_photo_is_small_and_upright_like_the_kept_copy():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    data = _encode(_skin((4000, 3000)), "JPEG", quality=85, exif=exif)
    quick = decode(data, "big.jpg", draft=True)
    kept = prepare(data, "big.jpg")
    assert (kept.width, kept.height) == (3000, 4000)
    assert quick.size == (1500, 2000)  # half scale: both sides stay >= 1024 px for the device model
    assert quick.mode == "RGB"


def test_previews_of_a_stored_12_mp_photo_come_from_a_small_decode_at_full_preview_size(tmp_path):
    from client.app import preview_png_from_file
    from client.device import PREVIEW_SIDE, thumbnail_png

    stored = tmp_path / "image.jpg"
    stored.write_bytes(prepare(_encode(_skin((4000, 3000)), "JPEG", quality=85)).jpeg)
    preview = Image.open(io.BytesIO(preview_png_from_file(stored, [0.25, 0.25, 0.75, 0.75])))
    assert preview.size == (PREVIEW_SIDE, PREVIEW_SIDE * 3 // 4)
    r, _, b = np.asarray(preview)[PREVIEW_SIDE * 3 // 16, PREVIEW_SIDE // 2].astype(int)  # the box's top edge
    assert b > 200 and r < 100  # the cyan box line (JPEG blurs its colour a little) on grey-ish skin
    assert Image.open(io.BytesIO(thumbnail_png(stored))).size == (96, 72)
    assert preview_png_from_file(tmp_path / "gone.jpg", None) is None


def test_a_truncated_jpeg_is_called_damaged():
    data = _encode(_skin(), "JPEG", quality=90)
    with pytest.raises(PhotoError, match="damaged or incomplete"):
        prepare(data[: len(data) // 2], "spot.jpg")


@pytest.mark.parametrize("mode", ["RGBA", "CMYK", "I;16", "P", "L"])
def test_other_colour_modes_become_an_rgb_jpeg(mode):
    img = _skin().convert("RGBA" if mode == "RGBA" else "RGB")
    if mode == "I;16":
        arr = np.asarray(img.convert("L"), np.uint16) * 257
        img = Image.fromarray(arr).convert("I;16")
    elif mode != "RGBA":
        img = img.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    photo = prepare(_encode(img, fmt), f"spot.{fmt.lower()}")
    assert photo.image.mode == "RGB" and photo.content_type in cases.IMAGE_CONTENT_TYPES
    assert Image.open(io.BytesIO(photo.jpeg)).format == "JPEG" and len(photo.sha256) == 64


def test_a_40_mp_photo_is_scaled_down_and_exif_is_dropped():
    big = Image.new("RGB", (7744, 5184), (180, 140, 120))  # 40 MP
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    exif[0x8825] = {1: "N"}  # a GPS block a phone would add
    photo = prepare(_encode(big, "JPEG", quality=70, exif=exif), "big.jpg")
    assert max(photo.width, photo.height) == MAX_SIDE
    assert photo.height > photo.width  # upright: the EXIF rotation was applied
    assert not Image.open(io.BytesIO(photo.jpeg)).getexif()  # nothing of the phone's metadata leaves the device


def test_the_kept_copy_is_the_prepared_photo_made_once_in_the_background(monkeypatch):
    data = _encode(_skin(), "JPEG", quality=90)
    made = []
    real = photos.prepare
    monkeypatch.setattr(photos, "prepare", lambda d, n, decoded=None: made.append(n) or real(d, n, decoded))
    kept = KeptCopy(data, "spot.jpg")
    kept.start()
    kept.start()
    assert kept.result().sha256 == real(data, "spot.jpg").sha256
    assert made == ["spot.jpg"]


def test_a_kept_copy_that_fails_says_why_when_asked_for():
    kept = KeptCopy(b"%PDF-1.4 hello", "spot.jpg")  # result() starts it if nobody did
    with pytest.raises(PhotoError, match="not a photo this app can read"):
        kept.result()


def _heic(img: Image.Image, **kw) -> bytes:
    pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif (a dependency) is not installed here")
    pillow_heif.register_heif_opener()
    return _encode(img, "HEIF", quality=90, **kw)


def test_a_phone_heic_is_decoded_upright_like_a_jpeg():
    img = _skin((640, 480))
    img.paste((255, 0, 0), (0, 0, 80, 80))  # a red mark in the top-left corner as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # the phone was held upright: show it turned 90 degrees clockwise
    exif[0x8825] = {1: "N"}  # a GPS block a phone would add
    data = _heic(img, exif=exif.tobytes())
    assert data[4:12] == b"ftypheic"
    photo = prepare(data, "IMG_0001.HEIC")
    assert (photo.width, photo.height) == (480, 640)  # upright
    def red(x0: int, y0: int) -> float:  # the mean red of a 40 px square
        return float(np.asarray(photo.image.crop((x0, y0, x0 + 40, y0 + 40)))[..., 0].mean())

    assert red(photo.width - 60, 20) > 240 and red(20, 20) < 200  # the mark is now top-right
    stored = Image.open(io.BytesIO(photo.jpeg))
    assert stored.format == "JPEG" and photo.content_type == "image/jpeg" and not stored.getexif()


def test_a_photo_decoded_at_full_size_for_the_answer_is_not_decoded_again_for_the_kept_copy(monkeypatch):
    """A HEIC (and a PNG or a small JPEG) is decoded at full size for the answer already: the kept copy
    is made from that image. A large JPEG's answer comes from a draft decode, so it is decoded again."""
    heic = _heic(_skin((640, 480)))
    big_jpeg = _encode(_skin((4200, 3000)), "JPEG", quality=80)
    decodes = []
    real_decode = photos.decode
    monkeypatch.setattr(photos, "decode", lambda d, n="photo", **kw: decodes.append(n) or real_decode(d, n, **kw))
    for data, name, decoded_again in ((heic, "IMG_0004.HEIC", False), (big_jpeg, "big.jpg", True)):
        decodes.clear()
        answer_image = photos.decode(data, name, draft=True)
        full = photos.holds_every_pixel(data, answer_image)
        assert full is not decoded_again, name
        before = answer_image.copy()
        kept = KeptCopy(data, name, answer_image if full else None).result()
        assert decodes == [name, name] if decoded_again else decodes == [name]
        assert kept.sha256 == prepare(data, name).sha256  # the same copy either way
        assert answer_image.tobytes() == before.tobytes()  # the answer's picture is not touched
    assert not photos.holds_every_pixel(b"not an image", _skin())


def test_a_damaged_heic_is_called_damaged():
    data = _heic(_skin())
    with pytest.raises(PhotoError, match="damaged or incomplete"):
        prepare(data[: len(data) // 2], "IMG_0002.HEIC")
    with pytest.raises(PhotoError, match="damaged or incomplete"):
        prepare(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "IMG_0003.HEIC")


def test_without_the_heic_decoder_the_patient_is_told_how_to_send_a_jpeg(monkeypatch):
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # as on a machine without pillow-heif
    with pytest.raises(PhotoError, match="HEIC photo, which this app cannot read.*JPEG"):
        prepare(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "IMG_0004.HEIC")


def test_risk_and_state_wording_is_calibrated_and_says_not_a_diagnosis():
    assert "two weeks" in wording.risk_advice("high")[1]
    assert wording.risk_advice(None)[0] == "No risk estimate"
    assert wording.state_text("failed", {"reason": "corrupt_image"}).startswith("Analysis failed: The photo arrived")
    assert wording.state_text("diagnosed_on_device").startswith("On this device only")
    assert "not a diagnosis" in wording.disclaimer()
    assert set(wording.STATE_TEXT) == set(cases.Status)
