"""End-to-end: every error the API promises, with its exact status, type, code and param.

Errors are read as raw JSON with httpx (`{"error": {"message", "type", "param", "code"}}`) and, for a
few, through the `openai` client's exception classes. Boundary values that must be accepted are
checked beside the ones that must be refused. The last test checks the server still answers.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.conftest import Server

MODEL = "deepseek/deepseek-v4-flash"
USER = [{"role": "user", "content": "What is the capital of France?"}]
INVALID = "invalid_request_error"
ANY = object()


def body(**kw) -> dict:
    return {"model": MODEL, "messages": USER, "max_tokens": 2, **kw}


def check_error(r: httpx.Response, status: int, *, param=ANY, code=ANY,
                types: tuple[str, ...] = (INVALID,)) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    payload = r.json()
    assert set(payload) == {"error"}, payload
    err = payload["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert err["type"] in types, err
    if param is not ANY:
        assert err["param"] == param, err
    if code is not ANY:
        assert err["code"] == code, err
    return err


def post(http: httpx.Client, payload, **kw) -> httpx.Response:
    return http.post("/v1/chat/completions", json=payload, **kw)


# -- 401 ---------------------------------------------------------------------------------------------------
AUTH_TYPES = (INVALID, "authentication_error")


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer sk-wrong-key"},
    {"Authorization": "Bearer"},
    {"Authorization": "Basic c2stZmxhc2hzZXJ2ZQ=="},
], ids=["missing", "wrong", "empty", "not-bearer"])
@pytest.mark.parametrize("method,path", [("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                                         ("GET", f"/v1/models/{MODEL}")])
def test_401_without_a_valid_key(base_url: str, headers: dict, method: str, path: str) -> None:
    r = httpx.request(method, f"{base_url}{path}", headers=headers, timeout=30,
                      json=body() if method == "POST" else None)
    check_error(r, 401, code="invalid_api_key", param=None, types=AUTH_TYPES)


def test_401_through_the_openai_client(base_url: str) -> None:
    bad = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-not-the-key", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    assert e.value.status_code == 401
    assert e.value.code == "invalid_api_key"


# -- 404 ---------------------------------------------------------------------------------------------------
NOT_FOUND_TYPES = (INVALID, "not_found_error")


@pytest.mark.parametrize("model", ["no-such-model", "deepseek/deepseek-v4-pro", "deepseek/deepseek-v4-flash-x"])
def test_404_unknown_model_in_chat(http: httpx.Client, model: str) -> None:
    err = check_error(post(http, body(model=model)), 404, code="model_not_found", types=NOT_FOUND_TYPES)
    assert err["param"] in (None, "model")


@pytest.mark.parametrize("model", ["no-such-model", "deepseek/no-such-model"])
def test_404_unknown_model_retrieve(http: httpx.Client, client: openai.OpenAI, model: str) -> None:
    check_error(http.get(f"/v1/models/{model}"), 404, code="model_not_found", types=NOT_FOUND_TYPES)
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve(model)
    assert e.value.code == "model_not_found"


def test_404_through_the_openai_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=USER, max_tokens=2)
    assert e.value.code == "model_not_found"


# -- malformed bodies --------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [b'{"model": "deepseek/deepseek-v4-flash", "messages": [', b"not json", b""],
                         ids=["truncated", "text", "empty"])
def test_400_malformed_json(http: httpx.Client, raw: bytes) -> None:
    r = http.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    check_error(r, 400)


@pytest.mark.parametrize("raw", [b"[]", b'"hello"', b"42", b"null"], ids=["list", "string", "number", "null"])
def test_400_body_is_not_an_object(http: httpx.Client, raw: bytes) -> None:
    r = http.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    check_error(r, 400)


@pytest.mark.parametrize("missing", ["model", "messages"])
def test_400_missing_required_field(http: httpx.Client, missing: str) -> None:
    payload = body()
    del payload[missing]
    check_error(post(http, payload), 400, param=missing)


# -- wrong types -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("temperature", "hot"),
    ("temperature", "0.7"),
    ("top_p", [1]),
    ("max_tokens", "ten"),
    ("max_tokens", 12.5),
    ("max_completion_tokens", "8"),
    ("n", "two"),
    ("seed", 1.5),
    ("stop", 5),
    ("stream", "yes"),
    ("messages", "hello"),
    ("messages", {"role": "user", "content": "hi"}),
    ("presence_penalty", "high"),
    ("stream_options", "include_usage"),
])
def test_400_wrong_type(http: httpx.Client, field: str, value) -> None:
    check_error(post(http, body(**{field: value})), 400, param=field)


@pytest.mark.parametrize("message,param_prefix", [
    ({"role": "user", "content": 5}, "messages[0]"),
    ({"role": "wizard", "content": "hi"}, "messages[0]"),
    ({"content": "hi"}, "messages[0]"),
    ("hi", "messages[0]"),
])
def test_400_bad_message(http: httpx.Client, message, param_prefix: str) -> None:
    err = check_error(post(http, body(messages=[message])), 400)
    assert isinstance(err["param"], str) and err["param"].startswith(param_prefix), err


def test_400_empty_messages(http: httpx.Client) -> None:
    check_error(post(http, body(messages=[])), 400, param="messages")


# -- out of range ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("temperature", 2.5),
    ("temperature", -0.1),
    ("top_p", 1.5),
    ("top_p", -0.1),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.5),
    ("frequency_penalty", 3),
    ("frequency_penalty", -2.01),
    ("max_tokens", -1),
    ("max_completion_tokens", -5),
    ("n", 0),
    ("n", 17),
    ("n", -1),
])
def test_400_out_of_range(http: httpx.Client, field: str, value) -> None:
    check_error(post(http, body(**{field: value})), 400, param=field)


@pytest.mark.parametrize("extra", [
    {"temperature": 2, "top_p": 0},
    {"temperature": 0, "top_p": 1},
    {"presence_penalty": -2, "frequency_penalty": 2},
    {"presence_penalty": 2, "frequency_penalty": -2},
    {"n": 16, "max_tokens": 1},
], ids=["t2-p0", "t0-p1", "pp-2-fp2", "pp2-fp-2", "n16"])
def test_range_boundaries_are_accepted(client: openai.OpenAI, extra: dict) -> None:
    kw = {"max_tokens": 2, **extra}
    r = client.chat.completions.create(model=MODEL, messages=USER, **kw)
    assert len(r.choices) == kw.get("n", 1)
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)


# -- unknown fields and stream_options -----------------------------------------------------------------------
@pytest.mark.parametrize("field", ["foo", "max_output_tokens", "temprature"])
def test_400_unknown_top_level_field(http: httpx.Client, field: str) -> None:
    err = check_error(post(http, body(**{field: 1})), 400, param=field)
    assert field in err["message"]


@pytest.mark.parametrize("extra", [{}, {"stream": False}], ids=["stream-absent", "stream-false"])
def test_400_stream_options_without_stream(http: httpx.Client, extra: dict) -> None:
    check_error(post(http, body(stream_options={"include_usage": True}, **extra)), 400, param="stream_options")


# -- unsupported parameters ----------------------------------------------------------------------------------
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": {"type": "object",
                                                        "properties": {"city": {"type": "string"}}}}}


@pytest.mark.parametrize("field,value", [
    ("audio", {"format": "wav", "voice": "alloy"}),
    ("modalities", ["text", "audio"]),
    ("modalities", ["audio"]),
])
def test_400_unsupported_parameter(http: httpx.Client, field: str, value) -> None:
    check_error(post(http, body(**{field: value})), 400, param=field, code="unsupported_parameter")


def test_400_unsupported_parameter_when_streaming(client: openai.OpenAI) -> None:
    """Refused before the stream starts: a plain JSON 400, which the client raises."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, stream=True,
                                       modalities=["text", "audio"])
    assert e.value.status_code == 400
    assert e.value.code == "unsupported_parameter"
    assert e.value.param == "modalities"


