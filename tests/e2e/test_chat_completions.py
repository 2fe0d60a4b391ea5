"""End-to-end: non-streaming POST /v1/chat/completions and the /v1/models endpoints.

Drives the real server (see conftest.py) with the `openai` client and, where the exact JSON matters,
raw httpx. Covers the response shape and usage arithmetic, greedy answers, the spec's reference
request, max_tokens / max_completion_tokens and the clamp of huge values, stop strings, seeds, n > 1,
every message role, content arrays, the prefix cache's cached_tokens, and model listing/retrieval.
Generated lengths stay small: the server decodes at a few tens of tokens per second on CPU.
"""

from __future__ import annotations

import time
import uuid

import httpx
import openai
import pytest

MODEL = "deepseek/deepseek-v4-flash"
ALT_MODEL = "smollm2-135m-instruct"
CONTEXT = 8192
BLOCK = 16

PARIS = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
POEM = [{"role": "user", "content": "Write a poem about the sea, the wind and a lonely lighthouse."}]

REFERENCE_BODY = {
    "model": "deepseek/deepseek-v4-flash",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello, how are you?"},
    ],
    "temperature": 0.7,
    "max_tokens": 384000,
}


def greedy(client: openai.OpenAI, messages: list, max_tokens: int = 32, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                          max_tokens=max_tokens, **kw)


def check_usage_dict(usage: dict) -> None:
    """The exact usage object of the spec, with consistent arithmetic (text-only, no reasoning)."""
    p, c = usage["prompt_tokens"], usage["completion_tokens"]
    assert all(isinstance(usage[k], int) for k in ("prompt_tokens", "completion_tokens", "total_tokens"))
    assert p > 0 and c >= 0
    assert usage["total_tokens"] == p + c
    pd, cd = usage["prompt_tokens_details"], usage["completion_tokens_details"]
    assert set(pd) >= {"cached_tokens", "text_tokens", "audio_tokens", "image_tokens"}, pd
    assert set(cd) >= {"text_tokens", "audio_tokens", "reasoning_tokens"}, cd
    assert 0 <= pd["cached_tokens"] < p
    assert pd["cached_tokens"] % BLOCK == 0
    assert pd["text_tokens"] == p
    assert pd["audio_tokens"] == 0 and pd["image_tokens"] == 0
    assert cd["reasoning_tokens"] == 0
    assert cd["text_tokens"] == c
    assert cd["audio_tokens"] == 0


# -- shape and usage ---------------------------------------------------------------------------------------
def test_response_shape_via_openai_client(client: openai.OpenAI) -> None:
    before = time.time()
    r = greedy(client, PARIS, max_tokens=16)
    after = time.time()
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion"
    assert before - 5 <= r.created <= after + 5
    assert r.model == MODEL
    assert r.system_fingerprint and r.system_fingerprint.startswith("fp_")
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert not choice.message.tool_calls
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens is not None
    assert r.usage.completion_tokens_details.reasoning_tokens == 0


