"""The deployment secret, and the per-purpose keys derived from it.

flashserve needs one secret that every gateway of a deployment shares: it
seals reasoning handed to clients (the Responses API's
`reasoning.encrypted_content`, Anthropic thinking signatures), signs console
session cookies, and keys the hash that turns a tenant into a KV-cache salt.
This module owns where that secret comes from and what may be done with it.

Where it comes from:
- `FLASHSERVE_SECRET_KEY`, when set: any string of at least 32 characters
  (surrounding whitespace ignored), used as it is: its UTF-8 bytes are the
  HKDF input. There is no hex or base64 decoding to guess at, so a value
  means the same key everywhere. Generate one with
  `python -c "import secrets; print(secrets.token_urlsafe(32))"`. Set but too
  short (empty included) is a `ServerKeyError`, never a silent fallback:
  gateways that quietly made their own keys would reject each other's tokens.
- Otherwise `<data_dir>/secret_key`, generated on first start: 32 random bytes
  written as URL-safe base64 (43 characters, so the file's text is a valid
  `FLASHSERVE_SECRET_KEY` and can be copied to other gateways). It is created
  with mode 0600 and published atomically (written to a temporary file, then
  hard-linked into place, which fails if the name exists): of processes that
  start together, one wins and the others read the winner's complete file. A
  key file readable by group or others is refused.

What may be done with it: each purpose ("reasoning-seal", "session",
"cache-salt") gets its own subkeys via HKDF-SHA256, one per use (AEAD,
HMAC, keyed hash), so no key ever serves two algorithms or two purposes.
- `seal` / `open`: AES-256-GCM, a random 96-bit nonce per seal, the caller's
  associated data bound in. A token is URL-safe base64 without padding of
  `version (1 byte) | nonce (12) | ciphertext | tag (16)`; the version byte is
  authenticated too. Any tampering, a foreign key, another purpose, other
  associated data or a malformed token raises `SealError`, and nothing else.
- `sign` / `verify`: HMAC-SHA256 (session cookies), compared in constant time.
- `keyed_hash`: HMAC-SHA256 as hex: stable for a key, opaque, not reversible.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ENV_VAR = "FLASHSERVE_SECRET_KEY"
KEY_FILE_NAME = "secret_key"
PURPOSES = ("reasoning-seal", "session", "cache-salt")
MIN_KEY_CHARS = 32
GENERATED_KEY_BYTES = 32

_SEAL_VERSION = 1
_NONCE_BYTES = 12
_TAG_BYTES = 16
_HKDF_SALT = b"flashserve server key v1"
_TOKEN_ALPHABET = re.compile(r"[A-Za-z0-9_-]*")
# How long a process that lost the race waits for the winner's file to be whole (O_EXCL fallback only).
_READ_WAIT_S = 5.0


class ServerKeyError(ValueError):
    """The secret is misconfigured: a short FLASHSERVE_SECRET_KEY, a bad or exposed key file."""


class SealError(Exception):
    """A sealed token cannot be opened: tampered, sealed under another key or purpose, or not a token."""


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Strict: URL-safe alphabet, no padding, and the canonical spelling (no second text for the same bytes)."""
    if not _TOKEN_ALPHABET.fullmatch(text) or len(text) % 4 == 1:
        raise SealError("not a sealed token")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise SealError("not a sealed token") from exc
    if _b64encode(data) != text:
        raise SealError("not a sealed token")
    return data


def _checked_secret(value: str, origin: str) -> bytes:
    secret = value.strip()
    if len(secret) < MIN_KEY_CHARS:
        raise ServerKeyError(
            f"{origin} must be at least {MIN_KEY_CHARS} characters (it has {len(secret)}); generate one with "
            "`python -c \"import secrets; print(secrets.token_urlsafe(32))\"`")
    if len(set(secret)) < 8:
        raise ServerKeyError(f"{origin} looks like a placeholder (fewer than 8 distinct characters)")
    return secret.encode("utf-8")


