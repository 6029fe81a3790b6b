"""``dermaloop diagnose``: the on-device path end to end through the real CLI entry point, with the
real analysis TFLite model and a small TFLite classifier in a model directory."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermaloop.cli import main
from tests.example_photos import document_photo, lesion_photo

pytest.importorskip("tensorflow")


@pytest.fixture(scope="session")
def models_dir(analysis_models_dir) -> Path:
    return analysis_models_dir


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    from tests.worker_support import tiny_device_model_dir

    return tiny_device_model_dir(tmp_path_factory.mktemp("model") / "tiny-1")


@pytest.fixture()
def env(models_dir, monkeypatch):
    monkeypatch.setenv("DERMALOOP_MODELS_DIR", str(models_dir))
    return models_dir


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.strip().splitlines()]


def test_json_lines_for_a_lesion_and_a_document(env, model_dir, tmp_path, capsys):
    lesion, _ = lesion_photo((640, 480), (0.3, 0.25, 0.7, 0.75), seed=5)
    a = _save(lesion, tmp_path / "spot.jpg", quality=92)
    b = _save(document_photo(), tmp_path / "doc.png")
    code = main(["diagnose", str(a), str(b), "--model", str(model_dir), "--json"])
    assert code == 0
    first, second = _json_lines(capsys.readouterr().out)
    for rec in (first, second):
        assert set(rec) >= {"quality", "lesion", "box", "top", "risk", "timings_ms"}
        assert set(rec["quality"]) >= {"ok", "issues"} and isinstance(rec["quality"]["issues"], list)
        assert set(rec["lesion"]) == {"is_lesion", "score"} and 0 <= rec["lesion"]["score"] <= 1
        assert rec["timings_ms"]["total"] > 0 and "decode" in rec["timings_ms"] and "analyse" in rec["timings_ms"]
    assert second["file"].endswith("doc.png")
    assert second["lesion"]["is_lesion"] is False
    assert second["top"] == [] and second["risk"] is None and "does not look like" in second["message"]
    if first["lesion"]["is_lesion"]:  # the synthetic spot is not dermoscopy; it may be declined
        assert len(first["top"]) == 3 and first["risk"] in ("low", "moderate", "high")
        assert sum(t["p"] for t in first["top"]) <= 1.0 + 1e-6
        assert all(set(t) == {"label", "name", "p"} for t in first["top"])


def test_forced_classification_and_box_fractions(env, model_dir, tmp_path, capsys):
    lesion, _ = lesion_photo((400, 300), (0.3, 0.25, 0.7, 0.75), seed=6)
    a = _save(lesion, tmp_path / "spot.png")
    assert main(["diagnose", str(a), "--model", str(model_dir), "--json", "--force"]) == 0
    (rec,) = _json_lines(capsys.readouterr().out)
    assert len(rec["top"]) == 3 and rec["risk"] in ("low", "moderate", "high")
    assert rec["model_version"] == "tiny-1"
    if rec["box"] is not None:
        x0, y0, x1, y1 = rec["box"]
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        assert "infer" in rec["timings_ms"] and "classify" in rec["timings_ms"]


def test_no_localisation_baseline_and_human_output(env, model_dir, tmp_path, capsys):
    lesion, _ = lesion_photo(seed=7)
    a = _save(lesion, tmp_path / "spot.jpg")
    assert main(["diagnose", str(a), "--model", str(model_dir), "--no-localise"]) == 0
    out = capsys.readouterr().out
    assert "spot.jpg:" in out and "quality:" in out and "not a diagnosis" in out and "analyse" not in out


def test_unreadable_input_gives_a_clear_message_and_non_zero_exit(env, model_dir, tmp_path, capsys):
    good = _save(lesion_photo()[0], tmp_path / "ok.png")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image")
    missing = tmp_path / "missing.jpg"
    code = main(["diagnose", str(good), str(junk), str(missing), "--model", str(model_dir), "--json"])
    captured = capsys.readouterr()
    assert code == 1
    lines = _json_lines(captured.out)
    assert len(lines) == 3 and "quality" in lines[0]
    assert lines[1]["file"].endswith("junk.jpg") and "not a readable image" in lines[1]["error"]
    assert "cannot read" in lines[2]["error"]
    assert "junk.jpg" in captured.err


def test_missing_model_dir_is_reported(env, tmp_path, capsys):
    img = _save(lesion_photo()[0], tmp_path / "ok.png")
    assert main(["diagnose", str(img), "--model", str(tmp_path / "nope")]) == 2
    assert "cannot load the models" in capsys.readouterr().err


def test_without_any_classifier_only_checks_run(env, tmp_path, capsys):
    img = _save(lesion_photo()[0], tmp_path / "ok.png")
    assert main(["diagnose", str(img), "--json", "--force"]) == 0
    captured = capsys.readouterr()
    (rec,) = _json_lines(captured.out)
    assert rec["top"] == [] and rec["risk"] is None and "No device model" in rec["message"]
    assert "no device model found" in captured.err


def _png16(path: Path) -> Path:
    a = (np.linspace(0, 65535, 256 * 192).reshape(192, 256)).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in a)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 256, 192, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _bomb_png(path: Path) -> Path:
    """A valid PNG header claiming 40000 x 40000 pixels (1.6 GP) with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))
    return path


