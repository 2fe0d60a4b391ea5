"""The settlement outbox: a settlement the database could not take (it restarted, the connection dropped)
is appended to a local file, fsynced, and replayed until the database takes it.

One JSON object per line: `{"op": "settle", "charge": {...}}` or `{"op": "cancel", "request_id": ...}`.
Replaying is safe to repeat: a settlement deletes its reservation in the transaction that writes the usage
row, so a request id whose reservation is gone was written already (`reservations.py: settle` returns
None) and nothing is written twice. The file is the gateway's own (in its data dir): an entry is removed
only after the database committed it, by rewriting the file atomically (write, fsync, rename).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Outbox:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = asyncio.Lock()

    async def append(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, separators=(",", ":"), sort_keys=True) + "\n"
        async with self._lock:
            await asyncio.to_thread(self._append_line, line)

    def _append_line(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def pending(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a crash mid-append: it was never acknowledged
                log.error("skipping a torn outbox line in %s", self.path)
        return out

    async def replay(self, apply: Callable[[dict[str, Any]], Awaitable[None]]) -> int:
        """Apply every pending entry in order; the applied ones leave the file. Stops at the first failure
        (the database is still away). Returns how many were applied."""
        entries = await asyncio.to_thread(self.pending)
        done: set[str] = set()
        for entry in entries:
            try:
                await apply(entry)
            except Exception:  # noqa: BLE001 - kept for the next round
                log.warning("ledger outbox: %d settlement(s) still waiting for the database",
                            len(entries) - len(done), exc_info=log.isEnabledFor(logging.DEBUG))
                break
            done.add(_key(entry))
        if done:
            async with self._lock:
                await asyncio.to_thread(self._drop, done)
            log.info("ledger outbox: %d settlement(s) written to the database", len(done))
        return len(done)

    def _drop(self, done: set[str]) -> None:
        keep = [e for e in self.pending() if _key(e) not in done]
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for e in keep:
                f.write(json.dumps(e, separators=(",", ":"), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _key(entry: dict[str, Any]) -> str:
    request_id = entry["charge"]["request_id"] if entry["op"] == "settle" else entry["request_id"]
    return f"{entry['op']}:{request_id}"
