"""The calibrated abstain rule: split-conformal prediction sets fitted on calib (training.abstain),
applied at runtime (dermaloop.risk.AbstainRule, the model directory's diagnose)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dermaloop.risk import AbstainRule, RiskPolicy
from dermaloop.taxonomy import load_taxonomy
from training.abstain import abstain_figures, fit_abstain, fit_model_dir, main


def calibrated(n: int, k: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of a calibrated model and labels drawn from them: calib and test rows are
    exchangeable, which is all split conformal assumes."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(k, 0.4), size=n)
    labels = (probs.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return probs, labels


@pytest.mark.parametrize("method", ["lac", "aps"])
@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_coverage_on_exchangeable_data_is_close_to_the_target(method, coverage):
    calib_p, calib_y = calibrated(2000, seed=1)
    test_p, test_y = calibrated(20000, seed=2)
    rule = fit_abstain(calib_p, calib_y, coverage, method)
    covered = rule.prediction_set(test_p)[np.arange(len(test_y)), test_y].mean()
    # Guaranteed >= coverage in expectation, and at most coverage + 1/(n+1) for LAC; the margins
    # are the sampling noise of 2,000 calib and 20,000 test rows.
    assert coverage - 0.015 <= covered <= coverage + (0.02 if method == "lac" else 0.04)
    assert rule.n_calib == 2000 and rule.method == method and rule.coverage == coverage


@pytest.mark.parametrize("method", ["lac", "aps"])
def test_sets_grow_monotonically_with_coverage(method):
    calib_p, calib_y = calibrated(1500, seed=3)
    test_p, _ = calibrated(3000, seed=4)
    rules = [fit_abstain(calib_p, calib_y, c, method) for c in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)]
    qhats = [r.qhat for r in rules]
    assert qhats == sorted(qhats) and qhats[0] < qhats[-1]
    sets = [r.prediction_set(test_p) for r in rules]
    for smaller, larger in zip(sets, sets[1:], strict=False):
        assert np.all(larger | ~smaller)  # nested: a class in the smaller set is in the larger one
    sizes = [s.sum(axis=1).mean() for s in sets]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_the_rule_is_sure_only_when_the_set_is_exactly_the_call():
    rule = AbstainRule("lac", 0.9, 0.7, 100)  # a class is in the set when p >= 0.3
    assert rule.judge(np.array([0.8, 0.1, 0.1]), 0) == (False, [0])
    assert rule.judge(np.array([0.5, 0.4, 0.1]), 0) == (True, [0, 1])  # two classes: cannot tell them apart
    assert rule.judge(np.array([0.25, 0.25, 0.5]), 0) == (True, [2])  # the call (an offset's) is not in the set
    assert rule.judge(np.array([0.28, 0.27, 0.25, 0.2]), 0) == (True, [])  # empty: nothing probable enough
    batch = np.array([[0.8, 0.1, 0.1], [0.5, 0.4, 0.1]])
    assert rule.unsure(batch, np.array([0, 0])).tolist() == [False, True]
    # APS: a class is in the set when it and the classes above it hold at most qhat of the mass;
    # the most probable class always is.
    aps = AbstainRule("aps", 0.9, 0.9, 100)
    assert aps.judge(np.array([0.95, 0.03, 0.02]), 0) == (False, [0])  # 0.95 > qhat, kept as the top class
    assert aps.judge(np.array([0.4, 0.15, 0.45]), 2) == (True, [2, 0])  # 0.45, 0.85 <= 0.9 < 1.0
    assert AbstainRule("aps", 0.9, 0.6, 100).judge(np.array([0.4, 0.15, 0.45]), 2) == (False, [2])


def test_too_little_or_wrong_input_is_refused_clearly():
    p, y = calibrated(8)
    with pytest.raises(ValueError, match="cannot back a coverage of 0.90"):
        fit_abstain(p, y, 0.9)
    fit_abstain(*calibrated(9), 0.9)  # ceil(0.9 / 0.1) = 9 is enough
    with pytest.raises(ValueError, match="coverage"):
        fit_abstain(*calibrated(50), 1.0)
    with pytest.raises(ValueError, match="unknown conformal method"):
        fit_abstain(*calibrated(50), 0.9, "bayes")
    with pytest.raises(ValueError, match="method, coverage, qhat and n_calib"):
        AbstainRule.from_dict({"method": "lac", "coverage": 0.9})
    rule = AbstainRule("aps", 0.85, 0.93, 812)
    assert AbstainRule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule


def test_figures_count_abstentions_and_the_malignant_cases_not_abstained_on():
    taxonomy = load_taxonomy("ham10000")
    mel, nv = taxonomy.ids.index("mel"), taxonomy.ids.index("nv")
    policy = RiskPolicy(1.0, tuple(taxonomy.malignant_mask), 0.5, 0.8)
    rule = AbstainRule("lac", 0.9, 0.6, 50)  # in the set when p >= 0.4

    def row(**ps: float) -> np.ndarray:
        p = np.full(7, (1 - sum(ps.values())) / (7 - len(ps)))
        for cid, v in ps.items():
            p[taxonomy.ids.index(cid)] = v
        return p

    probs = np.stack([row(mel=0.9), row(mel=0.45, nv=0.45), row(nv=0.9), row(nv=0.9)])
    labels = np.array([mel, mel, mel, nv])
    calls = probs.argmax(axis=1)
    f = abstain_figures(rule, probs, labels, calls, policy, taxonomy.ids)
    assert f["abstain_rate"] == pytest.approx(0.25) and f["mean_set_size"] == pytest.approx(1.25)
    assert f["coverage"] == pytest.approx(0.75)
    assert f["malignant_abstained"] == pytest.approx(1 / 3)
    assert f["malignant_sensitivity_sure"] == pytest.approx(1 / 2)  # the confident melanoma, not the "nevus"
    assert f["malignant_missed_sure"] == 1
    assert f["malignant_flagged_or_abstained"] == pytest.approx(2 / 3)
    assert f["accuracy_sure"] == pytest.approx(2 / 3) and f["abstain_rate_per_class"]["mel"] == pytest.approx(1 / 3)


@pytest.fixture()
def synthetic_model(tmp_path) -> tuple[Path, Path]:
    """A tiny device model directory whose split.json names calib and val photos of a synthetic set."""
    pytest.importorskip("tensorflow")
    from tests.worker_support import tiny_device_model_dir
    from training.datasets import open_dataset
    from training.synthetic import generate

    data = generate(tmp_path / "data", per_class=6, size=(96, 72), seed=5)
    model = tiny_device_model_dir(tmp_path / "model")
    ids = [s.id for s in open_dataset(data, load_taxonomy("ham10000")).samples]
    (model / "split.json").write_text(json.dumps({"train": [], "calib": ids[0::2], "val": ids[1::2]}))
    return model, data


def test_the_command_fits_on_calib_and_writes_the_card_that_diagnose_then_follows(synthetic_model, capsys):
    from dermaloop.model_dir import load_device_model

    model, data = synthetic_model
    before = load_device_model(model, "fp32")
    assert before.abstain is None and "unsure" not in before.diagnose(next((data / "images").glob("*.jpg")))
    assert main([str(model), "--data", str(data), "--kind", "device", "--coverage", "0.8", "--path", "centre",
                 "--val", "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "qhat" in said and "val sweep" in said
    section = json.loads((model / "card.json").read_text())["device"]["abstain"]
    assert section["method"] == "lac" and section["coverage"] == 0.8 and section["n_calib"] == 21
    assert "calib split" in section["fitted_on"] and section["val"]["n"] == 21
    assert 0.0 <= section["val"]["abstain_rate"] <= 1.0
    after = load_device_model(model, "fp32")
    assert after.abstain == AbstainRule.from_dict(section)
    answer = after.diagnose(next((data / "images").glob("*.jpg")))
    assert isinstance(answer["unsure"], bool) and set(answer["predictionSet"]) <= set(after.taxonomy.ids)
    probs = np.array([answer["probs"][c] for c in after.taxonomy.ids])
    unsure, members = after.abstain.judge(probs, int(after.policy.decide(probs)))
    assert answer["unsure"] is unsure and answer["predictionSet"] == [after.taxonomy.ids[i] for i in members]


def test_a_model_without_calib_data_is_refused_with_a_clear_message(synthetic_model, capsys):
    model, data = synthetic_model
    card_before = (model / "card.json").read_text()
    (model / "split.json").write_text(json.dumps({"train": [], "val": []}))
    with pytest.raises(ValueError, match="split.json has no calib photos: the abstain rule must be fitted on held-out"):
        fit_model_dir(model, data, "device", path="centre", progress=False)
    (model / "split.json").unlink()
    assert main([str(model), "--data", str(data), "--kind", "device", "--path", "centre", "--quiet"]) == 2
    assert "no split.json, so no calib data" in capsys.readouterr().err
    assert (model / "card.json").read_text() == card_before  # nothing written
