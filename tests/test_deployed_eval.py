"""``dermaloop evaluate --as-deployed``: photo by photo, the evaluation's answers are what
``dermaloop diagnose --json`` prints (run as a real subprocess) and what the worker's pipeline
records, and the photos the gates decline are counted, never dropped."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermaloop.risk import RiskPolicy
from dermaloop.settings import PROJECT_ROOT
from dermaloop.taxonomy import load_taxonomy
from tests.conftest import HAM10000
from training.datasets import Dataset, Sample, open_dataset

pytest.importorskip("tensorflow")

FLOAT_TOLERANCE = 1e-5  # batched vs one-at-a-time and Grad-CAM vs plain graphs differ in the last digits


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, int]:
    """A fixed folder-per-class set: one real HAM10000 photo per class when the folder is here (the
    gates accept those), plus photos every gate declines: synthetic spots (not skin to the model),
    a document, a thumbnail too small to judge, and a file that is not an image."""
    from tests.example_photos import document_photo
    from tests.worker_support import lesion_jpeg

    root = tmp_path_factory.mktemp("photos")
    real = 0
    if (HAM10000 / "metadata.csv").is_file():
        with open(HAM10000 / "metadata.csv") as f:
            first: dict[str, str] = {}
            for row in csv.DictReader(f):
                first.setdefault(row["dx"], row["image_id"])
        for dx, image_id in sorted(first.items()):
            (root / dx).mkdir(exist_ok=True)
            shutil.copy(HAM10000 / "images" / f"{image_id}.jpg", root / dx / f"{image_id}.jpg")
            real += 1
    for dx in ("mel", "nv", "bcc"):
        (root / dx).mkdir(exist_ok=True)
    (root / "mel" / "spot.jpg").write_bytes(lesion_jpeg(3))
    document_photo().save(root / "nv" / "document.png")
    Image.new("RGB", (40, 30), (200, 150, 130)).save(root / "mel" / "thumbnail.png")
    (root / "bcc" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root, real


ABSTAIN = {"method": "lac", "coverage": 0.9, "qhat": 0.85, "n_calib": 100}  # in the set when p >= 0.15


def _with_abstain_rule(model_dir: Path, kind: str) -> Path:
    """The card gets an abstain rule, so the answers compared below carry ``unsure`` and the set."""
    card = json.loads((model_dir / "card.json").read_text())
    card[kind]["abstain"] = ABSTAIN
    (model_dir / "card.json").write_text(json.dumps(card))
    return model_dir


@pytest.fixture(scope="module")
def device_model(tmp_path_factory) -> Path:
    from tests.worker_support import tiny_device_model_dir

    return _with_abstain_rule(tiny_device_model_dir(tmp_path_factory.mktemp("device") / "tiny-device"), "device")


@pytest.fixture(scope="module")
def cloud_model(tmp_path_factory) -> Path:
    from tests.worker_support import tiny_model_dir

    return _with_abstain_rule(tiny_model_dir(tmp_path_factory.mktemp("cloud") / "tiny-cloud"), "cloud")


def _dataset(root: Path) -> Dataset:
    return open_dataset(root, load_taxonomy("ham10000"))


def _check_gates(found, real: int) -> None:
    by_name = {Path(p.file).name: p for p in found}
    assert by_name["broken.jpg"].status == "unreadable"
    assert by_name["thumbnail.png"].status == "declined" and by_name["thumbnail.png"].reason == "low_resolution"
    assert by_name["document.png"].status == "declined" and by_name["document.png"].reason == "not_skin"
    assert by_name["spot.jpg"].status == "declined"
    classified = [p for p in found if p.status == "classified"]
    if real:  # real dermoscopy passes the gates (at most one in 25 is declined on HAM10000)
        assert len(classified) >= real - 1
    for p in classified:
        assert p.probs is not None and p.probs.shape == (7,) and abs(p.probs.sum() - 1) < 1e-4
        assert p.called is not None and p.cropped is not None


def _close(a, b, path: str = "") -> None:
    """Equal, except floats within FLOAT_TOLERANCE."""
    if isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None and abs(a - b) <= FLOAT_TOLERANCE, (path, a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, sorted(a), sorted(b))
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def test_device_answers_equal_diagnose_json_photo_by_photo(photos, device_model, analysis_models_dir):
    from training.deployed_eval import open_device, run_device

    root, real = photos
    dataset = _dataset(root)
    found = run_device(open_device(device_model, analysis_models_dir), dataset.samples, progress=False)
    assert [p.id for p in found] == [s.id for s in dataset.samples]  # nothing dropped
    _check_gates(found, real)

    env = {**os.environ, "DERMALOOP_MODELS_DIR": str(analysis_models_dir), "TF_CPP_MIN_LOG_LEVEL": "3"}
    files = [str(s.path) for s in dataset.samples]
    proc = subprocess.run([sys.executable, "-m", "dermaloop", "diagnose", *files, "--model", str(device_model),
                           "--json"], capture_output=True, text=True, env=env, cwd=PROJECT_ROOT)
    assert proc.returncode == 1, proc.stderr  # 1: one file could not be read (broken.jpg)
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["file"] for r in printed] == files
    taxonomy = load_taxonomy("ham10000")
    for p, line in zip(found, printed, strict=True):
        line.pop("file")
        line.pop("timings_ms", None)
        assert p.answer == line  # exactly what diagnose prints, rounding included
        if p.status == "classified":
            assert line["top"][0]["label"] == taxonomy.ids[p.called]
            for t in line["top"]:
                assert t["p"] == round(float(p.probs[taxonomy.ids.index(t["label"])]), 4)
            members = [c for c in taxonomy.ids if p.probs[taxonomy.ids.index(c)] >= 0.15]
            assert sorted(line["prediction_set"]) == sorted(members)
            assert line["unsure"] is (members != [taxonomy.ids[p.called]])
        else:
            assert line.get("top") in ([], None) and "unsure" not in line


def test_cloud_answers_equal_the_workers_records_photo_by_photo(photos, cloud_model, analysis_models_dir):
    from cloud_worker.checks import load_checks
    from cloud_worker.errors import JobError
    from cloud_worker.model import load_model
    from cloud_worker.pipeline import infer, prepare, record
    from training.deployed_eval import open_cloud, run_cloud

    root, real = photos
    dataset = _dataset(root)
    checks, model = open_cloud(cloud_model, analysis_models_dir)
    found = run_cloud(checks, model, dataset.samples, batch_size=4, progress=False)
    assert [p.id for p in found] == [s.id for s in dataset.samples]
    _check_gates(found, real)

    # The worker as deployed: its own loaders, one photo per call, Grad-CAM on (the default).
    worker_checks, worker_model = load_checks(analysis_models_dir), load_model(cloud_model)
    ids = [label.id for label in worker_model.labels]
    for p, sample in zip(found, dataset.samples, strict=True):
        try:
            item = prepare(sample.path.read_bytes(), worker_checks)
        except JobError as exc:
            assert p.status == "unreadable" and exc.permanent and p.answer == {"error": str(exc)}
            continue
        result = infer(worker_model, [item], explain=True)[0]
        written = record(item, result, None, 0)
        written.pop("timingsMs")
        written.pop("at")
        _close(p.answer, written)
        if p.status == "classified":
            assert written["top"][0]["label"] == ids[p.called]
            assert np.allclose(p.probs, result.probs, atol=FLOAT_TOLERANCE)
            assert isinstance(written["unsure"], bool) and written["predictionSet"]
        else:
            assert written["probs"] is None and written["top"] == [] and "unsure" not in written


def test_the_cli_reports_declined_photos_and_the_centre_square(photos, device_model, analysis_models_dir, tmp_path,
                                                                capsys):
    from dermaloop.cli import main

    root, real = photos
    if not real:
        pytest.skip(f"HAM10000 folder not found at {HAM10000}: the synthetic photos are all declined, no report")
    out = tmp_path / "report"
    code = main(["evaluate", "--as-deployed", "--model", str(device_model), "--data", str(root), "--out", str(out),
                 "--models-dir", str(analysis_models_dir), "--quiet"])
    assert code == 0, capsys.readouterr().out
    said = capsys.readouterr().out
    assert "as deployed: balanced accuracy" in said and "centre square" in said
    lines = [json.loads(line) for line in (out / "photos.jsonl").read_text().splitlines()]
    assert len(lines) == len(_dataset(root).samples)
    deployed = json.loads((out / "metrics.json").read_text())["deployed"]
    gates = deployed["gates"]
    for cid, g in gates.items():
        mine = [r for r in lines if r["label"] == cid]
        assert g["n"] == len(mine) == g["classified"] + g["declined"] + g["unreadable"]
        assert g["declined"] == sum(r["status"] == "declined" for r in mine)
    assert gates["mel"]["reasons"].get("low_resolution") == 1 and gates["bcc"]["unreadable"] == 1
    n_classified = sum(r["status"] == "classified" for r in lines)
    assert deployed["classified"]["n"] == n_classified == deployed["declined_as_wrong"]["classified"]
    assert deployed["declined_as_wrong"]["n"] == len(lines)
    centre = deployed["centre_square"]
    assert centre["centre_all"]["n"] == len(lines) - 1  # every readable photo
    assert centre["centre_same_photos"]["n"] == n_classified
    report = (out / "report.md").read_text()
    assert "## Deployed path" in report and "| all | " in report and "declined = wrong" in report
    assert "### Abstain rule" in report and deployed["abstain"]["rule"] == ABSTAIN
    assert sum(b["n"] for b in deployed["by_crop"]) == n_classified
    assert all(0 < r["crop_share"] <= 1 for r in lines if r["status"] == "classified")
    assert all(len(r["centre_probs"]) == 7 for r in lines if r["status"] != "unreadable")
    assert deployed["abstain"]["n"] == n_classified


def test_declined_photos_count_as_wrong_answers():
    from training.deployed_eval import Photo, declined_as_wrong, gate_counts

    taxonomy = load_taxonomy("ham10000")
    mel, nv = taxonomy.ids.index("mel"), taxonomy.ids.index("nv")
    policy = RiskPolicy(1.0, tuple(taxonomy.malignant_mask), 0.5, 0.8)

    def probs(c: int) -> np.ndarray:
        p = np.full(7, 0.02)
        p[c] = 0.88
        return p

    found = [Photo("a", "a", mel, "classified", None, probs(mel), mel, True, {}),
             Photo("b", "b", mel, "declined", "blurry", None, None, None, {}),
             Photo("c", "c", mel, "classified", None, probs(nv), nv, False, {}),
             Photo("d", "d", nv, "classified", None, probs(nv), nv, True, {}),
             Photo("e", "e", nv, "unreadable", "unreadable", None, None, None, {})]
    figures = declined_as_wrong(found, taxonomy, policy)
    assert figures["per_class_recall"]["mel"] == pytest.approx(1 / 3)
    assert figures["per_class_recall"]["nv"] == pytest.approx(1 / 2)
    assert figures["balanced_accuracy"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert figures["malignant_sensitivity"] == pytest.approx(1 / 3)  # the blurred melanoma is a miss
    assert figures["malignant_specificity"] == pytest.approx(1 / 2)  # the unreadable nevus is not cleared
    gates = gate_counts(found, taxonomy)
    assert gates["mel"] == {"n": 3, "classified": 2, "declined": 1, "unreadable": 0, "reasons": {"blurry": 1},
                            "cropped": 1}
    assert gates["nv"]["unreadable"] == 1 and gates["df"]["n"] == 0


def test_limit_draws_the_same_subset_every_time():
    from training.deployed_eval import limit_samples

    taxonomy = load_taxonomy("ham10000")
    ds = Dataset([Sample(f"s{i}", Path(f"{i}.jpg"), i % 7, f"g{i}") for i in range(50)], taxonomy, "x", "folder")
    a, b = limit_samples(ds, 10), limit_samples(ds, 10)
    assert [s.id for s in a.samples] == [s.id for s in b.samples] and len(a) == 10
    assert [s.id for s in a.samples] != [f"s{i}" for i in range(10)]  # drawn at random, not the first ten
    assert limit_samples(ds, 100) is ds
    with pytest.raises(ValueError, match="at least 1"):
        limit_samples(ds, 0)
