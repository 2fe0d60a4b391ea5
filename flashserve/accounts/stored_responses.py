"""Stored responses of the Responses API (`store: true`): per account, never readable by another.

A row holds the response object as it was returned, the request's own input items (for
`GET /v1/responses/{id}/input_items`) and the whole conversation up to and including the response's output
(what `previous_response_id` continues: earlier turns, reasoning and tool calls included). Rows expire after
the retention the server was given (`responses_retention_days`); `purge_expired` deletes them, run
periodically by the app's lifespan. Every read and delete is keyed by (account, id): another account's id
reads as absent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from flashserve.accounts.clock import utcnow
from flashserve.accounts.tables import stored_responses


@dataclass(frozen=True, slots=True)
class StoredResponse:
    id: str
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    conversation: list[dict[str, Any]]


class ResponseStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def save(self, account_id: str, response_id: str, response: dict[str, Any],
                   input_items: list[dict[str, Any]], conversation: list[dict[str, Any]],
                   retention: timedelta) -> None:
        now = utcnow()
        async with self.engine.begin() as conn:
            await conn.execute(stored_responses.insert().values(
                id=response_id, account_id=account_id, created_at=now, expires_at=now + retention,
                response=json.dumps(response, ensure_ascii=False),
                input_items=json.dumps(input_items, ensure_ascii=False),
                conversation=json.dumps(conversation, ensure_ascii=False)))

    async def get(self, account_id: str, response_id: str) -> StoredResponse | None:
        """The account's stored response, or None (unknown, expired, or another account's)."""
        t = stored_responses
        query = sa.select(t).where(t.c.id == response_id, t.c.account_id == account_id, t.c.expires_at > utcnow())
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        return StoredResponse(row.id, json.loads(row.response), json.loads(row.input_items),
                              json.loads(row.conversation))

    async def delete(self, account_id: str, response_id: str) -> bool:
        t = stored_responses
        async with self.engine.begin() as conn:
            result = await conn.execute(t.delete().where(t.c.id == response_id, t.c.account_id == account_id))
        return bool(result.rowcount)

    async def purge_expired(self) -> int:
        """Delete every expired row; returns how many."""
        t = stored_responses
        async with self.engine.begin() as conn:
            result = await conn.execute(t.delete().where(t.c.expires_at <= utcnow()))
        return int(result.rowcount or 0)