class ServerKey:
    """Per-purpose keys derived from the deployment secret. Never shows the secret (repr, str, pickling)."""

    __slots__ = ("source", "key_id", "_keys")

    def __init__(self, secret: bytes, source: str) -> None:
        if len(secret) < MIN_KEY_CHARS:
            raise ServerKeyError(f"a server key needs at least {MIN_KEY_CHARS} bytes of secret")
        self.source = source  # "env" or the key file's path: where the secret came from, for logs
        self._keys = {(purpose, use): _derive(secret, f"{purpose}/{use}")
                      for purpose in PURPOSES for use in ("aead", "hmac", "hash")}
        # A public fingerprint: equal on gateways that share the secret, and nothing about the secret.
        self.key_id = _derive(secret, "key-id")[:8].hex()

    @classmethod
    def load(cls, data_dir: Path, env: Mapping[str, str]) -> ServerKey:
        """The key from `FLASHSERVE_SECRET_KEY` in `env` if set, else from (or newly into) `data_dir`."""
        if ENV_VAR in env:
            return cls(_checked_secret(env[ENV_VAR], ENV_VAR), "env")
        path = Path(data_dir) / KEY_FILE_NAME
        return cls(_load_or_create(path), str(path))

    def __repr__(self) -> str:
        return f"ServerKey(key_id={self.key_id!r}, source={self.source!r})"

    def __reduce__(self) -> object:
        raise TypeError("a ServerKey is not pickled: load it in each process")

    # -- sealing -------------------------------------------------------------------------------------
    def seal(self, purpose: str, plaintext: bytes, associated: bytes) -> str:
        header = bytes([_SEAL_VERSION])
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = AESGCM(self._key(purpose, "aead")).encrypt(nonce, plaintext, header + associated)
        return _b64encode(header + nonce + sealed)

    def open(self, purpose: str, token: str, associated: bytes) -> bytes:
        key = self._key(purpose, "aead")
        if not isinstance(token, str):
            raise SealError("not a sealed token")
        data = _b64decode(token)
        if len(data) < 1 + _NONCE_BYTES + _TAG_BYTES:
            raise SealError("sealed token too short")
        if data[0] != _SEAL_VERSION:
            raise SealError(f"unknown sealed token version {data[0]}")
        nonce, sealed = data[1:1 + _NONCE_BYTES], data[1 + _NONCE_BYTES:]
        try:
            return AESGCM(key).decrypt(nonce, sealed, data[:1] + associated)
        except InvalidTag as exc:
            raise SealError("sealed token was altered, or sealed under another key, purpose or context") from exc

    # -- signing and hashing -------------------------------------------------------------------------
    def sign(self, purpose: str, data: bytes) -> str:
        return _b64encode(hmac.new(self._key(purpose, "hmac"), data, hashlib.sha256).digest())

    def verify(self, purpose: str, data: bytes, signature: str) -> bool:
        expected = self.sign(purpose, data).encode()
        return isinstance(signature, str) and hmac.compare_digest(expected, signature.encode("utf-8", "replace"))

    def keyed_hash(self, purpose: str, data: bytes) -> str:
        return hmac.new(self._key(purpose, "hash"), data, hashlib.sha256).hexdigest()

    def _key(self, purpose: str, use: str) -> bytes:
        try:
            return self._keys[(purpose, use)]
        except KeyError:
            raise ValueError(f"unknown key purpose {purpose!r}; known: {', '.join(PURPOSES)}") from None


def _derive(secret: bytes, info: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT, info=info.encode()).derive(secret)


# -- the key file ------------------------------------------------------------------------------------
def _load_or_create(path: Path) -> bytes:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ServerKeyError(f"cannot create the data directory {path.parent} ({exc.strerror or exc}); "
                             f"set {ENV_VAR} or choose a writable data directory") from exc
    deadline = time.monotonic() + _READ_WAIT_S
    while True:
        try:
            return _read_key_file(path)
        except FileNotFoundError:
            pass
        except _Incomplete:
            if time.monotonic() > deadline:
                raise ServerKeyError(f"{path} stayed empty or incomplete; remove it to generate a new key") from None
            time.sleep(0.01)
            continue
        text = _b64encode(secrets.token_bytes(GENERATED_KEY_BYTES)) + "\n"
        try:
            published = _publish(path, text)
        except OSError as exc:
            raise ServerKeyError(f"cannot create the key file {path} ({exc.strerror or exc}); make its directory "
                                 f"writable or set {ENV_VAR}") from exc
        if published:
            return text.strip().encode()
        # Another process published first: loop and read its key.


class _Incomplete(Exception):
    """The key file exists but its writer has not finished it (only possible on the O_EXCL fallback)."""


def _read_key_file(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ServerKeyError(f"{path} is not a regular file")
        if mode & 0o077:
            raise ServerKeyError(f"{path} is readable or writable by others (mode {stat.S_IMODE(mode):04o}); "
                                 f"run `chmod 600 {path}`")
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    if not raw.endswith(b"\n"):  # every file this module writes ends with a newline, after the whole key
        raise _Incomplete
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ServerKeyError(f"{path} is not UTF-8 text") from None
    return _checked_secret(text, str(path))


def _publish(path: Path, text: str) -> bool:
    """Put `text` at `path` unless a file is already there: True if this call created it."""
    fd, temporary = tempfile.mkstemp(prefix=".secret_key.", dir=path.parent)  # mode 0600 whatever the umask
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
        os.close(fd)
        fd = -1
        try:
            os.link(temporary, path)  # atomic, and fails if the name exists: the whole file or nothing
        except FileExistsError:
            return False
        except OSError:  # no hard links on this filesystem
            return _publish_exclusive(path, text)
        _fsync_dir(path.parent)
        return True
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(temporary)


def _publish_exclusive(path: Path, text: str) -> bool:
    """The fallback: O_CREAT | O_EXCL, then write; a reader that finds it unfinished waits (`_Incomplete`)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path.parent)
    return True


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
