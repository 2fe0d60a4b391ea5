"""Records what an agent CLI sends, and answers it as little as lets the CLI finish a turn.

Claude Code speaks Anthropic Messages (`POST /v1/messages`), Codex speaks the
Responses API (`POST /v1/responses`). Before flashserve's adapters for them
exist, this server shows what those clients really send: every request
(method, path, query, headers with secrets redacted, JSON body) is written to
`--out` as `NNN-METHOD-path.json`, in arrival order. It answers:

- `POST /v1/messages`: a valid Anthropic message saying `--text` ("ok"), as an
  SSE stream (message_start, content_block_start, content_block_delta,
  content_block_stop, message_delta with stop_reason end_turn and usage,
  message_stop) when the body has `"stream": true`, else as one JSON message;
- `POST /v1/responses`: a valid Responses API stream (response.created,
  response.in_progress, output_item.added, content_part.added,
  output_text.delta, output_text.done, content_part.done, output_item.done,
  response.completed with usage), or the response object when not streaming;
- with `--tool-call`, a streamed turn whose conversation holds no tool result
  yet gets reasoning (a thinking block with a signature / a reasoning item
  with a summary and encrypted_content) and a call of Bash / exec_command
  running `echo ok`, so the next request shows how the CLI sends a tool's
  result and replays reasoning;
- `GET /v1/models`, with `--model ID` given: a list of those ids (else 404);
- anything else: 404 with an Anthropic-shaped error for /v1/messages/* paths
  and an OpenAI-shaped one otherwise, so a CLI's reaction to a 404 shows too.

`--status CODE` answers every POST with that error instead (to see how a CLI
reacts to a 4xx/5xx), with `--error-message` / `--error-code` as its message
and OpenAI `code` (e.g. Anthropic's "prompt is too long: 250000 tokens >
200000 maximum", OpenAI's code "context_length_exceeded"). Stdlib only, so it runs under any Python 3.11:

    python tests/agents/capture_server.py --port 0 --out /tmp/captures
    # prints "listening on http://127.0.0.1:PORT" once it accepts connections
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import re
import sys
import threading
import time
import uuid
import zlib
from base64 import b64encode
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

# Header names whose values are credentials (or carry them); their values are never written.
_SECRET_HEADER = re.compile(r"authorization|api[-_]?key|cookie|token|secret|password", re.IGNORECASE)
REDACTED = "<redacted>"


def redact_headers(headers: dict[str, str]) -> dict[str, str]:
    return {name.lower(): (REDACTED if _SECRET_HEADER.search(name) else value) for name, value in headers.items()}


def _decode_body(raw: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if encoding == "gzip":
        return gzip.decompress(raw)
    if encoding == "deflate":
        return zlib.decompress(raw)
    if encoding == "zstd":
        import zstandard  # not stdlib: only needed if a client compresses its bodies with zstd

        return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    return raw


# -- the minimal replies -----------------------------------------------------------------------------
def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def anthropic_message(model: str, text: str) -> dict[str, Any]:
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 1, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0},
    }


def anthropic_events(model: str, text: str) -> list[bytes]:
    message = anthropic_message(model, text)
    start = dict(message, content=[], stop_reason=None, usage=dict(message["usage"], output_tokens=1))
    return [
        _sse("message_start", {"type": "message_start", "message": start}),
        _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
        _sse("ping", {"type": "ping"}),
        _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": text}}),
        _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _sse("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": 1}}),
        _sse("message_stop", {"type": "message_stop"}),
    ]


def responses_object(model: str, text: str, status: str, response_id: str, item_id: str) -> dict[str, Any]:
    done = status == "completed"
    item = {"id": item_id, "type": "message", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}
    return {
        "id": response_id, "object": "response", "created_at": int(time.time()), "status": status,
        "model": model, "output": [item] if done else [], "parallel_tool_calls": True, "tool_choice": "auto",
        "tools": [], "error": None, "incomplete_details": None,
        "usage": {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 1,
                  "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 13} if done else None,
    }


def responses_events(model: str, text: str) -> list[bytes]:
    response_id, item_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
    sequence = itertools.count()
    part = {"type": "output_text", "text": "", "annotations": []}
    item = {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}

    def event(kind: str, **fields: Any) -> bytes:
        return _sse(kind, {"type": kind, "sequence_number": next(sequence), **fields})

    final = responses_object(model, text, "completed", response_id, item_id)
    return [
        event("response.created", response=responses_object(model, text, "in_progress", response_id, item_id)),
        event("response.in_progress", response=responses_object(model, text, "in_progress", response_id, item_id)),
        event("response.output_item.added", output_index=0, item=item),
        event("response.content_part.added", item_id=item_id, output_index=0, content_index=0, part=part),
        event("response.output_text.delta", item_id=item_id, output_index=0, content_index=0, delta=text,
              logprobs=[]),
        event("response.output_text.done", item_id=item_id, output_index=0, content_index=0, text=text,
              logprobs=[]),
        event("response.content_part.done", item_id=item_id, output_index=0, content_index=0,
              part=dict(part, text=text)),
        event("response.output_item.done", output_index=0, item=final["output"][0]),
        event("response.completed", response=final),
    ]


def models_list(ids: list[str]) -> dict[str, Any]:
    """A model list both Anthropic clients (`type`, `display_name`, paging fields) and OpenAI ones read."""
    data = [{"type": "model", "id": i, "display_name": i, "created_at": "2026-01-01T00:00:00Z",
             "object": "model", "created": 1767225600, "owned_by": "flashserve", "max_input_tokens": 131072,
             "max_tokens": 8192} for i in ids]
    return {"object": "list", "data": data, "has_more": False, "first_id": ids[0], "last_id": ids[-1]}


# -- a tool-calling first turn (--tool-call) --------------------------------------------------------
ANTHROPIC_TOOL = ("Bash", {"command": "echo ok", "description": "Print ok"})
RESPONSES_TOOL = ("exec_command", {"cmd": "echo ok"})
THINKING = "The user wants ok. I will run echo."
OPAQUE = "c2VhbGVkLXJlYXNvbmluZy1ieS1jYXB0dXJlLXNlcnZlcg"  # stands in for a signature / encrypted reasoning


def anthropic_tool_events(model: str) -> list[bytes]:
    """A thinking block (with its signature), then a tool_use block, ending with stop_reason tool_use."""
    name, arguments = ANTHROPIC_TOOL
    start = dict(anthropic_message(model, ""), content=[], stop_reason=None)
    arguments_json = json.dumps(arguments)
    return [
        _sse("message_start", {"type": "message_start", "message": start}),
        _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
        _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "thinking_delta", "thinking": THINKING}}),
        _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "signature_delta", "signature": OPAQUE}}),
        _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _sse("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
            "type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": name, "input": {}}}),
        _sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                     "delta": {"type": "input_json_delta", "partial_json": arguments_json[:10]}}),
        _sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                     "delta": {"type": "input_json_delta", "partial_json": arguments_json[10:]}}),
        _sse("content_block_stop", {"type": "content_block_stop", "index": 1}),
        _sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                               "usage": {"output_tokens": 20}}),
        _sse("message_stop", {"type": "message_stop"}),
    ]


def responses_tool_events(model: str) -> list[bytes]:
    """A reasoning item (summary + encrypted_content), then a function_call item."""
    name, arguments = RESPONSES_TOOL
    response_id, reasoning_id = f"resp_{uuid.uuid4().hex}", f"rs_{uuid.uuid4().hex}"
    call_item = f"fc_{uuid.uuid4().hex}"
    call_id, arguments_json = f"call_{uuid.uuid4().hex[:24]}", json.dumps(arguments)
    sequence = itertools.count()

    def event(kind: str, **fields: Any) -> bytes:
        return _sse(kind, {"type": kind, "sequence_number": next(sequence), **fields})

    reasoning = {"id": reasoning_id, "type": "reasoning", "summary": [{"type": "summary_text", "text": THINKING}],
                 "encrypted_content": OPAQUE}
    call = {"id": call_item, "type": "function_call", "status": "completed", "call_id": call_id, "name": name,
            "arguments": arguments_json}
    shell = responses_object(model, "", "in_progress", response_id, "unused")
    final = dict(shell, status="completed", output=[reasoning, call],
                 usage={"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 20,
                        "output_tokens_details": {"reasoning_tokens": 9}, "total_tokens": 32})
    part = {"type": "summary_text", "text": THINKING}
    return [
        event("response.created", response=shell),
        event("response.in_progress", response=shell),
        event("response.output_item.added", output_index=0,
              item=dict(reasoning, summary=[], encrypted_content=None)),
        event("response.reasoning_summary_part.added", item_id=reasoning_id, output_index=0, summary_index=0,
              part=dict(part, text="")),
        event("response.reasoning_summary_text.delta", item_id=reasoning_id, output_index=0, summary_index=0,
              delta=THINKING),
        event("response.reasoning_summary_text.done", item_id=reasoning_id, output_index=0, summary_index=0,
              text=THINKING),
        event("response.reasoning_summary_part.done", item_id=reasoning_id, output_index=0, summary_index=0,
              part=part),
        event("response.output_item.done", output_index=0, item=reasoning),
        event("response.output_item.added", output_index=1,
              item=dict(call, status="in_progress", arguments="")),
        event("response.function_call_arguments.delta", item_id=call_item, output_index=1, delta=arguments_json),
        event("response.function_call_arguments.done", item_id=call_item, output_index=1, arguments=arguments_json),
        event("response.output_item.done", output_index=1, item=call),
        event("response.completed", response=final),
    ]


def has_tool_result(path: str, body: dict[str, Any]) -> bool:
    """Whether the conversation already holds a tool's result (then the turn ends with text)."""
    if path == "/v1/responses":
        return any(isinstance(i, dict) and i.get("type") == "function_call_output" for i in body.get("input") or [])
    return any(isinstance(block, dict) and block.get("type") == "tool_result"
               for message in body.get("messages") or [] if isinstance(message.get("content"), list)
               for block in message["content"])


