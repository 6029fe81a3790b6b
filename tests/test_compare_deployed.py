"""``training.compare_deployed``: two deployed evaluations of the same photos, compared photo for photo."""

from __future__ import annotations

import json

import pytest

from training.compare_deployed import compare, gates, main


def write(folder, rows):
    folder.mkdir()
    (folder / "photos.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def photo(i, label, called, status="classified", risk=None):
    return {"id": f"p{i}", "label": label, "called": called, "status": status, "answer": {"risk": risk}}


def test_the_comparison_uses_the_photos_both_classified_and_bounds_the_difference(tmp_path):
    truth = ["nv"] * 40 + ["mel"] * 20 + ["bcc"] * 10
    a = write(tmp_path / "a", [photo(i, y, y if i % 2 else "nv") for i, y in enumerate(truth)]
              + [photo(99, "mel", None, "declined")])
    b = write(tmp_path / "b", [photo(i, y, y) for i, y in enumerate(truth)])
    result = compare(a, b)
    assert result["photos"] == 70 and result["only_a"] == 0
    assert result["b"]["balanced_accuracy"] == 1.0 and result["b"]["accuracy"] == 1.0
    # A misses every other mel and bcc photo (calls them nv) and gets nv right: BA (1 + .5 + .5) / 3
    assert result["a"]["balanced_accuracy"] == pytest.approx(2 / 3)
    d, lo, hi = result["b_minus_a"]["balanced_accuracy"]
    assert d == pytest.approx(1 / 3) and lo <= d <= hi and lo > 0
    assert result["a"]["malignant_called_malignant"] == pytest.approx(0.5)
    assert result["malignant_mcnemar"] == {**result["malignant_mcnemar"], "lost": 0, "gained": 15}
    assert result["per_class_recall"]["mel"] == [0.5, 1.0, 20]
    assert "tier" not in result  # these answers name no tier (a demonstration model's, say)


def test_the_risk_tier_is_compared_on_malignant_and_benign_photos(tmp_path, capsys):
    truth = ["nv"] * 40 + ["mel"] * 20 + ["bcc"] * 10
    # A flags every malignant photo and half the nevi; B misses a third of the malignant ones, clears every nevus
    a = write(tmp_path / "a", [photo(i, y, y, risk="low" if y == "nv" and i % 2 else "high")
                               for i, y in enumerate(truth)])
    b = write(tmp_path / "b", [photo(i, y, y, risk="moderate" if y != "nv" and i % 3 else "low")
                               for i, y in enumerate(truth)])
    tier = compare(a, b)["tier"]
    assert tier["a"] == {"sensitivity": 1.0, "specificity": 0.5}
    assert tier["b"]["specificity"] == 1.0 and tier["b"]["sensitivity"] == pytest.approx(20 / 30)
    d, lo, hi = tier["b_minus_a"]["sensitivity"]
    assert d == pytest.approx(-1 / 3) and lo <= d <= hi < 0
    d, lo, hi = tier["b_minus_a"]["specificity"]
    assert d == pytest.approx(0.5) and 0 < lo <= d <= hi
    assert main([str(a), str(b)]) == 0
    assert "risk tier malignant sensitivity (moderate or high): A 1.0000, B 0.6667" in capsys.readouterr().out


def test_evaluations_of_different_photos_or_labels_are_refused(tmp_path, capsys):
    a = write(tmp_path / "a", [photo(1, "nv", "nv")])
    other = write(tmp_path / "b", [photo(2, "nv", "nv")])
    relabelled = write(tmp_path / "c", [photo(1, "mel", "nv")])
    with pytest.raises(ValueError, match="share no classified photo"):
        compare(a, other)
    with pytest.raises(ValueError, match="disagree on the labels"):
        compare(a, relabelled)
    assert main([str(a), str(tmp_path / "missing")]) == 2
    assert "dermaloop evaluate --as-deployed" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "photos.jsonl").write_text("{not json\n")
    assert main([str(a), str(tmp_path / "bad")]) == 2
    assert "not JSON" in capsys.readouterr().err


def test_the_gates_refuse_a_candidate_that_tells_more_cancers_low_and_pass_one_that_does_not(tmp_path, capsys):
    truth = ["nv"] * 60 + ["mel"] * 40 + ["bcc"] * 20
    serving = write(tmp_path / "serving", [photo(i, y, y, risk="low" if y == "nv" else "moderate")
                                           for i, y in enumerate(truth)])
    # the same calls, but a third of the malignant photos told "low"
    worse = write(tmp_path / "worse", [photo(i, y, y, risk="low" if y == "nv" or i % 3 == 0 else "high")
                                       for i, y in enumerate(truth)])
    (worse / "metrics.json").write_text(json.dumps({"ece": 0.2}))
    same = write(tmp_path / "same", [photo(i, y, y, risk="low" if y == "nv" else "high")
                                     for i, y in enumerate(truth)])
    refused = gates(serving, worse)
    assert not refused.promote
    failed = {v.gate for v in refused.verdicts if not v.passed}
    assert failed == {"malignant_sensitivity", "calibration"}  # no serving ECE: the 0.05 bound applies
    passed = gates(serving, same)
    assert passed.promote and [v.gate for v in passed.verdicts] == ["balanced_accuracy", "malignant_sensitivity"]
    assert main([str(serving), str(worse), "--gates"]) == 0
    out = capsys.readouterr().out
    assert "gate malignant_sensitivity: FAILED" in out and "B may replace A: no" in out
