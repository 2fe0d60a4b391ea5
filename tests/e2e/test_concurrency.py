"""End-to-end: simultaneous streams on one server.

Eight streams with distinct prompts at temperature 0 run at once (threads, one `openai` client each,
released together by a barrier): all must complete, each must say exactly what the same request says
when sent alone, and they must really overlap (continuous batching, not a queue). A second test
staggers the starts so requests join a batch that is already decoding.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import openai
import pytest

MODEL = "deepseek/deepseek-v4-flash"
MAX_TOKENS = 24
SUBJECTS = ["a dragon", "a lighthouse keeper", "a robot chef", "a lost kitten", "a pirate queen",
            "a haunted library", "a time-travelling clock", "a mountain village"]
PROMPTS = [f"Write a long, detailed story about {s}." for s in SUBJECTS]


@dataclass
class Result:
    content: str
    finish_reason: str | None
    completion_tokens: int
    role: str | None
    t_start: float
    t_first: float
    t_last: float


def run_stream(client: openai.OpenAI, prompt: str, start: threading.Barrier | None = None,
               delay: float = 0.0) -> Result:
    if start is not None:
        start.wait(timeout=60)
    time.sleep(delay)
    t_start = time.monotonic()
    content, finish, usage, role = "", None, None, None
    t_first = t_last = None
    with client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                        temperature=0, max_tokens=MAX_TOKENS, stream=True,
                                        stream_options={"include_usage": True}) as s:
        for chunk in s:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                role = role or choice.delta.role
                if choice.delta.content:
                    t_last = time.monotonic()
                    t_first = t_first or t_last
                    content += choice.delta.content
                if choice.finish_reason is not None:
                    finish = choice.finish_reason
    assert usage is not None, "no usage chunk"
    assert t_first is not None, "no content"
    return Result(content, finish, usage.completion_tokens, role, t_start, t_first, t_last)


def make_client(base_url: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=300.0)


def run_together(base_url: str, api_key: str, delays: list[float]) -> list[Result]:
    clients = [make_client(base_url, api_key) for _ in PROMPTS]
    barrier = threading.Barrier(len(PROMPTS))
    try:
        with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
            futures = [pool.submit(run_stream, c, p, barrier, d) for c, p, d in zip(clients, PROMPTS, delays,
                                                                                  strict=True)]
            return [f.result(timeout=300) for f in futures]
    finally:
        for c in clients:
            c.close()


@pytest.fixture(scope="module")
def alone(client: openai.OpenAI) -> list[Result]:
    """Each request sent alone, one after the other."""
    results = [run_stream(client, p) for p in PROMPTS]
    for p, r in zip(PROMPTS, results, strict=True):
        assert r.role == "assistant"
        # Precondition for the overlap check: every story is long enough to hit max_tokens.
        assert r.finish_reason == "length" and r.completion_tokens == MAX_TOKENS, (p, r)
    assert len({r.content for r in results}) == len(PROMPTS), "prompts should give distinct answers"
    return results


def check_same(alone: list[Result], together: list[Result]) -> None:
    for p, a, t in zip(PROMPTS, alone, together, strict=True):
        assert t.role == "assistant", p
        assert t.finish_reason == a.finish_reason, p
        assert t.completion_tokens == a.completion_tokens, p
        assert t.content == a.content, f"{p!r}: concurrent answer differs from the answer alone"


def test_eight_simultaneous_streams_match_requests_sent_alone(base_url: str, api_key: str,
                                                              alone: list[Result]) -> None:
    together = run_together(base_url, api_key, [0.0] * len(PROMPTS))
    check_same(alone, together)
    # They ran at the same time: every stream had produced its first token before any stream ended.
    first_tokens = max(t.t_first for t in together)
    first_end = min(t.t_last for t in together)
    assert first_tokens < first_end, "streams were served one after another, not batched"


def test_staggered_streams_join_a_running_batch(base_url: str, api_key: str, alone: list[Result]) -> None:
    together = run_together(base_url, api_key, [0.3 * i for i in range(len(PROMPTS))])
    check_same(alone, together)