def test_response_json_and_usage_fields(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions",
                  json={"model": MODEL, "messages": PARIS, "temperature": 0, "max_tokens": 8})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) >= {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["system_fingerprint"].startswith("fp_")
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    check_usage_dict(body["usage"])
    assert body["usage"]["completion_tokens"] <= 8
    if choice["finish_reason"] == "length":
        assert body["usage"]["completion_tokens"] == 8


def test_ids_are_unique(client: openai.OpenAI) -> None:
    ids = {greedy(client, PARIS, max_tokens=1).id for _ in range(3)}
    assert len(ids) == 3


# -- greedy answers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", [MODEL, ALT_MODEL])
def test_capital_of_france_is_paris(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(model=model, messages=PARIS, temperature=0, max_tokens=32)
    assert r.model == model
    assert "Paris" in r.choices[0].message.content


def test_temperature_zero_is_deterministic_and_ignores_seed(client: openai.OpenAI) -> None:
    a = greedy(client, STORY, max_tokens=12)
    b = greedy(client, STORY, max_tokens=12, seed=1)
    c = greedy(client, STORY, max_tokens=12, seed=2)
    assert a.choices[0].message.content == b.choices[0].message.content == c.choices[0].message.content


def test_reference_request_from_the_spec(base_url: str, api_key: str) -> None:
    """The spec's curl example, byte for byte: max_tokens 384000 is clamped to the context.

    It samples at temperature 0.7 without a seed, so the small stand-in model usually stops at EOS but
    now and then writes until the context is full: either end is right, and "length" must mean exactly
    that the context filled, not that max_tokens cut it."""
    r = httpx.post(f"{base_url}/v1/chat/completions", json=REFERENCE_BODY, timeout=300.0,
                   headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "deepseek/deepseek-v4-flash"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].strip()) >= 2
    assert choice["finish_reason"] in ("stop", "length")
    check_usage_dict(body["usage"])
    assert body["usage"]["total_tokens"] <= CONTEXT
    if choice["finish_reason"] == "length":
        assert body["usage"]["total_tokens"] == CONTEXT


# -- output length -----------------------------------------------------------------------------------------
def test_max_tokens_gives_length(client: openai.OpenAI) -> None:
    r5 = greedy(client, STORY, max_tokens=5)
    assert r5.choices[0].finish_reason == "length"
    assert r5.usage.completion_tokens == 5
    r9 = client.chat.completions.create(model=MODEL, messages=STORY, temperature=0, max_completion_tokens=9)
    assert r9.choices[0].finish_reason == "length"
    assert r9.usage.completion_tokens == 9
    # Greedy: the 5-token answer is the start of the 9-token one.
    assert r9.choices[0].message.content.startswith(r5.choices[0].message.content)
    assert len(r9.choices[0].message.content) > len(r5.choices[0].message.content)


def test_max_tokens_one(client: openai.OpenAI) -> None:
    r = greedy(client, STORY, max_tokens=1)
    assert r.usage.completion_tokens == 1
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_huge_max_tokens_is_clamped_not_an_error(client: openai.OpenAI, field: str) -> None:
    r = client.chat.completions.create(model=MODEL, messages=PARIS, temperature=0, timeout=300.0,
                                       **{field: 384000})
    assert r.choices[0].finish_reason == "stop"
    assert "Paris" in r.choices[0].message.content
    assert r.usage.total_tokens <= CONTEXT


# -- stop strings ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paris_answer(client: openai.OpenAI) -> tuple[str, str]:
    r = greedy(client, PARIS, max_tokens=32)
    content = r.choices[0].message.content
    assert "Paris" in content, content
    return content, r.choices[0].finish_reason


def expected_cut(text: str, stops: list[str]) -> str:
    hits = [text.index(s) for s in stops if s in text]
    return text[:min(hits)] if hits else text


def spanning(text: str) -> str:
    """Five characters around the first space inside the answer: "ab cd" crosses a token boundary
    (BPE starts a new token at a space that follows a word)."""
    for i in range(2, len(text) - 3):
        if text[i] == " " and not any(ch.isspace() for ch in text[i - 2:i] + text[i + 1:i + 3]):
            return text[i - 2:i + 3]
    raise AssertionError(f"no word boundary in {text!r}")


STOP_CASES = {
    "string": lambda base: "Paris",
    "list": lambda base: ["Paris"],
    "mid-token": lambda base: ["ari"],
    "spanning": lambda base: [spanning(base)],
    "several": lambda base: ["zzqx", "Paris", spanning(base)],
}


@pytest.mark.parametrize("case", list(STOP_CASES))
def test_stop_strings(client: openai.OpenAI, paris_answer: tuple[str, str], case: str) -> None:
    base, _ = paris_answer
    stop = STOP_CASES[case](base)
    stops = [stop] if isinstance(stop, str) else stop
    expected = expected_cut(base, stops)
    assert expected != base, f"precondition: a stop of {stops} occurs in {base!r}"
    r = greedy(client, PARIS, max_tokens=32, stop=stop)
    content = r.choices[0].message.content
    assert content == expected
    assert r.choices[0].finish_reason == "stop"
    assert not any(s in content for s in stops)


def test_stop_string_that_never_completes_changes_nothing(client: openai.OpenAI,
                                                          paris_answer: tuple[str, str]) -> None:
    """A stop whose prefix is the answer's tail: held-back text must be released at the end."""
    base, finish = paris_answer
    stop = base[-4:] + "QZ"
    r = greedy(client, PARIS, max_tokens=32, stop=[stop, "Parisian"])
    assert r.choices[0].message.content == base
    assert r.choices[0].finish_reason == finish


# -- sampling ----------------------------------------------------------------------------------------------
def test_same_seed_same_output_at_temperature_one(client: openai.OpenAI) -> None:
    def sample(seed: int):
        return client.chat.completions.create(model=MODEL, messages=POEM, temperature=1.0, max_tokens=16,
                                              seed=seed)

    a, b = sample(1234), sample(1234)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens == b.usage.completion_tokens
    outputs = {a.choices[0].message.content} | {sample(s).choices[0].message.content for s in (1, 2, 3)}
    assert len(outputs) >= 2, f"four seeds gave one output: {outputs}"


def test_n_choices_sampled(client: openai.OpenAI) -> None:
    single = greedy(client, STORY, max_tokens=1)
    r = client.chat.completions.create(model=MODEL, messages=STORY, temperature=1.0, max_tokens=8, n=3,
                                       seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.role == "assistant" and c.message.content for c in r.choices)
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert r.usage.prompt_tokens == single.usage.prompt_tokens
    at_length = sum(8 for c in r.choices if c.finish_reason == "length")
    assert at_length <= r.usage.completion_tokens <= 3 * 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert len({c.message.content for c in r.choices}) >= 2, "n=3 at temperature 1 gave three equal samples"


def test_n_choices_greedy_are_identical(client: openai.OpenAI) -> None:
    one = greedy(client, STORY, max_tokens=8)
    r = greedy(client, STORY, max_tokens=8, n=2)
    assert len(r.choices) == 2
    assert [c.message.content for c in r.choices] == [one.choices[0].message.content] * 2
    assert r.usage.completion_tokens == 2 * one.usage.completion_tokens


# -- messages ----------------------------------------------------------------------------------------------
def all_roles() -> list[dict]:
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature_c\": 18, \"sky\": \"sunny\"}"},
        {"role": "assistant", "content": "It is sunny and 18 degrees in Paris."},
        {"role": "user", "content": "Thanks! And what is the capital of France?"},
    ]