def test_bad_inputs_never_crash(env, model_dir, tmp_path, capsys):
    lesion, _ = lesion_photo((400, 300))
    buf = io.BytesIO()
    lesion.save(buf, format="JPEG", quality=90)
    files = {
        "tiny.png": _save(lesion.resize((12, 9)), tmp_path / "tiny.png"),
        "grey.jpg": _save(lesion.convert("L"), tmp_path / "grey.jpg"),
        "cmyk.jpg": _save(lesion.convert("CMYK"), tmp_path / "cmyk.jpg"),
        "alpha.png": _save(lesion.convert("RGBA"), tmp_path / "alpha.png"),
        "palette.png": _save(lesion.convert("P"), tmp_path / "palette.png"),
        "16bit.png": _png16(tmp_path / "16bit.png"),
        "truncated.jpg": tmp_path / "truncated.jpg",
        "bomb.png": _bomb_png(tmp_path / "bomb.png"),
        "empty.jpg": tmp_path / "empty.jpg",
        "huge.jpg": tmp_path / "huge.jpg",
    }
    files["truncated.jpg"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    files["empty.jpg"].write_bytes(b"")
    Image.new("RGB", (6000, 4500), (200, 150, 130)).save(files["huge.jpg"], quality=70)
    code = main(["diagnose", *map(str, files.values()), "--model", str(model_dir), "--json"])
    lines = {Path(r["file"]).name: r for r in _json_lines(capsys.readouterr().out)}
    assert code == 1 and set(lines) == set(files)
    for name in ("truncated.jpg", "bomb.png", "empty.jpg"):
        assert "error" in lines[name] and lines[name]["error"], name
    assert lines["tiny.png"]["quality"]["issues"] == ["low_resolution"] and lines["tiny.png"]["top"] == []
    for name in ("grey.jpg", "cmyk.jpg", "alpha.png", "palette.png", "16bit.png", "huge.jpg"):
        assert "quality" in lines[name], (name, lines[name])
    # A blank 27 MP frame is decoded in draft mode and declined as not skin, not crashed on.
    assert lines["huge.jpg"]["lesion"]["is_lesion"] is False


def test_models_dir_without_a_localiser_builds_one(tmp_path, monkeypatch, models_dir, capsys):
    """First run on a fresh machine: the analysis model is found (here: copied) under the models dir."""
    target = tmp_path / "fresh"
    shutil.copytree(models_dir, target)
    monkeypatch.setenv("DERMALOOP_MODELS_DIR", str(target))
    img = _save(document_photo(), tmp_path / "doc.png")
    assert main(["diagnose", str(img), "--json"]) == 0
    (rec,) = _json_lines(capsys.readouterr().out)
    assert rec["lesion"]["is_lesion"] is False


def test_human_output_explains_a_call_that_is_not_the_most_probable():
    from dermaloop.diagnose_cli import _human

    res = {"quality": {"ok": True, "issues": []}, "lesion": {"score": None}, "box": None, "risk": "moderate",
           "message": None, "timings_ms": {},
           "top": [{"label": "mel", "name": "Melanoma", "p": 0.31}, {"label": "nv", "name": "Mole", "p": 0.52}]}
    text = _human("a.jpg", res)
    assert "Melanoma is listed first on purpose" in text and "not a diagnosis" in text
    res["top"] = res["top"][::-1]
    assert "on purpose" not in _human("a.jpg", res)


_ON_DEVICE_SNIPPET = """
import json, sys
from dermaloop.analysis.on_device import open_device_path
path = open_device_path(sys.argv[1], sys.argv[2])
result = path.run(sys.argv[3], force=True)
heavy = sorted(m for m in ("keras", "tensorflow", "training") if m in sys.modules)
print(json.dumps({"answer": result.to_json(), "record": result.case_record(at=1), "heavy": heavy}))
"""


def test_the_public_on_device_factory_needs_no_keras_and_answers_as_diagnose_does(env, model_dir, tmp_path,
                                                                                     capsys):
    """What a phone build runs: a fresh process opens the whole device path through the public
    factory, answers, and has loaded neither Keras, TensorFlow nor the training package."""
    import subprocess
    import sys

    from dermaloop.settings import PROJECT_ROOT

    photo = _save(lesion_photo((640, 480), (0.3, 0.25, 0.7, 0.75), seed=5)[0], tmp_path / "spot.jpg", quality=92)
    done = subprocess.run([sys.executable, "-c", _ON_DEVICE_SNIPPET, str(env), str(model_dir), str(photo)],
                          capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert main(["diagnose", str(photo), "--model", str(model_dir), "--json", "--force"]) == 0
    (cli,) = _json_lines(capsys.readouterr().out)
    answer = out["answer"]
    assert [t["label"] for t in answer["top"]] == [t["label"] for t in cli["top"]]
    assert answer["risk"] == cli["risk"] and answer["box"] == cli["box"] and answer["quality"] == cli["quality"]
    record = out["record"]  # the case's device field, in the shape database.rules.json accepts
    assert record["modelVersion"] == "tiny-1" and record["at"] == 1 and len(record["top"]) == 3


def test_a_missing_analysis_model_is_a_clear_error(tmp_path, model_dir):
    from dermaloop.analysis.on_device import AnalysisModelMissing, open_device_path

    with pytest.raises(AnalysisModelMissing, match="dermaloop run"):
        open_device_path(tmp_path, model_dir)
    path = open_device_path(tmp_path, model_dir, localise=False)
    assert path.analyser is None and path.classifier.version == "tiny-1"


def test_human_output_says_unsure_when_the_abstain_rule_does():
    from dermaloop.diagnose_cli import _human

    res = {"quality": {"ok": True, "issues": []}, "lesion": {"score": None}, "box": None, "risk": "moderate",
           "message": None, "timings_ms": {}, "top": [{"label": "mel", "name": "Melanoma", "p": 0.69}],
           "unsure": True, "prediction_set": ["mel", "nv"]}
    assert "UNSURE: prediction set mel, nv: the model cannot tell these apart" in _human("a.jpg", res)
    res["prediction_set"] = []
    assert "UNSURE: empty prediction set" in _human("a.jpg", res)
    res["unsure"] = False
    assert "UNSURE" not in _human("a.jpg", res)
    res.update(unsure=True, demonstration=True)  # a demonstration model claims no calibrated doubt
    assert "UNSURE" not in _human("a.jpg", res)
