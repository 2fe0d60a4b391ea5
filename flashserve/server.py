"""Assembles a running server from settings: loads the checkpoint, builds the
model and engine, wraps them in the local backend, and lists the served
model ids in the catalog.

Kept apart from the CLI so tests and benchmarks build the same server the
command line does.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import torch
from fastapi import FastAPI

from flashserve.accounts.keys import generate_key
from flashserve.accounts.pricing import pusd_from_usd
from flashserve.accounts.service import Accounts, Bootstrap
from flashserve.api.app import create_app
from flashserve.backends.base import Backend
from flashserve.backends.local import LocalBackend, LocalModel
from flashserve.backends.remote import RemoteBackend, Upstream
from flashserve.backends.router import Replica, Router
from flashserve.catalog import (
    REFERENCE_MODEL_ID,
    REFERENCE_PRICES,
    Catalog,
    ModelCard,
    ReplicaSet,
    load_catalog_file,
)
from flashserve.chat.deepseek_v4 import THINK_END, DeepseekV4Template
from flashserve.chat.reasoning import ReasoningSpec
from flashserve.chat.structured import GrammarBackend
from flashserve.chat.template import ChatTemplate
from flashserve.engine.async_engine import AsyncEngine
from flashserve.engine.engine import EngineConfig, LLMEngine
from flashserve.kernels import cpu_ops
from flashserve.models.loading import Checkpoint, embedded_model_path, load_checkpoint
from flashserve.models.registry import build_model
from flashserve.settings import Settings

EMBEDDED_MODEL_ID = "smollm2-135m-instruct"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

T = TypeVar("T")


@dataclass(slots=True)
class Server:
    app: FastAPI
    catalog: Catalog
    api_key: str
    admin_key: str
    checkpoint_name: str


def build_engine(checkpoint: Checkpoint, settings: Settings) -> tuple[AsyncEngine, LocalModel]:
    dtype = _DTYPES[settings.dtype]
    model = build_model(checkpoint, dtype, settings.weight_quant, _DTYPES[settings.weight_dtype], consume=True)
    cpu_ops()  # compile (or load) the native operators now, not inside the first request's step
    max_len = int(checkpoint.config["max_position_embeddings"])
    if settings.max_context_tokens:
        max_len = min(max_len, settings.max_context_tokens)
    # A model that caches prefixes in units of its own (DeepSeek-V4: 128 tokens) gets blocks of that size.
    block_size = getattr(model, "prefix_unit", settings.block_size)
    num_blocks = max(-(-settings.kv_cache_tokens // block_size), -(-max_len // block_size))
    config = EngineConfig(max_model_len=max_len, num_kv_blocks=num_blocks, block_size=block_size,
                          max_num_seqs=settings.max_num_seqs,
                          max_num_batched_tokens=settings.max_num_batched_tokens,
                          enable_prefix_caching=settings.enable_prefix_caching, dtype=dtype,
                          kv_cache_dtype=_DTYPES[settings.kv_cache_dtype])
    vocab = int(checkpoint.config["vocab_size"])
    engine = AsyncEngine(LLMEngine(model, config, vocab))
    tokens = checkpoint.tokenizer.get_vocab(with_added_tokens=True)
    by_id = [""] * max(len(tokens), 1)
    for text, token_id in tokens.items():
        if token_id < len(by_id):
            by_id[token_id] = text
    special = {i for i, t in checkpoint.tokenizer.get_added_tokens_decoder().items() if t.special}
    v4 = checkpoint.architecture == "deepseek_v4"  # DeepSeek's own encoding, thinking modes and DSML calls
    grammars = GrammarBackend(by_id, special, list(checkpoint.stop_token_ids), vocab,
                              tool_format="dsml" if v4 else "json")
    local = LocalModel(
        tokenizer=checkpoint.tokenizer,
        template=DeepseekV4Template() if v4 else ChatTemplate.from_checkpoint(checkpoint),
        stop_token_ids=tuple(checkpoint.stop_token_ids),
        max_model_len=max_len,
        vocab_size=vocab,
        fingerprint=checkpoint.fingerprint,
        dtype=settings.dtype,
        grammars=grammars,
        reasoning=ReasoningSpec(can_think=True) if v4 else ReasoningSpec(),
        think_end_ids=tuple(checkpoint.tokenizer.encode(THINK_END, add_special_tokens=False).ids) if v4 else (),
        tool_format="dsml" if v4 else "json",
    )
    return engine, local


def build_server(settings: Settings, progress: Callable[[int, int, str], None] | None = None) -> Server:
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    path = Path(settings.model) if settings.model else embedded_model_path()
    if settings.workers:
        return _build_router_server(settings, path)

    def load() -> tuple[Checkpoint, AsyncEngine, LocalModel]:
        checkpoint = load_checkpoint(path, _DTYPES[settings.dtype], progress)
        return checkpoint, *build_engine(checkpoint, settings)

    checkpoint, engine, local = _off_main_thread(load)
    _return_freed_memory()
    engine.start()
    backend = LocalBackend(engine, local, max_active=settings.max_num_seqs + settings.max_queued_requests)

    own_id = _own_model_id(settings, path)
    ids = list(dict.fromkeys([*(settings.served_model_ids or (REFERENCE_MODEL_ID,)), own_id]))
    overrides = load_catalog_file(settings.catalog) if settings.catalog else {}
    catalog = Catalog()
    created = int(time.time())
    remote = {model_id: entry for model_id, entry in overrides.items() if "backend" in entry}
    for model_id, entry in remote.items():  # served by upstream engines, billed here
        spec: Upstream | ReplicaSet = entry["backend"]
        upstream = spec.upstreams[0] if isinstance(spec, ReplicaSet) else spec
        backend: Backend = RemoteBackend(upstream) if isinstance(spec, Upstream) else Router(
            [Replica(u.url, RemoteBackend(u), health_url=u.url.rstrip("/").removesuffix("/v1") + "/health")
             for u in spec.upstreams], spec.policy)
        catalog.add(ModelCard(
            id=model_id,
            context_length=entry.get("context_length", 1 << 20),
            prices=entry.get("prices", REFERENCE_PRICES),
            owned_by="flashserve",
            reasoning=ReasoningSpec(can_think=entry.get("reasoning", upstream.kind != "openai")),
            created=created,
            weights=f"{upstream.model} at {upstream.url} ({upstream.kind})",
            description=f"{upstream.model} on a remote {upstream.kind} engine",
        ), backend)
    for model_id in ids:
        if model_id in remote:
            continue
        stand_in = model_id == REFERENCE_MODEL_ID
        catalog.add(ModelCard(
            id=model_id,
            context_length=local.max_model_len,
            prices=overrides.get(model_id, {}).get("prices", REFERENCE_PRICES),
            owned_by="deepseek" if stand_in else "flashserve",
            reasoning=local.reasoning,  # the same spec the backend applies
            created=created,
            weights=f"{checkpoint.name} ({checkpoint.architecture}, embedded engine)",
            description=("DeepSeek-V4-Flash API served by stand-in weights on the embedded engine"
                         if stand_in else f"{checkpoint.name} on the embedded engine"),
        ), backend)

    return _finish_server(settings, catalog, checkpoint.name)


def _own_model_id(settings: Settings, path: Path) -> str:
    """The id a checkpoint is served under besides the reference id (the workers serve it under it too)."""
    return EMBEDDED_MODEL_ID if not settings.model else path.name.removesuffix(".gguf").lower()


def _finish_server(settings: Settings, catalog: Catalog, checkpoint_name: str) -> Server:
    """Accounts, the app and its settings around a filled catalog."""
    api_key = settings.api_key or generate_key()
    admin_key = settings.admin_key or generate_key()
    accounts = Accounts(settings.resolved_database_url, Bootstrap(
        api_key=api_key, admin_key=admin_key, default_balance_pusd=pusd_from_usd(settings.default_balance_usd)))
    app = create_app(catalog, accounts)
    app.state.sse_keepalive_s = settings.sse_keepalive_s
    app.state.max_body_bytes = settings.max_body_bytes
    return Server(app=app, catalog=catalog, api_key=api_key, admin_key=admin_key, checkpoint_name=checkpoint_name)


def _build_router_server(settings: Settings, path: Path) -> Server:
    """`--workers N`: N `flashserve serve` processes on this machine, each with its own engine on a free
    local port and an internal key, behind one router that keeps the API, the keys and the billing here."""
    workers = WorkerPool.start(settings, path)
    own_id = _own_model_id(settings, path)
    replicas = [Replica(url, RemoteBackend(Upstream(f"{url}/v1", own_id, "openai", workers.key, retries=0)),
                        health_url=f"{url}/health", pid=process.pid)
                for url, process in zip(workers.urls, workers.processes, strict=True)]
    router = Router(replicas, settings.routing_policy, settings.routing_margin)
    router.on_close = workers.stop
    catalog = Catalog()
    created = int(time.time())
    context = workers.context_length
    for model_id in dict.fromkeys([*(settings.served_model_ids or (REFERENCE_MODEL_ID,)), own_id]):
        catalog.add(ModelCard(
            id=model_id, context_length=context, prices=REFERENCE_PRICES,
            owned_by="deepseek" if model_id == REFERENCE_MODEL_ID else "flashserve", created=created,
            weights=f"{path.name} on {len(workers.urls)} local workers ({settings.routing_policy} routing)",
            description=f"{path.name} behind a router of {len(workers.urls)} engine workers",
        ), router)
    return _finish_server(settings, catalog, path.name)


@dataclass
class WorkerPool:
    processes: list[subprocess.Popen[bytes]]
    urls: list[str]
    key: str
    context_length: int

    @classmethod
    def start(cls, settings: Settings, path: Path, timeout_s: float = 300.0) -> WorkerPool:
        key = generate_key()
        processes, urls = [], []
        for i in range(settings.workers):
            port = _free_port()
            data = Path(settings.data_dir) / f"worker-{i}"
            data.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "FLASHSERVE_API_KEY": key, "FLASHSERVE_WORKERS": "0", "PYTHONUNBUFFERED": "1"}
            env.pop("FLASHSERVE_CATALOG", None)
            env.pop("FLASHSERVE_DATABASE_URL", None)  # each worker keeps its own (unused) ledger
            cmd = [sys.executable, "-m", "flashserve", "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--data-dir", str(data)] + (["--model", str(path)] if settings.model else [])
            with open(data / "worker.log", "wb") as log_file:
                processes.append(subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
        pool = cls(processes, urls, key, 0)
        deadline = time.monotonic() + timeout_s
        for process, url in zip(processes, urls, strict=True):
            while True:
                if process.poll() is not None:
                    pool.stop()
                    raise RuntimeError(f"engine worker {url} exited during start-up (see its worker.log)")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    pool.stop()
                    raise RuntimeError(f"engine worker {url} not ready after {timeout_s:.0f}s")
                time.sleep(0.25)
        models = httpx.get(f"{urls[0]}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()
        pool.context_length = int(models["data"][0]["context_length"])
        return pool

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _return_freed_memory() -> None:
    """Hand the float32 checkpoint's freed pages back to the OS: glibc keeps freed heap memory for reuse,
    which would leave the server's resident size at its loading peak."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _off_main_thread(fn: Callable[[], T]) -> T:
    """Run `fn` (loading and packing: parallel PyTorch work) in a thread that then exits.

    The engine steps on its own thread. libgomp keeps an OpenMP team for every thread that ever ran a
    parallel region, and once it manages more threads than there are cores it stops spin-waiting
    between regions: every parallel op then pays a futex wake-up, and a decode step on 2 cores takes
    twice as long. A team created here ends with this thread, so the engine's is the only one.
    """
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # re-raised on the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="flashserve-load")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]
