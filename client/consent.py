"""The patient's consent, kept on the device per account: shown before the first photo, and the
research opt-in that becomes each new case's ``consent.research``.

A small JSON file per uid (written atomically) rather than the server: consent must be given before
the first photo, and the first photo may be taken offline.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

_SAFE_UID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


@dataclass(frozen=True)
class Consent:
    accepted_at: int  # ms
    research: bool


class ConsentStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "consent"

    def _file(self, uid: str) -> Path:
        if not _SAFE_UID.match(uid):
            raise ValueError(f"not a valid uid: {uid!r}")
        return self.root / f"{uid}.json"

    def get(self, uid: str) -> Consent | None:
        try:
            data = json.loads(self._file(uid).read_text())
            return Consent(int(data["accepted_at"]), bool(data["research"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def accept(self, uid: str, research: bool) -> Consent:
        consent = Consent(int(time.time() * 1000), bool(research))
        path = self._file(uid)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(consent)))
        tmp.replace(path)
        return consent

    def forget(self, uid: str) -> None:
        self._file(uid).unlink(missing_ok=True)