def test_all_roles_with_tool_call_history(client: openai.OpenAI) -> None:
    r = greedy(client, all_roles(), max_tokens=16)
    assert r.choices[0].message.content.strip()
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("index", [0, 1, 2, 4, 5, 6])
def test_every_role_reaches_the_prompt(client: openai.OpenAI, index: int) -> None:
    """Lengthening any one message's content lengthens the prompt: no role's content is dropped."""
    messages = all_roles()
    base = greedy(client, messages, max_tokens=1).usage.prompt_tokens
    messages[index]["content"] += " banana" * 20
    longer = greedy(client, messages, max_tokens=1).usage.prompt_tokens
    assert longer - base >= 20, (messages[index]["role"], base, longer)


def test_optional_message_fields_are_accepted(client: openai.OpenAI) -> None:
    messages = [
        {"role": "user", "content": "Hi, I am Ann.", "name": "ann"},
        {"role": "assistant", "content": "Hello Ann!", "reasoning_content": "The user greeted me."},
        {"role": "user", "content": "What is the capital of France?", "name": "ann"},
    ]
    r = greedy(client, messages, max_tokens=4)
    assert r.choices[0].message.content


def test_single_text_part_equals_string_content(client: openai.OpenAI) -> None:
    as_string = greedy(client, PARIS, max_tokens=16)
    as_part = greedy(client, [{"role": "user",
                               "content": [{"type": "text", "text": PARIS[0]["content"]}]}], max_tokens=16)
    assert as_part.usage.prompt_tokens == as_string.usage.prompt_tokens
    assert as_part.choices[0].message.content == as_string.choices[0].message.content


def test_text_parts_are_joined(client: openai.OpenAI) -> None:
    as_string = greedy(client, PARIS, max_tokens=1)
    parts = [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}]
    r = greedy(client, [{"role": "user", "content": parts}], max_tokens=32)
    assert abs(r.usage.prompt_tokens - as_string.usage.prompt_tokens) <= 2
    assert "Paris" in r.choices[0].message.content
    system_parts = [{"type": "text", "text": "You are a geography expert."},
                    {"type": "text", "text": " Answer briefly."}]
    r2 = greedy(client, [{"role": "system", "content": system_parts}, *PARIS], max_tokens=1)
    r3 = greedy(client, [{"role": "system", "content": system_parts[:1]}, *PARIS], max_tokens=1)
    assert r2.usage.prompt_tokens > r3.usage.prompt_tokens


# -- prefix cache ------------------------------------------------------------------------------------------
def test_repeated_long_prompt_reports_cached_tokens(client: openai.OpenAI) -> None:
    text = (f"Note {uuid.uuid4().hex}. " + "The quick brown fox jumps over the lazy dog. " * 25
            + "How many times did the fox jump?")
    messages = [{"role": "user", "content": text}]
    first = greedy(client, messages, max_tokens=8)
    second = greedy(client, messages, max_tokens=8)
    p = first.usage.prompt_tokens
    assert p > 4 * BLOCK
    assert second.usage.prompt_tokens == p
    c1 = first.usage.prompt_tokens_details.cached_tokens
    c2 = second.usage.prompt_tokens_details.cached_tokens
    assert c2 > 0 and c2 > c1
    assert c2 % BLOCK == 0 and c1 % BLOCK == 0
    assert c2 < p
    assert c2 >= p - 2 * BLOCK, f"only {c2} of {p} prompt tokens came from the cache"
    # A cache hit must not change the answer.
    assert second.choices[0].message.content == first.choices[0].message.content


# -- models ------------------------------------------------------------------------------------------------
def test_list_models(client: openai.OpenAI, http: httpx.Client) -> None:
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids and ALT_MODEL in ids
    body = http.get("/v1/models").json()
    assert body["object"] == "list"
    for m in body["data"]:
        assert m["object"] == "model"
        assert isinstance(m["id"], str) and isinstance(m["created"], int) and isinstance(m["owned_by"], str)


@pytest.mark.parametrize("model", [MODEL, ALT_MODEL])
def test_retrieve_model(client: openai.OpenAI, http: httpx.Client, model: str) -> None:
    m = client.models.retrieve(model)
    assert m.id == model
    assert m.object == "model"
    raw = http.get(f"/v1/models/{model}")
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert body["id"] == model
    assert isinstance(body["created"], int) and isinstance(body["owned_by"], str)
    assert set(body) > {"id", "object", "created", "owned_by"}, "expected fields describing the weights"
    listed = {x["id"]: x for x in http.get("/v1/models").json()["data"]}
    assert listed[model] == body
