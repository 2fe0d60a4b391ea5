"""A second server: no FLASHSERVE_API_KEY (so it generates and prints one) and a 256-token context,
which makes the context-limit behaviour cheap to reach. The context-limit tests moved in-process
(tests/api/test_context.py); the banner's generated keys stay here."""

from __future__ import annotations

import re
from collections.abc import Iterator

import openai
import pytest

from tests.e2e.conftest import _stop, _wait_ready, start_server

CONTEXT = 256
MODEL = "deepseek/deepseek-v4-flash"


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    process, base, log = start_server(tmp_path_factory, {"FLASHSERVE_MAX_CONTEXT_TOKENS": str(CONTEXT)},
                                      unset=("FLASHSERVE_API_KEY",))
    try:
        _wait_ready(base, process, log)
        banner = log.read_text(errors="replace")
        match = re.search(r"API key:\s+(\S+)\s+\(generated for this run", banner)
        assert match, f"the banner names no generated key:\n{banner}"
        assert f"{base}/v1" in banner, "the banner names the base URL"
        assert re.search(r"admin key:\s+sk-fs-\S+\s+\(generated for this run", banner), "an admin key is printed"
        assert "deepseek/deepseek-v4-flash" in banner and "SmolLM2-135M-Instruct" in banner
        yield base, match.group(1)
    finally:
        _stop(process, log)


@pytest.fixture(scope="module")
def small_client(small: tuple[str, str]) -> Iterator[openai.OpenAI]:
    base, key = small
    c = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120.0)
    yield c
    c.close()


def test_generated_key_works_and_others_do_not(small: tuple[str, str], small_client: openai.OpenAI) -> None:
    base, key = small
    assert len(key) >= 32
    assert small_client.models.retrieve(MODEL).id == MODEL
    wrong = openai.OpenAI(base_url=f"{base}/v1", api_key=key + "x", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
