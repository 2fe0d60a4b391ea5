"""Grammar-constrained decoding through the real engine, sampler and xgrammar, on the weightless
counting model: constrained requests produce schema-valid JSON, free requests in the same batch are
untouched, and schemas xgrammar rejects become a 400 naming response_format."""

from __future__ import annotations

import json
import string

import pytest

from flashserve.api.chat import generation_request
from flashserve.api.schemas import ChatCompletionRequest
from flashserve.chat.structured import GrammarBackend
from flashserve.engine.engine import EngineConfig, LLMEngine
from flashserve.engine.request import FinishReason, SamplingParams
from flashserve.errors import FlashserveError
from tests.unit.fake_model import VOCAB, CountingModel, expected_next

# A character-level vocabulary of exactly VOCAB tokens; token 0 is the end of sequence.
CHARS = list(dict.fromkeys(string.digits + string.ascii_letters + '{}[]:,"-.+ eE_'))
TOKENS = ["<eos>"] + CHARS + [f"<unused{i}>" for i in range(VOCAB - 1 - len(CHARS))]
EOS = 0
assert len(TOKENS) == VOCAB


def response_format(fmt: dict) -> object:
    """A response_format as the chat surface hands it on (the internal type)."""
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 "response_format": fmt})
    return generation_request(body).response_format


@pytest.fixture(scope="module")
def grammars() -> GrammarBackend:
    special = {0} | {i for i, t in enumerate(TOKENS) if t.startswith("<unused")}
    return GrammarBackend(TOKENS, special, [EOS], VOCAB)


def decode(ids: list[int]) -> str:
    return "".join(TOKENS[i] for i in ids if i != EOS)


def run(engine: LLMEngine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return out


def make_engine() -> LLMEngine:
    return LLMEngine(CountingModel(), EngineConfig(max_model_len=256, num_kv_blocks=64, block_size=4), VOCAB)


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "b": {"type": "string", "enum": ["x", "yz"]},
                                           "c": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
          "required": ["a", "b", "c"], "additionalProperties": False}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constrained_output_is_valid_json_for_the_schema(grammars: GrammarBackend, temperature: float) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    engine = make_engine()
    fmt = response_format({"type": "json_schema", "schema": SCHEMA})
    compiled = grammars.for_response_format(fmt)
    request = engine.add_request("j", [5, 6, 7], SamplingParams(temperature=temperature, seed=3, max_tokens=120,
                                                                stop_token_ids=(EOS,)),
                                 constraint=GrammarBackend.constraint(compiled))
    tokens = run(engine)["j"]
    assert request.finish_reason is FinishReason.STOP
    value = json.loads(decode(tokens))
    jsonschema.validate(value, SCHEMA)


def test_free_requests_in_a_mixed_batch_are_unaffected(grammars: GrammarBackend) -> None:
    engine = make_engine()
    compiled = grammars.for_response_format(response_format({"type": "json_object"}))
    engine.add_request("json", [1, 2], SamplingParams(temperature=0, max_tokens=60, stop_token_ids=(EOS,)),
                       constraint=GrammarBackend.constraint(compiled))
    engine.add_request("free", [3, 4, 5], SamplingParams(temperature=0, max_tokens=12))
    out = run(engine)
    ctx = [3, 4, 5]
    for token in out["free"]:
        assert token == expected_next(ctx)
        ctx.append(token)
    assert isinstance(json.loads(decode(out["json"])), dict)


def test_grammars_are_compiled_once(grammars: GrammarBackend) -> None:
    fmt = response_format({"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}})
    assert grammars.for_response_format(fmt) is grammars.for_response_format(
        response_format({"type": "json_schema", "schema": SCHEMA}))


@pytest.mark.parametrize("fmt", [
    {"type": "json_schema", "schema": {"type": "nonsense"}},
    {"type": "json_schema", "json_schema": {"name": "s"}},
    {"type": "json_schema"},
])
def test_unusable_schemas_are_a_400_naming_response_format(grammars: GrammarBackend, fmt: dict) -> None:
    with pytest.raises(FlashserveError) as err:
        grammars.for_response_format(response_format(fmt))
    assert err.value.status == 400 and err.value.param == "response_format"


def test_text_format_means_no_grammar(grammars: GrammarBackend) -> None:
    assert grammars.for_response_format(None) is None
    assert grammars.for_response_format(response_format({"type": "text"})) is None


@pytest.mark.parametrize("schema", [
    {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    {"type": "object", "properties": {"a": {"not": {"type": "integer"}}}},
    {"oneOf": [{"type": "integer"}, {"type": "number"}]},
    {"type": "object", "properties": {"e": {"type": "string", "format": "email", "maxLength": 12}}},
    {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"], "additionalProperties": False},
])
def test_schemas_the_grammar_cannot_enforce_are_refused(grammars: GrammarBackend, schema: dict) -> None:
    with pytest.raises(FlashserveError) as err:
        grammars.compile_schema(schema, "response_format")
    assert err.value.code == "invalid_json_schema"


def test_property_names_that_look_like_keywords_are_fine(grammars: GrammarBackend) -> None:
    schema = {"type": "object", "properties": {"not": {"type": "string"}, "if": {"type": "integer"}}}
    assert grammars.compile_schema(schema, "response_format") is not None
