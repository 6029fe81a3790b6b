"""How the portal words a model's answer: a demonstration model's output is never shown as a risk.

Pure view-model functions (reviewer_portal.results, reviewer_portal.queue) over records built by
dermaloop.cases, as the worker and the patient app store them; no browser, no server.
"""

from __future__ import annotations

from dermaloop import cases
from reviewer_portal import monitoring, results
from reviewer_portal import queue as triage

HOUR = 3_600_000
NOW = 50 * 24 * HOUR
DEMO = "DEMONSTRATION MODEL (synthetic training data): not a clinical result"


def device(demonstration: bool, risk: str | None = "high") -> dict:
    answer = {"modelVersion": "device-1", "quality": {"ok": True, "issues": []},
              "top": [{"label": "mel", "name": "Melanoma", "p": 0.81}], "risk": None if demonstration else risk}
    if demonstration:
        answer["demonstration"] = True
    return cases.device_record(answer, at=NOW - HOUR)


def cloud(demonstration: bool, risk: str | None = "high") -> dict:
    return cases.cloud_record(model_version="cloud-1", quality={"ok": True, "issues": []}, lesion=None, box=None,
                              heatmap_path=None, timings_ms={}, message=None, at=NOW - HOUR,
                              probs={"mel": 0.72, "nv": 0.28},
                              top=[{"label": "mel", "name": "Melanoma", "p": 0.72}], risk=risk, malignant_p=0.72,
                              demonstration=demonstration)


def queue_and_cases(**case_records: dict) -> tuple[dict, dict]:
    """``/queue`` and ``/cases`` holding these cases, waiting an hour; each queue entry's tier is the
    cloud record's, as the worker writes it."""
    queue, all_cases = {}, {"p1": {}}
    for case_id, case in case_records.items():
        risk = (case.get("cloud") or {}).get("risk")
        queue[case_id] = {"uid": "p1", "status": "diagnosed", "risk": risk, "score": 1.0, "createdAt": NOW - HOUR}
        all_cases["p1"][case_id] = {"status": "diagnosed", **case}
    return queue, all_cases


def rows_for(**case_records: dict) -> dict[str, triage.QueueRow]:
    """One queue row per case."""
    return {r.case_id: r for r in triage.build_rows(*queue_and_cases(**case_records), {}, {}, {}, NOW)}


def test_the_wording_is_the_one_asked_for():
    assert results.DEMONSTRATION == DEMO


def test_queue_rows_badge_demonstration_answers_instead_of_a_risk():
    rows = rows_for(both={"device": device(True), "cloud": cloud(True)},
                    real={"device": device(False), "cloud": cloud(False)},
                    cloud_demo={"device": device(False), "cloud": cloud(True)},
                    device_demo={"device": device(True), "cloud": cloud(False)},
                    device_only_demo={"device": device(True)},
                    nothing={})
    assert rows["both"].demonstration == ("device", "cloud")
    assert rows["both"].risk_badges == [DEMO]  # no "UNKNOWN risk": a demonstration has no tier to be unknown
    assert rows["device_only_demo"].risk_badges == [DEMO]  # the only answer so far
    assert rows["real"].demonstration == () and rows["real"].risk_badges == ["HIGH risk"]
    assert rows["cloud_demo"].risk_badges == [f"cloud: {DEMO}"]
    assert rows["device_demo"].risk_badges == ["HIGH risk", f"device: {DEMO}"]
    assert rows["nothing"].risk_badges == ["UNKNOWN risk"]  # pending, not a demonstration
    for row in rows.values():
        if row.demonstration:
            assert not any(b.startswith("UNKNOWN") for b in row.risk_badges), row.case_id
    # the calls are still there to read; the risk filter groups the rows as their badges and the
    # monitoring screen do: a demonstration answer without a tier is "demonstration", not "unknown"
    assert rows["both"].cloud.name == "Melanoma" and rows["both"].device.p == 0.81
    demo = [r.case_id for r in triage.apply(rows.values(), triage.Filters(risk="demonstration"))]
    assert sorted(demo) == ["both", "cloud_demo", "device_only_demo"]  # monitoring counts these 3 too
    assert [r.case_id for r in triage.apply(rows.values(), triage.Filters(risk="unknown"))] == ["nothing"]
    assert "device_demo" in [r.case_id for r in triage.apply(rows.values(), triage.Filters(risk="high"))]
    assert triage.TIERS == monitoring.TIERS


