"""Runs Claude Code and Codex once each against `capture_server.py` and saves what they sent.

This is how `tests/fixtures/agents/*_first_request.json` were made; run it
again after bumping a CLI in `package.json` and compare. Both CLIs run with
a throwaway HOME / CODEX_HOME, a dummy key and the settings that keep them
offline (`offline_env` below, documented in tests/fixtures/agents/README.md);
every proxy variable points at a second capture server, so any attempt to
reach another host shows up as a refused CONNECT in the summary.

    npm ci --prefix tests/agents
    python tests/agents/capture_clis.py [--fixtures tests/fixtures/agents] [--status 500]
    python tests/agents/capture_clis.py --fixtures tests/fixtures/agents --tool-call
    python tests/agents/capture_clis.py --only claude --status 400 \
        --error-message "prompt is too long: 250000 tokens > 200000 maximum"

`--status CODE` makes the capture server answer every POST with that error,
to see how each CLI reacts (retries, exit code, message); fixtures are only
written when the CLIs got the normal "ok" replies.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BIN = HERE / "node_modules" / ".bin"
# Identifiers that name this machine or run; not secrets, but nothing a fixture needs to keep.
_SCRUB = re.compile(r'("?(?:device_id|installation_id|x-codex-installation-id)\\?"?\s*[:=]\s*\\?")([^"\\]+)')

CODEX_CONFIG = """\
model = "deepseek-v4-flash"
model_provider = "flashserve"
check_for_update_on_startup = false

[analytics]
enabled = false

[features]
# Plugin sync reaches github.com, api.github.com and chatgpt.com at start-up.
plugins = false

[model_providers.flashserve]
name = "flashserve"
base_url = "{base_url}/v1"
env_key = "FLASHSERVE_API_KEY"
wire_api = "responses"
"""


def offline_env(home: Path, proxy: str) -> dict[str, str]:
    """What both CLIs run with: nothing of the caller's environment but PATH."""
    return {
        "PATH": os.environ["PATH"], "HOME": str(home), "TERM": "dumb", "LANG": "C.UTF-8",
        "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "ALL_PROXY": proxy,
        "https_proxy": proxy, "http_proxy": proxy, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    }


def claude_env(base: dict[str, str], base_url: str) -> dict[str, str]:
    return dict(base, ANTHROPIC_BASE_URL=base_url, ANTHROPIC_API_KEY="sk-ant-local-test-key",
                CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_TELEMETRY="1", DISABLE_AUTOUPDATER="1",
                DISABLE_ERROR_REPORTING="1", CLAUDE_CONFIG_DIR=str(Path(base["HOME"]) / ".claude"))


def codex_env(base: dict[str, str], codex_home: Path) -> dict[str, str]:
    return dict(base, CODEX_HOME=str(codex_home), FLASHSERVE_API_KEY="fs-local-test-key")


class Capture:
    def __init__(self, out: Path, status: int | None = None, error_args: list[str] | None = None,
                 tool_call: bool = False) -> None:
        command = [sys.executable, str(HERE / "capture_server.py"), "--port", "0", "--out", str(out)]
        if tool_call:
            command.append("--tool-call")
        if status is not None:
            command += ["--status", str(status), *(error_args or [])]
        self.out = out
        self.log = out.with_suffix(".log")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log.open("w"), text=True)
        line = self.process.stdout.readline() if self.process.stdout else ""
        if not line.startswith("listening on "):
            raise RuntimeError(f"capture server did not start: {line!r}")
        self.url = line.split()[-1]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)

    def requests(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.out.glob("*.json"))]

    def refused_hosts(self) -> list[str]:
        return re.findall(r"CONNECT (\S+) HTTP", self.log.read_text(errors="replace"))


def run(command: list[str], env: dict[str, str], cwd: Path, timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    try:
        done = subprocess.run(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)
        rc, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = "timeout", exc.stdout or "", exc.stderr or ""
        out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x for x in (out, err))
    return {"command": command, "exit": rc, "seconds": round(time.monotonic() - started, 1),
            "stdout": out[-4000:], "stderr": err[-4000:]}


def scrub(entry: dict[str, Any]) -> dict[str, Any]:
    text = _SCRUB.sub(lambda m: m.group(1) + "<scrubbed>", json.dumps(entry, ensure_ascii=False))
    entry = json.loads(text)
    entry.pop("time", None)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", type=Path, default=None, help="write the first requests here")
    parser.add_argument("--status", type=int, default=None, help="answer every POST with this error")
    parser.add_argument("--error-message", default=None, help="the message of those errors")
    parser.add_argument("--error-code", default=None, help="the OpenAI-shaped `code` of those errors")
    parser.add_argument("--tool-call", action="store_true",
                        help="first answer with reasoning + a call running `echo ok`; the fixture is then the "
                             "request that carries the tool's result (*_tool_turn_request.json)")
    parser.add_argument("--only", choices=("claude", "codex"), default=None, help="run one CLI")
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="agents-capture-"))
    proxy = Capture(work / "proxy")
    summary: dict[str, Any] = {}
    try:
        error_args = [*(["--error-message", args.error_message] if args.error_message else []),
                      *(["--error-code", args.error_code] if args.error_code else [])]
        for name in [args.only] if args.only else ["claude", "codex"]:
            capture = Capture(work / name, args.status, error_args, args.tool_call)
            home, cwd = work / f"{name}-home", work / f"{name}-cwd"
            home.mkdir()
            cwd.mkdir()
            base = offline_env(home, proxy.url)
            if name == "claude":
                allow = ["--allowedTools", "Bash(echo ok)"] if args.tool_call else []
                result = run([str(BIN / "claude"), "-p", "say ok", *allow], claude_env(base, capture.url), cwd,
                             args.timeout)
            else:
                codex_home = home / ".codex"
                codex_home.mkdir()
                (codex_home / "config.toml").write_text(CODEX_CONFIG.format(base_url=capture.url))
                result = run([str(BIN / "codex"), "exec", "--skip-git-repo-check", "say ok"],
                             codex_env(base, codex_home), cwd, args.timeout)
            capture.stop()
            requests = capture.requests()
            result["requests"] = [f"{r['method']} {r['path']}{'?' + r['raw_query'] if r['raw_query'] else ''}"
                                  for r in requests]
            summary[name] = result
            kept = requests[1:2] if args.tool_call else requests[:1]
            if args.fixtures and args.status is None and kept:
                args.fixtures.mkdir(parents=True, exist_ok=True)
                stem = "claude_code" if name == "claude" else "codex"
                target = args.fixtures / f"{stem}_{'tool_turn' if args.tool_call else 'first'}_request.json"
                target.write_text(json.dumps(scrub(kept[0]), indent=2, ensure_ascii=False) + "\n")
    finally:
        proxy.stop()
    summary["refused_connects"] = proxy.refused_hosts()
    summary["work_dir"] = str(work)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
