"""The deployment secret (flashserve/server_key.py): where it comes from, and that sealed data cannot be forged."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import stat
from pathlib import Path

import pytest

from flashserve.server_key import (
    ENV_VAR,
    KEY_FILE_NAME,
    SealError,
    ServerKey,
    ServerKeyError,
    _b64decode,
    _b64encode,
)

ENV_KEY = "0123456789abcdefghijklmnopqrstuvwxyz-ENV"


@pytest.fixture()
def key(tmp_path: Path) -> ServerKey:
    return ServerKey.load(tmp_path, {})


def test_seal_round_trips_and_each_seal_differs(key: ServerKey) -> None:
    for plaintext in (b"", b"thinking...", os.urandom(100_000)):
        token = key.seal("reasoning-seal", plaintext, b"resp_1")
        assert key.open("reasoning-seal", token, b"resp_1") == plaintext
    assert key.seal("session", b"x", b"") != key.seal("session", b"x", b"")
    token = key.seal("session", b"x", b"")
    assert token.isascii() and "=" not in token and "+" not in token and "/" not in token


@pytest.mark.parametrize("part", ["version", "nonce", "ciphertext", "tag"])
def test_tampering_with_any_part_is_a_seal_error(key: ServerKey, part: str) -> None:
    raw = _b64decode(key.seal("reasoning-seal", b"secret reasoning", b"ctx"))
    spans = {"version": range(0, 1), "nonce": range(1, 13), "ciphertext": range(13, len(raw) - 16),
             "tag": range(len(raw) - 16, len(raw))}
    for index in spans[part]:
        for bit in (0x01, 0x80):
            forged = bytearray(raw)
            forged[index] ^= bit
            with pytest.raises(SealError):
                key.open("reasoning-seal", _b64encode(bytes(forged)), b"ctx")


def test_malformed_tokens_are_seal_errors(key: ServerKey) -> None:
    token = key.seal("reasoning-seal", b"datum", b"")  # 34 bytes: the last character has 4 unused bits
    # A second spelling of the same bytes (other unused bits) is refused too.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    sibling = next(token[:-1] + c for c in alphabet
                   if c != token[-1] and _try_decode(token[:-1] + c) == _b64decode(token))
    for bad in ("", "!!!!", token + "=", token + "A", token[:-1], token[:20], token.replace(token[5], "+"),
                " " + token, sibling):
        with pytest.raises(SealError):
            key.open("reasoning-seal", bad, b"")
    with pytest.raises(SealError):
        key.open("reasoning-seal", None, b"")  # type: ignore[arg-type]


def _try_decode(text: str) -> bytes | None:
    import base64

    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        return None


def test_another_key_purpose_or_associated_data_cannot_open(tmp_path: Path, key: ServerKey) -> None:
    other = ServerKey.load(tmp_path / "other", {})
    token = key.seal("reasoning-seal", b"data", b"resp_1")
    with pytest.raises(SealError):
        other.open("reasoning-seal", token, b"resp_1")
    with pytest.raises(SealError):
        key.open("session", token, b"resp_1")
    with pytest.raises(SealError):
        key.open("reasoning-seal", token, b"resp_2")
    with pytest.raises(SealError):
        key.open("reasoning-seal", token, b"")


def test_unknown_purposes_are_programming_errors(key: ServerKey) -> None:
    with pytest.raises(ValueError, match="unknown key purpose"):
        key.seal("cookies", b"", b"")
    with pytest.raises(ValueError, match="unknown key purpose"):
        key.keyed_hash("", b"")


def test_sign_and_verify(tmp_path: Path, key: ServerKey) -> None:
    signature = key.sign("session", b"account=7;expires=99")
    assert key.verify("session", b"account=7;expires=99", signature)
    assert not key.verify("session", b"account=8;expires=99", signature)
    assert not key.verify("cache-salt", b"account=7;expires=99", signature)
    assert not key.verify("session", b"account=7;expires=99", signature[:-1])
    assert not key.verify("session", b"account=7;expires=99", "é" + signature[1:])
    assert not ServerKey.load(tmp_path / "other", {}).verify("session", b"account=7;expires=99", signature)


def test_keyed_hash_is_stable_per_key_and_purpose(tmp_path: Path, key: ServerKey) -> None:
    again = ServerKey.load(tmp_path, {})
    digest = key.keyed_hash("cache-salt", b"account-42")
    assert digest == again.keyed_hash("cache-salt", b"account-42")
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert digest != key.keyed_hash("cache-salt", b"account-43")
    assert digest != key.keyed_hash("session", b"account-42")
    assert digest != ServerKey.load(tmp_path / "other", {}).keyed_hash("cache-salt", b"account-42")
    assert b"account-42".hex() not in digest


def test_generated_key_file_is_0600_and_reused(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        first = ServerKey.load(tmp_path / "data", {})
    finally:
        os.umask(old)
    path = tmp_path / "data" / KEY_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.source == str(path)
    text = path.read_text()
    assert text.endswith("\n") and len(text.strip()) == 43
    assert [p.name for p in (tmp_path / "data").iterdir()] == [KEY_FILE_NAME]  # no temporary file left behind
    second = ServerKey.load(tmp_path / "data", {})
    assert second.key_id == first.key_id
    assert second.open("session", first.seal("session", b"x", b""), b"") == b"x"


def test_the_file_text_works_as_the_env_key(tmp_path: Path, key: ServerKey) -> None:
    copied = ServerKey.load(tmp_path / "gateway-2", {ENV_VAR: (tmp_path / KEY_FILE_NAME).read_text()})
    assert copied.key_id == key.key_id and copied.source == "env"
    assert copied.open("reasoning-seal", key.seal("reasoning-seal", b"r", b"a"), b"a") == b"r"


def test_env_key_overrides_the_file(tmp_path: Path, key: ServerKey) -> None:
    before = (tmp_path / KEY_FILE_NAME).read_text()
    from_env = ServerKey.load(tmp_path, {ENV_VAR: ENV_KEY})
    assert from_env.key_id != key.key_id
    assert from_env.key_id == ServerKey.load(tmp_path / "elsewhere", {ENV_VAR: f"  {ENV_KEY}\n"}).key_id
    assert (tmp_path / KEY_FILE_NAME).read_text() == before
    assert not (tmp_path / "elsewhere").exists()  # an env key never writes a file
    with pytest.raises(SealError):
        from_env.open("session", key.seal("session", b"x", b""), b"")


@pytest.mark.parametrize("value", ["", "short", "x" * 31, "a" * 40, "  " + "k" * 20 + "  "])
def test_a_short_or_placeholder_env_key_is_a_clear_error(tmp_path: Path, value: str) -> None:
    with pytest.raises(ServerKeyError, match=ENV_VAR):
        ServerKey.load(tmp_path, {ENV_VAR: value})
    assert not (tmp_path / KEY_FILE_NAME).exists()


def test_a_bad_key_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    path.write_text("too short\n")
    path.chmod(0o600)
    with pytest.raises(ServerKeyError, match="at least 32"):
        ServerKey.load(tmp_path, {})
    path.write_text(ENV_KEY + "\n")
    path.chmod(0o644)
    with pytest.raises(ServerKeyError, match="chmod 600"):
        ServerKey.load(tmp_path, {})
    path.chmod(0o600)
    assert ServerKey.load(tmp_path, {}).key_id == ServerKey.load(tmp_path / "x", {ENV_VAR: ENV_KEY}).key_id


def test_the_secret_never_shows(tmp_path: Path, key: ServerKey) -> None:
    secret = (tmp_path / KEY_FILE_NAME).read_text().strip()
    assert secret not in repr(key) and secret not in str(key)
    assert not hasattr(key, "__dict__")
    with pytest.raises(TypeError):
        pickle.dumps(key)


def _load_after(start: multiprocessing.synchronize.Event, data_dir: str, results: multiprocessing.Queue) -> None:
    start.wait()
    key = ServerKey.load(Path(data_dir), {})
    results.put((key.key_id, key.seal("session", b"from another process", b"")))


def test_processes_starting_together_end_up_with_one_key(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    for round_ in range(3):
        data_dir = tmp_path / f"round-{round_}"
        start, results = context.Event(), context.Queue()
        workers = [context.Process(target=_load_after, args=(start, str(data_dir), results)) for _ in range(6)]
        for worker in workers:
            worker.start()
        start.set()
        outcomes = [results.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(timeout=30)
            assert worker.exitcode == 0
        mine = ServerKey.load(data_dir, {})
        assert {key_id for key_id, _ in outcomes} == {mine.key_id}
        assert all(mine.open("session", token, b"") == b"from another process" for _, token in outcomes)
        assert [p.name for p in data_dir.iterdir()] == [KEY_FILE_NAME]


def test_a_process_that_loses_the_race_reads_the_winners_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic version of the race: the winner's file appears between our read and our publish."""
    import flashserve.server_key as server_key

    winner = ServerKey.load(tmp_path / "winner", {})
    winner_file = tmp_path / "winner" / KEY_FILE_NAME
    real_publish = server_key._publish

    def publish_after_the_winner(path: Path, text: str) -> bool:
        path.write_bytes(winner_file.read_bytes())
        path.chmod(0o600)
        return real_publish(path, text)

    monkeypatch.setattr(server_key, "_publish", publish_after_the_winner)
    assert ServerKey.load(tmp_path / "loser", {}).key_id == winner.key_id


def test_the_exclusive_create_fallback_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(*_: object) -> None:
        raise PermissionError("hard links not supported here")

    monkeypatch.setattr(os, "link", no_links)
    first = ServerKey.load(tmp_path, {})
    assert stat.S_IMODE((tmp_path / KEY_FILE_NAME).stat().st_mode) == 0o600
    assert ServerKey.load(tmp_path, {}).key_id == first.key_id
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE_NAME]


def test_an_unwritable_data_dir_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    def refuse(*_: object, **__: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(ServerKeyError, match=f"cannot create the key file .*{ENV_VAR}"):
        ServerKey.load(tmp_path, {})
    (tmp_path / "file").write_text("")
    with pytest.raises(ServerKeyError, match="cannot create the data directory"):
        ServerKey.load(tmp_path / "file" / "data", {})
