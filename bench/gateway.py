"""The gateway's own cost: flashserve's remote path beside LiteLLM's proxy, in front of one fast fake upstream.

    python bench/gateway.py [--duration 10] [--skip-litellm] [--skip-postgres] [--pg-url URL]

Layout (2 cores): the gateway under test runs alone on core 1 (`taskset -c 1`); the fake upstream
(`bench/fake_openai_upstream.py`) and the load generators share core 0. Each gateway runs in turn,
against the same upstream, in one run:

- flashserve `serve --catalog` with its SQLite ledger (the default), then with a PostgreSQL ledger (a
  throwaway server from `scripts/test-postgres.sh`, or `--pg-url`), then
- LiteLLM's proxy (`litellm[proxy]` 1.110.x in its own virtualenv, bench/.peers/litellm-proxy; not a
  dependency of flashserve): `make bench-gateway-peers` installs it.

Figures per gateway:
- added latency p50 at concurrency 1: the gateway's p50 minus the upstream's own p50 (both from `wrk`,
  non-streaming, one connection);
- requests/s on one core at concurrency 16 (`wrk -c16`), with its p50 and p99;
- CPU per non-streaming request and per 20-chunk stream: utime+stime of the gateway's process tree from
  /proc/<pid>/stat over the run, divided by the requests answered;
- streaming TTFT (time to the first content token) p50 at 16 concurrent clients (an asyncio client on raw
  sockets), and what the gateway adds to the upstream's own;
- the share of the c=16 run the gateway spent runnable but waiting for a CPU (/proc schedstat): another
  process on its core, which on a shared machine is where the tail latency comes from.

It prints a table and writes bench/results/gateway-<timestamp>.{json,md}. Never run by the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
LITELLM_VENV = REPO / "bench" / ".peers" / "litellm-proxy"
GATEWAY_CORE = "1"
LOAD_CORE = "0"
CHUNKS = 20
CLIENT_KEY = "sk-fs-bench-gateway-client"
ADMIN_KEY = "sk-fs-bench-gateway-admin"
LITELLM_KEY = "sk-bench-litellm-master"
UPSTREAM_KEY = "upstream-bench-key"
MODEL = "bench-remote"
TICK = os.sysconf("SC_CLK_TCK")

TARGETS = {
    "added_p50_ms": "≤ 2 ms",
    "rps_c16": "≥ 5× LiteLLM's",
    "cpu_ms_per_stream": "≤ 5 ms",
    "ttft_added_ms": "≤ 0.2× LiteLLM's",
    "p99_over_p50": "≤ 3",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited early; log:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up; log:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- CPU of a process tree ------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds: utime+stime+cutime+cstime) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    # fields[0] is field 3 (state): ppid is field 4, utime..cstime are fields 14..17.
    return int(fields[1]), sum(int(x) for x in fields[11:15]) / TICK


def tree_cpu_s(root: int) -> float:
    """CPU seconds so far of `root` and every live descendant (a dead child's is in its parent's cutime)."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                stats[int(entry)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


# -- load: wrk for requests, an asyncio client for streams ----------------------------------------------
WRK_LUA = """
wrk.method = "POST"
wrk.body = [[%(body)s]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(key)s"
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"non2xx":%%d,"socket_errors":%%d,' ..
    '"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"mean_us":%%f}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
"""


def chat_body(model: str, stream: bool) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 64,
            "stream": stream}


