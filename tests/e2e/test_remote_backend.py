"""A model served by a remote upstream: flashserve keeps the API, keys and billing, the upstream generates.

The upstream is a real process on 127.0.0.1: a faithful stand-in for DeepSeek's API
(tests/e2e/fake_deepseek.py). The session's shared server (tests/e2e/scripted.py: `serve_upstreams`) has a
catalog entry that points `ds-remote` at it.
Retries, upstream errors, a wrong upstream key and timeouts moved in-process (tests/api/test_remote_router.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.e2e.scripted import ADMIN, KEY, REMOTE_MODEL, UPSTREAM_KEY, Upstreams

MODEL = REMOTE_MODEL


@pytest.fixture(scope="module")
def remote(upstreams: Upstreams) -> Iterator[tuple[openai.OpenAI, str, str]]:
    with openai.OpenAI(base_url=f"{upstreams.base}/v1", api_key=KEY, max_retries=0, timeout=60) as client:
        yield client, upstreams.base, upstreams.upstream[MODEL]


def sent_upstream(upstream_url: str) -> list[dict]:
    return httpx.get(f"{upstream_url}/requests", timeout=10).json()


def test_non_streaming_answer_usage_and_billing(remote: tuple[openai.OpenAI, str, str]) -> None:
    client, base, upstream_url = remote
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       reasoning_effort="medium")
    assert r.choices[0].message.content == "Hello from upstream"
    assert r.choices[0].message.reasoning_content == "Let me think."  # type: ignore[attr-defined]
    assert r.usage.prompt_tokens == 100 and r.usage.completion_tokens == 7
    assert r.usage.prompt_tokens_details.cached_tokens == 64  # DeepSeek's prompt_cache_hit_tokens
    assert r.usage.completion_tokens_details.reasoning_tokens == 3
    expected_pusd = 64 * 2_800 + 36 * 140_000 + 7 * 280_000  # the reference prices, per token
    assert round(r.usage.cost * 1e12) == expected_pusd  # type: ignore[attr-defined]
    last = sent_upstream(upstream_url)[-1]
    assert last["body"]["model"] == "deepseek-v4-flash" and last["body"]["stream"] is True
    assert last["body"]["thinking"] == {"type": "enabled"} and last["body"]["reasoning_effort"] == "high"
    assert last["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert KEY not in str(last["headers"])  # the client's key never leaves flashserve
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as admin:
        records = admin.get("/admin/usage/records").json()["data"]
    assert any(rec["model"] == MODEL and rec["cached_tokens"] == 64 and rec["cost_pusd"] == expected_pusd
               for rec in records), records


def test_streaming_passes_through_with_usage(remote: tuple[openai.OpenAI, str, str]) -> None:
    client, _, upstream_url = remote
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            reasoning_effort="none", stream=True,
                                            stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
        usage = chunk.usage or usage
    assert text == "Hello from upstream" and usage is not None and usage.prompt_tokens_details.cached_tokens == 64
    assert sent_upstream(upstream_url)[-1]["body"]["thinking"] == {"type": "disabled"}
