"""Dataset readers and lesion-grouped splits (synthetic data; the real HAM10000 when present)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from dermaloop.taxonomy import load_taxonomy
from training.datasets import detect_layout, grouped_split, open_dataset, read_reviewed_cases
from training.synthetic import _cues_for as cues_for
from training.synthetic import generate, render_lesion

HAM = load_taxonomy()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("syn"), per_class=10, photos_per_lesion=2, seed=3)


def test_synthetic_dataset_in_ham_layout(synthetic):
    ds = open_dataset(synthetic, HAM)
    assert ds.layout == "ham10000" and len(ds) == 70
    assert ds.class_counts() == {c: 10 for c in HAM.ids}
    assert len(set(ds.groups.tolist())) == 35  # two photos per lesion
    with open(synthetic / "metadata.csv") as f:
        row = next(csv.DictReader(f))
    mask = np.asarray(Image.open(synthetic / "masks" / f"{row['image_id']}_segmentation.png"))
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    assert float(row["box_x0"]) == pytest.approx(xs.min() / w, abs=1e-3)
    assert float(row["box_y1"]) == pytest.approx((ys.max() + 1) / h, abs=1e-3)
    assert all(s.box is not None for s in ds.samples)


def test_synthetic_classes_differ_in_their_cues():
    mel, _ = render_lesion(cues_for("mel", 4), seed=1)
    nv, nv_mask = render_lesion(cues_for("nv", 5), seed=1)
    vasc, vasc_mask = render_lesion(cues_for("vasc", 6), seed=1)
    assert mel.mean() < nv.mean()  # melanoma darker
    assert vasc[vasc_mask][:, 0].mean() > 1.5 * vasc[vasc_mask][:, 1].mean()  # vascular red
    assert nv_mask.sum() > 0


def test_grouped_split_keeps_lesions_together_and_stratifies(synthetic):
    ds = open_dataset(synthetic, HAM)
    parts = grouped_split(ds, val_fraction=0.2, calib_fraction=0.1, seed=0)
    assert sum(len(v) for v in parts.values()) == len(ds)
    groups = {k: set(ds.groups[v].tolist()) for k, v in parts.items()}
    assert not (groups["train"] & groups["val"]) and not (groups["calib"] & groups["val"])
    assert not (groups["train"] & groups["calib"])
    assert len(set(ds.labels[parts["val"]].tolist())) == len(HAM)  # every class in validation
    again = grouped_split(ds, seed=0)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)


def test_folder_layout(tmp_path):
    for cid in ("mel", "nv", "unknown"):
        (tmp_path / cid).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / cid / f"lesionA{i % 2}__{i}.jpg")
    ds = open_dataset(tmp_path, HAM)
    assert detect_layout(tmp_path) == "folder" and len(ds) == 6
    assert ds.skipped == {"folder 'unknown' not in taxonomy": 3}
    assert len(set(ds.groups.tolist())) == 4  # group = class folder + name before "__"


def test_isic2019_layout_maps_to_another_taxonomy(tmp_path):
    classes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    rows = [("ISIC_1", "MEL"), ("ISIC_2", "AK"), ("ISIC_3", "SCC"), ("ISIC_4", "NV")]
    with open(tmp_path / "ISIC_2019_Training_GroundTruth.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", *classes])
        for image, dx in rows:
            w.writerow([image, *[1.0 if c == dx else 0.0 for c in classes]])
            Image.new("RGB", (8, 8)).save(tmp_path / f"{image}.jpg")
    with open(tmp_path / "ISIC_2019_Training_Metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "age_approx", "lesion_id"])
        w.writerow(["ISIC_1", 50, "L1"])
        w.writerow(["ISIC_4", 40, "L1"])
    isic = open_dataset(tmp_path, load_taxonomy("isic2019"))
    assert len(isic) == 4 and isic.samples[2].label == isic.taxonomy.index("SCC")
    ham = open_dataset(tmp_path, HAM)  # AK -> akiec; SCC has no HAM class and is counted, not dropped silently
    assert [HAM.ids[s.label] for s in ham.samples] == ["mel", "akiec", "nv"]
    assert ham.skipped == {"class 'SCC' not in taxonomy": 1}
    assert ham.samples[0].group == ham.samples[2].group == "L1"


def test_reviewed_cases(tmp_path):
    cases = {
        "c1": {"patientUid": "u1", "consent": {"research": True}, "review": {"label": "mel"},
               "device": {"box": [0.1, 0.1, 0.5, 0.6]}},
        "c2": {"patientUid": "u1", "consent": {"research": True}, "review": {"label": "nv"}},
        "c3": {"patientUid": "u2", "consent": {"research": False}, "review": {"label": "nv"}},
        "c4": {"patientUid": "u3", "consent": {"research": True}, "review": {"label": "ungradable"}},
        "c5": {"patientUid": "u4", "consent": {"research": True}},
        "c6": {"patientUid": "u5", "consent": {"research": True}, "review": {"label": "bcc"}},
    }
    for cid in ("c1", "c2", "c3", "c4", "c5"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{cid}.jpg")
    ds = read_reviewed_cases(cases, tmp_path, HAM)
    assert [s.id for s in ds.samples] == ["c1", "c2"]
    assert ds.samples[0].group == ds.samples[1].group == "u1"
    assert ds.samples[0].box == (0.1, 0.1, 0.5, 0.6)
    assert ds.skipped == {"no research consent": 1, "no usable review label": 2, "image file missing": 1}
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "export" / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "export" / "images" / "c1.jpg")
    assert len(open_dataset(tmp_path / "export", HAM)) == 1


def test_bad_dataset_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        open_dataset(tmp_path / "nope", HAM)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="supported layout"):
        open_dataset(tmp_path / "empty", HAM)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metadata.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        open_dataset(tmp_path / "bad", HAM)


@pytest.mark.ham10000
def test_real_ham10000_split_is_lesion_grouped(ham10000):
    ds = open_dataset(ham10000, HAM)
    assert len(ds) == 10014 and len(set(ds.groups.tolist())) == 7470
    assert ds.class_counts()["nv"] == 6704 and ds.class_counts()["df"] == 115
    parts = grouped_split(ds, seed=0)
    groups = {k: set(ds.groups[v].tolist()) for k, v in parts.items()}
    assert not (groups["train"] & groups["val"]) and not (groups["calib"] & groups["val"])
    for k, v in parts.items():
        share = np.bincount(ds.labels[v], minlength=7) / len(v)
        overall = np.bincount(ds.labels, minlength=7) / len(ds)
        assert np.abs(share - overall).max() < 0.03, k  # stratified
    assert 0.18 < len(parts["val"]) / len(ds) < 0.22
