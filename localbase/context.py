"""State shared by the three services of one localbase process."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localbase import tokens
from localbase.security import Security

log = logging.getLogger("localbase")


@dataclass
class Context:
    data_dir: Path
    project_id: str
    host: str
    ports: dict[str, int]
    rules_dir: Path
    # The mode's policy: token format, who is admin, CORS, per-client limits (localbase.security).
    security: Security = field(default_factory=Security.emulator)
    # Filled in by the services at start-up; the RTDB and Storage rules ask the Auth service through
    # this hook whether a token was revoked (user deleted, disabled or tokens revoked).
    extras: dict[str, Any] = field(default_factory=dict)
    # Bumped by Auth whenever some user's tokens may have stopped being valid, so a database stream
    # re-checks its token before the next event instead of trusting an earlier check.
    auth_epoch: int = 0
    _auth_listeners: list[Callable[[str | None], None]] = field(default_factory=list)

    @property
    def secure(self) -> bool:
        return self.security.secure

    @property
    def codec(self) -> tokens.TokenCodec:
        return self.security.codec

    def verify_id_token(self, token: str) -> dict[str, Any]:
        """Claims of a valid end-user ID token; raises tokens.InvalidToken otherwise."""
        claims = self.codec.decode_id_token(token, self.project_id)
        is_revoked = self.extras.get("is_revoked")
        if is_revoked is not None and is_revoked(claims):
            raise tokens.InvalidToken("token revoked")
        return claims

    def on_auth_change(self, listener: Callable[[str | None], None]) -> None:
        """Call ``listener(uid)`` whenever a user's existing tokens may have become invalid (deleted,
        disabled, revoked, password or email changed); ``uid`` None means possibly every user."""
        self._auth_listeners.append(listener)

    def auth_changed(self, uid: str | None) -> None:
        self.auth_epoch += 1
        for listener in list(self._auth_listeners):
            try:
                listener(uid)
            except Exception:  # one service's failure must not stop the revocation reaching the others
                log.exception("an auth-change listener failed")
