"""Dashboard sessions: a signed cookie naming the key id, an expiry and the CSRF token.

The key itself never goes into the cookie or a page. The signing secret is `MLCP_SESSION_SECRET`
when set (so several control planes accept each other's sessions); otherwise a random one per
process, and sessions end when it restarts.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

COOKIE = "mlcp_session"
SESSION_S = 8 * 3600


@dataclass(frozen=True)
class Session:
    key_id: int
    expires: int
    csrf: str


class Signer:
    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)

    def _sig(self, payload: str) -> str:
        return hmac.new(self._secret, payload.encode(), hashlib.sha256).hexdigest()

    def issue(self, key_id: int, now: float | None = None) -> tuple[str, Session]:
        session = Session(key_id, int((now or time.time()) + SESSION_S), secrets.token_urlsafe(24))
        payload = f"{session.key_id}.{session.expires}.{session.csrf}"
        return f"{payload}.{self._sig(payload)}", session

    def verify(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session a cookie stands for, or None when it is missing, forged or expired."""
        if not cookie or len(cookie) > 300:
            return None
        parts = cookie.split(".")
        if len(parts) != 4:
            return None
        key_id, expires, csrf, sig = parts
        if not hmac.compare_digest(self._sig(f"{key_id}.{expires}.{csrf}"), sig):
            return None
        if not (key_id.isascii() and key_id.isdigit() and expires.isascii() and expires.isdigit()):
            return None
        if len(key_id) > 18 or int(expires) < (now or time.time()):
            return None
        return Session(int(key_id), int(expires), csrf)


def csrf_ok(session: Session, token: str | None) -> bool:
    return token is not None and hmac.compare_digest(session.csrf.encode(), token.encode())
