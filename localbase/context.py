"""State shared by the three services of one localbase process."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localbase import tokens


@dataclass
class Context:
    data_dir: Path
    project_id: str
    host: str
    ports: dict[str, int]
    rules_dir: Path
    # Filled in by the services at start-up; the RTDB and Storage rules ask the Auth service through
    # this hook whether a token was revoked (user deleted, disabled or tokens revoked).
    extras: dict[str, Any] = field(default_factory=dict)

    def verify_id_token(self, token: str) -> dict[str, Any]:
        """Claims of a valid end-user ID token; raises tokens.InvalidToken otherwise."""
        claims = tokens.decode_id_token(token, self.project_id)
        is_revoked = self.extras.get("is_revoked")
        if is_revoked is not None and is_revoked(claims):
            raise tokens.InvalidToken("token revoked")
        return claims
