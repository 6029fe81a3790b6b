"""The release model shipped in ``models/release`` (issue 19): packing keeps it small without changing
what it says, and the shipped directory is whole, real and within its size budget."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dermaloop.model_dir import CARD, ModelDir, is_demonstration, sha256_file
from dermaloop.risk import RiskPolicy
from dermaloop.settings import PROJECT_ROOT
from tests.worker_support import tiny_model_dir
from training.release import pack

RELEASE = PROJECT_ROOT / "models" / "release"
BUDGET_BYTES = 40 * 1024 * 1024


def test_packing_halves_the_cloud_weights_and_keeps_the_answers(tmp_path):
    from cloud_worker.model import KerasCloudModel

    source = tiny_model_dir(tmp_path / "trained")
    (source / "device").mkdir(exist_ok=True)
    (source / "device" / "model_fp32.tflite").write_bytes(b"reference copy, left out")
    result = pack(source, tmp_path / "release")
    out = tmp_path / "release"
    assert result["max_probability_change"] < 1e-3
    assert not (out / "device" / "model_fp32.tflite").exists()
    card = json.loads((out / CARD).read_text())
    assert card["release"]["cloud_weights"].startswith("float16")
    for rel, digest in card["files"].items():
        assert sha256_file(out / rel) == digest, rel
    x = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    before, _ = KerasCloudModel(source).classify(x, explain=False)
    after, _ = KerasCloudModel(out).classify(x, explain=False)
    np.testing.assert_allclose(before, after, atol=1e-3)
    assert pack(source, tmp_path / "release")["version"] == result["version"]  # repacking replaces it whole


@pytest.mark.skipif(not (RELEASE / CARD).is_file(), reason="this checkout has no models/release (a trimmed clone)")
def test_the_shipped_release_model_is_whole_real_and_small():
    model = ModelDir.open(RELEASE)
    card = model.card
    assert not is_demonstration(card), "the release model must be trained on real images"
    for rel, digest in card["files"].items():
        assert sha256_file(RELEASE / rel) == digest, f"{rel} does not match its card"
    total = sum(p.stat().st_size for p in RELEASE.rglob("*") if p.is_file())
    assert total < BUDGET_BYTES, f"models/release is {total / 1e6:.1f} MB"
    for kind in ("device", "cloud"):
        metrics = card[kind]["metrics"]
        assert metrics["n"] > 1000 and 0 < metrics["balanced_accuracy"] <= 1, kind
    assert (RELEASE / "README.md").read_text().count(card["version"]) >= 1
    for kind in ("device", "cloud"):  # the tier's promise, fitted where patients' photos go
        policy = RiskPolicy.from_dict(card[kind]["risk"])
        assert policy.sensitivity_confidence == 0.95 and policy.moderate_threshold < policy.high_threshold, kind
        fit = card[kind]["policy_fit"]
        assert "as deployed" in fit["fitted_on"] and fit["calib_after"]["malignant_sensitivity"] >= 0.93, kind
        assert card[kind]["abstain"]["coverage"] == 0.9 and "as deployed" in card[kind]["abstain"]["fitted_on"], kind
