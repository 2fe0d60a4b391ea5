"""Which models are served: model IDs -> `ModelCard` (what the model is, what
it can do, what it costs) and the `Backend` that serves it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from flashserve.api.errors import NOT_FOUND, OpenAIError
from flashserve.backends.base import Backend

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
            "pricing": {
                "input_cache_hit_per_million_usd": str(self.prices.input_cache_hit),
                "input_cache_miss_per_million_usd": str(self.prices.input_cache_miss),
                "output_per_million_usd": str(self.prices.output),
            },
        }


@dataclass(slots=True)
class Catalog:
    entries: dict[str, tuple[ModelCard, Backend]] = field(default_factory=dict)

    def add(self, card: ModelCard, backend: Backend) -> None:
        assert card.id not in self.entries, f"model {card.id} listed twice"
        self.entries[card.id] = (card, backend)

    def resolve(self, model_id: str) -> tuple[ModelCard, Backend]:
        try:
            return self.entries[model_id]
        except KeyError:
            raise OpenAIError(404, f"The model '{model_id}' does not exist or you do not have access to it.",
                              NOT_FOUND, "model", "model_not_found") from None

    def cards(self) -> list[ModelCard]:
        return [card for card, _ in self.entries.values()]

    def backends(self) -> list[Backend]:
        unique: dict[int, Backend] = {}
        for _, backend in self.entries.values():
            unique.setdefault(id(backend), backend)
        return list(unique.values())
