"""Request ids, what each upstream kind receives, llama.cpp's body, the log formats, the bounded key label
and the worker scrape (over a real local HTTP server)."""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flashserve import metrics
from flashserve.backends.remote import LLAMACPP_FIELDS, request_headers, upstream_body, upstream_error
from flashserve.catalog import KINDS, RemoteSpec
from flashserve.errors import FlashserveError
from flashserve.generation import (
    GenerationRequest,
    Message,
    Reasoning,
    RequestContext,
    ResponseFormat,
    Sampling,
)
from flashserve.request_scope import (
    CURRENT,
    JsonFormatter,
    RequestScope,
    ScopeFilter,
    TextFormatter,
    accept_request_id,
    as_uuid,
)


@pytest.mark.parametrize("given", ["a", "abc-123", "req_1.2:3/4=5+6", "A" * 128, str(uuid.uuid4())])
def test_well_formed_ids_are_kept(given: str) -> None:
    assert accept_request_id(given) == given


@pytest.mark.parametrize("given", [None, "", "A" * 129, "with space", "new\nline", "-dash-first", "é", "a;b", "a\"b"])
def test_other_ids_are_replaced_by_a_uuid(given: str | None) -> None:
    out = accept_request_id(given)
    assert out != given and str(uuid.UUID(out)) == out


def test_as_uuid_keeps_a_uuid_and_maps_anything_else_stably() -> None:
    u = str(uuid.uuid4())
    assert as_uuid(u) == u
    assert as_uuid("trace-1") == as_uuid("trace-1") != as_uuid("trace-2")
    assert str(uuid.UUID(as_uuid("trace-1"))) == as_uuid("trace-1")


CTX = RequestContext("chatcmpl-1", tenant="acct_secret123/x", trace_id="trace-1", cache_salt="0123abcd" * 4)


@pytest.mark.parametrize("kind", KINDS)
def test_what_each_upstream_kind_receives(kind: str) -> None:
    headers = request_headers(RemoteSpec("http://u/v1", "m", kind, api_key="up-key"), CTX)
    assert headers["Authorization"] == "Bearer up-key"
    assert "acct_" not in json.dumps(headers)  # no account id reaches any upstream
    if kind == "llamacpp":
        assert headers["x-request-id"] == as_uuid("trace-1")
    else:
        assert headers["x-request-id"] == "trace-1"
    assert ("x-flashserve-cache-salt" in headers) == (kind == "flashserve")
    if kind == "flashserve":
        assert headers["x-flashserve-cache-salt"] == CTX.cache_salt


def _request(**extra: object) -> GenerationRequest:
    messages = [Message("user", "hi"), Message("assistant", "ok", reasoning_content="thought"),
                Message("user", "more")]
    return GenerationRequest("m", messages, **extra)  # type: ignore[arg-type]


def test_llamacpp_gets_only_the_fields_it_reads() -> None:
    gen = _request(sampling=Sampling(temperature=0.5, max_tokens=9), reasoning=Reasoning(effort="high"),
                   parallel_tool_calls=True, passthrough={"store": True, "metadata": {"a": "b"}})
    body = upstream_body(gen, RemoteSpec("http://u/v1", "m", "llamacpp"))
    assert set(body) <= LLAMACPP_FIELDS
    assert body["stream"] is False and body["temperature"] == 0.5 and body["max_tokens"] == 9
    assert all(set(m) <= {"role", "content", "name", "tool_calls", "tool_call_id"} for m in body["messages"])


def test_llamacpp_json_schema_becomes_its_json_object_with_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    gen = _request(response_format=ResponseFormat("json_schema", schema=schema, name="x"))
    body = upstream_body(gen, RemoteSpec("http://u/v1", "m", "llamacpp"))
    assert body["response_format"] == {"type": "json_object", "schema": schema}


def test_llamacpp_refuses_more_than_one_choice() -> None:
    with pytest.raises(FlashserveError) as info:
        upstream_body(_request(sampling=Sampling(n=2)), RemoteSpec("http://u/v1", "m", "llamacpp"))
    assert info.value.status == 400 and info.value.param == "n"


def test_an_empty_refusal_names_the_upstream_and_its_status() -> None:
    error = upstream_error(400, "", {}, RemoteSpec("http://10.0.0.5:8080/v1", "smollm2", "llamacpp"))
    assert error.status == 400
    assert "llamacpp upstream (model 'smollm2')" in error.message and "HTTP 400" in error.message
    assert "10.0.0.5" not in error.message  # the internal address goes to the log only
    worded = upstream_error(400, '{"error": {"message": "bad max_tokens"}}', {})
    assert worded.message.endswith("bad max_tokens")