def test_monitoring_counts_waiting_demonstration_answers_as_demonstration_not_unknown_risk():
    queue, all_cases = queue_and_cases(both={"device": device(True), "cloud": cloud(True)},
                                       cloud_demo={"device": device(False), "cloud": cloud(True)},
                                       device_only_demo={"device": device(True)},
                                       device_demo={"device": device(True), "cloud": cloud(False)},
                                       real={"device": device(False), "cloud": cloud(False, "low")},
                                       nothing={}, unclassified={"cloud": cloud(False, None)})
    queue["lost"] = {"uid": "p9", "status": "queued", "risk": None, "createdAt": NOW - 2 * HOUR}  # no case
    ages = monitoring.compute(all_cases, queue, NOW).queue_age
    # The same grouping as the queue rows' badges: no tier plus a demonstration answer is a demonstration.
    assert {tier: age["count"] for tier, age in ages.items()} == {"demonstration": 3, "high": 1, "low": 1,
                                                                  "unknown": 3}
    assert ages["demonstration"] == {"count": 3, "p50_h": 1.0, "max_h": 1.0, "overdue": 0}
    lines = monitoring.waiting_lines(monitoring.compute(all_cases, queue, NOW))
    assert lines == ["Waiting, high risk: 1 cases, median 1.0 h, oldest 1.0 h, overdue 0",
                     "Waiting, low risk: 1 cases, median 1.0 h, oldest 1.0 h, overdue 0",
                     "Waiting, demonstration model answers (no risk tier): 3 cases, median 1.0 h, oldest 1.0 h, "
                     "overdue 0",
                     "Waiting, unknown risk: 3 cases, median 1.0 h, oldest 2.0 h, overdue 0"]


def texts(lines: list[results.Line]) -> list[str]:
    return [line.text for line in lines]


def test_the_case_view_puts_the_warning_next_to_the_probabilities_and_no_risk_line():
    lines = results.model_lines("Cloud model", cloud(True), {"mel": "Melanoma", "nv": "Mole"}.get)
    shown = texts(lines)
    warning = shown.index(DEMO)
    assert lines[warning].kind == "warning"
    assert shown[warning + 1:warning + 3] == ["Melanoma: 72%", "Mole: 28%"]  # right above the numbers
    assert not any(t.startswith("Risk") or "malignant" in t for t in shown)  # although malignantP is stored
    device_lines = texts(results.model_lines("Device model", device(True), str))
    assert device_lines[device_lines.index(DEMO) + 1] == "Melanoma: 81%"
    assert not any(t.startswith("Risk") for t in device_lines)


def test_a_real_model_keeps_its_risk_line_and_no_warning():
    shown = texts(results.model_lines("Cloud model", cloud(False), str))
    assert DEMO not in shown
    assert "Risk: high · malignant p 72%" in shown and "Call: Melanoma" in shown
    assert texts(results.model_lines("Cloud model", None, str)) == ["Cloud model", "No result yet."]
    assert "Risk: not classified" in texts(results.model_lines("Device model", device(False, risk=None), str))


def test_demonstration_must_be_exactly_true():
    assert results.is_demonstration({"demonstration": True})
    for value in (False, "true", 1, None):
        assert not results.is_demonstration({"demonstration": value, "risk": "low"})
    assert not results.is_demonstration(None) and not results.is_demonstration("x")


UNSURE_SET = ["bkl", "mel", "nv"]


def unsure_cloud(demonstration: bool = False) -> dict:
    """A cloud record as the worker writes it when the card carries an abstain rule that said unsure."""
    return {**cloud(demonstration), "unsure": True, "predictionSet": UNSURE_SET}


def unsure_device(prediction_set: list[str]) -> dict:
    answer = {"modelVersion": "device-1", "quality": {"ok": True, "issues": []}, "risk": "moderate",
              "top": [{"label": "mel", "name": "Melanoma", "p": 0.51}], "unsure": True,
              "prediction_set": prediction_set}  # the device answer's own key (DeviceResult.to_json)
    return cases.device_record(answer, at=NOW - HOUR)


def test_an_unsure_model_shows_its_prediction_set_next_to_the_call_and_keeps_its_risk():
    names = {"bkl": "Keratosis", "mel": "Melanoma", "nv": "Mole"}.get
    lines = results.model_lines("Cloud model", unsure_cloud(), names)
    shown = texts(lines)
    line = "UNSURE (prediction set: Keratosis, Melanoma, Mole)"
    assert shown[shown.index("Call: Melanoma") + 1] == line and lines[shown.index(line)].kind == "warning"
    assert "Risk: high · malignant p 72%" in shown  # next to the risk, not instead of it
    device_shown = texts(results.model_lines("Device model", unsure_device(["mel", "nv"]), names))
    assert "UNSURE (prediction set: Melanoma, Mole)" in device_shown and "Risk: moderate" in device_shown
    assert "UNSURE (prediction set: empty)" in texts(results.model_lines("Device model", unsure_device([]), str))


