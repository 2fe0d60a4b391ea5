"""Costs in integer picodollars, checked against a Decimal oracle."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashserve.accounts.pricing import TokenPrices, format_usd, per_token_pusd, pusd_from_usd
from flashserve.catalog import REFERENCE_PRICES

REFERENCE = TokenPrices.from_usd_per_million(REFERENCE_PRICES.input_cache_hit, REFERENCE_PRICES.input_cache_miss,
                                             REFERENCE_PRICES.output)


def oracle_usd(prompt: int, cached: int, completion: int, hit: Decimal, miss: Decimal, out: Decimal) -> Decimal:
    million = Decimal(1_000_000)
    return cached * hit / million + (prompt - cached) * miss / million + completion * out / million


def test_reference_prices_per_token() -> None:
    assert (REFERENCE.input_cache_hit, REFERENCE.input_cache_miss, REFERENCE.output) == (2_800, 140_000, 280_000)


@given(st.integers(0, 10**7), st.integers(0, 10**7), st.integers(0, 10**7))
def test_cost_matches_decimal_oracle_at_reference_prices(prompt: int, cached_raw: int, completion: int) -> None:
    cached = min(cached_raw, prompt)
    pusd = REFERENCE.cost(prompt, cached, completion)
    expected = oracle_usd(prompt, cached, completion, Decimal("0.0028"), Decimal("0.14"), Decimal("0.28"))
    assert Decimal(pusd) / Decimal(10**12) == expected
    assert Decimal(format_usd(pusd)) == expected


prices = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False)


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6), prices, prices, prices)
def test_cost_matches_decimal_oracle_at_any_prices(prompt: int, cached_raw: int, completion: int,
                                                   hit: Decimal, miss: Decimal, out: Decimal) -> None:
    cached = min(cached_raw, prompt)
    table = TokenPrices.from_usd_per_million(hit, miss, out)
    assert Decimal(table.cost(prompt, cached, completion)) / Decimal(10**12) == oracle_usd(
        prompt, cached, completion, hit, miss, out)


def test_reasoning_tokens_are_output_tokens() -> None:
    # Reasoning is part of completion_tokens; the cost function has no separate term for it.
    assert REFERENCE.cost(10, 0, 7) == 10 * 140_000 + 7 * 280_000


def test_prices_with_sub_picodollar_precision_are_refused() -> None:
    with pytest.raises(ValueError):
        per_token_pusd(Decimal("0.0000001"))
    with pytest.raises(ValueError):
        per_token_pusd(Decimal("-1"))


def test_usd_round_trip() -> None:
    assert pusd_from_usd("10") == 10 * 10**12
    assert pusd_from_usd(0.5) == 5 * 10**11
    assert format_usd(5_740_000) == "0.00000574"
    assert format_usd(10**12) == "1"
    assert format_usd(0) == "0"
    with pytest.raises(ValueError):
        pusd_from_usd("0.0000000000001")
