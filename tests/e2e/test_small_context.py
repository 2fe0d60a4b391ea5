"""A second server: no FLASHSERVE_API_KEY (so it generates and prints one) and a 256-token context,
which makes the context-limit behaviour cheap to reach."""

from __future__ import annotations

import re
from collections.abc import Iterator

import openai
import pytest

from tests.e2e.conftest import _stop, _wait_ready, start_server

CONTEXT = 256
MODEL = "deepseek/deepseek-v4-flash"


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    process, base, log = start_server(tmp_path_factory, {"FLASHSERVE_MAX_CONTEXT_TOKENS": str(CONTEXT)},
                                      unset=("FLASHSERVE_API_KEY",))
    try:
        _wait_ready(base, process, log)
        banner = log.read_text(errors="replace")
        match = re.search(r"API key:\s+(\S+)\s+\(generated for this run", banner)
        assert match, f"the banner names no generated key:\n{banner}"
        assert f"{base}/v1" in banner, "the banner names the base URL"
        assert re.search(r"admin key:\s+sk-fs-\S+\s+\(generated for this run", banner), "an admin key is printed"
        assert "deepseek/deepseek-v4-flash" in banner and "SmolLM2-135M-Instruct" in banner
        yield base, match.group(1)
    finally:
        _stop(process, log)


@pytest.fixture(scope="module")
def small_client(small: tuple[str, str]) -> Iterator[openai.OpenAI]:
    base, key = small
    c = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120.0)
    yield c
    c.close()


def test_generated_key_works_and_others_do_not(small: tuple[str, str], small_client: openai.OpenAI) -> None:
    base, key = small
    assert len(key) >= 32
    assert small_client.models.retrieve(MODEL).id == MODEL
    wrong = openai.OpenAI(base_url=f"{base}/v1", api_key=key + "x", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_card_reports_the_context(small_client: openai.OpenAI) -> None:
    card = small_client.models.retrieve(MODEL)
    assert card.model_extra["context_length"] == CONTEXT


def test_output_is_clamped_to_what_the_context_leaves(small_client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Write a very long story about a dragon. " * 22}]
    r = small_client.chat.completions.create(model=MODEL, messages=messages, temperature=0.7, seed=1,
                                             max_tokens=384000)
    prompt = r.usage.prompt_tokens
    assert CONTEXT - 64 < prompt < CONTEXT
    assert prompt + r.usage.completion_tokens <= CONTEXT
    if r.choices[0].finish_reason == "length":
        assert prompt + r.usage.completion_tokens == CONTEXT
    else:
        assert r.choices[0].finish_reason == "stop"


def test_ignoring_eos_is_impossible_so_length_comes_from_the_context(small_client: openai.OpenAI) -> None:
    # logit_bias bans both end-of-turn tokens, so generation can only end at the context's end.
    messages = [{"role": "user", "content": "Count from one to one thousand."}]
    r = small_client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                             max_completion_tokens=100000, logit_bias={"2": -100, "0": -100})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == CONTEXT


def test_prompt_over_the_context_is_a_400(small_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        small_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 400}])
    assert err.value.status_code == 400
    assert err.value.body["code"] == "context_length_exceeded"
