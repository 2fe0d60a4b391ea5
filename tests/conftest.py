"""Shared test fixtures: the embedded SmolLM2 checkpoint, loaded once per test session, and the native
CPU operators (`ops`).

Tests never touch the network: transformers and huggingface_hub are told to stay offline before
anything imports them, so a reference tokenizer or model can only come from local files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from flashserve.kernels import CpuOps
    from flashserve.models.loading import Checkpoint

# tests/multi (several gateway processes sharing a database, minutes) runs from `make test-multi`, which sets
# FLASHSERVE_TEST_MULTI=1; the default `pytest` run (`make test`) leaves it out.
if not os.environ.get("FLASHSERVE_TEST_MULTI"):
    collect_ignore = ["multi"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite's processes (pytest and the servers it starts, which inherit this environment) share the machine's
# cores. OpenMP's default lets an idle worker thread spin, so a torch op split over 2 threads waits on a core
# another process holds: on 2 busy cores 100 tiny-V4 decode steps took 10-17 s spinning, 1.6 s with PASSIVE
# waits (and the whole suite half its wall time). Set before anything imports torch; it changes no result.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    from flashserve.models.loading import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def smollm(smollm_path: Path) -> Checkpoint:
    """The embedded SmolLM2-135M-Instruct, dequantized to float32 (shared: treat as read-only)."""
    import torch

    from flashserve.models.loading import load_checkpoint

    return load_checkpoint(smollm_path, dtype=torch.float32)


# -- databases -------------------------------------------------------------------------------------------
POSTGRES_ENV = "FLASHSERVE_TEST_DATABASE_URL"


def postgres_url() -> str:
    """The PostgreSQL URL the ledger tests run against. `.ci/run` starts a server and sets it; in CI a
    missing URL is a failure, never a skip. Locally, without one, the PostgreSQL variants skip."""
    url = os.environ.get(POSTGRES_ENV)
    if url:
        return url
    if os.environ.get("CI"):
        pytest.fail(f"{POSTGRES_ENV} is not set: .ci/run must start PostgreSQL for the ledger tests", pytrace=False)
    pytest.skip(f"{POSTGRES_ENV} not set (`.ci/run` sets it); PostgreSQL variant not run locally")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL for each backend the accounts layer supports."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'flashserve.db'}"
    return postgres_url()


@pytest.fixture(scope="session")
def ops() -> CpuOps:
    """The compiled operators. Only an explicit opt-out skips: with a compiler (CI has one) a failed build
    is a failure."""
    from flashserve.kernels import cpu_ops

    native = cpu_ops()
    if native is None:
        if os.environ.get("FLASHSERVE_NATIVE_KERNELS") == "0":
            pytest.skip("FLASHSERVE_NATIVE_KERNELS=0: the native CPU operators are switched off")
        pytest.fail("the native CPU operators did not build (see the flashserve.kernels warning)")
    return native


# -- tier times ------------------------------------------------------------------------------------------
_TIER_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Adds each test's setup, call and teardown time to its tier (tests/unit, tests/api, tests/e2e, ...)."""
    parts = report.nodeid.split("/")
    tier = "/".join(parts[:2]) if len(parts) > 2 and parts[0] == "tests" else "other"
    _TIER_SECONDS[tier] = _TIER_SECONDS.get(tier, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """`make test` reports each tier's time (the sum of its tests' phases; a session fixture such as the
    e2e server counts in the tier of the first test that used it)."""
    if _TIER_SECONDS:
        terminalreporter.section("tier times")
        for tier, seconds in sorted(_TIER_SECONDS.items()):
            terminalreporter.write_line(f"{tier:<14} {seconds:8.1f} s")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A real Redis for the shared-limits tests (`tests/redis_server.py`); tests use their own key prefix."""
    from tests.redis_server import redis_url as url

    return url()


BROWSER_TIER = Path(__file__).parent / "browser"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """`tests/browser` (the console in Chromium, `make test-browser`) runs only when named on the command line,
    not in the default `pytest -q` of `make test`."""
    named = [Path(str(arg).split("::")[0]).resolve() for arg in config.args]
    if any(p == BROWSER_TIER or BROWSER_TIER in p.parents for p in named):
        return None
    return True if collection_path.resolve() == BROWSER_TIER else None