def run_wrk(url: str, model: str, key: str, connections: int, duration_s: int, lua_dir: Path) -> dict[str, Any]:
    script = lua_dir / f"post-{connections}.lua"
    script.write_text(WRK_LUA % {"body": json.dumps(chat_body(model, False)), "key": key})
    threads = 1 if connections == 1 else 2
    cmd = ["taskset", "-c", LOAD_CORE, "wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration_s}s",
           "--timeout", "10s", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRKJSON "))
    result = json.loads(line[len("WRKJSON "):])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


async def _one_stream(host: str, port: int, request: bytes, state: dict[str, Any],
                      reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    """Send one streaming request on a kept-alive connection; returns its TTFT in seconds."""
    start = time.perf_counter()
    writer.write(request)
    buf = b""
    ttft = None
    while True:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("the gateway closed the connection mid-stream")
        buf += data
        if ttft is None and b"tok " in buf:
            ttft = time.perf_counter() - start
        if b"[DONE]" in buf and buf.endswith(b"\r\n0\r\n\r\n"):
            break
    if not buf.startswith(b"HTTP/1.1 200") or buf.count(b"tok ") != CHUNKS or ttft is None:
        state["bad"] += 1
        if state["bad"] == 1:
            print("  unexpected stream answer:", buf[:600], file=sys.stderr)
    return ttft if ttft is not None else time.perf_counter() - start


async def stream_load(url: str, model: str, key: str, clients: int, duration_s: float) -> dict[str, Any]:
    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port
    body = json.dumps(chat_body(model, True)).encode()
    request = (f"POST {parsed.raw_path.decode()} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    ttfts: list[float] = []
    state = {"bad": 0, "streams": 0}
    deadline = time.perf_counter() + duration_s

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < deadline:
                ttfts.append(await _one_stream(host, port, request, state, reader, writer))
                state["streams"] += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    ttfts.sort()
    return {"streams": state["streams"], "bad": state["bad"], "seconds": elapsed,
            "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))]}


STREAM_CLIENT = r"""
import asyncio, json, sys
sys.path.insert(0, %(repo)r)
from bench.gateway import stream_load
print("STREAMJSON " + json.dumps(asyncio.run(stream_load(%(url)r, %(model)r, %(key)r, %(clients)d, %(duration)f))))
"""


def run_streams(url: str, model: str, key: str, clients: int, duration_s: float) -> dict[str, Any]:
    """The streaming client, in its own process pinned beside the upstream."""
    code = STREAM_CLIENT % {"repo": str(REPO), "url": url, "model": model, "key": key, "clients": clients,
                            "duration": duration_s}
    out = subprocess.run(["taskset", "-c", LOAD_CORE, sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    sys.stderr.write(out.stderr)
    line = next(x for x in out.stdout.splitlines() if x.startswith("STREAMJSON "))
    return json.loads(line[len("STREAMJSON "):])


# -- gateways ------------------------------------------------------------------------------------------
@dataclass
class Gateway:
    name: str
    cmd: list[str]
    env: dict[str, str]
    ready_url: str
    chat_url: str
    model: str
    key: str
    log: Path
    process: subprocess.Popen | None = None
    figures: dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(["taskset", "-c", GATEWAY_CORE, *self.cmd], cwd=REPO,
                                            env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        wait_http(self.ready_url, self.process, self.log)


def flashserve_gateway(name: str, work: Path, upstream_url: str, database_url: str | None) -> Gateway:
    port = free_port()
    catalog = work / f"{name}-catalog.toml"
    catalog.write_text(f'''
[models."{MODEL}"]
context_length = 131072

[models."{MODEL}".backend]
type = "remote"
url = "{upstream_url}/v1"
model = "fake"
kind = "vllm"
api_key_env = "BENCH_UPSTREAM_KEY"
''')
    data = work / f"{name}-data"
    data.mkdir()
    env = {"FLASHSERVE_API_KEY": CLIENT_KEY, "FLASHSERVE_ADMIN_KEY": ADMIN_KEY, "BENCH_UPSTREAM_KEY": UPSTREAM_KEY,
           "FLASHSERVE_DEFAULT_BALANCE_USD": "1000000", "PYTHONPATH": str(REPO)}
    if database_url:
        env["FLASHSERVE_DATABASE_URL"] = database_url
    cmd = [str(REPO / ".venv" / "bin" / "python"), "-m", "flashserve", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--data-dir", str(data), "--catalog", str(catalog)]
    base = f"http://127.0.0.1:{port}"
    return Gateway(name, cmd, env, f"{base}/health", f"{base}/v1/chat/completions", MODEL, CLIENT_KEY,
                   work / f"{name}.log")


def litellm_gateway(work: Path, upstream_url: str) -> Gateway:
    port = free_port()
    config = work / "litellm.yaml"
    config.write_text(f"""
model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/fake
      api_base: {upstream_url}/v1
      api_key: {UPSTREAM_KEY}
general_settings:
  master_key: {LITELLM_KEY}
litellm_settings:
  telemetry: false
""")
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False",
           "PYTHONPATH": ""}
    cmd = [str(LITELLM_VENV / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1",
           "--port", str(port), "--num_workers", "1"]
    base = f"http://127.0.0.1:{port}"
    return Gateway("LiteLLM proxy", cmd, env, f"{base}/health/liveliness", f"{base}/v1/chat/completions", MODEL,
                   LITELLM_KEY, work / "litellm.log")


def cpu_wait_s(root: int) -> float:
    """Seconds the threads of `root` have spent runnable but waiting for a CPU (/proc/<pid>/task/*/schedstat,
    its second field): time another process held the gateway's core, which a shared machine's other work
    adds to the latencies (its tail above all)."""
    total = 0
    for stat in Path(f"/proc/{root}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(stat.read_text().split()[1])
    return total / 1e9


def measure(gw: Gateway, duration_s: int, lua_dir: Path) -> dict[str, Any]:
    assert gw.process is not None
    pid = gw.process.pid
    run_wrk(gw.chat_url, gw.model, gw.key, 4, 2, lua_dir)  # warm-up: connections, caches, JIT-free paths
    run_streams(gw.chat_url, gw.model, gw.key, 4, 1.0)
    c1 = run_wrk(gw.chat_url, gw.model, gw.key, 1, max(3, duration_s // 2), lua_dir)
    before, waited = tree_cpu_s(pid), cpu_wait_s(pid)
    c16 = run_wrk(gw.chat_url, gw.model, gw.key, 16, duration_s, lua_dir)
    cpu_requests = tree_cpu_s(pid) - before
    c16["cpu_wait_s"] = cpu_wait_s(pid) - waited
    before = tree_cpu_s(pid)
    streams = run_streams(gw.chat_url, gw.model, gw.key, 16, duration_s)
    cpu_streams = tree_cpu_s(pid) - before
    return {"c1": c1, "c16": c16, "streams16": streams, "cpu_s_requests": cpu_requests, "cpu_s_streams": cpu_streams,
            "cpu_ms_per_request": 1000 * cpu_requests / max(1, c16["requests"]),
            "cpu_ms_per_stream": 1000 * cpu_streams / max(1, streams["streams"])}


def summarize(name: str, m: dict[str, Any], direct: dict[str, Any]) -> dict[str, Any]:
    c1, c16, st = m["c1"], m["c16"], m["streams16"]
    return {
        "gateway": name,
        "p50_c1_ms": c1["p50_us"] / 1000,
        "added_p50_ms": (c1["p50_us"] - direct["c1"]["p50_us"]) / 1000,
        "rps_c16": c16["rps"],
        "p50_c16_ms": c16["p50_us"] / 1000,
        "p99_c16_ms": c16["p99_us"] / 1000,
        "p99_over_p50": c16["p99_us"] / max(1, c16["p50_us"]),
        "cpu_ms_per_request": m["cpu_ms_per_request"],
        "cpu_ms_per_stream": m["cpu_ms_per_stream"],
        "ttft_p50_ms": st["ttft_p50_ms"],
        "ttft_added_ms": st["ttft_p50_ms"] - direct["streams16"]["ttft_p50_ms"],
        "cpu_wait_share_c16": c16.get("cpu_wait_s", 0.0) / max(1e-9, c16["duration_us"] / 1e6),
        "errors": c1["non2xx"] + c1["socket_errors"] + c16["non2xx"] + c16["socket_errors"] + st["bad"],
    }


def verdicts(row: dict[str, Any], litellm: dict[str, Any] | None) -> dict[str, str]:
    out = {"added_p50_ms": "met" if row["added_p50_ms"] <= 2 else "missed",
           "cpu_ms_per_stream": "met" if row["cpu_ms_per_stream"] <= 5 else "missed",
           "p99_over_p50": "met" if row["p99_over_p50"] <= 3 else "missed"}
    if litellm is not None:
        out["rps_c16"] = f"{row['rps_c16'] / litellm['rps_c16']:.2f}× LiteLLM: " + (
            "met" if row["rps_c16"] >= 5 * litellm["rps_c16"] else "missed")
        ratio = row["ttft_added_ms"] / litellm["ttft_added_ms"] if litellm["ttft_added_ms"] > 0 else float("inf")
        out["ttft_added_ms"] = f"{ratio:.2f}× LiteLLM: " + ("met" if ratio <= 0.2 else "missed")
    return out


COLUMNS = [("added latency p50, c=1 (ms)", "added_p50_ms", "{:.2f}"),
           ("requests/s on one core, c=16", "rps_c16", "{:.0f}"),
           ("p50 / p99 at c=16 (ms)", None, ""),
           ("CPU per request (ms)", "cpu_ms_per_request", "{:.2f}"),
           ("CPU per 20-chunk stream (ms)", "cpu_ms_per_stream", "{:.2f}"),
           ("streaming TTFT p50 at 16 clients (ms)", "ttft_p50_ms", "{:.1f}"),
           ("streaming TTFT added at 16 clients (ms)", "ttft_added_ms", "{:.1f}"),
           ("share of c=16 run waiting for a CPU (other processes)", "cpu_wait_share_c16", "{:.0%}"),
           ("errors", "errors", "{}")]


def markdown(rows: list[dict[str, Any]], direct_row: dict[str, Any], command: str, meta: dict[str, Any],
             checks: dict[str, dict[str, str]]) -> str:
    head = "| figure | " + " | ".join(r["gateway"] for r in rows) + " | upstream direct |"
    lines = [f"`{command}`", "", f"{meta['when']} · load before the run: {meta['loadavg']} · {meta['cpu']}", "",
             head, "|---" * (len(rows) + 2) + "|"]
    for title, key, fmt in COLUMNS:
        if key is None:
            cells = [f"{r['p50_c16_ms']:.1f} / {r['p99_c16_ms']:.1f}" for r in rows]
            direct = f"{direct_row['p50_c16_ms']:.2f} / {direct_row['p99_c16_ms']:.2f}"
        else:
            cells = [fmt.format(r[key]) for r in rows]
            direct = {"added_p50_ms": f"(p50 {direct_row['p50_c1_ms']:.2f})", "rps_c16": f"{direct_row['rps_c16']:.0f}",
                      "ttft_p50_ms": f"{direct_row['ttft_p50_ms']:.1f}"}.get(key, "")
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {direct} |")
    if checks:
        lines += ["", "| target | " + " | ".join(checks) + " |", "|---" * (len(checks) + 1) + "|"]
        for key, target in TARGETS.items():
            lines.append(f"| {key} {target} | " + " | ".join(c.get(key, "n/a") for c in checks.values()) + " |")
    return "\n".join(lines) + "\n"


def pin_postgres(pgdata: Path) -> None:
    """Move the PostgreSQL server (and the backends it forks) to the load core, off the gateway's."""
    pidfile = pgdata / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        print(f"  (could not read {pidfile}: PostgreSQL is not pinned)", file=sys.stderr)
        return
    subprocess.run(["taskset", "-a", "-p", "-c", LOAD_CORE, str(pid)], capture_output=True, check=False)


def start_postgres() -> str:
    env = {**os.environ, "FLASHSERVE_TEST_PG_PORT": "54391", "FLASHSERVE_TEST_PGDATA": "/tmp/pg-gateway"}
    out = subprocess.run(["bash", str(REPO / "scripts" / "test-postgres.sh"), "start"], env=env, capture_output=True,
                         text=True, check=True).stdout
    return next(line.split("=", 1)[1] for line in out.splitlines() if "FLASHSERVE_TEST_DATABASE_URL=" in line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds of each load run (c=1 runs half)")
    parser.add_argument("--skip-litellm", action="store_true")
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument("--pg-url", help="PostgreSQL URL for the ledger (default: scripts/test-postgres.sh)")
    parser.add_argument("--pg-data", default="/tmp/pg-gateway",
                        help="that server's data directory, to pin it beside the upstream (default: %(default)s)")
    args = parser.parse_args()
    command = "python bench/gateway.py " + shlex.join(sys.argv[1:])
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        sys.exit("needs wrk and taskset (apt-get install wrk util-linux)")
    if not args.skip_litellm and not (LITELLM_VENV / "bin" / "litellm").exists():
        sys.exit(f"LiteLLM is not installed in {LITELLM_VENV}: run `make bench-gateway-peers` (or --skip-litellm)")
    meta = {"when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
            "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "command": command}
    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    lua_dir = work
    up_port = free_port()
    up_log = work / "upstream.log"
    with open(up_log, "wb") as log:
        upstream = subprocess.Popen(["taskset", "-c", LOAD_CORE, sys.executable,
                                     str(REPO / "bench" / "fake_openai_upstream.py"), str(up_port)],
                                    stdout=log, stderr=subprocess.STDOUT)
    upstream_url = f"http://127.0.0.1:{up_port}"
    gateways: list[Gateway] = []
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", up_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        print(f"upstream {upstream_url}; measuring it directly", flush=True)
        direct_url = f"{upstream_url}/v1/chat/completions"
        run_wrk(direct_url, "fake", UPSTREAM_KEY, 4, 1, lua_dir)
        direct = {"c1": run_wrk(direct_url, "fake", UPSTREAM_KEY, 1, max(3, args.duration // 2), lua_dir),
                  "c16": run_wrk(direct_url, "fake", UPSTREAM_KEY, 16, max(3, args.duration // 2), lua_dir),
                  "streams16": run_streams(direct_url, "fake", UPSTREAM_KEY, 16, args.duration / 2)}
        direct_row = {"p50_c1_ms": direct["c1"]["p50_us"] / 1000, "rps_c16": direct["c16"]["rps"],
                      "p50_c16_ms": direct["c16"]["p50_us"] / 1000, "p99_c16_ms": direct["c16"]["p99_us"] / 1000,
                      "ttft_p50_ms": direct["streams16"]["ttft_p50_ms"]}
        if not args.skip_sqlite:
            gateways.append(flashserve_gateway("flashserve (SQLite)", work, upstream_url, None))
        if not args.skip_postgres:
            gateways.append(flashserve_gateway("flashserve (PostgreSQL)", work, upstream_url,
                                               args.pg_url or start_postgres()))
            pin_postgres(Path(args.pg_data))
        if not args.skip_litellm:
            gateways.append(litellm_gateway(work, upstream_url))
        raw: dict[str, Any] = {"direct": direct}
        rows = []
        for gw in gateways:
            print(f"{gw.name}: starting on core {GATEWAY_CORE}", flush=True)
            gw.start()
            try:
                raw[gw.name] = measure(gw, args.duration, lua_dir)
            finally:
                stop(gw.process)  # type: ignore[arg-type]
            rows.append(summarize(gw.name, raw[gw.name], direct))
            print(f"  {json.dumps(rows[-1])}", flush=True)
    finally:
        for gw in gateways:
            if gw.process is not None:
                stop(gw.process)
        stop(upstream)
    litellm = next((r for r in rows if r["gateway"] == "LiteLLM proxy"), None)
    checks = {r["gateway"]: verdicts(r, litellm) for r in rows if r["gateway"] != "LiteLLM proxy"}
    table = markdown(rows, direct_row, command, meta, checks)
    print()
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"gateway-{stamp}.json").write_text(json.dumps(
        {"meta": meta, "rows": rows, "direct": direct_row, "targets": checks, "raw": raw}, indent=2) + "\n")
    (RESULTS / f"gateway-{stamp}.md").write_text(table)
    print(f"wrote bench/results/gateway-{stamp}.{{json,md}} (gateway logs in {work})")


if __name__ == "__main__":
    main()
