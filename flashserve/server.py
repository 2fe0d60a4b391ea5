"""Composition: settings -> the catalog, the engine and its backends, the accounts and the app.

`build_server` loads the checkpoint and builds the engine (`build_engine`, wrapped in
`backends/local.py: LocalBackend`), turns each catalog entry's backend spec into a backend
(`build_backend`: the local engine, a `RemoteBackend`, or a `Router` over replicas), lists every served id
in the `Catalog` with its card (`catalog.py: make_card`), and creates the app. `--workers N` instead
starts N engine processes (`backends/workers.py: WorkerPool`) behind one router. The memory workarounds
of loading live in `memory.py`.

Kept apart from the CLI so tests and benchmarks build the same server the command line does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI
from prometheus_client import start_http_server

from flashserve import metrics
from flashserve.accounts.keys import generate_key
from flashserve.accounts.limits import make_limiter
from flashserve.accounts.pricing import pusd_from_usd
from flashserve.accounts.service import Accounts, Bootstrap
from flashserve.api.app import create_app
from flashserve.api.console import ConsoleConfig
from flashserve.backends.base import Backend
from flashserve.backends.local import LocalBackend, LocalModel
from flashserve.backends.remote import RemoteBackend
from flashserve.backends.router import Replica, Router
from flashserve.backends.workers import WorkerPool
from flashserve.catalog import (
    REFERENCE_MODEL_ID,
    BackendSpec,
    Catalog,
    CatalogEntry,
    LocalSpec,
    RemoteSpec,
    load_catalog_file,
    make_card,
)
from flashserve.chat.formats import chat_format
from flashserve.chat.reasoning import ReasoningSpec
from flashserve.chat.structured import GrammarBackend
from flashserve.engine.async_engine import AsyncEngine
from flashserve.engine.engine import EngineConfig, LLMEngine
from flashserve.kernels import cpu_ops
from flashserve.memory import off_main_thread, return_freed_memory
from flashserve.metrics import EngineSeries
from flashserve.models.loading import Checkpoint, embedded_model_path, load_checkpoint
from flashserve.models.registry import MemorySetting, build_model, model_family
from flashserve.server_key import ServerKey
from flashserve.settings import Settings

EMBEDDED_MODEL_ID = "smollm2-135m-instruct"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class Server:
    app: FastAPI
    catalog: Catalog[Backend]
    api_key: str
    admin_key: str
    checkpoint_name: str


def build_engine(checkpoint: Checkpoint, settings: Settings,
                 model_name: str = EMBEDDED_MODEL_ID) -> tuple[AsyncEngine, LocalModel]:
    """The checkpoint's engine and what the local backend needs to know of its model, each piece as the
    checkpoint's `ModelFamily` says (`models/registry.py`): runner, memory, template, tools, reasoning.
    `model_name` labels the engine's metrics (vLLM's `model_name`)."""
    family = model_family(checkpoint.architecture)
    dtype = _DTYPES[settings.dtype]
    model = build_model(checkpoint, dtype, settings.weight_quant, _DTYPES[settings.weight_dtype], consume=True)
    cpu_ops()  # compile (or load) the native operators now, not inside the first request's step
    max_len = int(checkpoint.config["max_position_embeddings"])
    if settings.max_context_tokens:
        max_len = min(max_len, settings.max_context_tokens)
    memory = family.memory(model, MemorySetting(settings.kv_cache_tokens, max_len, settings.block_size,
                                                _DTYPES[settings.kv_cache_dtype]))
    config = EngineConfig(max_model_len=max_len, num_kv_blocks=memory.num_blocks, block_size=memory.block_size,
                          max_num_seqs=settings.max_num_seqs,
                          max_num_batched_tokens=settings.max_num_batched_tokens,
                          enable_prefix_caching=settings.enable_prefix_caching, dtype=dtype,
                          kv_cache_dtype=_DTYPES[settings.kv_cache_dtype], snapshot_bytes=memory.snapshot_bytes)
    vocab = int(checkpoint.config["vocab_size"])
    llm = LLMEngine(model, config, vocab, runner=family.runner)
    llm.series = EngineSeries(model_name)  # the engine's /metrics series (vLLM's names)
    engine = AsyncEngine(llm)
    tokens = checkpoint.tokenizer.get_vocab(with_added_tokens=True)
    by_id = [""] * max(len(tokens), 1)
    for text, token_id in tokens.items():
        if token_id < len(by_id):
            by_id[token_id] = text
    special = {i for i, t in checkpoint.tokenizer.get_added_tokens_decoder().items() if t.special}
    chat = chat_format(family, checkpoint)
    grammars = GrammarBackend(by_id, special, list(checkpoint.stop_token_ids), vocab,
                              tool_format=chat.grammar_format)
    local = LocalModel(
        tokenizer=checkpoint.tokenizer,
        template=chat.template,
        stop_token_ids=tuple(checkpoint.stop_token_ids),
        max_model_len=max_len,
        vocab_size=vocab,
        fingerprint=checkpoint.fingerprint,
        dtype=settings.dtype,
        grammars=grammars,
        reasoning=chat.reasoning,
        think_end_ids=chat.think_end_ids,
        tool_parser=chat.tool_parser,
    )
    return engine, local


def build_server(settings: Settings, progress: Callable[[int, int, str], None] | None = None) -> Server:
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    path = Path(settings.model) if settings.model else embedded_model_path()
    if settings.workers:
        return _build_router_server(settings, path)

    own_id = _own_model_id(settings, path)

    def load() -> tuple[Checkpoint, AsyncEngine, LocalModel]:
        checkpoint = load_checkpoint(path, _DTYPES[settings.dtype], progress)
        return checkpoint, *build_engine(checkpoint, settings, own_id)

    checkpoint, engine, local = off_main_thread(load)
    return_freed_memory()
    engine.start()
    backend = LocalBackend(engine, local, max_active=settings.max_num_seqs + settings.max_queued_requests)

    ids = list(dict.fromkeys([*(settings.served_model_ids or (REFERENCE_MODEL_ID,)), own_id]))
    entries = load_catalog_file(settings.catalog) if settings.catalog else {}
    catalog: Catalog[Backend] = Catalog()
    created = int(time.time())
    for model_id, entry in entries.items():  # served by upstream engines, billed here
        if isinstance(entry.backend, LocalSpec):
            continue
        upstream = entry.backend if isinstance(entry.backend, RemoteSpec) else entry.backend.upstreams[0]
        # A raw-text upstream is told to think unless the request turns it off (remote.py: raw_thinking).
        raw = upstream.raw_text is not None
        catalog.add(make_card(
            model_id, context_length=1 << 20,
            reasoning=ReasoningSpec(can_think=upstream.kind not in ("openai", "llamacpp") or raw,
                                    thinks_by_default=raw),
            weights=f"{upstream.model} at {upstream.url} ({upstream.kind})",
            description=f"{upstream.model} on a remote {upstream.kind} engine", created=created, entry=entry,
            max_output_tokens=settings.max_output_tokens_cap,
        ), build_backend(entry.backend, backend))
    for model_id in ids:
        if model_id in catalog.entries:
            continue
        stand_in = model_id == REFERENCE_MODEL_ID
        catalog.add(make_card(
            model_id, context_length=local.max_model_len,
            reasoning=local.reasoning,  # the same spec the backend applies
            weights=f"{checkpoint.name} ({checkpoint.architecture}, embedded engine)",
            description=("DeepSeek-V4-Flash API served by stand-in weights on the embedded engine"
                         if stand_in else f"{checkpoint.name} on the embedded engine"),
            created=created, entry=entries.get(model_id, CatalogEntry(model_id)),
            max_output_tokens=settings.max_output_tokens_cap,
        ), backend)
    catalog.add_aliases(entries)
    return _finish_server(settings, catalog, checkpoint.name)


def build_backend(spec: BackendSpec, local: Backend) -> Backend:
    """A catalog entry's backend spec as a backend: the local engine, one upstream, or a router over
    replicas (each replica's health at its URL's /health)."""
    if isinstance(spec, LocalSpec):
        return local
    if isinstance(spec, RemoteSpec):
        return RemoteBackend(spec)
    return Router([Replica(u.url, RemoteBackend(u), health_url=u.url.rstrip("/").removesuffix("/v1") + "/health")
                   for u in spec.upstreams], spec.policy)


def _own_model_id(settings: Settings, path: Path) -> str:
    """The id a checkpoint is served under besides the reference id (the workers serve it under it too)."""
    return EMBEDDED_MODEL_ID if not settings.model else path.name.removesuffix(".gguf").lower()


def _finish_server(settings: Settings, catalog: Catalog[Backend], checkpoint_name: str) -> Server:
    """Accounts, the app and its settings around a filled catalog."""
    api_key = settings.api_key or generate_key()
    admin_key = settings.admin_key or generate_key()
    limiter = make_limiter(settings.redis_url, failure_mode=settings.redis_failure_mode,
                           lease_ttl_s=settings.redis_lease_ttl_s, timeout_s=settings.redis_timeout_s,
                           prefix=settings.redis_key_prefix)
    accounts = Accounts(settings.resolved_database_url, Bootstrap(
        api_key=api_key, admin_key=admin_key, default_balance_pusd=pusd_from_usd(settings.default_balance_usd)),
        data_dir=settings.data_dir, reservation_lease_s=settings.reservation_lease_s, limiter=limiter)
    # The deployment secret (FLASHSERVE_SECRET_KEY, else data_dir/secret_key): gateways sharing it seal,
    # sign and hash cache salts alike.
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    server_key = ServerKey.load(Path(settings.data_dir), os.environ)
    metrics.set_key_allowlist(settings.metrics_key_ids)
    address = settings.metrics_address
    if address is not None:
        start_http_server(address[1], addr=address[0], registry=metrics.REGISTRY)
    app = create_app(catalog, accounts, sse_keepalive_s=settings.sse_keepalive_s,
                     max_body_bytes=settings.max_body_bytes, anthropic_models=settings.anthropic_models,
                     responses_retention_days=settings.responses_retention_days,
                     responses_purge_interval_s=settings.responses_purge_interval_s, server_key=server_key,
                     serve_metrics=address is None,
                     console_config=ConsoleConfig(
                         registration=settings.console_registration, invite_code=settings.console_invite_code,
                         granted_balance_pusd=pusd_from_usd(settings.console_granted_balance_usd),
                         session_ttl_s=int(settings.console_session_hours * 3600)))
    return Server(app=app, catalog=catalog, api_key=api_key, admin_key=admin_key, checkpoint_name=checkpoint_name)


def _build_router_server(settings: Settings, path: Path) -> Server:
    """`--workers N`: N `flashserve serve` processes on this machine, each with its own engine on a free
    local port and an internal key, behind one router that keeps the API, the keys and the billing here."""
    workers = WorkerPool.start(settings, path)
    own_id = _own_model_id(settings, path)
    replicas = [Replica(url, RemoteBackend(RemoteSpec(f"{url}/v1", own_id, "flashserve", workers.key, retries=0)),
                        health_url=f"{url}/health", pid=process.pid)
                for url, process in zip(workers.urls, workers.processes, strict=True)]
    router = Router(replicas, settings.routing_policy, settings.routing_margin)
    # The router's /metrics includes every worker's engine series (metrics.py: WorkerScrape says how).
    scrape = metrics.WorkerScrape(workers.urls, workers.admin_key)
    metrics.REGISTRY.register(scrape)

    def stop() -> None:
        metrics.REGISTRY.unregister(scrape)
        workers.stop()

    router.on_close = stop
    catalog: Catalog[Backend] = Catalog()
    created = int(time.time())
    for model_id in dict.fromkeys([*(settings.served_model_ids or (REFERENCE_MODEL_ID,)), own_id]):
        catalog.add(make_card(
            model_id, context_length=workers.context_length, reasoning=ReasoningSpec(),
            weights=f"{path.name} on {len(workers.urls)} local workers ({settings.routing_policy} routing)",
            description=f"{path.name} behind a router of {len(workers.urls)} engine workers", created=created,
            max_output_tokens=settings.max_output_tokens_cap,
        ), router)
    catalog.add_aliases({})
    return _finish_server(settings, catalog, path.name)
