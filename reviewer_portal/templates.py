"""A dermatologist's recommendation templates, kept in the database so they follow them around.

The review form starts the recommendation from the template of the chosen urgency. Templates edited
in one browser session used to vanish with it; now they live at
``/reviewers/{uid}/templates/{urgency}``, which only that dermatologist may read and write (the
rules cap each at ``cases.MAX_RECOMMENDATION_CHARS``, as a recommendation). An urgency with nothing
stored uses :data:`reviewer_portal.review.DEFAULT_TEMPLATES`.
"""

from __future__ import annotations

from collections.abc import Mapping

from dermaloop import cases
from dermaloop.database import UserDatabase
from reviewer_portal.review import DEFAULT_TEMPLATES


class TemplatesRefused(ValueError):
    """The templates were not saved; the message says what to fix."""


def load(db: UserDatabase, uid: str) -> dict[str, str]:
    """The dermatologist's templates, the defaults where they stored none (or something unusable)."""
    stored = db.get(cases.reviewer_templates_path(uid))
    stored = stored if isinstance(stored, Mapping) else {}
    return {u: stored[u] if isinstance(stored.get(u), str) else DEFAULT_TEMPLATES[u] for u in cases.REVIEW_URGENCIES}


def check(templates: Mapping[str, str]) -> dict[str, str]:
    """The templates to store (trimmed), or :class:`TemplatesRefused` saying which one is wrong."""
    clean: dict[str, str] = {}
    for urgency, text in templates.items():
        if urgency not in cases.REVIEW_URGENCIES:
            raise TemplatesRefused(f"There is no urgency called {urgency!r}; templates are for "
                                   f"{', '.join(cases.REVIEW_URGENCIES)}.")
        if not isinstance(text, str):
            raise TemplatesRefused(f"The {urgency} template must be text.")
        text = text.strip()
        if len(text) > cases.MAX_RECOMMENDATION_CHARS:
            raise TemplatesRefused(f"The {urgency} template is limited to {cases.MAX_RECOMMENDATION_CHARS} characters "
                                   f"({len(text)} given). Nothing was saved.")
        clean[urgency] = text
    return clean


def save(db: UserDatabase, uid: str, templates: Mapping[str, str]) -> dict[str, str]:
    """Store ``templates`` (all of them in one write, or none); returns what was stored."""
    clean = check(templates)
    if clean:
        db.update("/", {cases.reviewer_templates_path(uid, u): text for u, text in clean.items()})
    return clean
