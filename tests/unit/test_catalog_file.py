"""Per-model prices from the catalog file, its aliases (beside DeepSeek's built-in names), and its errors
naming the file, line and key."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from flashserve.catalog import REFERENCE_MODEL_ID, Alias, Catalog, CatalogError, load_catalog_file, make_card
from flashserve.chat.reasoning import ReasoningSpec


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "catalog.toml"
    path.write_text(text)
    return path


def test_prices_are_read_exactly(tmp_path: Path) -> None:
    path = write(tmp_path, '''
[models."deepseek/deepseek-v4-flash".prices]
input_cache_hit = "0.0028"
input_cache_miss = "0.14"
output = "0.28"

[models."smollm2-135m-instruct".prices]
input_cache_hit = "0"
input_cache_miss = "1"
output = 2
''')
    models = load_catalog_file(path)
    flash = models["deepseek/deepseek-v4-flash"].prices
    assert flash is not None
    assert (flash.input_cache_hit, flash.input_cache_miss, flash.output) == (
        Decimal("0.0028"), Decimal("0.14"), Decimal("0.28"))
    small = models["smollm2-135m-instruct"].prices
    assert small is not None and small.output == Decimal(2)


@pytest.mark.parametrize(("text", "line", "fragment"), [
    ('[models."m".prices]\ninput_cache_hit = "0.1"\ninput_cache_miss = "0.1"\noutput = 0.28\n', 4, "output"),
    ('[models."m".prices]\ninput_cache_hit = "x"\ninput_cache_miss = "0.1"\noutput = "1"\n', 2, "input_cache_hit"),
    ('[models."m".prices]\ninput_cache_hit = "0.1"\noutput = "1"\n', 1, "missing input_cache_miss"),
    ('[models."m"]\ncolour = "red"\n', 2, "colour"),
    ('[models."m".prices]\ninput_cache_hit = "0.00000001"\ninput_cache_miss = "1"\noutput = "1"\n', 2,
     "picodollars"),
    ("[server\n", 1, "catalog.toml"),
])
def test_errors_name_line_and_key(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(CatalogError) as err:
        load_catalog_file(path)
    message = str(err.value)
    assert str(path) in message and fragment in message
    if "[server" not in text:
        assert f"{path}:{line}:" in message


def test_aliases_are_entries_of_the_file_beside_the_built_in_ones(tmp_path: Path) -> None:
    path = write(tmp_path, '''
[models."fast-chat"]
alias_of = "deepseek/deepseek-v4-flash"
thinking = false

[models."deepseek-chat"]
alias_of = "deepseek/deepseek-v4-flash"
thinking = true
''')
    entries = load_catalog_file(path)
    assert entries["fast-chat"].alias_of == REFERENCE_MODEL_ID and entries["fast-chat"].thinking is False
    catalog: Catalog[str] = Catalog()
    catalog.add(make_card(REFERENCE_MODEL_ID, context_length=8, reasoning=ReasoningSpec(), weights="w",
                          description="d", created=0), "backend")
    catalog.add_aliases(entries)
    assert catalog.resolve("fast-chat") == catalog.resolve(REFERENCE_MODEL_ID)  # the target's card: billed as it
    assert {a.id: a.thinking for a in catalog.aliases.values()} == {
        "deepseek-v4-flash": None, "deepseek-chat": True, "deepseek-reasoner": True, "fast-chat": False}
    listed = {m["id"]: m for m in catalog.models()}
    assert listed["fast-chat"]["alias_of"] == REFERENCE_MODEL_ID and "alias_of" not in listed[REFERENCE_MODEL_ID]
    with pytest.raises(ValueError, match="listed twice"):
        catalog.add_alias(Alias(REFERENCE_MODEL_ID, REFERENCE_MODEL_ID))
    with pytest.raises(ValueError, match="not a served model"):
        catalog.add_alias(Alias("x", "nope"))


def test_no_built_in_aliases_without_the_reference_model() -> None:
    catalog: Catalog[str] = Catalog()
    catalog.add(make_card("other", context_length=8, reasoning=ReasoningSpec(), weights="w", description="d",
                          created=0), "backend")
    catalog.add_aliases({})
    assert catalog.aliases == {}


@pytest.mark.parametrize(("text", "fragment"), [
    ('[models."a"]\nalias_of = "m"\ncontext_length = 5\n', "belongs to the model"),
    ('[models."a"]\nthinking = true\n', "needs alias_of"),
    ('[models."a"]\nalias_of = 3\n', "must be a model id"),
    ('[models."a"]\nalias_of = "m"\nthinking = "yes"\n', "true or false"),
])
def test_alias_errors(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(CatalogError, match=fragment):
        load_catalog_file(write(tmp_path, text))
