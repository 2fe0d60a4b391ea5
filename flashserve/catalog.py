"""Which models are served: model IDs -> `ModelCard` (what the model is, what
it can do, what it costs) and the backend that serves it.

The catalog file (`load_catalog_file`) gives typed `CatalogEntry`s: per model
id, its prices and card overrides and a backend *spec* (`LocalSpec`,
`RemoteSpec` for one OpenAI-compatible upstream, `ReplicaSetSpec` for several
behind a router). Specs are plain data: `server.py` (composition) builds the
backends from them, so nothing here imports `backends/`. `make_card` is the one
place a `ModelCard` is built. `Catalog` is generic in the backend type
(`api/state.py` holds a `Catalog[Backend]`).

Aliases are catalog entries too: another name for a served model, optionally with thinking switched on or
off by default (`Alias`). DeepSeek's own names are built in (`DEEPSEEK_ALIASES`: `deepseek-v4-flash`,
and the legacy `deepseek-chat` / `deepseek-reasoner` with thinking off / on) whenever the reference id is
served; a catalog file adds its own with `alias_of` (and `thinking`). A request names an alias and is
served, billed and recorded as the model it resolves to.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Generic, TypeVar

from flashserve.accounts.pricing import TokenPrices, per_token_pusd
from flashserve.chat.reasoning import ReasoningSpec
from flashserve.errors import model_not_found

REFERENCE_MODEL_ID = "deepseek/deepseek-v4-flash"


@dataclass(frozen=True, slots=True)
class Prices:
    """USD per million tokens."""

    input_cache_hit: Decimal
    input_cache_miss: Decimal
    output: Decimal


# The reference page's prices for deepseek/deepseek-v4-flash.
REFERENCE_PRICES = Prices(Decimal("0.0028"), Decimal("0.14"), Decimal("0.28"))


@dataclass(frozen=True, slots=True)
class ModelCard:
    id: str
    context_length: int
    prices: Prices
    owned_by: str = "flashserve"
    created: int = 0
    weights: str = ""  # what actually backs the id (file name, upstream URL)
    description: str = ""
    capabilities: tuple[str, ...] = ("chat",)
    input_modalities: tuple[str, ...] = ("text",)
    # Whether the model can think, whether it does by default, and the thinking-token budget of each
    # effort mode; a model that cannot think ignores reasoning_effort.
    reasoning: ReasoningSpec = field(default_factory=ReasoningSpec)
    # Most tokens one completion may generate: a larger max_tokens is clamped to it (api/core.py), and a
    # request without max_tokens gets it. None: no cap.
    max_output_tokens: int | None = None

    def clamp_max_tokens(self, max_tokens: int | None) -> int | None:
        cap = self.max_output_tokens
        return max_tokens if cap is None else min(max_tokens or cap, cap)

    @property
    def token_prices(self) -> TokenPrices:
        return TokenPrices.from_usd_per_million(self.prices.input_cache_hit, self.prices.input_cache_miss,
                                                self.prices.output)

    def to_openai(self) -> dict[str, object]:
        return {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": self.owned_by,
            "context_length": self.context_length,
            "weights": self.weights,
            "description": self.description,
            "capabilities": list(self.capabilities),
            "input_modalities": list(self.input_modalities),
            "reasoning": self.reasoning.can_think,
            "reasoning_default": self.reasoning.thinks_by_default if self.reasoning.can_think else False,
            "reasoning_budgets": dict(self.reasoning.budgets) if self.reasoning.can_think else {},
            "structured_outputs": True,
            "pricing": {
                "input_cache_hit_per_million_usd": str(self.prices.input_cache_hit),
                "input_cache_miss_per_million_usd": str(self.prices.input_cache_miss),
                "output_per_million_usd": str(self.prices.output),
            },
        }


def make_card(model_id: str, *, context_length: int, reasoning: ReasoningSpec, weights: str, description: str,
              created: int, entry: CatalogEntry | None = None, max_output_tokens: int | None = None) -> ModelCard:
    """The one place a `ModelCard` is built: what backs the id (its context, reasoning, a description of
    the weights, the server's output cap), with the catalog file's entry applied (prices and
    max_output_tokens_cap always; context_length and reasoning for a remote model only: a local model's
    come from its checkpoint). The reference id is DeepSeek's."""
    prices = entry.prices if entry is not None and entry.prices is not None else REFERENCE_PRICES
    if entry is not None and entry.max_output_tokens_cap is not None:
        max_output_tokens = entry.max_output_tokens_cap
    if entry is not None and not isinstance(entry.backend, LocalSpec):
        context_length = entry.context_length or context_length
        if entry.reasoning is not None:  # the default (thinking unless turned off) stays the backend's
            reasoning = ReasoningSpec(can_think=entry.reasoning,
                                      thinks_by_default=entry.reasoning and reasoning.thinks_by_default)
    return ModelCard(id=model_id, context_length=context_length, prices=prices,
                     owned_by="deepseek" if model_id == REFERENCE_MODEL_ID else "flashserve", created=created,
                     weights=weights, description=description, reasoning=reasoning,
                     max_output_tokens=max_output_tokens)


@dataclass(frozen=True, slots=True)
class Alias:
    """Another name for a served model. `thinking`: the default thinking switch of requests that name the
    alias and set neither `thinking` nor `reasoning_effort` themselves (None: the model's own default)."""

    id: str
    target: str
    thinking: bool | None = None

    def to_openai(self, card: ModelCard) -> dict[str, object]:
        """The target's model object under the alias's id, naming its target."""
        out = card.to_openai()
        out["id"] = self.id
        out["alias_of"] = self.target
        out["alias_thinking"] = self.thinking
        return out


# DeepSeek's own names for the reference model: its API's current id and the legacy chat / reasoner pair.
DEEPSEEK_ALIASES = (Alias("deepseek-v4-flash", REFERENCE_MODEL_ID),
                    Alias("deepseek-chat", REFERENCE_MODEL_ID, thinking=False),
                    Alias("deepseek-reasoner", REFERENCE_MODEL_ID, thinking=True))

B = TypeVar("B")


@dataclass(frozen=True, slots=True)
class Served(Generic[B]):
    card: ModelCard
    backend: B


@dataclass(slots=True)
class Catalog(Generic[B]):
    entries: dict[str, Served[B]] = field(default_factory=dict)
    aliases: dict[str, Alias] = field(default_factory=dict)

    def add(self, card: ModelCard, backend: B) -> None:
        if card.id in self.entries or card.id in self.aliases:
            raise ValueError(f"model {card.id} listed twice")
        self.entries[card.id] = Served(card, backend)

    def add_alias(self, alias: Alias) -> None:
        """Another name for a served model (an alias of an alias is refused: one hop, always)."""
        if alias.id in self.entries or alias.id in self.aliases:
            raise ValueError(f"model {alias.id} listed twice")
        if alias.target not in self.entries:
            raise ValueError(f"alias {alias.id} names {alias.target}, which is not a served model")
        self.aliases[alias.id] = alias

    def alias(self, model_id: str) -> Alias | None:
        return self.aliases.get(model_id)

    def resolve(self, model_id: str) -> tuple[ModelCard, B]:
        """The card and backend of a model id or alias (an alias gives its target's card: usage rows and
        billing record the resolved model)."""
        alias = self.aliases.get(model_id)
        try:
            served = self.entries[alias.target if alias is not None else model_id]
        except KeyError:
            raise model_not_found(model_id) from None
        return served.card, served.backend

    def model_object(self, model_id: str) -> dict[str, object]:
        """One model or alias as an OpenAI model object (GET /v1/models/{id}, and the console's page)."""
        card, _ = self.resolve(model_id)
        alias = self.aliases.get(model_id)
        return alias.to_openai(card) if alias is not None else card.to_openai()

    def models(self) -> list[dict[str, object]]:
        """Every model and alias as OpenAI model objects (GET /v1/models)."""
        out = [card.to_openai() for card in self.cards()]
        out.extend(alias.to_openai(self.entries[alias.target].card) for alias in self.aliases.values())
        return out

    def add_aliases(self, entries: dict[str, CatalogEntry]) -> None:
        """DeepSeek's built-in names (when the reference model is served) and the catalog file's aliases;
        a file alias of the same id replaces a built-in one, a served model of that id wins over both."""
        wanted = {a.id: a for a in DEEPSEEK_ALIASES if a.target in self.entries}
        for entry in entries.values():
            if entry.alias_of is not None:
                wanted[entry.model_id] = Alias(entry.model_id, entry.alias_of, entry.thinking)
        for alias in wanted.values():
            if alias.id not in self.entries:
                self.add_alias(alias)

    def cards(self) -> list[ModelCard]:
        return [served.card for served in self.entries.values()]

    def backends(self) -> list[B]:
        unique: dict[int, B] = {}
        for served in self.entries.values():
            unique.setdefault(id(served.backend), served.backend)
        return list(unique.values())


# -- backend specs: plain data, built into backends by server.py ----------------------------------------
# What each kind of upstream receives is its own (backends/remote.py: request_headers, upstream_body):
# "flashserve" (another flashserve, e.g. a --workers process) gets the request id as is and the opaque cache
# salt; "llamacpp" (llama-cpp-python's server) a UUID request id and only the fields it knows; the others the
# request id as is and never the salt.
KINDS = ("openai", "deepseek", "vllm", "sglang", "flashserve", "llamacpp")
RAW_TEXT_FORMATS = ("deepseek_v4",)  # model output syntaxes a raw-text upstream's content is parsed from
POLICIES = ("round_robin", "least_load", "prefix_aware")


@dataclass(frozen=True, slots=True)
class LocalSpec:
    """Served by this process's own engine (the default: a catalog entry without a backend table)."""


@dataclass(frozen=True, slots=True)
class RemoteSpec:
    """One OpenAI-compatible upstream (`backends/remote.py: RemoteBackend`)."""

    url: str  # base URL, e.g. http://10.0.0.5:8000/v1
    model: str  # the model name the upstream serves
    kind: str = "openai"  # one of KINDS: how reasoning is asked for and usage reported
    api_key: str | None = None  # the upstream's own key (from the catalog's environment variable)
    timeout_s: float = 600.0  # the whole request
    connect_timeout_s: float = 10.0
    retries: int = 2  # extra attempts before the first byte
    # None: the upstream parses its model's output (reasoning_content, tool_calls). "deepseek_v4": its
    # `content` is the model's raw text, which flashserve splits and parses itself (chat/model_output.py).
    raw_text: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"upstream kind must be one of {KINDS}, not {self.kind!r}")
        if self.raw_text is not None and self.raw_text not in RAW_TEXT_FORMATS:
            raise ValueError(f"raw_text must be one of {RAW_TEXT_FORMATS}, not {self.raw_text!r}")