@pytest.mark.parametrize("extra,param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [TOOL, TOOL]}, "tools[1].function.name"),
])
def test_400_inconsistent_tools(http: httpx.Client, extra: dict, param: str) -> None:
    check_error(post(http, body(**extra)), 400, param=param)


@pytest.mark.parametrize("extra", [
    {"tools": []},
    {"response_format": {"type": "text"}},
    {"reasoning_effort": "none"},
    {"reasoning_effort": "low"},
    {"reasoning_effort": "high"},
    {"reasoning_effort": "xhigh"},
    {"reasoning_effort": "max"},
    {"modalities": ["text"]},
    {"user": "user-1234", "stop": [], "logit_bias": {}, "presence_penalty": 0.5},
], ids=["empty-tools", "text-format", "no-reasoning", "low", "high", "xhigh", "max", "text-modality", "misc"])
def test_supported_variants_are_accepted(client: openai.OpenAI, extra: dict) -> None:
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, **extra)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.choices[0].message.content is not None
    # The embedded model cannot think: any effort is accepted and produces no reasoning.
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    assert getattr(r.choices[0].message, "reasoning_content", None) is None


def test_model_object_says_it_cannot_reason(client: openai.OpenAI) -> None:
    assert client.models.retrieve(MODEL).model_extra["reasoning"] is False


