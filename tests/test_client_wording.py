"""What the patient reads when the card's abstain rule says "unsure" (issue 20): a clear line next to
the risk advice, naming the classes the model could not tell apart; nothing for a sure answer, a
card without the rule, or a demonstration model (its own wording stays)."""

from __future__ import annotations

from client import wording

NAMES = {"mel": "Melanoma", "nv": "Mole", "bkl": "Keratosis"}.get


def test_an_unsure_device_answer_names_the_classes_it_could_not_tell_apart():
    answer = {"risk": "moderate", "unsure": True, "prediction_set": ["mel", "nv"]}  # DeviceResult.to_json
    assert wording.unsure_line(answer, NAMES) == ("Unsure: the model could not tell these apart: Melanoma, Mole. "
                                                  "A dermatologist will look.")
    record = {"risk": "high", "unsure": True, "predictionSet": ["bkl", "mel", "nv"]}  # device/cloud records
    assert wording.unsure_line(record, NAMES).startswith("Unsure: the model could not tell these apart: "
                                                         "Keratosis, Melanoma, Mole.")
    assert wording.risk_advice(record["risk"])[0] == "Higher risk"  # the tier's advice still stands


def test_a_set_of_one_other_class_or_an_empty_set_is_still_unsure():
    one = wording.unsure_line({"unsure": True, "predictionSet": ["nv"]}, NAMES)
    assert one.startswith("Unsure:") and "Mole" in one and one.endswith("A dermatologist will look.")
    assert wording.unsure_line({"unsure": True}, NAMES) == wording.UNSURE_NONE
    assert wording.unsure_line({"unsure": True, "predictionSet": []}) == wording.UNSURE_NONE
    assert "Unsure" in wording.UNSURE_NONE and "dermatologist" in wording.UNSURE_NONE


def test_no_line_when_sure_without_a_rule_or_for_a_demonstration_model():
    assert wording.unsure_line({"unsure": False, "predictionSet": ["mel"]}, NAMES) is None
    assert wording.unsure_line({"risk": "low", "top": []}, NAMES) is None  # a card without the rule
    assert wording.unsure_line(None) is None
    assert wording.unsure_line({"unsure": "yes", "predictionSet": ["mel", "nv"]}) is None  # only true counts
    demo = {"demonstration": True, "unsure": True, "predictionSet": ["mel", "nv"]}
    assert wording.unsure_line(demo, NAMES) is None
    assert wording.risk_advice(None, demonstration=True) == wording.DEMONSTRATION


def box_texts(result: dict) -> list[str]:
    from client.app import _namer, _risk_box

    return [c.value for c in _risk_box(result, _namer(result)).content.controls]


def test_the_risk_box_shows_the_unsure_line_under_the_advice():
    """The app's risk box (answer and case screens): advice first, then the line, names from the top list."""
    record = {"risk": "moderate", "unsure": True, "predictionSet": ["mel", "zz-unknown"],
              "top": [{"label": "mel", "name": "Melanoma (device taxonomy)", "p": 0.5}]}
    title, advice, line = box_texts(record)
    assert (title, advice) == wording.risk_advice("moderate")
    assert line == ("Unsure: the model could not tell these apart: Melanoma (device taxonomy), zz-unknown. "
                    "A dermatologist will look.")
    assert box_texts({"risk": "low", "top": []}) == list(wording.risk_advice("low"))
    assert box_texts({"demonstration": True, "unsure": True, "predictionSet": ["mel", "nv"]}) == list(
        wording.DEMONSTRATION)


# The nevus photo ISIC_0024314 through the release's device model: the call (melanoma, by its offset)
# is not the most probable class. The app listed "1. Benign keratosis 46 %, 2. Melanoma 21 %,
# 3. Nevus 27 %" and the home list called the case "Melanoma (26 %)".
CALLED_BELOW = [{"label": "mel", "name": "Melanoma", "p": 0.21}, {"label": "bkl", "name": "Benign keratosis", "p": 0.46},
                {"label": "nv", "name": "Melanocytic nevus (mole)", "p": 0.27}]


def test_the_list_is_in_order_of_probability_and_a_less_probable_call_is_explained():
    from client.app import _top_rows

    texts = [c.value for c in _top_rows(CALLED_BELOW)]
    assert texts[:3] == ["1. Benign keratosis: 46%", "2. Melanocytic nevus (mole): 27%", "3. Melanoma: 21%"]
    assert texts[3] == ("The model flags Melanoma for a dermatologist's attention although Benign keratosis is more "
                        "probable: missing Melanoma would cost more.")
    sure = sorted(CALLED_BELOW, key=lambda t: -t["p"])
    assert [c.value for c in _top_rows(sure)] == texts[:3]  # the call is the most probable: no note
    assert _top_rows([]) == []


def test_the_home_list_names_the_most_probable_class_and_the_tier(tmp_path):
    from types import SimpleNamespace

    from client.app import PatientApp
    from client.device import Device
    from dermaloop.settings import load_settings
    from tests.test_sign_in_off_loop import Page
    from tests.worker_support import lesion_jpeg

    device = Device(load_settings(environ={}), tmp_path / "device")
    app = PatientApp(Page(), device)
    app.session, app.sync = SimpleNamespace(uid="patient-1"), None
    case = device.store.add_case("patient-1", lesion_jpeg(1))
    case = SimpleNamespace(case_id=case.case_id, status="diagnosed", created_at=0, image_path=case.image_path,
                           device={"top": CALLED_BELOW, "risk": "moderate"},
                           remote={"status": "diagnosed", "cloud": {"top": CALLED_BELOW, "risk": "high"}})
    title = app._case_row(case).title.value
    assert title.endswith(": Higher risk · Benign keratosis (46%)"), title  # the cloud's word, not the call
    case.remote["cloud"]["demonstration"] = True
    case.remote["cloud"]["risk"] = None
    title = app._case_row(case).title.value
    assert title.endswith(": Benign keratosis (46%)") and "risk" not in title, title
