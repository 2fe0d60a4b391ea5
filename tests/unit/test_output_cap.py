"""The output cap: `max_output_tokens_cap` (a server setting, and a catalog key per model) clamps a
request's max_tokens and fills it in when absent; it never refuses. Agent CLIs send max_tokens of 64000 to
128000, which a small or random model would spend in full. (End to end: tests/e2e/test_raw_v4_upstream.py
checks what the upstream receives.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from flashserve.catalog import CatalogEntry, CatalogError, ModelCard, load_catalog_file, make_card
from flashserve.chat.reasoning import ReasoningSpec
from flashserve.settings import Settings, SettingsError


def card(cap: int | None, entry: CatalogEntry | None = None) -> ModelCard:
    return make_card("m", context_length=4096, reasoning=ReasoningSpec(), weights="w", description="d", created=0,
                     entry=entry, max_output_tokens=cap)


@pytest.mark.parametrize(("cap", "asked", "got"), [(None, None, None), (None, 128000, 128000), (512, 128000, 512),
                                                   (512, 100, 100), (512, None, 512)])
def test_the_cap_clamps_and_fills_in(cap: int | None, asked: int | None, got: int | None) -> None:
    assert card(cap).clamp_max_tokens(asked) == got


def test_a_catalog_entry_overrides_the_server_cap(tmp_path: Path) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text('[models."m"]\nmax_output_tokens_cap = 64\n')
    entry = load_catalog_file(path)["m"]
    assert entry.max_output_tokens_cap == 64
    assert card(4096, entry).max_output_tokens == 64
    assert card(4096, CatalogEntry("m")).max_output_tokens == 4096
    path.write_text('[models."m"]\nmax_output_tokens_cap = 0\n')
    with pytest.raises(CatalogError, match="max_output_tokens_cap must be a positive integer"):
        load_catalog_file(path)


def test_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().max_output_tokens_cap is None
    monkeypatch.setenv("FLASHSERVE_MAX_OUTPUT_TOKENS_CAP", "2048")
    assert Settings.load().max_output_tokens_cap == 2048
    with pytest.raises(SettingsError, match="max_output_tokens_cap"):
        Settings(max_output_tokens_cap=0)