# -- the server --------------------------------------------------------------------------------------
class CaptureServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, out: Path, text: str, status: int | None, error_message: str | None = None,
                 error_code: str | None = None) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.out, self.text, self.status = out, text, status
        self.error_message, self.error_code = error_message, error_code
        self.models: list[str] = []
        self.tool_call = False
        self._lock = threading.Lock()
        self._count = 0
        out.mkdir(parents=True, exist_ok=True)

    def record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._count += 1
            entry["seq"] = self._count
            slug = re.sub(r"[^A-Za-z0-9]+", "_", entry["path"]).strip("_") or "root"
            name = f"{self._count:03d}-{entry['method']}-{slug}.json"
        (self.out / name).write_text(json.dumps(entry, indent=2, ensure_ascii=False) + "\n")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: CaptureServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        sys.stderr.write(f"capture: {self.command} {self.path} -> {format % args}\n")

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        self._handle()

    def do_POST(self) -> None:  # noqa: N802
        self._handle()

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle()

    def do_PUT(self) -> None:  # noqa: N802
        self._handle()

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle()

    def _handle(self) -> None:
        url = urlsplit(self.path)
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        entry: dict[str, Any] = {"method": self.command, "path": url.path, "query": parse_qs(url.query),
                                 "raw_query": url.query, "headers": redact_headers(dict(self.headers.items())),
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        body: Any = None
        if raw:
            try:
                body = json.loads(_decode_body(raw, self.headers.get("content-encoding", "")))
                entry["body"] = body
            except Exception as exc:  # keep what came, whatever it was
                entry["body_error"] = repr(exc)
                entry["body_base64"] = b64encode(raw).decode()
        self.server.record(entry)
        self._answer(url.path, body if isinstance(body, dict) else {})

    def _answer(self, path: str, body: dict[str, Any]) -> None:
        anthropic = path.startswith("/v1/messages")
        if self.command == "POST" and self.server.status is not None:
            message = self.server.error_message or f"capture server answers {self.server.status}"
            return self._error(self.server.status, anthropic, message, self.server.error_code)
        model, stream = str(body.get("model") or "unknown"), bool(body.get("stream"))
        if self.command == "POST" and stream and self.server.tool_call and not has_tool_result(path, body):
            if path == "/v1/messages":
                return self._stream(anthropic_tool_events(model))
            if path == "/v1/responses":
                return self._stream(responses_tool_events(model))
        if self.command == "POST" and path == "/v1/messages":
            if stream:
                return self._stream(anthropic_events(model, self.server.text))
            return self._json(200, anthropic_message(model, self.server.text))
        if self.command == "POST" and path == "/v1/responses":
            if stream:
                return self._stream(responses_events(model, self.server.text))
            rid, iid = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
            return self._json(200, responses_object(model, self.server.text, "completed", rid, iid))
        if self.command == "GET" and path == "/v1/models" and self.server.models:
            return self._json(200, models_list(self.server.models))
        return self._error(404, anthropic, f"no route for {self.command} {path}")

    def _error(self, status: int, anthropic: bool, message: str, code: str | None = None) -> None:
        kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}
        kind = kinds.get(status, "api_error")
        if anthropic:
            return self._json(status, {"type": "error", "error": {"type": kind, "message": message}})
        return self._json(status, {"error": {"message": message, "type": kind, "param": None, "code": code}})

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("request-id", f"req_{uuid.uuid4().hex[:24]}")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _stream(self, events: list[bytes]) -> None:
        """Each event in its own chunk (chunked transfer encoding), flushed: a real stream, not one body."""
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.send_header("request-id", f"req_{uuid.uuid4().hex[:24]}")
        self.end_headers()
        for event in events:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--out", type=Path, required=True, help="folder the requests are written to")
    parser.add_argument("--text", default="ok", help="what every reply says")
    parser.add_argument("--status", type=int, default=None, help="answer every POST with this error status")
    parser.add_argument("--error-message", default=None, help="the message of those errors")
    parser.add_argument("--error-code", default=None, help="the OpenAI-shaped `code` of those errors")
    parser.add_argument("--tool-call", action="store_true",
                        help="answer a streamed turn without a tool result with reasoning + a tool call")
    parser.add_argument("--model", action="append", default=[], help="answer GET /v1/models with these ids")
    args = parser.parse_args(argv)
    server = CaptureServer(args.port, args.out, args.text, args.status, args.error_message, args.error_code)
    server.models = args.model
    server.tool_call = args.tool_call
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
