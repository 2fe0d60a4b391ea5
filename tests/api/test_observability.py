"""Request ids on every surface and every answer, the usage row's id, and GET /metrics against the requests
made (counts, tokens, cost, the engine's vLLM-named series, routing and upstream series)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flashserve.api.state import app_state
from tests.api.conftest import API_KEY, Api

pytestmark = pytest.mark.anyio


def chat(model: str, content: str = "hello there world", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


async def scrape(api: Api) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = await api.admin.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum over the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


async def test_every_answer_carries_a_request_id(api: Api) -> None:
    answers = {
        "chat ok": await api.client.post("/v1/chat/completions", json=chat("scripted")),
        "chat stream": await api.client.post("/v1/chat/completions", json=chat("scripted", stream=True)),
        "no key": await api.http("").post("/v1/chat/completions", json=chat("scripted")),
        "wrong key": await api.http("sk-not-a-key").post("/v1/chat/completions", json=chat("scripted")),
        "unknown model": await api.client.post("/v1/chat/completions", json=chat("no-such-model")),
        "bad field": await api.client.post("/v1/chat/completions", json=chat("scripted", temperature=9)),
        "bad json": await api.client.post("/v1/chat/completions", content=b"{not json",
                                          headers={"content-type": "application/json"}),
        "anthropic": await api.client.post("/v1/messages", json={"model": "scripted", "max_tokens": 5,
                                                                 "messages": [{"role": "user", "content": "hi"}]}),
        "anthropic error": await api.client.post("/v1/messages", json={"model": "scripted"}),
        "responses": await api.client.post("/v1/responses", json={"model": "scripted", "input": "hi"}),
        "models": await api.client.get("/v1/models"),
        "admin": await api.admin.get("/admin/accounts"),
        "not found": await api.client.get("/v1/nothing-here"),
        "health": await api.client.get("/health"),
        "metrics": await api.admin.get("/metrics"),
        "metrics refused": await api.client.get("/metrics"),
    }
    assert answers["chat ok"].status_code == 200 and answers["unknown model"].status_code == 404
    assert answers["bad field"].status_code == 400 and answers["no key"].status_code == 401
    for what, r in answers.items():
        assert is_uuid(r.headers.get("x-request-id", "")), (what, r.status_code, dict(r.headers))
    ids = {r.headers["x-request-id"] for r in answers.values()}
    assert len(ids) == len(answers)  # one per request


async def test_a_draining_server_still_names_the_request(api: Api) -> None:
    state = app_state(api.app)
    state.draining = True
    try:
        r = await api.client.post("/v1/chat/completions", json=chat("scripted"), headers={"x-request-id": "drain-1"})
    finally:
        state.draining = False
    assert r.status_code == 503 and r.headers["x-request-id"] == "drain-1"


@pytest.mark.parametrize("given", ["abc-123", "req_0f9A.b:c/d=e+f", "x" * 128, str(uuid.uuid4())])
async def test_a_well_formed_client_id_is_kept(api: Api, given: str) -> None:
    r = await api.client.post("/v1/chat/completions", json=chat("scripted"), headers={"x-request-id": given})
    assert r.status_code == 200 and r.headers["x-request-id"] == given
    assert r.json()["id"].startswith("chatcmpl-") and r.json()["id"] != given  # never the object's id


@pytest.mark.parametrize("given", ["x" * 129, "has space", "semi;colon", "-leading-dash", "quote\"d", "é"])
async def test_a_malformed_client_id_is_replaced(api: Api, given: str) -> None:
    r = await api.client.post("/v1/chat/completions", json=chat("scripted"),
                              headers={"x-request-id": given.encode()})
    assert r.status_code == 200 and is_uuid(r.headers["x-request-id"])


async def test_the_usage_row_carries_the_request_id(api: Api) -> None:
    r = await api.client.post("/v1/chat/completions", json=chat("scripted"), headers={"x-request-id": "row-trace-1"})
    assert r.status_code == 200
    rows = [x for x in await api.records() if x["x_request_id"] == "row-trace-1"]
    assert len(rows) == 1 and rows[0]["request_id"] == r.json()["id"]
    # a streamed request and an error after admission are recorded with their ids too
    r = await api.client.post("/v1/chat/completions", json=chat("scripted", stream=True),
                              headers={"x-request-id": "row-trace-2"})
    assert r.status_code == 200
    assert [x for x in await api.records() if x["x_request_id"] == "row-trace-2"]


async def test_metrics_need_the_admin_key(api: Api) -> None:
    assert (await api.http("").get("/metrics")).status_code == 401
    assert (await api.client.get("/metrics")).status_code == 401  # an ordinary API key is not enough
    assert (await api.admin.get("/metrics")).status_code == 200


async def test_metrics_count_the_requests_tokens_and_cost(api: Api) -> None:
    before = await scrape(api)
    costs, prompt, completion = 0.0, 0, 0
    for _ in range(3):
        r = await api.client.post("/v1/chat/completions", json=chat("scripted"))
        usage = r.json()["usage"]
        costs += usage["cost"]
        prompt += usage["prompt_tokens"]
        completion += usage["completion_tokens"]
    assert (await api.client.post("/v1/chat/completions", json=chat("no-such-model"))).status_code == 404
    assert (await api.http("sk-wrong").post("/v1/chat/completions", json=chat("scripted"))).status_code == 401
    after = await scrape(api)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("flashserve_requests_total", model="scripted", surface="chat", status="200", code="") == 3
    assert delta("flashserve_requests_total", surface="chat", status="404", code="model_not_found") == 1
    assert delta("flashserve_requests_total", surface="chat", status="401", code="invalid_api_key") == 1
    assert delta("flashserve_tokens_total", model="scripted", kind="cache_miss") == prompt
    assert delta("flashserve_tokens_total", model="scripted", kind="output") == completion
    assert delta("flashserve_cost_picodollars_total", model="scripted") == pytest.approx(costs * 1e12)
    assert delta("flashserve_request_duration_seconds_count", surface="chat") == 5


async def test_engine_series_use_vllm_names(api: Api) -> None:
    before = await scrape(api)
    r = await api.client.post("/v1/chat/completions", json=chat("fake-local", max_tokens=6, temperature=0))
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    after = await scrape(api)

    def delta(name: str) -> float:
        return value(after, name, model_name="fake-local") - value(before, name, model_name="fake-local")

    assert delta("vllm:prompt_tokens_total") == usage["prompt_tokens"]
    assert delta("vllm:generation_tokens_total") == usage["completion_tokens"]
    assert delta("vllm:prefix_cache_queries_total") == usage["prompt_tokens"]
    assert delta("vllm:prefix_cache_hits_total") == usage["prompt_tokens_details"]["cached_tokens"]
    for histogram in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                      "vllm:request_queue_time_seconds"):
        assert delta(histogram + "_count") == 1, histogram
    assert delta("vllm:inter_token_latency_seconds_count") == usage["completion_tokens"] - 1
    assert delta("vllm:request_success_total") == 1
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert any(n == gauge for n, _ in after), gauge


async def test_routing_and_upstream_series(api: Api) -> None:
    before = await scrape(api)
    for _ in range(2):
        assert (await api.client.post("/v1/chat/completions", json=chat("routed"))).status_code == 200
    after = await scrape(api)
    routed = (value(after, "flashserve_routing_decisions_total", policy="round_robin", reason="turn")
              - value(before, "flashserve_routing_decisions_total", policy="round_robin", reason="turn"))
    assert routed == 2
    answered = sum(value(after, "flashserve_upstream_response_seconds_count", upstream=f"http://{n}/v1")
                   - value(before, "flashserve_upstream_response_seconds_count", upstream=f"http://{n}/v1")
                   for n in ("up-b", "up-c"))
    assert answered == 2
    assert value(after, "flashserve_replica_healthy", replica="up-b") == 1


async def test_no_upstream_but_a_flashserve_worker_gets_the_cache_salt(api: Api) -> None:
    r = await api.client.post("/v1/chat/completions", json=chat("remote"), headers={"x-request-id": "salt-check"})
    assert r.status_code == 200
    seen = api.upstreams["up-a"].seen[-1]["headers"]
    assert seen["x-request-id"] == "salt-check"
    assert "x-flashserve-cache-salt" not in seen and API_KEY not in str(seen)
    assert "acct_" not in str(seen)