@pytest.mark.parametrize("messages,param", [
    ([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_nope", "content": "18C"}],
     "messages[1].tool_call_id"),
    ([{"role": "user", "content": "hi"},
      {"role": "assistant", "content": None,
       "tool_calls": [{"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "call_a", "content": "ok"},
      {"role": "tool", "tool_call_id": "call_b", "content": "?"}],
     "messages[3].tool_call_id"),
])
def test_400_tool_message_answering_no_earlier_call(http: httpx.Client, messages: list, param: str) -> None:
    check_error(post(http, body(messages=messages)), 400, param=param)


# -- non-text content ------------------------------------------------------------------------------------------
NON_TEXT_PARTS = {
    "image_url": {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}},
    "input_audio": {"type": "input_audio", "input_audio": {"data": "UklGRiQAAABXQVZF", "format": "wav"}},
    "file": {"type": "file", "file": {"file_id": "file-abc123", "filename": "a.pdf"}},
    "video_url": {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}},
}


@pytest.mark.parametrize("kind", list(NON_TEXT_PARTS))
def test_400_non_text_content_part(http: httpx.Client, kind: str) -> None:
    content = [{"type": "text", "text": "Describe this."}, NON_TEXT_PARTS[kind]]
    err = check_error(post(http, body(messages=[{"role": "user", "content": content}])), 400)
    assert isinstance(err["param"], str) and err["param"].startswith("messages[0].content[1]"), err
    assert "text" in err["message"].lower(), err


def test_400_non_text_content_part_names_the_right_message(http: httpx.Client) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [NON_TEXT_PARTS["image_url"], {"type": "text", "text": "What?"}]}]
    err = check_error(post(http, body(messages=messages)), 400)
    assert isinstance(err["param"], str) and err["param"].startswith("messages[1].content[0]"), err


# -- context length --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_400_context_length_exceeded(http: httpx.Client, stream: bool) -> None:
    long = [{"role": "user", "content": "hello " * 9000}]
    err = check_error(post(http, body(messages=long, stream=stream)), 400, code="context_length_exceeded")
    assert err["param"] in (None, "messages"), err


def test_400_context_length_exceeded_through_the_openai_client(client: openai.OpenAI) -> None:
    long = [{"role": "system", "content": "word " * 5000}, {"role": "user", "content": "word " * 5000}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=long, max_tokens=384000)
    assert e.value.code == "context_length_exceeded"


# -- afterwards ------------------------------------------------------------------------------------------------
def test_server_still_answers_after_the_errors(client: openai.OpenAI, http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    r = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=32)
    assert "Paris" in r.choices[0].message.content
    s = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=4, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices)


def test_413_body_over_the_limit(http: httpx.Client) -> None:
    """A body over the server's limit (8 MiB by default) is refused before it is parsed, declared length or not."""
    head = b'{"model": "deepseek/deepseek-v4-flash", "messages": [{"role": "user", "content": "'
    huge = head + b"x" * (9 << 20) + b'"}]}'
    check_error(http.post("/v1/chat/completions", content=huge, headers={"content-type": "application/json"}),
                413, code="request_too_large")

    def chunks() -> object:  # no content-length: the body arrives in pieces
        for _ in range(10):
            yield b"x" * (1 << 20)

    check_error(http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}),
                413, code="request_too_large")
    # Just under the limit, the same path parses the body and answers as usual.
    check_error(http.post("/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"}),
                400)


def test_400_too_many_messages_or_too_long_a_message(http: httpx.Client) -> None:
    many = [{"role": "user", "content": "hi"}] * 2049
    check_error(http.post("/v1/chat/completions", json={"model": "deepseek/deepseek-v4-flash", "messages": many}),
                400, param="messages")
    long = [{"role": "user", "content": "z" * ((4 << 20) + 1)}]
    error = check_error(http.post("/v1/chat/completions",
                                  json={"model": "deepseek/deepseek-v4-flash", "messages": long}), 400)
    assert error["param"].startswith("messages[0]") and "characters" in error["message"], error


def test_keys_prompts_and_outputs_stay_out_of_the_log(server: Server, client: openai.OpenAI) -> None:
    """The server's log (its stdout and stderr) never shows a key, a prompt or an answer, even for a
    request that fails."""
    log_path = server.log_path
    if log_path is None:
        pytest.skip("an external server: its log is not ours to read")
    secret = "zebra-canary-7f3a"  # a prompt no log line could contain by chance
    answer = client.chat.completions.create(model="deepseek/deepseek-v4-flash", temperature=0, max_tokens=8,
                                            messages=[{"role": "user", "content": f"Repeat: {secret}"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="deepseek/deepseek-v4-flash", temperature=9,
                                       messages=[{"role": "user", "content": secret}])
    text = log_path.read_text(errors="replace")
    banner_end = text.index("Started server process")  # the banner prints the key once, on purpose
    logged = text[banner_end:]
    assert secret not in logged
    said = (answer.choices[0].message.content or "").strip()
    assert len(said) < 12 or said not in logged  # a few characters could be any log line's
    assert server.api_key not in logged and server.api_key[6:18] not in logged