@dataclass(frozen=True, slots=True)
class ReplicaSetSpec:
    """Several upstreams of one model behind a router (`backends/router.py: Router`)."""

    upstreams: tuple[RemoteSpec, ...]
    policy: str = "prefix_aware"  # one of POLICIES


BackendSpec = LocalSpec | RemoteSpec | ReplicaSetSpec


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """What the catalog file says about one model id; None: not given."""

    model_id: str
    backend: BackendSpec = LocalSpec()
    prices: Prices | None = None
    context_length: int | None = None
    reasoning: bool | None = None
    max_output_tokens_cap: int | None = None  # clamps max_tokens (over the server's max_output_tokens_cap)
    alias_of: str | None = None  # this id is an alias of that served model (no backend, prices or card keys)
    thinking: bool | None = None  # an alias's default thinking switch


class CatalogError(ValueError):
    """A catalog file that cannot be used; the message names the file, line and key."""


_PRICE_KEYS = ("input_cache_hit", "input_cache_miss", "output")


def load_catalog_file(path: str | Path) -> dict[str, CatalogEntry]:
    """Read per-model settings from a TOML catalog file::

        [models."deepseek/deepseek-v4-flash".prices]   # USD per million tokens
        input_cache_hit = "0.0028"
        input_cache_miss = "0.14"
        output = "0.28"

    An alias is an entry of its own::

        [models."fast-chat"]
        alias_of = "deepseek/deepseek-v4-flash"
        thinking = false    # optional: the alias's default thinking switch

    Returns {model_id: CatalogEntry}. Prices are strings (or integers) so that no float
    rounding creeps into money.
    """
    path = Path(path)
    text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{path}: {exc}") from None
    unknown = set(data) - {"models"}
    if unknown:
        key = sorted(unknown)[0]
        raise CatalogError(f"{path}:{_line_of(text, key)}: unknown top-level key '{key}' (expected 'models')")
    out: dict[str, CatalogEntry] = {}
    for model_id, table in data.get("models", {}).items():
        where = f'models."{model_id}"'
        if not isinstance(table, dict):
            raise CatalogError(f"{path}:{_line_of(text, model_id)}: {where} must be a table")
        entry: dict[str, Any] = {}
        for key, value in table.items():
            line = _line_of(text, key, after=model_id)
            if key == "prices":
                entry["prices"] = _prices(path, text, model_id, value)
            elif key == "backend":
                entry["backend"] = _backend(path, text, model_id, value)
            elif key in ("context_length", "reasoning", "max_output_tokens_cap", "thinking"):
                entry[key] = _card_value(path, line, f"{where}.{key}", value)
            elif key == "alias_of":
                if not isinstance(value, str) or not value:
                    raise CatalogError(f"{path}:{line}: {where}.alias_of must be a model id")
                entry[key] = value
            else:
                raise CatalogError(f"{path}:{line}: unknown key '{where}.{key}'")
        if "alias_of" in entry and set(entry) - {"alias_of", "thinking"}:
            other = sorted(set(entry) - {"alias_of", "thinking"})[0]
            raise CatalogError(f"{path}:{_line_of(text, other, after=model_id)}: {where} is an alias "
                               f"(alias_of): '{other}' belongs to the model it names")
        if "thinking" in entry and "alias_of" not in entry:
            raise CatalogError(f"{path}:{_line_of(text, 'thinking', after=model_id)}: {where}.thinking is "
                               "an alias's setting: it needs alias_of")
        out[model_id] = CatalogEntry(model_id, **entry)
    return out


