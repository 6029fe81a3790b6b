"""A small world on a real localbase for the retraining tests (new labels, dataset versions, the
retraining run): patients who submit cases through the rules with their own tokens, dermatologists
with their role in Auth who review through the portal's own save, and the admin handles retraining
reads with."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from typing import Any

from firebase_admin import db

from dermaloop import auth as dl_auth
from dermaloop import cases
from dermaloop.admin_app import get_app
from dermaloop.database import UserDatabase, new_push_id
from dermaloop.storage import UserStorage, admin_bucket
from dermaloop.taxonomy import load_taxonomy
from localbase.tokens import mint_id_token
from reviewer_portal import claims, review
from tests.worker_support import lesion_jpeg

LABELS = load_taxonomy().ids


@dataclass
class World:
    settings: Any
    app: Any
    bucket: Any
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    derms: dict[str, tuple[str, UserDatabase]] = field(default_factory=dict)  # name -> (uid, db)
    patients: dict[str, tuple[UserDatabase, UserStorage]] = field(default_factory=dict)  # uid -> clients

    def ref(self, path: str = "/"):
        return db.reference(path, app=self.app)

    def dermatologist(self, name: str) -> str:
        """A dermatologist with an account in Auth (role claim) and a database client as themself."""
        if name not in self.derms:
            user, _ = dl_auth.create_user(f"{name}-{self.tag}@example.com", "secret123", "dermatologist",
                                          settings=self.settings)
            token = mint_id_token(self.settings.project_id, user.uid, {"role": "dermatologist"})
            self.derms[name] = (user.uid, UserDatabase(token, self.settings))
        return self.derms[name][0]

    def patient(self, uid: str | None = None) -> str:
        uid = uid or f"p-{self.tag}-{uuid.uuid4().hex[:6]}"
        if uid not in self.patients:
            token = mint_id_token(self.settings.project_id, uid, {"role": "patient"})
            self.patients[uid] = (UserDatabase(token, self.settings), UserStorage(token, self.settings))
        return uid

    def submit(self, uid: str, photo: bytes, *, consent: bool = True, same_lesion_as: str | None = None) -> str:
        """What the patient app does: upload the photo, then case + job in one write, as the patient."""
        database, storage = self.patients[uid]
        case_id = new_push_id()
        storage.upload(cases.image_object(uid, case_id), photo, "image/jpeg")
        image = cases.image_record(uid, case_id, hashlib.sha256(photo).hexdigest(), "image/jpeg", len(photo), 320, 240)
        database.update("/", cases.new_case_writes(cases.new_case(uid, case_id, image, consent,
                                                                  same_lesion_as=same_lesion_as)))
        return case_id

    def review(self, derm: str, uid: str, case_id: str, label: str, *, usable: bool = True,
               other_text: str | None = None) -> dict[str, Any]:
        """What the portal does when a dermatologist saves a review (then closes the case)."""
        me, database = self.derms[derm][0], self.derms[derm][1]
        form = review.ReviewForm(label, "Keep an eye on it.", "routine", confidence="high", other_text=other_text,
                                 training_use=usable)
        stored = review.save(database, me, uid, case_id, form, LABELS)
        claims.release(database, me, case_id)
        return stored

    def case(self, uid: str, case_id: str) -> Any:
        return self.ref(cases.case_path(uid, case_id)).get()


def make_world(localbase, namespace: str) -> World:
    settings = localbase.settings(database_url=f"https://{namespace}-default-rtdb.firebaseio.com")
    return World(settings, get_app(settings), admin_bucket(settings))


def photo(seed: int) -> bytes:
    return lesion_jpeg(seed, size=(96, 72))
