"""`response_format` -> an xgrammar grammar, and the per-request matcher the
engine uses to mask logits.

One `GrammarBackend` per tokenizer compiles grammars with xgrammar against
the engine's own vocabulary; compiled grammars are cached by their schema
text, so a schema is compiled once however many requests use it. Each
request (each choice) gets its own `GrammarConstraint`: a matcher that
fills its row of the batch's token bitmask and advances on every sampled
token. JSON is generated compactly (no free whitespace) so a small model
cannot wander into whitespace until `max_tokens`.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from flashserve.chat.tools import CALL_SUFFIX, MAX_PARALLEL_CALLS, OPEN, ToolPlan, call_prefix
from flashserve.errors import invalid_request

if TYPE_CHECKING:
    import torch
    import xgrammar as xgr

    from flashserve.generation import ResponseFormat

_CACHE_SIZE = 256
# The smallest JSON object grammar: `json_object` mode means "one JSON object".
_ANY_OBJECT_SCHEMA = {"type": "object"}
MAX_SCHEMA_BYTES = 64 * 1024


class GrammarConstraint:
    """One request's grammar state; used by the engine thread only."""

    def __init__(self, matcher: xgr.GrammarMatcher) -> None:
        self.matcher = matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        return bool(self.matcher.accept_token(token_id))

    @property
    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())


class GrammarBackend:
    """Compiles and caches grammars for one tokenizer's vocabulary."""

    def __init__(self, vocab: list[str], special_ids: set[int], stop_token_ids: list[int], vocab_size: int,
                 tool_format: str = "json") -> None:
        # xgrammar treats tokens that decode to nothing as special and never allows them (stop tokens aside),
        # so control tokens such as <|im_start|> can never appear inside generated JSON.
        self._encoded = ["" if i in special_ids else token for i, token in enumerate(vocab)]
        self._stop_token_ids = list(stop_token_ids)
        self.vocab_size = vocab_size
        self._compiler: Any = None  # built on first use: importing xgrammar costs seconds at start-up
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.tool_format = tool_format  # the call syntax forced tool calls take: "json" or "dsml"

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo(self._encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=self.vocab_size,
                                         stop_token_ids=self._stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=2)
            return self._compiler

    def compile_schema(self, schema: dict[str, Any], param: str) -> Any:
        text = json.dumps(schema)  # key order kept: it is the order the properties are generated in
        if len(text) > MAX_SCHEMA_BYTES:
            raise invalid_request(f"The JSON schema is too large (over {MAX_SCHEMA_BYTES} bytes).", param,
                                  "invalid_value")
        problem = unenforceable(schema)
        if problem:
            raise invalid_request(f"Unsupported JSON schema in '{param}': {problem}", param, "invalid_json_schema")
        return self._cached(text, lambda: self._get_compiler().compile_json_schema(
            text, any_whitespace=False, strict_mode=True), param)

    def for_response_format(self, response_format: ResponseFormat | None) -> Any | None:
        """The compiled grammar a response format asks for, or None for free text."""
        if response_format is None or response_format.type == "text":
            return None
        if response_format.type == "json_object":
            return self.compile_schema(_ANY_OBJECT_SCHEMA, "response_format")
        schema = response_format.schema
        if schema is None:
            raise invalid_request("response_format of type 'json_schema' needs a schema: "
                                  "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}.",
                                  "response_format", "missing_required_parameter")
        return self.compile_schema(schema, "response_format")

    def for_tools(self, plan: ToolPlan) -> Any | None:
        """The grammar of a request's tool calls: None when the model may answer freely."""
        if plan.choice == "none" or not plan.tools:
            return None
        if self.tool_format == "dsml" and plan.choice == "auto":
            # DSML parameters are not one JSON document a structural tag could hold: the model answers
            # freely and the streaming parser takes whatever well-formed block it writes.
            return None
        tools = [t for t in plan.tools if plan.choice != "named" or t.name == plan.named]
        for i, tool in enumerate(plan.tools):
            problem = unenforceable(plan.parameters(tool))
            if problem:
                raise invalid_request(f"Unsupported JSON schema in tool '{tool.name}': {problem}",
                                      f"tools[{i}].function.parameters", "invalid_json_schema")
        key = json.dumps(["tools", plan.choice, plan.parallel,
                          [(t.name, plan.parameters(t)) for t in tools]])
        return self._cached(key, lambda: self._compile_tools(plan, tools), "tools")

    def _compile_tools(self, plan: ToolPlan, tools: list[Any]) -> Any:
        import xgrammar as xgr

        compiler = self._get_compiler()
        if self.tool_format == "dsml":
            return compiler.compile_grammar(dsml_calls_grammar(plan, tools))
        if plan.choice == "auto":
            # Free text until the model opens a call; from there the call must be well-formed.
            items = [xgr.StructuralTagItem(begin=call_prefix(t.name), schema=json.dumps(plan.parameters(t)),
                                           end=CALL_SUFFIX) for t in tools]
            return compiler.compile_structural_tag(items, [OPEN])

        def literal(text: str) -> Any:
            return xgr.Grammar.from_ebnf("root ::= " + json.dumps(text))

        one = xgr.Grammar.union(*[
            xgr.Grammar.concat(literal(call_prefix(t.name)),
                               xgr.Grammar.from_json_schema(json.dumps(plan.parameters(t)), any_whitespace=False),
                               literal(CALL_SUFFIX))
            for t in tools
        ]) if len(tools) > 1 else xgr.Grammar.concat(
            literal(call_prefix(tools[0].name)),
            xgr.Grammar.from_json_schema(json.dumps(plan.parameters(tools[0])), any_whitespace=False),
            literal(CALL_SUFFIX))
        if plan.choice == "named" or not plan.parallel:
            return compiler.compile_grammar(one)
        sequences = [one]
        for _ in range(MAX_PARALLEL_CALLS - 1):
            sequences.append(xgr.Grammar.concat(sequences[-1], literal("\n"), one))
        return compiler.compile_grammar(xgr.Grammar.union(*sequences))

    def _cached(self, key: str, build: Any, param: str) -> Any:
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        try:
            compiled = build()
        except Exception as exc:  # noqa: BLE001 - a schema xgrammar cannot compile is the caller's error
            raise invalid_request(f"Invalid JSON schema in '{param}': {_first_line(exc)}", param,
                                  "invalid_json_schema") from None
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    @staticmethod
    def constraint(compiled: Any) -> GrammarConstraint:
        import xgrammar as xgr

        return GrammarConstraint(xgr.GrammarMatcher(compiled))


