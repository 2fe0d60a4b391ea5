"""End-to-end: code written against DeepSeek's own API, on the session server (the embedded model).

Legacy completions through the `openai` client (streamed and not), chat prefix completion, DeepSeek's
model names and `thinking` switch, the root base URL (`base_url` without /v1, as DeepSeek's SDK examples
have it), `user` keeping end users' cached prefixes apart, the tokenizer endpoints, and LiteLLM's own
`deepseek` provider as the client (issue 17's two failing calls, and a stream). FIM on the V4 format is in
tests/e2e/test_deepseek_v4_serve.py (the embedded model has no FIM format: 400 here).
"""

from __future__ import annotations

import os
import uuid

import httpx
import openai
import pytest

MODEL = "deepseek/deepseek-v4-flash"
FRANCE = "What is the capital of France?"


def test_completions_through_the_openai_client(client: openai.OpenAI) -> None:
    done = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    text = done.choices[0].text
    assert done.object == "text_completion" and text.strip()
    assert done.usage is not None and done.usage.completion_tokens == 6 and done.choices[0].finish_reason == "length"
    stream = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text  # greedy: the same text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_completions_list_of_prompts_echo_and_no_fim_format(client: openai.OpenAI) -> None:
    done = client.completions.create(model=MODEL, prompt=["One, two,", "Red, green,"], n=2, max_tokens=3,
                                     temperature=0, echo=True)
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    assert done.choices[0].text.startswith("One, two,") and done.choices[3].text.startswith("Red, green,")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="def f(", suffix="return 1", max_tokens=3)
    assert err.value.body["param"] == "suffix"  # type: ignore[index]


def test_chat_prefix_completion_continues_the_assistant_text(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": FRANCE},
                {"role": "assistant", "content": "The capital of France is", "prefix": True}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    content = r.choices[0].message.content or ""
    assert content.strip() and not content.lstrip().startswith("The capital")
    assert "Paris" in content
    plain = client.chat.completions.create(model=MODEL, messages=messages[:1], max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens  # the prefix's text was sent


def test_prefix_on_a_user_message_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, max_tokens=2,
                                       messages=[{"role": "user", "content": FRANCE, "prefix": True}])  # type: ignore[list-item]
    assert err.value.body["param"] == "messages[0].prefix"  # type: ignore[index]


def test_deepseek_names_and_the_root_base_url(base_url: str, api_key: str) -> None:
    with openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120) as root:
        models = {m.id: m for m in root.models.list().data}
        for alias in ("deepseek-v4-flash", "deepseek-chat", "deepseek-reasoner"):
            assert models[alias].model_extra["alias_of"] == MODEL  # type: ignore[index]
        assert root.models.retrieve("deepseek-chat").model_extra["alias_thinking"] is False  # type: ignore[index]
        for name in ("deepseek-chat", "deepseek-reasoner", "deepseek-v4-flash"):
            r = root.chat.completions.create(model=name, messages=[{"role": "user", "content": FRANCE}],
                                             max_tokens=3, temperature=0,
                                             extra_body={"thinking": {"type": "disabled"}}, reasoning_effort="high")
            assert r.model == name and r.choices[0].message.content
        done = root.completions.create(model="deepseek-chat", prompt="Hello", max_tokens=2)
        assert done.choices[0].text
    with openai.OpenAI(base_url=f"{base_url}/beta", api_key=api_key, max_retries=0, timeout=120) as beta:
        r = beta.chat.completions.create(model="deepseek-chat", max_tokens=4, temperature=0, messages=[
            {"role": "user", "content": FRANCE}, {"role": "assistant", "content": "It is", "prefix": True}])  # type: ignore[list-item]
        assert r.choices[0].message.content


def test_user_keeps_cached_prefixes_apart(client: openai.OpenAI) -> None:
    # A prompt of its own (no other test's cache can hold it), several 16-token blocks long.
    prompt = f"[{uuid.uuid4().hex}] " + "Summarize the history of bread baking in many careful sentences. " * 6

    def cached(user: str) -> int:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=1,
                                           temperature=0, user=user)
        return r.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]

    alice, bob = f"alice-{uuid.uuid4().hex[:6]}", f"bob-{uuid.uuid4().hex[:6]}"
    assert cached(alice) == 0
    assert cached(bob) == 0
    assert cached(alice) >= 16


def test_tokenize_and_detokenize(http: httpx.Client) -> None:
    messages = [{"role": "user", "content": FRANCE}]
    r = http.post("/tokenize", json={"model": MODEL, "messages": messages})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["count"] == len(data["tokens"]) > 5 and data["max_model_len"] > 0
    chat = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 1})
    assert chat.json()["usage"]["prompt_tokens"] == data["count"]
    text = http.post("/v1/detokenize", json={"model": MODEL, "tokens": data["tokens"]}).json()["prompt"]
    assert FRANCE in text
    r = http.post("/tokenize", json={"model": MODEL, "prompt": FRANCE})
    assert http.post("/detokenize", json={"model": MODEL, "tokens": r.json()["tokens"]}).json()["prompt"] == FRANCE


@pytest.fixture(scope="module")
def litellm_module():  # noqa: ANN201 - the module
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch of its price list
    import litellm

    litellm.telemetry = False
    return litellm


@pytest.mark.parametrize("extra", [{"reasoning_effort": "high"}, {}])
def test_litellm_deepseek_provider(litellm_module, base_url: str, api_key: str,  # noqa: ANN001
                                   extra: dict[str, str]) -> None:
    r = litellm_module.completion(model="deepseek/deepseek-v4-flash", api_base=f"{base_url}/v1", api_key=api_key,
                                  messages=[{"role": "user", "content": FRANCE}], max_tokens=8, temperature=0,
                                  **extra)
    assert r.choices[0].message.content
    assert r.usage.completion_tokens > 0


def test_litellm_streams(litellm_module, base_url: str, api_key: str) -> None:  # noqa: ANN001
    stream = litellm_module.completion(model="deepseek/deepseek-v4-flash", api_base=f"{base_url}/v1",
                                       api_key=api_key, messages=[{"role": "user", "content": FRANCE}],
                                       max_tokens=8, temperature=0, stream=True,
                                       reasoning_effort="ultra")  # LiteLLM's top effort: thinks in "max" mode
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text.strip()
