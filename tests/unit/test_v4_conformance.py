"""DeepSeek-V4 output conformance (issue 16 §3) at the text level, on both producers of raw V4 text.

What vLLM and SGLang users report on V4, none of which may happen here: a call written before `</think>`
lost in the reasoning channel; raw DSML markup in `content` (also when the stream is cut mid-block, and
when a raw upstream writes a malformed block); a newline after `</think>` leaking. The rules live in
`chat/model_output.py` (`ModelOutputParser`), the one stage the local engine and a raw-text remote upstream
(`raw_text = "deepseek_v4"`) share; the remote half
is driven through the scripted upstream (tests/e2e/scripted_v4_upstream.py) over an in-process transport.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from flashserve.backends.remote import RemoteBackend, upstream_body
from flashserve.catalog import CatalogError, RemoteSpec, load_catalog_file
from flashserve.chat.model_output import ModelOutputParser, TextPieces
from flashserve.generation import (
    ChoiceDelta,
    GenerationRequest,
    Message,
    Reasoning,
    RequestContext,
    ToolChoice,
    ToolSpec,
)
from tests.e2e.scripted_v4_upstream import DEFAULT_SCRIPT, create_app, dsml_block, load_script

NAMES = ["get_weather", "other"]
CALL = dsml_block("get_weather", {"city": "Paris", "days": 3})


def run(pieces: list[str], thinking: bool = True, reason: str = "stop", names: list[str] | None = NAMES,
        max_calls: int | None = None) -> tuple[TextPieces, str | None]:
    parser = ModelOutputParser(thinking, names, max_calls)
    out = TextPieces()
    for piece in pieces:
        out.add(parser.feed(piece))
    rest, final = parser.finish(reason)
    out.add(rest)
    return out, final


def split(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_a_call_after_think_end_is_a_tool_call_whatever_the_pieces(size: int) -> None:
    out, reason = run(split("Let me look.</think>\n\n" + CALL, size))
    assert (out.reasoning, out.content, reason) == ("Let me look.", "", "tool_calls")
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == [("get_weather", {"city": "Paris", "days": 3})]


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_a_call_written_inside_thinking_is_recovered_and_the_thinking_stays_reasoning(size: int) -> None:
    out, reason = run(split("I need the weather.\n\n" + CALL + "\nThen I answer.</think>", size))
    assert [c.name for c in out.calls] == ["get_weather"] and reason == "tool_calls"
    assert out.reasoning == "I need the weather.Then I answer."
    assert "DSML" not in out.reasoning and out.content == ""


def test_max_calls_counts_calls_in_thinking_and_after() -> None:
    out, _ = run(["a\n\n" + CALL + "</think>\n\n" + dsml_block("other", {})], max_calls=1)
    assert [c.name for c in out.calls] == ["get_weather"]


def test_an_unfinished_block_in_thinking_stays_reasoning_text() -> None:
    out, reason = run(["Maybe <｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_w", "</think>The answer."])
    assert out.calls == [] and reason == "stop"
    assert out.reasoning.startswith("Maybe <｜DSML｜tool_calls>") and out.content == "The answer."


@pytest.mark.parametrize("cut", [len("Sure.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">"),
                                 len("Sure.\n\n<｜DS"), len("Sure.\n\n<｜DSML｜tool_calls>"),
                                 len("Sure.\n\n" + CALL) - 3])
@pytest.mark.parametrize("reason", ["length", "stop"])
def test_a_stream_cut_inside_a_block_drops_the_markup_and_keeps_its_finish_reason(cut: int, reason: str) -> None:
    text = ("Sure.\n\n" + CALL)[:cut]
    for thinking, prefix in ((False, ""), (True, "Think.</think>")):
        out, final = run(split(prefix + text, 4), thinking=thinking, reason=reason)
        assert out.content == "Sure." and out.calls == [] and final == reason


def test_a_call_cut_by_the_length_limit_after_a_complete_one_keeps_the_first() -> None:
    text = CALL + "\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"other\">"
    out, final = run([text], thinking=False, reason="length")
    assert [c.name for c in out.calls] == ["get_weather"] and out.content == "" and final == "length"


MALFORMED = [
    '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="rm_rf">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>',  # unknown tool
    CALL.replace('string="false">3', 'string="false">three'),  # a value that is not JSON
    "<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>",  # no calls
    CALL.replace("<｜DSML｜invoke", "stray <｜DSML｜invoke", 1),  # text inside the block
]


@pytest.mark.parametrize("block", MALFORMED)
@pytest.mark.parametrize("size", [1, 4, 1000])
def test_a_malformed_block_in_the_answer_is_dropped_not_content(block: str, size: int) -> None:
    assert block != CALL
    out, reason = run(split("Think.</think>\n\nSure.\n\n" + block + "\n\nDone.", size))
    assert (out.reasoning, out.content, out.calls, reason) == ("Think.", "Sure.Done.", [], "stop")
    # a real call after a broken one is still made
    out, reason = run(split("Think.</think>" + block + "\n\n" + CALL, size))
    assert [c.name for c in out.calls] == ["get_weather"] and out.content == "" and reason == "tool_calls"


def test_a_malformed_block_in_the_thinking_stays_reasoning_text() -> None:
    out, _ = run([MALFORMED[0] + "</think>Answer."])
    assert out.reasoning == MALFORMED[0] and out.content == "Answer." and out.calls == []


def test_a_malformed_block_cut_by_the_end_is_dropped() -> None:
    out, reason = run(["</think>Hi.\n\n" + MALFORMED[0][:60] + "broken"], reason="length")
    assert (out.content, out.calls, reason) == ("Hi.", [], "length")


@pytest.mark.parametrize("pieces", [["Plan.</think>\n", "\n" + CALL], ["Plan.</think>", "\n", "\n", CALL],
                                    ["Plan.</th", "ink>\n\n", CALL], ["Plan.</think>\n", "\nHello"]])
def test_newlines_after_think_end_never_leak(pieces: list[str]) -> None:
    out, _ = run(pieces)
    assert out.reasoning == "Plan." and out.content in ("", "Hello")


@pytest.mark.parametrize("thinking", [False, True])
def test_a_stray_think_marker_in_the_answer_is_not_content(thinking: bool) -> None:
    parser = ModelOutputParser(thinking, NAMES, strip_think_markers=True)
    out = TextPieces()
    for piece in split("R.</think></think>Hi</th" + "ink> there.\n\n" + CALL, 3):
        out.add(parser.feed(piece))
    rest, reason = parser.finish("stop")
    out.add(rest)
    assert out.content == ("Hi there." if thinking else "R.Hi there.") and reason == "tool_calls"
    assert out.reasoning == ("R." if thinking else "")


def test_without_tools_the_text_is_content_and_thinking_is_split() -> None:
    out, reason = run(["Hm.</think>\n\nHi ", "there"], names=None)
    assert (out.reasoning, out.content, out.calls, reason) == ("Hm.", "Hi there", [], "stop")


# -- the remote raw-text upstream -------------------------------------------------------------------
WEATHER = ToolSpec("get_weather", "Weather", {"type": "object", "required": ["city"],
                                              "properties": {"city": {"type": "string"}}})


def raw_backend(script: dict[str, Any] | None = None) -> RemoteBackend:
    app = create_app(script or load_script(None))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://scripted")
    return RemoteBackend(RemoteSpec("http://scripted/v1", "deepseek-v4-flash", raw_text="deepseek_v4"), client)


def generate(backend: RemoteBackend, request: GenerationRequest) -> list[ChoiceDelta]:
    async def go() -> list[ChoiceDelta]:
        generation = await backend.open(request, RequestContext("req-1"))
        return [delta async for delta in generation]
    return asyncio.run(go())


def v4_request(*messages: Message, **kw: Any) -> GenerationRequest:
    return GenerationRequest("m", list(messages or [Message("user", "weather in Paris?")]), **kw)


@pytest.mark.parametrize("chunk_chars", [1, 4, 7, 64])
def test_a_raw_upstream_gives_reasoning_and_a_tool_call(chunk_chars: int) -> None:
    script = load_script(None)
    script["chunk_chars"] = chunk_chars
    deltas = generate(raw_backend(script), v4_request(tools=(WEATHER,)))
    reasoning = "".join(d.reasoning_content for d in deltas)
    assert reasoning == DEFAULT_SCRIPT["user"]["reasoning"]
    assert "".join(d.content for d in deltas) == ""
    calls = [c for d in deltas for c in d.tool_calls]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "ok"})]
    assert calls[0].id.startswith("call_") and deltas[-1].finish_reason == "tool_calls"


def test_a_raw_upstream_answers_a_tool_result_as_content() -> None:
    [call] = [c for d in generate(raw_backend(), v4_request(tools=(WEATHER,))) for c in d.tool_calls]
    conversation = [Message("user", "weather in Paris?"),
                    Message("assistant", None, reasoning_content="I will use the tool.", tool_calls=(call,)),
                    Message("tool", "sunny", tool_call_id=call.id)]
    deltas = generate(raw_backend(), v4_request(*conversation, tools=(WEATHER,)))
    assert "".join(d.content for d in deltas) == DEFAULT_SCRIPT["tool"]["content"]
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["stop"]


def test_tool_choice_none_leaves_calls_unparsed_but_splits_thinking() -> None:
    script = load_script(None)
    script["no_tools"] = {"reasoning": "R.", "content": "plain"}
    deltas = generate(raw_backend(script), v4_request())
    assert ("".join(d.reasoning_content for d in deltas), "".join(d.content for d in deltas)) == ("R.", "plain")


def test_a_raw_upstream_is_always_told_whether_to_think() -> None:
    raw = RemoteSpec("http://u/v1", "up", kind="vllm", raw_text="deepseek_v4")
    assert upstream_body(v4_request(), raw)["chat_template_kwargs"] == {"thinking": True, "reasoning_effort": "high"}
    off = v4_request(reasoning=Reasoning(effort="none"))
    assert upstream_body(off, raw)["chat_template_kwargs"] == {"thinking": False}
    plain = RemoteSpec("http://u/v1", "up", kind="vllm")
    assert "chat_template_kwargs" not in upstream_body(v4_request(), plain)


def test_thinking_off_parses_the_answer_from_the_first_character() -> None:
    script = load_script(None)
    script["user"] = {"reasoning": "", "content": "Checking."}
    deltas = generate(raw_backend(script), v4_request(tools=(WEATHER,), reasoning=Reasoning(thinking=False),
                                                       tool_choice=ToolChoice("auto")))
    # The scripted model still writes `</think>` first; with thinking off that is its own (odd) content.
    assert [c.name for d in deltas for c in d.tool_calls] == ["get_weather"]
    assert "DSML" not in "".join(d.content for d in deltas)


def test_catalog_raw_text(tmp_path: Path) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text('[models."v4".backend]\ntype = "remote"\nurl = "http://x/v1"\nmodel = "up"\n'
                    'raw_text = "deepseek_v4"\n')
    spec = load_catalog_file(path)["v4"].backend
    assert isinstance(spec, RemoteSpec) and spec.raw_text == "deepseek_v4"
    path.write_text('[models."v4".backend]\ntype = "remote"\nurl = "http://x/v1"\nmodel = "up"\nraw_text = "qwen"\n')
    with pytest.raises(CatalogError, match="raw_text must be one of"):
        load_catalog_file(path)


# -- a raw upstream that cuts its stream -----------------------------------------------------------------
class _Body(httpx.AsyncByteStream):
    """An upstream's SSE body: `lines`, then either the end of the body or a broken connection."""

    def __init__(self, lines: list[str], breaks: bool) -> None:
        self.lines, self.breaks = lines, breaks

    async def __aiter__(self):  # type: ignore[override]
        for line in self.lines:
            yield (line + "\n\n").encode()
        if self.breaks:
            raise httpx.ReadError("connection reset")