# Keywords xgrammar 0.2.8 compiles but does not enforce: output "valid" to the grammar could then break
# the schema, so such schemas are refused instead of silently honoured in part.
_UNENFORCED = ("uniqueItems", "not", "contains", "dependentRequired", "dependentSchemas", "if", "then", "else")


def unenforceable(schema: Any, path: str = "$") -> str | None:
    """Why the grammar could not guarantee this schema, or None."""
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            problem = unenforceable(item, f"{path}[{i}]")
            if problem:
                return problem
        return None
    if not isinstance(schema, dict):
        return None
    for key in _UNENFORCED:
        if key in schema and not (key == "uniqueItems" and schema[key] is False):
            return f"'{key}' at {path} cannot be enforced by the grammar"
    for key in ("oneOf", "allOf"):
        if isinstance(schema.get(key), list) and len(schema[key]) > 1:
            return f"'{key}' with several branches at {path} cannot be enforced by the grammar (use anyOf)"
    if ("format" in schema or "pattern" in schema) and ("minLength" in schema or "maxLength" in schema):
        return f"'minLength'/'maxLength' together with 'format' or 'pattern' at {path} cannot be enforced"
    properties = schema.get("properties")
    if schema.get("additionalProperties") is False and isinstance(schema.get("required"), list):
        missing = [name for name in schema["required"] if name not in (properties or {})]
        if missing:
            return f"required property '{missing[0]}' at {path} is not allowed by 'properties'"
    for key, value in schema.items():
        if key in ("enum", "const", "default", "examples", "description", "title"):
            continue  # values, not subschemas
        if key == "properties" and isinstance(value, dict):
            for name, sub in value.items():
                problem = unenforceable(sub, f"{path}.properties.{name}")
                if problem:
                    return problem
        elif isinstance(value, dict | list):
            problem = unenforceable(value, f"{path}.{key}")
            if problem:
                return problem
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    # xgrammar prefixes messages with a timestamp and a C++ source location; keep the reason.
    return text.split(": ", 1)[-1] if text.startswith("[") else text


DSML_STRING_CHARS = 1024  # longest raw-text parameter value a forced DSML call may write


def dsml_calls_grammar(plan: ToolPlan, tools: list[Any]) -> Any:
    """A DeepSeek-V4 DSML block of calls to `tools`, in the layout `chat.deepseek_v4` renders: each call
    gives the required parameters (all of them when none is required) in the schema's order, a plain string
    parameter as raw text without '<' (at most DSML_STRING_CHARS characters) and any other (a string with
    constraints included) as JSON of its schema. One call for a named or
    non-parallel choice, up to MAX_PARALLEL_CALLS otherwise."""
    import xgrammar as xgr

    from flashserve.chat import deepseek_v4 as v4

    def literal(text: str) -> Any:
        return xgr.Grammar.from_ebnf("root ::= " + json.dumps(text))

    # Bounded: a forced call must end even when the model never chooses to close the value itself.
    raw_text = xgr.Grammar.from_ebnf(f"root ::= [^<]{{0,{DSML_STRING_CHARS}}}")

    def parameter(name: str, schema: dict[str, Any]) -> Any:
        if schema.get("type") == "string" and set(schema) <= {"type", "description", "title"}:
            return xgr.Grammar.concat(literal(f'{v4.PARAMETER_OPEN_HEAD}{name}" string="true">'), raw_text,
                                      literal(v4.PARAMETER_CLOSE))
        return xgr.Grammar.concat(literal(f'{v4.PARAMETER_OPEN_HEAD}{name}" string="false">'),
                                  xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False),
                                  literal(v4.PARAMETER_CLOSE))

    def invoke(tool: Any) -> Any:
        schema = plan.parameters(tool)
        properties: dict[str, Any] = schema.get("properties") or {}
        wanted = [k for k in properties if k in (schema.get("required") or properties)]
        parts: list[Any] = [literal(f'{v4.INVOKE_OPEN_HEAD}{tool.name}">\n')]
        for i, key in enumerate(wanted):
            parts += [literal("\n")] if i else []
            parts.append(parameter(key, properties[key]))
        parts.append(literal("\n" + v4.INVOKE_CLOSE))  # as rendered: a call without parameters has an empty line
        return xgr.Grammar.concat(*parts)

    one = xgr.Grammar.union(*[invoke(t) for t in tools]) if len(tools) > 1 else invoke(tools[0])
    calls = [one]
    if plan.choice != "named" and plan.parallel:
        for _ in range(MAX_PARALLEL_CALLS - 1):
            calls.append(xgr.Grammar.concat(calls[-1], literal("\n"), one))
    body = xgr.Grammar.union(*calls) if len(calls) > 1 else one
    return xgr.Grammar.concat(literal(v4.TOOL_CALLS_OPEN + "\n"), body, literal("\n" + v4.TOOL_CALLS_CLOSE))
