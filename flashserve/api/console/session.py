"""Console sessions: a signed cookie, its CSRF token, and the sign-in rate limit.

The cookie holds no secret, only who signed in: the *id* of the key the playground bills (keys are hashed;
the key itself is never kept, in the cookie or the browser), the account id, whether the admin key signed
in, an expiry and a random nonce. It is `payload.signature`: URL-safe base64 JSON and an HMAC-SHA256 under
the "session" subkey of the deployment secret (`server_key.py`), so every gateway that shares
FLASHSERVE_SECRET_KEY accepts it. It is HttpOnly, SameSite=Strict, Secure when the request came over
HTTPS, and expires. Every visitor gets one (an anonymous one before signing in), so the sign-in form has
a CSRF token too; signing in issues a new nonce (no session fixation).

The CSRF token is an HMAC of the nonce (a different message from the cookie's), sent back as a form field
`csrf` or an `x-csrf-token` header; every state-changing request checks it.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from collections import defaultdict, deque
from dataclasses import asdict, dataclass, replace

from starlette.requests import Request
from starlette.responses import Response

from flashserve.server_key import ServerKey

COOKIE = "fs_console"
PURPOSE = "session"


@dataclass(frozen=True, slots=True)
class Session:
    nonce: str
    expires: int
    account_id: str | None = None  # signed in to an account (with a key or a password)
    key_id: str | None = None  # the key the playground bills: the one signed in with, or a console user's
    admin: bool = False  # signed in with the admin key
    admin_fp: str = ""  # which admin key: a session outlives no change of FLASHSERVE_ADMIN_KEY
    who: str = ""  # what the header shows: the key's prefix, the user's name, "admin"

    @property
    def signed_in(self) -> bool:
        return self.admin or self.account_id is not None


def new_session(ttl_s: int, **who: object) -> Session:
    return Session(nonce=secrets.token_urlsafe(16), expires=int(time.time()) + ttl_s, **who)  # type: ignore[arg-type]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encode(session: Session, key: ServerKey) -> str:
    payload = _b64(json.dumps(asdict(session), separators=(",", ":")).encode())
    return f"{payload}.{key.sign(PURPOSE, b'cookie|' + payload.encode())}"


def decode(cookie: str | None, key: ServerKey) -> Session | None:
    """The session in a cookie, or None when it is absent, altered, foreign or expired."""
    if not cookie or cookie.count(".") != 1:
        return None
    payload, signature = cookie.split(".")
    if not key.verify(PURPOSE, b"cookie|" + payload.encode(), signature):
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        session = Session(**data)
    except (binascii.Error, ValueError, TypeError):
        return None
    return session if session.expires > time.time() else None


def csrf_token(session: Session, key: ServerKey) -> str:
    return key.sign(PURPOSE, b"csrf|" + session.nonce.encode())


def csrf_ok(session: Session, key: ServerKey, presented: str | None) -> bool:
    return bool(presented) and key.verify(PURPOSE, b"csrf|" + session.nonce.encode(), presented or "")


def is_https(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "") == "https"


def set_cookie(response: Response, request: Request, session: Session, key: ServerKey) -> None:
    response.set_cookie(COOKIE, encode(session, key), max_age=max(0, session.expires - int(time.time())),
                        path="/", httponly=True, samesite="strict", secure=is_https(request))


def clear_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=is_https(request))


def refreshed(session: Session, ttl_s: int) -> Session:
    return replace(session, expires=int(time.time()) + ttl_s)


class SignInLimiter:
    """At most `failures` failed sign-ins per client address per `window_s`; the rest get 429."""

    def __init__(self, failures: int, window_s: float) -> None:
        self.failures = failures
        self.window_s = window_s
        self._seen: dict[str, deque[float]] = defaultdict(deque)

    def _recent(self, client: str) -> deque[float]:
        seen = self._seen[client]
        cutoff = time.monotonic() - self.window_s
        while seen and seen[0] < cutoff:
            seen.popleft()
        return seen

    def blocked(self, client: str) -> float:
        """Seconds until `client` may try again (0: now)."""
        seen = self._recent(client)
        if len(seen) < self.failures:
            return 0.0
        return max(0.0, seen[0] + self.window_s - time.monotonic())

    def failed(self, client: str) -> None:
        self._recent(client).append(time.monotonic())
        if len(self._seen) > 100_000:  # bounded memory under a spray of addresses
            self._seen.clear()