def cut_backend(text: str, end: str) -> RemoteBackend:
    """A raw upstream that streams `text` in 5-character pieces, then ends with `end`: "done" ([DONE] without
    a finish reason), "eof" (the body ends) or "break" (the connection fails)."""
    lines = ["data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text[i:i + 5]}}]})
             for i in range(0, len(text), 5)]
    if end == "done":
        lines.append("data: [DONE]")
    transport = httpx.MockTransport(lambda _: httpx.Response(200, stream=_Body(lines, end == "break")))
    client = httpx.AsyncClient(transport=transport, base_url="http://cut")
    return RemoteBackend(RemoteSpec("http://cut/v1", "v4", raw_text="deepseek_v4", retries=0), client)


@pytest.mark.parametrize("end", ["done", "eof"])
def test_a_raw_stream_cut_mid_block_without_a_finish_reason_leaks_no_markup(end: str) -> None:
    text = "Plan.</think>\n\nSure.\n\n" + CALL[:len(CALL) // 2]
    deltas = generate(cut_backend(text, end), v4_request(tools=(WEATHER,)))
    assert "".join(d.reasoning_content for d in deltas) == "Plan."
    assert "".join(d.content for d in deltas) == "Sure."
    assert not [c for d in deltas for c in d.tool_calls]
    # text held back as a possible start of a block is plain text after all once the stream is over
    deltas = generate(cut_backend("Plan.</think>Answer: 4\n", end), v4_request(tools=(WEATHER,)))
    assert "".join(d.content for d in deltas) == "Answer: 4\n"


def test_a_raw_stream_whose_connection_breaks_mid_block_is_an_error_with_no_markup_sent() -> None:
    from flashserve.errors import FlashserveError

    backend = cut_backend("Plan.</think>\n\nSure.\n\n" + CALL[:40], "break")
    seen: list[ChoiceDelta] = []

    async def go() -> None:
        async for delta in await backend.open(v4_request(tools=(WEATHER,)), RequestContext("req-1")):
            seen.append(delta)
    with pytest.raises(FlashserveError) as raised:
        asyncio.run(go())
    assert raised.value.status == 502
    assert "DSML" not in "".join(d.content for d in seen)
