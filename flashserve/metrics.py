"""The Prometheus registry of the process and every series flashserve exports.

It sits at the package's top level, below `api/`, `backends/` and `engine/`, and imports none of them, so
each layer records its own figures here and `api/` only serves them (`GET /metrics`, `api/metrics.py`).

Three groups of series:
- the engine's, under vLLM's names where the meaning is the same (so dashboards made for vLLM work), each
  labelled `model_name` and `engine` as vLLM labels them: `vllm:time_to_first_token_seconds`,
  `vllm:inter_token_latency_seconds`, `vllm:time_per_output_token_seconds`, `vllm:e2e_request_latency_seconds`,
  `vllm:request_queue_time_seconds` (histograms), `vllm:num_requests_running`, `vllm:num_requests_waiting`,
  `vllm:kv_cache_usage_perc` (gauges), `vllm:prefix_cache_queries`, `vllm:prefix_cache_hits` (tokens),
  `vllm:prompt_tokens`, `vllm:generation_tokens`, `vllm:request_success` (counters; `_total` on the wire);
- the gateway's (`flashserve_requests_total`, upstream latency and errors per upstream, routing decisions);
- billing (`flashserve_cost_picodollars_total`, `flashserve_tokens_total` by kind).

Every label takes values from a bounded set: models, surfaces and upstreams come from the catalog, status
and error codes from the code. The one per-key label (`key` on the billing series) names only the key ids
an operator lists in the `metrics_key_ids` setting (`set_key_allowlist`); every other key is "".

With `--workers N` the front process scrapes each worker's /metrics and re-exports their engine (`vllm:`)
series with `engine` set to the worker's index (`WorkerScrape`); the gateway and billing series are counted
once, by the front, which admits and bills every request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)
disable_created_metrics()  # no `_created` series beside every counter: vLLM exports none either

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

# -- engine (vLLM's names) ----------------------------------------------------------------------------------
_ENGINE = ("model_name", "engine")
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)

TIME_TO_FIRST_TOKEN = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                                _ENGINE, buckets=_LATENCY_BUCKETS, registry=REGISTRY)
INTER_TOKEN_LATENCY = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                                _ENGINE, buckets=_LATENCY_BUCKETS, registry=REGISTRY)
TIME_PER_OUTPUT_TOKEN = Histogram("vllm:time_per_output_token_seconds",
                                  "Histogram of a request's mean time per output token after the first, in seconds.",
                                  _ENGINE, buckets=_LATENCY_BUCKETS, registry=REGISTRY)
E2E_LATENCY = Histogram("vllm:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.",
                        _ENGINE, buckets=_REQUEST_BUCKETS, registry=REGISTRY)
QUEUE_TIME = Histogram("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
                       _ENGINE, buckets=_REQUEST_BUCKETS, registry=REGISTRY)
RUNNING = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", _ENGINE,
                registry=REGISTRY)
WAITING = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", _ENGINE,
                registry=REGISTRY)
KV_CACHE_USAGE = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", _ENGINE,
                       registry=REGISTRY)
PREFIX_QUERIES = Counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                         _ENGINE, registry=REGISTRY)
PREFIX_HITS = Counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                      _ENGINE, registry=REGISTRY)
PROMPT_TOKENS = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", _ENGINE, registry=REGISTRY)
GENERATION_TOKENS = Counter("vllm:generation_tokens", "Number of generation tokens processed.", _ENGINE,
                            registry=REGISTRY)
REQUEST_SUCCESS = Counter("vllm:request_success", "Count of successfully processed requests.",
                          (*_ENGINE, "finished_reason"), registry=REGISTRY)

# -- gateway ---------------------------------------------------------------------------------------------
REQUESTS = Counter("flashserve_requests", "HTTP requests answered, by model, surface, status and error code.",
                   ("model", "surface", "status", "code"), registry=REGISTRY)
REQUEST_LATENCY = Histogram("flashserve_request_duration_seconds",
                            "Time from a request's arrival to its response's last byte, by surface.", ("surface",),
                            buckets=_REQUEST_BUCKETS, registry=REGISTRY)
UPSTREAM_LATENCY = Histogram("flashserve_upstream_response_seconds",
                             "Time until an upstream (a remote engine or a worker) answered with its headers.",
                             ("upstream", "kind"), buckets=_LATENCY_BUCKETS, registry=REGISTRY)
UPSTREAM_ERRORS = Counter("flashserve_upstream_errors", "Failed upstream attempts, by upstream and error code.",
                          ("upstream", "kind", "code"), registry=REGISTRY)
ROUTING_DECISIONS = Counter("flashserve_routing_decisions",
                            "Requests a router sent to a replica, by policy and why that replica (prefix, load, "
                            "turn, failover).", ("policy", "replica", "reason"), registry=REGISTRY)
REPLICA_HEALTHY = Gauge("flashserve_replica_healthy", "1 while a replica is in its router's rotation.",
                        ("replica",), registry=REGISTRY)

# -- billing ---------------------------------------------------------------------------------------------
COST = Counter("flashserve_cost_picodollars", "Cost charged, in picodollars (1e-12 USD), by model.",
               ("model", "key"), registry=REGISTRY)
TOKENS = Counter("flashserve_tokens", "Tokens billed, by model and kind (cache_hit, cache_miss, output, reasoning).",
                 ("model", "kind", "key"), registry=REGISTRY)

_key_allowlist: frozenset[str] = frozenset()


def set_key_allowlist(key_ids: Iterable[str]) -> None:
    """The key ids that get their own `key` label on the billing series (the `metrics_key_ids` setting)."""
    global _key_allowlist
    _key_allowlist = frozenset(k for k in key_ids if k)


def key_label(key_id: str) -> str:
    return key_id if key_id in _key_allowlist else ""


def record_billing(model: str, key_id: str, prompt: int, cached: int, output: int, reasoning: int,
                   cost_pusd: int) -> None:
    """One request's billed tokens and cost (reasoning tokens are part of the output tokens too)."""
    key = key_label(key_id)
    COST.labels(model, key).inc(cost_pusd)
    for kind, count in (("cache_hit", cached), ("cache_miss", prompt - cached), ("output", output),
                        ("reasoning", reasoning)):
        if count:
            TOKENS.labels(model, kind, key).inc(count)


