"""First-run starter models: trained once (synthetic data when no dataset is given), then reused."""

from __future__ import annotations

import json

from dermaloop.model_dir import load_device_model
from training.starter import ensure_starter_models


def test_starter_models_are_trained_once_and_marked_synthetic(tmp_path, capsys):
    models = tmp_path / "models"
    first = ensure_starter_models(models, None, device_backbone="tiny", cloud_backbone="tiny",
                                  synthetic_per_class=6, progress=False)
    assert first == models / "starter"
    card = json.loads((first / "card.json").read_text())
    assert "synthetic" in card["warning"].lower() and card["data"]["images"] == 42
    assert card["demonstration"] is True  # every runtime then gives no risk tier
    assert "takes about" in capsys.readouterr().err
    stamp = (first / "card.json").stat().st_mtime_ns
    again = ensure_starter_models(models, None, device_backbone="tiny", cloud_backbone="tiny", progress=False)
    assert again == first and (first / "card.json").stat().st_mtime_ns == stamp
    assert capsys.readouterr().err == ""  # no second training
    assert load_device_model(first).diagnose(sorted((models / "_synthetic_data" / "images").glob("*.jpg"))[0])



def test_no_starter_is_trained_next_to_a_real_model(tmp_path, capsys):
    models = tmp_path / "models"
    (models / "ham-ens").mkdir(parents=True)
    (models / "ham-ens" / "card.json").write_text(json.dumps({"device": {}, "cloud": {}}))
    assert ensure_starter_models(models, None, device_backbone="tiny", cloud_backbone="tiny",
                                 progress=False) == models / "ham-ens"
    assert not (models / "starter").exists() and capsys.readouterr().err == ""
