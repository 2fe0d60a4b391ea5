"""Time helpers for the accounts layer: one notion of 'now' (naive UTC, as stored) and
parsing of the `from`/`to` bounds that usage reports accept."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def parse_instant(value: str) -> datetime:
    """Unix seconds, an ISO date (midnight UTC) or an ISO datetime (UTC when naive)."""
    text = value.strip()
    try:
        return datetime.fromtimestamp(float(text), UTC).replace(tzinfo=None)
    except ValueError:
        pass
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed
