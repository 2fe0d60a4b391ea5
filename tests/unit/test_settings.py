"""Settings validation holds under `python -O` (no asserts), and the CLI's help text reads as written."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from flashserve.cli import app
from flashserve.settings import Settings, SettingsError


@pytest.mark.parametrize(("change", "name"), [
    ({"port": 0}, "port"), ({"dtype": "int3"}, "dtype"), ({"weight_quant": "int2"}, "weight_quant"),
    ({"workers": -1}, "workers"), ({"routing_policy": "random"}, "routing_policy"),
    ({"sse_keepalive_s": 0.0}, "sse_keepalive_s"), ({"redis_failure_mode": "maybe"}, "redis_failure_mode"),
    ({"redis_lease_ttl_s": 0.0}, "redis_lease_ttl_s"), ({"redis_timeout_s": -1.0}, "redis_timeout_s"),
])
def test_bad_settings_are_refused_naming_the_setting(change: dict, name: str) -> None:
    with pytest.raises(SettingsError, match=f"setting {name} ="):
        Settings(**change)


def test_validation_survives_python_dash_o() -> None:
    code = ("from flashserve.settings import Settings, SettingsError\n"
            "assert False, 'asserts are on'\n")
    asserts = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True)
    assert asserts.returncode == 0, "python -O should strip asserts: " + asserts.stderr
    code = ("from flashserve.settings import Settings, SettingsError\n"
            "try:\n    Settings(port=70000)\nexcept SettingsError as e:\n    print('refused:', e)\n")
    run = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "refused: setting port = 70000" in run.stdout, run.stdout + run.stderr


def test_serve_help_names_the_server_table() -> None:
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert "TOML settings file ([server] table)" in result.output