def test_a_sure_model_a_card_without_the_rule_and_a_demonstration_show_no_unsure_line():
    sure = {**cloud(False), "unsure": False, "predictionSet": ["mel"]}
    for record in (sure, cloud(False), unsure_cloud(demonstration=True)):
        assert not any(t.startswith("UNSURE") for t in texts(results.model_lines("Cloud model", record, str)))
    assert not results.is_unsure({"unsure": "true", "predictionSet": ["mel"]})  # only a real true counts


def test_queue_rows_badge_the_unsure_models_after_the_tier():
    rows = rows_for(cloud_unsure={"device": device(False), "cloud": unsure_cloud()},
                    both_unsure={"device": unsure_device(["mel", "nv"]), "cloud": unsure_cloud()},
                    sure={"device": device(False), "cloud": {**cloud(False), "unsure": False}},
                    demo_unsure={"device": device(False), "cloud": unsure_cloud(demonstration=True)})
    assert rows["cloud_unsure"].unsure == ("cloud",)
    assert rows["cloud_unsure"].risk_badges == ["HIGH risk", "UNSURE (cloud)"]
    assert rows["both_unsure"].risk_badges == ["HIGH risk", "UNSURE (device and cloud)"]
    assert rows["sure"].risk_badges == ["HIGH risk"] and rows["sure"].unsure == ()
    assert rows["demo_unsure"].unsure == () and rows["demo_unsure"].risk_badges == [f"cloud: {DEMO}"]


def test_agreement_leaves_demonstration_answers_out_and_says_how_many():
    def reviewed(label: str, device_record: dict, cloud_record: dict) -> dict:
        return {"status": "reviewed", "createdAt": NOW - 3 * HOUR, "review": {"label": label, "at": NOW - HOUR},
                "device": device_record, "cloud": cloud_record}

    # every model here calls melanoma; the dermatologists said melanoma once and nevus twice
    all_cases = {"p1": {"real": reviewed("mel", device(False), cloud(False)),
                        "demo": reviewed("nv", device(True), cloud(True)),
                        "mixed": reviewed("nv", device(True), cloud(False))}}
    figures = monitoring.compute(all_cases, {}, NOW)
    assert figures.demonstration_left_out == {"device": 2, "cloud": 1}
    assert figures.pairs["device"] == (["mel"], ["mel"]) and figures.agreement["device"] == 1.0
    assert figures.agreement["cloud"] == 0.5  # the real cloud answers: right on "real", wrong on "mixed"
    assert monitoring.agreement_lines(figures) == [
        "Device model agreed with the dermatologists: 100% of 1 reviewed cases "
        "(2 answered by a demonstration model left out)",
        "Cloud model agreed with the dermatologists: 50% of 2 reviewed cases "
        "(1 answered by a demonstration model left out)"]
    empty = monitoring.compute({}, {}, NOW)
    assert monitoring.agreement_lines(empty)[0] == "Device model agreed with the dermatologists: n/a"


def test_a_call_below_a_more_probable_class_is_explained_and_the_list_is_by_probability():
    top = [{"label": "mel", "name": "Melanoma", "p": 0.21}, {"label": "bkl", "name": "Benign keratosis", "p": 0.46},
           {"label": "nv", "name": "Melanocytic nevus (mole)", "p": 0.27}]
    record = cases.device_record({"modelVersion": "device-1", "quality": {"ok": True, "issues": []}, "top": top,
                                  "risk": "moderate"}, at=NOW)
    lines = texts(results.model_lines("Device model", record, lambda label: {"bkl": "Benign keratosis"}.get(label, label)))
    assert lines[2:5] == ["Benign keratosis: 46%", "Melanocytic nevus (mole): 27%", "Melanoma: 21%"]
    call = next(line for line in lines if line.startswith("Call:"))
    assert call == ("Call: Melanoma (named over the more probable Benign keratosis, 46%, by the card's decision "
                    "offset: missing it costs more)")
    record["top"] = sorted(top, key=lambda t: -t["p"])
    assert "Call: Benign keratosis" in texts(results.model_lines("Device model", record, str))


def test_the_case_status_is_worded_for_a_dermatologist():
    # "diagnosed" alone read as if a doctor had already diagnosed the case
    assert results.status_text("diagnosed") == "answered by the models, waiting for a dermatologist's review"
    assert {results.status_text(s) for s in cases.Status if s not in cases.LOCAL_STATUSES} == set(
        results.STATUS_TEXT.values())  # every status a case in the database can have is worded
    assert results.status_text("something-new") == "something-new"
