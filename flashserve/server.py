"""Assembles a running server from settings: loads the checkpoint, builds the
model and engine, wraps them in the local backend, and lists the served
model ids in the catalog.

Kept apart from the CLI so tests and benchmarks build the same server the
command line does.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from fastapi import FastAPI

from flashserve.accounts.keys import generate_key
from flashserve.accounts.pricing import pusd_from_usd
from flashserve.accounts.service import Accounts, Bootstrap
from flashserve.api.app import create_app
from flashserve.backends.local import LocalBackend, LocalModel
from flashserve.backends.remote import RemoteBackend, Upstream
from flashserve.catalog import REFERENCE_MODEL_ID, REFERENCE_PRICES, Catalog, ModelCard, load_catalog_file
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

    def load() -> tuple[Checkpoint, AsyncEngine, LocalModel]:
        checkpoint = load_checkpoint(path, _DTYPES[settings.dtype], progress)
        return checkpoint, *build_engine(checkpoint, settings)

    checkpoint, engine, local = _off_main_thread(load)
    _return_freed_memory()
    engine.start()
    backend = LocalBackend(engine, local, max_active=settings.max_num_seqs + settings.max_queued_requests)

    own_id = EMBEDDED_MODEL_ID if not settings.model else path.name.removesuffix(".gguf").lower()
    ids = list(dict.fromkeys([*(settings.served_model_ids or (REFERENCE_MODEL_ID,)), own_id]))
    overrides = load_catalog_file(settings.catalog) if settings.catalog else {}
    catalog = Catalog()
    created = int(time.time())
    remote = {model_id: entry for model_id, entry in overrides.items() if "backend" in entry}
    for model_id, entry in remote.items():  # served by an upstream engine, billed here
        upstream: Upstream = entry["backend"]
        catalog.add(ModelCard(
            id=model_id,
            context_length=entry.get("context_length", 1 << 20),
            prices=entry.get("prices", REFERENCE_PRICES),
            owned_by="flashserve",
            reasoning=ReasoningSpec(can_think=entry.get("reasoning", upstream.kind != "openai")),
            created=created,
            weights=f"{upstream.model} at {upstream.url} ({upstream.kind})",
            description=f"{upstream.model} on a remote {upstream.kind} engine",
        ), RemoteBackend(upstream))
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

    api_key = settings.api_key or generate_key()
    admin_key = settings.admin_key or generate_key()
    accounts = Accounts(settings.resolved_database_url, Bootstrap(
        api_key=api_key, admin_key=admin_key, default_balance_pusd=pusd_from_usd(settings.default_balance_usd)))
    app = create_app(catalog, accounts)
    app.state.sse_keepalive_s = settings.sse_keepalive_s
    app.state.max_body_bytes = settings.max_body_bytes
    return Server(app=app, catalog=catalog, api_key=api_key, admin_key=admin_key, checkpoint_name=checkpoint.name)


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