def _card_value(path: Path, line: int, where: str, value: Any) -> int | bool:
    if where.endswith(("reasoning", "thinking")):
        if not isinstance(value, bool):
            raise CatalogError(f"{path}:{line}: {where} must be true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CatalogError(f"{path}:{line}: {where} must be a positive integer")
    return value


_BACKEND_KEYS = {"type", "url", "replicas", "policy", "model", "kind", "api_key_env", "timeout_s", "retries",
                 "raw_text"}


def _backend(path: Path, text: str, model_id: str, table: Any) -> RemoteSpec | ReplicaSetSpec:
    """A model's `backend` table: type = "remote", an OpenAI-compatible `url` (…/v1) or a list of them as
    `replicas` (with a routing `policy`), the upstream's `model` name, its `kind` (openai, deepseek, vllm,
    sglang, flashserve, llamacpp), the environment variable holding its key (`api_key_env`: the key never
    sits in the file), `timeout_s`, `retries`, and `raw_text = "deepseek_v4"` for an upstream whose content
    is the model's raw text (flashserve splits the thinking and parses the DSML calls itself)."""
    where = f'models."{model_id}".backend'
    line = _line_of(text, "backend", after=model_id)
    if not isinstance(table, dict):
        raise CatalogError(f"{path}:{line}: {where} must be a table")
    extra = sorted(set(table) - _BACKEND_KEYS)
    if extra:
        raise CatalogError(f"{path}:{_line_of(text, extra[0], after=model_id)}: unknown key '{where}.{extra[0]}'")
    if table.get("type") != "remote":
        raise CatalogError(f'{path}:{line}: {where}.type must be "remote" (the local engine needs no table)')
    replicas = table.get("replicas")
    if replicas is not None:
        if "url" in table or not isinstance(replicas, list) or not replicas or \
                not all(isinstance(u, str) and u for u in replicas):
            raise CatalogError(f"{path}:{_line_of(text, 'replicas', after=model_id)}: {where}.replicas must be a "
                               "non-empty list of URLs (instead of url)")
        table = {**table, "url": replicas[0]}
    policy = table.get("policy", "prefix_aware")
    if policy not in POLICIES:
        raise CatalogError(f"{path}:{_line_of(text, 'policy', after=model_id)}: {where}.policy must be "
                           "round_robin, least_load or prefix_aware")
    for key in ("url", "model"):
        if not isinstance(table.get(key), str) or not table[key]:
            raise CatalogError(f"{path}:{line}: {where}.{key} must be a non-empty string")
    key_env = table.get("api_key_env")
    api_key = None
    if key_env is not None:
        api_key = os.environ.get(str(key_env))
        if not api_key:
            raise CatalogError(f"{path}:{_line_of(text, 'api_key_env', after=model_id)}: {where}.api_key_env "
                               f"names {key_env}, which is not set")
    try:
        upstreams = tuple(RemoteSpec(url=url, model=table["model"], kind=str(table.get("kind", "openai")),
                                   api_key=api_key, timeout_s=float(table.get("timeout_s", 600.0)),
                                   retries=int(table.get("retries", 2 if replicas is None else 0)),
                                   raw_text=_raw_text(table.get("raw_text")))
                          for url in (replicas or [table["url"]]))
    except (TypeError, ValueError) as exc:
        raise CatalogError(f"{path}:{line}: {where}: {exc}") from None
    return upstreams[0] if replicas is None else ReplicaSetSpec(upstreams, policy)


def _raw_text(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"raw_text must be one of {RAW_TEXT_FORMATS}")
    return value


def _prices(path: Path, text: str, model_id: str, table: Any) -> Prices:
    where = f'models."{model_id}".prices'
    if not isinstance(table, dict):
        raise CatalogError(f"{path}:{_line_of(text, 'prices', after=model_id)}: {where} must be a table")
    missing = [k for k in _PRICE_KEYS if k not in table]
    extra = [k for k in table if k not in _PRICE_KEYS]
    if missing or extra:
        problem = f"missing {', '.join(missing)}" if missing else f"unknown key {extra[0]}"
        raise CatalogError(f"{path}:{_line_of(text, 'prices', after=model_id)}: {where}: {problem}")
    values = []
    for key in _PRICE_KEYS:
        raw = table[key]
        line = _line_of(text, key, after=model_id)
        if isinstance(raw, float | bool) or not isinstance(raw, str | int):
            raise CatalogError(f'{path}:{line}: {where}.{key} must be a decimal string such as "0.14"')
        try:
            value = Decimal(str(raw))
            per_token_pusd(value)
        except (ArithmeticError, ValueError) as exc:
            raise CatalogError(f"{path}:{line}: {where}.{key} = {raw!r}: {exc}") from None
        values.append(value)
    return Prices(*values)


def _line_of(text: str, needle: str, after: str | None = None) -> int:
    """1-based line of the first `needle` (after the first `after`), for error messages."""
    start = text.find(after) if after else 0
    index = text.find(needle, max(start, 0))
    return text.count("\n", 0, index) + 1 if index >= 0 else 1
