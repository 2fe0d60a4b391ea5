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
    # Activations and KV cache. bf16 halves the bytes each step reads; float32 gives exact parity with
    # the reference implementation.
    dtype: str = "bfloat16"
    # "int8": an int8 weight copy serves batches of a few rows (decode); bf16 serves larger ones.
    weight_quant: str = "none"
    kv_cache_tokens: int = 32768
    block_size: int = 16
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    max_context_tokens: int | None = None  # cap below the checkpoint's own context
    num_threads: int | None = None  # torch intra-op threads; default: torch's choice
    log_level: str = "info"

    def __post_init__(self) -> None:
        assert 0 < self.port < 65536, self.port
        assert self.kv_cache_tokens > 0 and self.block_size > 0
        assert self.dtype in ("float32", "bfloat16", "float16"), self.dtype
        assert self.weight_quant in ("none", "int8"), self.weight_quant

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
    def resolved_database_url(self) -> str:
        from flashserve.accounts.db import default_url

        return self.database_url or default_url(self.data_dir)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _coerce(cls: type, name: str, value: Any) -> Any:
    types = {f.name: f.type for f in fields(cls)}
    if name not in types:
        raise ValueError(f"unknown setting {name!r}")
    kind = str(types[name])
    if not isinstance(value, str):
        return tuple(value) if kind.startswith("tuple") else value
    if kind.startswith("int"):
        return int(value)
    if kind.startswith("bool"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    if kind.startswith("Path"):
        return Path(value)
    if kind.startswith("tuple"):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return value
