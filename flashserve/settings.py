"""One typed settings object for the whole server.

Values come, lowest priority first, from the defaults below, an optional TOML
file (`FLASHSERVE_CONFIG` or `--config`), `FLASHSERVE_<NAME>` environment
variables, and finally CLI flags. Every field is listed here so there is one
place to read what can be configured.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "FLASHSERVE_"


@dataclass(slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # bootstrap key of the default account; generated at startup when unset
    admin_key: str | None = None  # Bearer key of /admin/*; generated at startup when unset
    data_dir: Path = Path("data")
    database_url: str | None = None  # default: sqlite file flashserve.db in data_dir
    default_balance_usd: str = "10"  # opening balance of the default account, when first created
    catalog: Path | None = None  # TOML file of model cards (prices per model)
    model: str | None = None  # GGUF file or HF safetensors folder; None: the embedded SmolLM2
    served_model_ids: tuple[str, ...] = ()  # extra ids for the model; default: the reference id
    # Activations, norms, residuals and attention. float32 keeps a 135M model's greedy answers those of
    # the reference; the matmuls below are where the time goes, and they run in `weight_dtype`.
    dtype: str = "float32"
    # Dense matmul weights (prompt rows): bfloat16 uses the CPU's bf16 units and halves the bytes.
    weight_dtype: str = "bfloat16"
    # Generated-token rows use a quantized copy: "int4" (per 32-input group: a GGUF's 4-bit grid), "int8"
    # (per channel) or "none" (the dense weights). A quantized head has its top candidates rescored in
    # float32 (models/llama.py: compute_logits).
    weight_quant: str = "int4"
    # bfloat16 halves the bytes decode attention reads. Every row of K/V is computed the same way whatever
    # the batch or chunking (the native kernels are row-invariant), so rounding it keeps outputs invariant.
    kv_cache_dtype: str = "bfloat16"
    kv_cache_tokens: int = 12288  # bf16: 283 MB for the embedded model, allocated as used
    block_size: int = 16
    max_num_seqs: int = 32
    # Admission: requests the engine holds at once (running + queued) are capped at max_num_seqs plus this;
    # past it a request gets 503 `overloaded` with retry-after, before any model work.
    max_queued_requests: int = 128
    max_body_bytes: int = 8 << 20  # a larger request body gets 413 before it is parsed
    sse_keepalive_s: float = 10.0  # an SSE comment after this long without an event (queued or slow)
    shutdown_drain_s: float = 30.0  # on SIGTERM: how long in-flight requests may finish before they are aborted
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    max_context_tokens: int | None = None  # cap below the checkpoint's own context
    # Most tokens one completion may generate: a larger max_tokens (Claude Code sends 64000-128000) is
    # clamped to it, never refused, and a request without one gets it. None: no cap. A catalog entry's
    # `max_output_tokens_cap` overrides it per model.
    max_output_tokens_cap: int | None = None
    num_threads: int | None = None  # torch intra-op threads; default: torch's choice
    log_level: str = "info"
    # "text" or "json" (one object per line: time, level, request id, account, key id, model; the per-request
    # summary line adds status, tokens, cost and latency). Never a prompt, a completion or a key.
    log_format: str = "text"
    # GET /metrics: on the API's address behind the admin key (the default, None), or "HOST:PORT" to serve
    # the same series there instead, without a key (for a scraper on an internal network).
    metrics_bind: str | None = None
    # Key ids whose billing series carry their own `key` label (comma-separated); every other key's is "".
    # Bounded by this list so that label never grows with the number of keys.
    metrics_key_ids: tuple[str, ...] = ()
    # The Anthropic surface's model names: "pattern=catalog model id" pairs (glob patterns, first match wins;
    # env: comma-separated). Claude Code sends claude-* names; DeepSeek's own endpoint maps them the same way.
    anthropic_model_map: tuple[str, ...] = ("claude-*=deepseek/deepseek-v4-flash",)
    # Responses API stored responses (`store: true`): kept this many days, expired ones purged this often.
    responses_retention_days: float = 30.0
    responses_purge_interval_s: float = 3600.0
    # Scale-out on this machine: N engine worker processes behind one router (0: the engine in-process).
    workers: int = 0
    routing_policy: str = "prefix_aware"  # round_robin, least_load or prefix_aware (backends/router.py)
    routing_margin: int = 4  # prefix_aware: requests in flight a preferred replica may have beyond the least
    # Shared rate limits (accounts/redis_limits.py): with a Redis URL, per-key, per-account and per-end-user
    # RPM, TPM and concurrency hold across every gateway process using it; without, each process counts alone.
    redis_url: str | None = None
    # Redis unreachable: "open" admits under this process's own limits (and logs a warning), "closed"
    # refuses with 503 (retry-after) so nothing runs beyond the shared limits.
    redis_failure_mode: str = "open"
    redis_lease_ttl_s: float = 30.0  # a concurrency slot not renewed for this long (a dead gateway's) frees
    redis_timeout_s: float = 1.0  # connect/read timeout of one Redis call; past it Redis counts as down
    redis_key_prefix: str = "flashserve"  # several deployments can share one Redis under their own prefix
    # The web console (/console/): self-service accounts with a password: "off", "open" or "invite" (needs
    # console_invite_code); a new account's granted starting balance; how long a sign-in lasts.
    console_registration: str = "off"
    console_invite_code: str | None = None
    console_granted_balance_usd: str = "0"
    console_session_hours: float = 12.0
    # Reserved balances (accounts/reservations.py): a gateway renews its reservations every third of this;
    # one silent for this long is taken for dead, and any other gateway settles its reservations ("reaped").
    reservation_lease_s: float = 60.0

    def __post_init__(self) -> None:
        # Real errors, not asserts: `python -O` strips asserts, and a bad setting must never start a server.
        dtypes = ("float32", "bfloat16", "float16")
        _check(0 < self.port < 65536, "port", self.port, "must be in 1..65535")
        _check(self.kv_cache_tokens > 0, "kv_cache_tokens", self.kv_cache_tokens, "must be positive")
        _check(self.block_size > 0, "block_size", self.block_size, "must be positive")
        _check(self.dtype in dtypes, "dtype", self.dtype, f"must be one of {dtypes}")
        _check(self.kv_cache_dtype in dtypes, "kv_cache_dtype", self.kv_cache_dtype, f"must be one of {dtypes}")
        _check(self.weight_dtype in dtypes, "weight_dtype", self.weight_dtype, f"must be one of {dtypes}")
        _check(self.weight_quant in ("none", "int8", "int4"), "weight_quant", self.weight_quant,
               "must be none, int8 or int4")
        _check(self.max_queued_requests >= 0, "max_queued_requests", self.max_queued_requests, "must be >= 0")
        _check(self.sse_keepalive_s > 0, "sse_keepalive_s", self.sse_keepalive_s, "must be positive")
        _check(self.shutdown_drain_s >= 0, "shutdown_drain_s", self.shutdown_drain_s, "must be >= 0")
        _check(self.workers >= 0, "workers", self.workers, "must be >= 0")
        _check(self.responses_retention_days > 0, "responses_retention_days", self.responses_retention_days,
               "must be positive")
        _check(self.responses_purge_interval_s > 0, "responses_purge_interval_s", self.responses_purge_interval_s,
               "must be positive")
        _check(all("=" in pair for pair in self.anthropic_model_map), "anthropic_model_map",
               self.anthropic_model_map, "must be 'pattern=model id' pairs")
        _check(self.max_output_tokens_cap is None or self.max_output_tokens_cap > 0, "max_output_tokens_cap",
               self.max_output_tokens_cap, "must be positive")
        _check(self.redis_failure_mode in ("open", "closed"), "redis_failure_mode", self.redis_failure_mode,
               "must be open or closed")
        _check(self.redis_lease_ttl_s > 0, "redis_lease_ttl_s", self.redis_lease_ttl_s, "must be positive")
        _check(self.redis_timeout_s > 0, "redis_timeout_s", self.redis_timeout_s, "must be positive")
        _check(self.console_registration in ("off", "open", "invite"), "console_registration",
               self.console_registration, "must be off, open or invite")
        _check(self.console_registration != "invite" or bool(self.console_invite_code), "console_invite_code",
               self.console_invite_code, "must be set when console_registration is invite")
        _check(_is_usd(self.console_granted_balance_usd), "console_granted_balance_usd",
               self.console_granted_balance_usd, "must be a non-negative decimal USD amount")
        _check(self.console_session_hours > 0, "console_session_hours", self.console_session_hours,
               "must be positive")
        _check(self.log_format in ("text", "json"), "log_format", self.log_format, "must be text or json")
        _check(self.metrics_bind is None or _host_port(self.metrics_bind) is not None, "metrics_bind",
               self.metrics_bind, "must be HOST:PORT")
        _check(self.reservation_lease_s > 0, "reservation_lease_s", self.reservation_lease_s, "must be positive")
        _check(self.routing_policy in ("round_robin", "least_load", "prefix_aware"), "routing_policy",
               self.routing_policy, "must be round_robin, least_load or prefix_aware")

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> Settings:
        values: dict[str, Any] = {}
        config_file = config_file or os.environ.get(ENV_PREFIX + "CONFIG")
        if config_file:
            with open(config_file, "rb") as f:
                values.update(tomllib.load(f).get("server", {}))
        for f in fields(cls):
            env = os.environ.get(ENV_PREFIX + f.name.upper())
            if env is not None and env != "":
                values[f.name] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**{k: _coerce(cls, k, v) for k, v in values.items()})

    @property
    def anthropic_models(self) -> dict[str, str]:
        """`anthropic_model_map` as {pattern: catalog model id}, in order."""
        pairs = (pair.split("=", 1) for pair in self.anthropic_model_map)
        return {pattern.strip(): model.strip() for pattern, model in pairs}

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """`metrics_bind` as (host, port), or None: /metrics is served on the API's address."""
        return None if self.metrics_bind is None else _host_port(self.metrics_bind)

    @property
    def resolved_database_url(self) -> str:
        from flashserve.accounts.db import default_url

        return self.database_url or default_url(self.data_dir)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


class SettingsError(ValueError):
    """A setting with a value the server cannot run with; the message names it."""


def _is_usd(value: str) -> bool:
    from flashserve.accounts.pricing import pusd_from_usd

    try:
        return pusd_from_usd(value) >= 0
    except (ArithmeticError, ValueError):
        return False


def _host_port(value: str) -> tuple[str, int] | None:
    """HOST:PORT as (host, port); None when it is not that."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


def _check(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise SettingsError(f"setting {name} = {value!r} {why}")


def _coerce(cls: type, name: str, value: Any) -> Any:
    types = {f.name: f.type for f in fields(cls)}
    if name not in types:
        raise ValueError(f"unknown setting {name!r}")
    kind = str(types[name])
    if not isinstance(value, str):
        return tuple(value) if kind.startswith("tuple") else value
    if kind.startswith("int"):
        return int(value)
    if kind.startswith("float"):
        return float(value)
    if kind.startswith("bool"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    if kind.startswith("Path"):
        return Path(value)
    if kind.startswith("tuple"):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return value