def _record(message: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("flashserve.test", logging.INFO, __file__, 1, message, (), None)
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_the_request_scope() -> None:
    token = CURRENT.set(RequestScope("trace-9", account="acct_1", key_id="key_1", model="m"))
    try:
        record = _record("request done", status=200, prompt_tokens=3, cost_usd="0.000001", latency_ms=5)
        assert ScopeFilter().filter(record)
    finally:
        CURRENT.reset(token)
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "trace-9" and line["account"] == "acct_1" and line["key_id"] == "key_1"
    assert line["model"] == "m" and line["status"] == 200 and line["prompt_tokens"] == 3
    assert line["level"] == "info" and line["message"] == "request done" and line["time"].endswith("Z")
    text = TextFormatter().format(record)
    assert "[trace-9]" in text and "status=200" in text


def test_outside_a_request_no_request_fields() -> None:
    record = _record("started")
    ScopeFilter().filter(record)
    assert "request_id" not in json.loads(JsonFormatter().format(record))


def test_the_key_label_names_only_listed_keys() -> None:
    metrics.set_key_allowlist(["key_listed"])
    try:
        metrics.record_billing("unit-model", "key_listed", 10, 4, 3, 1, 100)
        metrics.record_billing("unit-model", "key_other", 10, 4, 3, 1, 100)
    finally:
        metrics.set_key_allowlist([])
    keys = {s.labels["key"] for f in metrics.REGISTRY.collect() if f.name == "flashserve_tokens"
            for s in f.samples if s.labels.get("model") == "unit-model"}
    assert keys == {"key_listed", ""}
    kinds = {s.labels["kind"]: s.value for f in metrics.REGISTRY.collect() if f.name == "flashserve_tokens"
             for s in f.samples if s.labels.get("model") == "unit-model" and s.labels["key"] == ""}
    assert kinds == {"cache_hit": 4, "cache_miss": 6, "output": 3, "reasoning": 1}


@pytest.fixture
def worker_metrics() -> Iterator[str]:
    """A real HTTP server answering /metrics as a worker would (an engine series and a gateway series)."""
    registry = CollectorRegistry()
    Counter("vllm:generation_tokens", "tokens", ("model_name", "engine"), registry=registry).labels("w", "0").inc(7)
    Counter("flashserve_requests", "requests", ("model",), registry=registry).labels("w").inc(3)
    body = generate_latest(registry)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            ok = self.headers.get("Authorization") == "Bearer worker-admin"
            self.send_response(200 if ok else 401)
            self.end_headers()
            self.wfile.write(body if ok else b"")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_the_router_re_exports_each_workers_engine_series(worker_metrics: str) -> None:
    registry = CollectorRegistry()
    registry.register(metrics.WorkerScrape([worker_metrics, worker_metrics, "http://127.0.0.1:9"], "worker-admin",
                                           timeout_s=1.0))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert "flashserve_requests" not in families  # the front counts requests itself
    samples = families["vllm:generation_tokens"].samples
    assert sorted((s.labels["engine"], s.value) for s in samples) == [("0", 7.0), ("1", 7.0)]


def test_exported_names_are_the_wire_names() -> None:
    names = metrics.exported_names()
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:prompt_tokens_total", "vllm:num_requests_running",
                 "vllm:kv_cache_usage_perc", "flashserve_requests_total", "flashserve_cost_picodollars_total"):
        assert name in names


def test_every_dashboard_query_names_an_exported_series() -> None:
    dashboard = json.loads((Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json").read_text())
    exported = metrics.exported_names()
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert exprs
    for expr in exprs:
        named = re.findall(r"\b(vllm:[a-z0-9_]+|flashserve_[a-z0-9_]+)", expr)
        assert named, expr
        missing = [n for n in named if n not in exported]
        assert not missing, (expr, missing)


def test_log_format_and_metrics_bind_settings() -> None:
    from flashserve.settings import Settings, SettingsError

    assert Settings(log_format="json", metrics_bind="0.0.0.0:9400").metrics_address == ("0.0.0.0", 9400)
    assert Settings().metrics_address is None
    for bad in ({"log_format": "xml"}, {"metrics_bind": "9400"}, {"metrics_bind": "host:99999"}):
        with pytest.raises(SettingsError):
            Settings(**bad)  # type: ignore[arg-type]


def test_metrics_bind_serves_the_registry_apart_without_a_key(tmp_path: Path) -> None:
    import socket

    import httpx

    from flashserve.catalog import Catalog
    from flashserve.server import _finish_server
    from flashserve.settings import Settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = _finish_server(Settings(data_dir=tmp_path, metrics_bind=f"127.0.0.1:{port}"), Catalog(), "none")
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert r.status_code == 200 and "# TYPE flashserve_requests_total counter" in r.text, r.text[:500]
    assert "/metrics" not in {getattr(route, "path", "") for route in server.app.routes}  # not on the API's address
