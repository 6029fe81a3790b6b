"""Taxonomies are data: bundled ones load, custom files validate, bad files fail clearly."""

from __future__ import annotations

import json

import pytest

from dermaloop.taxonomy import available_taxonomies, load_taxonomy


def test_bundled_taxonomies():
    assert {"ham10000", "isic2019", "mobile6"} <= set(available_taxonomies())
    ham = load_taxonomy()
    assert ham.ids == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert ham.malignant_ids == ["akiec", "bcc", "mel"]
    isic = load_taxonomy("isic2019")
    assert len(isic) == 8 and set(isic.malignant_ids) == {"MEL", "BCC", "AK", "SCC"}
    mobile = load_taxonomy("mobile6")
    assert mobile.ids == ["acne", "eczema", "melanoma", "bcc", "df", "ak"]
    for t in (ham, isic, mobile):
        assert all(c.advice and c.description and c.name for c in t.classes)
        assert {c.urgency for c in t.classes if c.malignant} <= {"soon", "urgent"}


def test_lookup_is_case_insensitive_and_unknown_ids_fail():
    ham = load_taxonomy()
    assert ham.index("MEL") == ham.index("mel") == 4
    assert ham.get("nv").malignant is False
    with pytest.raises(KeyError, match="not a class"):
        ham.index("scc")


def test_custom_file_round_trip(tmp_path):
    ham = load_taxonomy()
    path = tmp_path / "labels.json"
    ham.save(path)
    again = load_taxonomy(path)
    assert again == ham


@pytest.mark.parametrize("content, message", [
    ("{not json", "malformed"),
    (json.dumps({"classes": []}), "non-empty"),
    (json.dumps({"classes": [{"id": "a"}]}), "lacks"),
    (json.dumps({"classes": [{"id": "a", "name": "A", "description": "", "malignant": "yes",
                              "urgency": "routine", "advice": ""}]}), "true or false"),
    (json.dumps({"classes": [{"id": "a", "name": "A", "description": "", "malignant": False,
                              "urgency": "whenever", "advice": ""}]}), "urgency"),
    (json.dumps({"classes": [{"id": "a", "name": "A", "description": "", "malignant": False,
                              "urgency": "routine", "advice": ""}] * 2}), "duplicate"),
])
def test_bad_taxonomy_files_fail_clearly(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_taxonomy(path)


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown taxonomy"):
        load_taxonomy("nonexistent")
