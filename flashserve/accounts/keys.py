"""API key checks.

Keys are held only as SHA-256 digests and compared with
`hmac.compare_digest`, so neither memory dumps nor response timing reveal
them. Full accounts (many keys, balances) build on this module.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_PREFIX = "sk-fs-"


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def public_prefix(key: str) -> str:
    """The part of a key that may appear in logs and listings."""
    return key[: len(KEY_PREFIX) + 4] + "…"


class StaticKeyVerifier:
    """Accepts exactly one key (the operator's `FLASHSERVE_API_KEY` or a generated one)."""

    def __init__(self, key: str) -> None:
        if not key:
            raise ValueError("the API key must not be empty")
        self._digest = digest(key)
        self.tenant = hashlib.sha256(b"tenant:" + self._digest).hexdigest()[:16]

    def verify(self, presented: str) -> str | None:
        """The tenant the key belongs to, or None."""
        return self.tenant if hmac.compare_digest(digest(presented), self._digest) else None
