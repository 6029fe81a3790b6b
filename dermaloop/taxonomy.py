"""Diagnostic classes as data: a labels file travels with every model version.

A taxonomy is a JSON document (``dermaloop/taxonomies/*.json`` ship HAM10000's 7 classes as the
default, ISIC 2019's 8 and the original mobile system's 6). Each class has an id, a display name, a
plain-language description, a malignant-or-pre-malignant flag and the advice and urgency shown to
patients. Switching taxonomy is configuration (``--taxonomy NAME_OR_PATH``), not code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["LabelClass", "Taxonomy", "load_taxonomy", "available_taxonomies", "DEFAULT_TAXONOMY", "URGENCIES"]

TAXONOMY_DIR = Path(__file__).parent / "taxonomies"
DEFAULT_TAXONOMY = "ham10000"
URGENCIES = ("routine", "soon", "urgent")


@dataclass(frozen=True)
class LabelClass:
    id: str
    name: str
    description: str
    malignant: bool
    urgency: str
    advice: str


@dataclass(frozen=True)
class Taxonomy:
    name: str
    version: str
    description: str
    classes: tuple[LabelClass, ...]

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.classes]

    @property
    def malignant_ids(self) -> list[str]:
        return [c.id for c in self.classes if c.malignant]

    @property
    def malignant_mask(self) -> list[bool]:
        return [c.malignant for c in self.classes]

    def __len__(self) -> int:
        return len(self.classes)

    def index(self, class_id: str) -> int:
        """Position of a class id; case-insensitive so 'MEL' and 'mel' agree across datasets."""
        lowered = class_id.strip().lower()
        for i, c in enumerate(self.classes):
            if c.id.lower() == lowered:
                return i
        raise KeyError(f"{class_id!r} is not a class of taxonomy {self.name!r} ({', '.join(self.ids)})")

    def get(self, class_id: str) -> LabelClass:
        return self.classes[self.index(class_id)]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "description": self.description,
                "classes": [asdict(c) for c in self.classes]}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_dict(cls, data: Any, source: str = "taxonomy") -> Taxonomy:
        if not isinstance(data, dict) or not isinstance(data.get("classes"), list) or not data["classes"]:
            raise ValueError(f"{source}: expected an object with a non-empty 'classes' list")
        classes = []
        for i, raw in enumerate(data["classes"]):
            if not isinstance(raw, dict):
                raise ValueError(f"{source}: class {i} is not an object")
            missing = [k for k in ("id", "name", "description", "malignant", "urgency", "advice") if k not in raw]
            if missing:
                raise ValueError(f"{source}: class {i} lacks {', '.join(missing)}")
            if not isinstance(raw["id"], str) or not raw["id"].strip():
                raise ValueError(f"{source}: class {i} has an empty id")
            if not isinstance(raw["malignant"], bool):
                raise ValueError(f"{source}: class {raw['id']!r}: 'malignant' must be true or false")
            if raw["urgency"] not in URGENCIES:
                raise ValueError(f"{source}: class {raw['id']!r}: urgency must be one of {URGENCIES}")
            classes.append(LabelClass(raw["id"], str(raw["name"]), str(raw["description"]), raw["malignant"],
                                      raw["urgency"], str(raw["advice"])))
        ids = [c.id.lower() for c in classes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{source}: duplicate class ids")
        return cls(str(data.get("name", source)), str(data.get("version", "1")),
                   str(data.get("description", "")), tuple(classes))


def available_taxonomies() -> list[str]:
    return sorted(p.stem for p in TAXONOMY_DIR.glob("*.json"))


def load_taxonomy(name_or_path: str | Path = DEFAULT_TAXONOMY) -> Taxonomy:
    """A bundled taxonomy by name (``ham10000``, ``isic2019``, ``mobile6``) or a labels JSON file by path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = TAXONOMY_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise ValueError(f"unknown taxonomy {name_or_path!r}; bundled: {', '.join(available_taxonomies())}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"taxonomy file {path} not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: malformed JSON ({exc})") from exc
    return Taxonomy.from_dict(data, source=str(path))
