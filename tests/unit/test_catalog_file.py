"""Per-model prices from the catalog file, and its errors naming the file, line and key."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from flashserve.catalog import CatalogError, load_catalog_file


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