class EngineSeries:
    """The engine's series bound to one engine's labels, recorded from its thread (prometheus_client is
    thread-safe). The engine calls `on_token` for each sampled token, `on_finish` for each ended request
    and `on_step` after each step; times are `time.monotonic()` seconds."""

    def __init__(self, model_name: str, engine: str = "0") -> None:
        labels = (model_name, engine)
        self.ttft = TIME_TO_FIRST_TOKEN.labels(*labels)
        self.itl = INTER_TOKEN_LATENCY.labels(*labels)
        self.tpot = TIME_PER_OUTPUT_TOKEN.labels(*labels)
        self.e2e = E2E_LATENCY.labels(*labels)
        self.queue = QUEUE_TIME.labels(*labels)
        self.running = RUNNING.labels(*labels)
        self.waiting = WAITING.labels(*labels)
        self.kv_usage = KV_CACHE_USAGE.labels(*labels)
        self.prefix_queries = PREFIX_QUERIES.labels(*labels)
        self.prefix_hits = PREFIX_HITS.labels(*labels)
        self.prompt_tokens = PROMPT_TOKENS.labels(*labels)
        self.generation_tokens = GENERATION_TOKENS.labels(*labels)
        self._labels = labels

    def on_first_token(self, arrival: float, scheduled: float, now: float, prompt_tokens: int,
                       cached_tokens: int) -> None:
        self.ttft.observe(now - arrival)
        self.queue.observe(max(0.0, scheduled - arrival))
        self.prompt_tokens.inc(prompt_tokens)
        self.prefix_queries.inc(prompt_tokens)
        self.prefix_hits.inc(cached_tokens)

    def on_token(self, since_last: float | None) -> None:
        self.generation_tokens.inc()
        if since_last is not None:
            self.itl.observe(since_last)

    def on_finish(self, arrival: float, first_token: float | None, now: float, output_tokens: int,
                  reason: str) -> None:
        self.e2e.observe(now - arrival)
        if first_token is not None and output_tokens > 1:
            self.tpot.observe((now - first_token) / (output_tokens - 1))
        REQUEST_SUCCESS.labels(*self._labels, reason).inc()

    def on_step(self, running: int, waiting: int, kv_usage: float) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)


class WorkerScrape(Collector):
    """`--workers N`: each worker's engine series, scraped from its /metrics when this registry is
    collected, with `engine` set to the worker's index. A worker that does not answer is left out of that
    scrape (its series reappear on the next) and logged."""

    def __init__(self, urls: list[str], admin_key: str, timeout_s: float = 2.0) -> None:
        self.urls = urls
        self.admin_key = admin_key
        self.timeout_s = timeout_s

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for index, url in enumerate(self.urls):
            try:
                response = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {self.admin_key}"},
                                     timeout=self.timeout_s)
                response.raise_for_status()
            except httpx.HTTPError as exc:
                log.warning("worker %s: /metrics not scraped: %s", url, exc)
                continue
            for family in text_string_to_metric_families(response.text):
                if not family.name.startswith("vllm:"):
                    continue  # the gateway and billing series are the front's own
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation, family.type)
                for sample in family.samples:
                    out.add_sample(sample.name, {**sample.labels, "engine": str(index)}, sample.value)
        yield from merged.values()


def exposition(registry: CollectorRegistry = REGISTRY) -> bytes:
    """The registry in Prometheus' text format (blocking: a worker scrape makes HTTP calls)."""
    from prometheus_client import generate_latest

    return generate_latest(registry)


_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_names(registry: CollectorRegistry = REGISTRY) -> set[str]:
    """Every series name this registry can export, as it appears on the wire (`_total`, `_bucket`...), for
    tests and the check that every dashboard query names a real series."""
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names
