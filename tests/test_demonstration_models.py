"""A model trained on synthetic images must never speak with a risk tier's voice (issue 19): every
runtime marks its answers as a demonstration and gives no tier, and the rules accept the mark."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from dermaloop import cases
from dermaloop.analysis.device_classifier import load_device_classifier
from dermaloop.analysis.device_path import DevicePath
from dermaloop.database import UserDatabase, new_push_id
from dermaloop.model_dir import is_demonstration, load_device_model
from localbase.tokens import mint_id_token
from tests.worker_support import lesion_jpeg, tiny_device_model_dir, tiny_model_dir


def _mark(model_dir: Path, **fields) -> Path:
    card = json.loads((model_dir / "card.json").read_text())
    card.update(fields)
    (model_dir / "card.json").write_text(json.dumps(card))
    return model_dir


def test_what_counts_as_a_demonstration_model():
    assert is_demonstration({"demonstration": True})
    assert is_demonstration({"warning": "Trained on synthetic images: runnable, but ..."})  # older starters
    assert not is_demonstration({"warning": None}) and not is_demonstration({})


@pytest.mark.parametrize("demo", [False, True])
def test_the_device_answer_has_no_tier_when_the_model_is_a_demonstration(tmp_path, demo):
    model_dir = tiny_device_model_dir(tmp_path / "m")
    if demo:
        _mark(model_dir, demonstration=True)
    answer = load_device_model(model_dir, "fp32").diagnose(lesion_jpeg(1))
    assert answer["top"] and 0 <= answer["malignantP"] <= 1
    assert (answer["risk"] is None) == demo and (answer.get("demonstration") is True) == demo

    result = DevicePath(None, load_device_classifier(model_dir)).run(lesion_jpeg(2))
    assert result.top and result.demonstration == demo and (result.risk is None) == demo
    record = result.case_record(at=1)
    assert record.get("demonstration") is (True if demo else None)
    assert ("risk" in record) != demo


def test_the_cloud_model_and_its_record_give_no_tier_for_a_demonstration(tmp_path):
    from cloud_worker.model import KerasCloudModel

    model = KerasCloudModel(_mark(tiny_model_dir(tmp_path / "c"), warning="Trained on synthetic images"))
    assert model.demonstration
    probs, _ = model.classify(np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32),
                              explain=False)
    tier, malignant_p = model.risk(probs[0])
    assert tier is None and 0 <= malignant_p <= 1
    record = cases.cloud_record(model_version="v", quality=None, lesion=None, box=None, heatmap_path=None,
                                timings_ms={}, message=None, at=1, probs={"mel": 0.9}, top=[], risk="high",
                                malignant_p=0.9, demonstration=True)
    assert record["risk"] is None and record["demonstration"] is True
    assert "demonstration" not in cases.cloud_record(model_version="v", quality=None, lesion=None, box=None,
                                                     heatmap_path=None, timings_ms={}, message=None, at=1)


def test_the_worker_claims_no_calibrated_doubt_for_a_demonstration_model(tmp_path):
    """The worker's cloud record carries the card's abstain verdict (``unsure``, ``predictionSet``)
    for a real model, and neither for a demonstration model: its answer means nothing medically, so
    it claims no calibrated "unsure" either."""
    from cloud_worker.model import load_model
    from cloud_worker.pipeline import NoAnalysis, infer, prepare, record

    def with_abstain_rule(model_dir: Path) -> Path:
        card = json.loads((model_dir / "card.json").read_text())
        # LAC with qhat 1: every class is in the set, so the rule says unsure on any photo.
        card["cloud"]["abstain"] = {"method": "lac", "coverage": 0.9, "qhat": 1.0, "n_calib": 100}
        (model_dir / "card.json").write_text(json.dumps(card))
        return model_dir

    real = load_model(with_abstain_rule(tiny_model_dir(tmp_path / "real")))
    demo = load_model(_mark(with_abstain_rule(tiny_model_dir(tmp_path / "demo")), demonstration=True))
    item = prepare(lesion_jpeg(5), NoAnalysis())
    real_record = record(item, infer(real, [item])[0], None, 1)
    assert real_record["unsure"] is True and len(real_record["predictionSet"]) == 7  # the premise
    demo_record = record(item, infer(demo, [item])[0], None, 1)
    assert demo_record["demonstration"] is True and demo_record["risk"] is None and demo_record["top"]
    assert "unsure" not in demo_record and "predictionSet" not in demo_record
    # the same rule on the device path (diagnose, the app): one place decides, model_dir._Model.unsure
    from dermaloop.model_dir import load_cloud_model

    photo = lesion_jpeg(5)
    assert "unsure" in load_cloud_model(tmp_path / "real").diagnose(photo)
    assert "unsure" not in load_cloud_model(tmp_path / "demo").diagnose(photo)


def test_the_rules_accept_a_marked_device_answer_and_nothing_but_true(localbase):
    settings = localbase.settings(database_url="https://demo-answers-default-rtdb.firebaseio.com")
    uid = f"p-{uuid.uuid4().hex[:8]}"
    patient = UserDatabase(mint_id_token(settings.project_id, uid, {"role": "patient"}), settings)

    def create(device: dict) -> None:
        case_id = new_push_id()
        image = cases.image_record(uid, case_id, "0" * 64, "image/jpeg", 1000, 320, 240)
        case = cases.new_case(uid, case_id, image, research_consent=False, device=device, created_at=1)
        patient.update("/", cases.new_case_writes(case))

    marked = {"modelVersion": "starter", "top": [{"label": "nv", "name": "Nevus", "p": 0.5}], "at": 1,
              "demonstration": True}
    create(marked)
    from dermaloop.errors import PermissionDenied

    with pytest.raises(PermissionDenied):
        create({**marked, "demonstration": "yes"})
