"""Exact prices and costs in integer picodollars (1e-12 USD).

A ModelCard states prices in USD per million tokens as Decimals; one token
then costs `price * 10**6` picodollars, which must be a whole number (six
decimal places of a per-million price at most), so every cost is an exact
integer and sums never drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

PUSD_PER_USD = 10**12
_PUSD_PER_TOKEN_PER_USD_PER_MILLION = 10**6


def per_token_pusd(usd_per_million: Decimal) -> int:
    value = Decimal(usd_per_million) * _PUSD_PER_TOKEN_PER_USD_PER_MILLION
    if value != value.to_integral_value() or value < 0:
        raise ValueError(f"price {usd_per_million} USD/M is not a whole number of picodollars per token "
                         "(use at most 6 decimal places, and no negative prices)")
    return int(value)


@dataclass(frozen=True, slots=True)
class TokenPrices:
    """Picodollars per token."""

    input_cache_hit: int
    input_cache_miss: int
    output: int

    @classmethod
    def from_usd_per_million(cls, hit: Decimal, miss: Decimal, output: Decimal) -> TokenPrices:
        return cls(per_token_pusd(hit), per_token_pusd(miss), per_token_pusd(output))

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
        """cached × hit + (prompt − cached) × miss + completion × output. Reasoning tokens are
        part of completion_tokens and priced as output."""
        if not 0 <= cached_tokens <= prompt_tokens or completion_tokens < 0:
            raise ValueError(f"token counts out of range: prompt {prompt_tokens}, cached {cached_tokens}, "
                             f"completion {completion_tokens}")
        return (cached_tokens * self.input_cache_hit + (prompt_tokens - cached_tokens) * self.input_cache_miss
                + completion_tokens * self.output)


def usd_from_pusd(pusd: int) -> Decimal:
    return Decimal(pusd).scaleb(-12)


def format_usd(pusd: int) -> str:
    """Exact decimal string without exponent or trailing zeros: 8680000 -> '0.00000868'."""
    text = format(usd_from_pusd(pusd), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def pusd_from_usd(usd: str | int | float | Decimal) -> int:
    """Parse a USD amount exactly (floats are taken by their decimal text)."""
    value = Decimal(str(usd)) * PUSD_PER_USD
    if value != value.to_integral_value():
        raise ValueError(f"{usd} USD is not a whole number of picodollars")
    return int(value)
