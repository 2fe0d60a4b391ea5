"""The context limit, in-process on the real engine over the fake model (a 512-token context): the card
reports it, a huge completion budget is clamped to what the context leaves (generation ends with `length`
exactly at the context's end), and a prompt over the context is a 400 before any work or charge.

Moved here from tests/e2e/test_small_context.py (its generated-key banner test is now in
tests/e2e/test_lifecycle.py).
"""

from __future__ import annotations

import pytest

from tests.api.conftest import LOCAL_CONTEXT, Api
from tests.api.test_billing import body

pytestmark = pytest.mark.anyio


async def test_card_reports_the_context(api: Api) -> None:
    card = (await api.client.get("/v1/models/fake-local")).json()
    assert card["id"] == "fake-local" and card["context_length"] == LOCAL_CONTEXT


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_a_huge_budget_is_clamped_to_what_the_context_leaves(api: Api, field: str) -> None:
    r = await api.client.post("/v1/chat/completions", json=body("fake-local", "a long story " * 8, **{field: 384000}))
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["total_tokens"] == LOCAL_CONTEXT
    assert 90 < data["usage"]["prompt_tokens"] < LOCAL_CONTEXT


@pytest.mark.parametrize("stream", [False, True])
async def test_a_prompt_over_the_context_is_a_400_and_no_row(api: Api, stream: bool) -> None:
    r = await api.client.post("/v1/chat/completions", json=body("fake-local", "word " * 200, stream=stream))
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert str(LOCAL_CONTEXT) in error["message"]
    assert await api.records() == []
