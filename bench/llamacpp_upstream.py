"""The remote path against the real llama.cpp server: flashserve `--catalog` in front of llama-cpp-python's
OpenAI server (the benchmark peer's build, `bench/compare.py: ensure_peer("llamacpp")`, reused, never rebuilt),
both serving the embedded SmolLM2 GGUF.

Each case is sent to flashserve with the official `openai` client and checked; the upstream's own answer to
the same request (sent straight to it) is recorded beside it, so what the upstream cannot do is measured, not
assumed:
- text: a plain answer, its usage exact (llama.cpp's whole answer carries usage);
- stream: streaming with `include_usage`, a client request id echoed and sent upstream as a UUID;
- tools: a named `tool_choice` and `auto`;
- json: JSON mode (`json_object`) and a `json_schema` (sent to llama.cpp as its `json_object` + `schema`);
- limits: `n: 2` (refused by flashserve: llama.cpp ignores `n`), a reasoning effort (llama.cpp has no switch).

    .venv/bin/python bench/llamacpp_upstream.py [--out bench/results/llamacpp-upstream-DATE.json]

Run by `make bench-llamacpp-upstream` (never by .ci/run: it needs the peer build, minutes of compiling).
Exit status 1 when a case flashserve must pass fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import NO_EXTRA_BUFTS, WORKER, ensure_peer, llamacpp_probe, venv_python  # noqa: E402
from serve_bench import API_KEY, REPO, RESULTS, ServerProcess, free_port  # noqa: E402

from flashserve.models.loading import embedded_model_path  # noqa: E402

MODEL = "llama-upstream"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}, "required": ["city"]}}}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def start_llamacpp(gguf: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    launcher = [str(WORKER), "llamacpp-server"] if NO_EXTRA_BUFTS in os.environ else ["-m", "llama_cpp.server"]
    cmd = [str(venv_python("llamacpp")), *launcher, "--model", str(gguf), "--model_alias", "smollm2",
           "--n_ctx", "4096", "--host", "127.0.0.1", "--port", str(port)]
    log = Path(tempfile.mkdtemp(prefix="llamacpp-upstream-")) / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"llama.cpp server did not start:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.25)


def catalog(folder: Path, upstream: str) -> Path:
    path = folder / "catalog.toml"
    path.write_text(f'[models."{MODEL}".backend]\ntype = "remote"\nurl = "{upstream}/v1"\nmodel = "smollm2"\n'
                    'kind = "llamacpp"\nretries = 0\ntimeout_s = 300\n')
    return path


def run_case(name: str, must_pass: bool, fn: Any) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        detail = fn()
        ok = True
    except Exception as exc:  # noqa: BLE001 - every case is reported, pass or fail
        detail, ok = f"{type(exc).__name__}: {exc}", False
    row = {"case": name, "ok": ok, "must_pass": must_pass, "seconds": round(time.monotonic() - t0, 2),
           "detail": detail}
    print(f"  {'PASS' if ok else 'FAIL'} {name} ({row['seconds']}s): {str(detail)[:160]}", flush=True)
    return row


def cases(client: openai.OpenAI, base: str, upstream: str) -> list[dict[str, Any]]:
    msgs = [{"role": "user", "content": "Say hello in five words."}]

    def text() -> dict[str, Any]:
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0)
        assert r.choices[0].message.content, "empty answer"
        assert r.usage and r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0, r.usage
        return {"content": r.choices[0].message.content, "usage": r.usage.model_dump()}

    def stream() -> dict[str, Any]:
        trace = "bench-trace-" + uuid.uuid4().hex[:8]
        t0 = time.monotonic()  # before the request: llama.cpp's whole answer comes before the first byte
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=msgs, max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_headers={"x-request-id": trace})
        assert raw.headers.get("x-request-id") == trace, raw.headers.get("x-request-id")
        pieces, usage, first = [], None, None
        for chunk in raw.parse():
            for choice in chunk.choices:
                if choice.delta.content:
                    first = first or time.monotonic() - t0
                    pieces.append(choice.delta.content)
            usage = chunk.usage or usage
        assert pieces and usage is not None and usage.completion_tokens > 0, (pieces, usage)
        return {"content_chunks": len(pieces), "ttft_s": round(first or 0, 3), "usage": usage.model_dump()}

    def tools_named() -> dict[str, Any]:
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=64, temperature=0)
        calls = r.choices[0].message.tool_calls
        assert calls and calls[0].function.name == "get_weather", r.choices[0].message
        return {"arguments": calls[0].function.arguments, "finish_reason": r.choices[0].finish_reason}

    def tools_auto() -> dict[str, Any]:
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER],
            max_tokens=64, temperature=0)
        message = r.choices[0].message
        return {"tool_calls": [c.model_dump() for c in message.tool_calls or []], "content": message.content,
                "finish_reason": r.choices[0].finish_reason}

    def json_object() -> dict[str, Any]:
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Give a JSON object with a name and an age."}],
            response_format={"type": "json_object"}, max_tokens=64, temperature=0)
        return {"parsed": json.loads(r.choices[0].message.content or "")}

    def json_schema() -> dict[str, Any]:
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=64,
            temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}})
        parsed = json.loads(r.choices[0].message.content or "")
        assert set(SCHEMA["required"]) <= set(parsed), parsed
        return {"parsed": parsed}

    def n_two() -> dict[str, Any]:
        r = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300,
                       json={"model": MODEL, "messages": msgs, "n": 2, "max_tokens": 8})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        direct = httpx.post(f"{upstream}/v1/chat/completions", timeout=300,
                            json={"messages": msgs, "n": 2, "max_tokens": 8}).json()
        return {"flashserve": r.json()["error"]["message"], "upstream_choices_for_n_2": len(direct["choices"])}

    def uuid_rule() -> dict[str, Any]:
        direct = httpx.post(f"{upstream}/v1/chat/completions", headers={"x-request-id": "chatcmpl-abc"}, timeout=300,
                            json={"messages": msgs, "max_tokens": 4})
        return {"upstream_status_for_non_uuid_id": direct.status_code, "upstream_body": direct.text[:200]}

    def stream_usage_upstream() -> dict[str, Any]:
        with httpx.stream("POST", f"{upstream}/v1/chat/completions", timeout=300,
                          json={"messages": msgs, "max_tokens": 8, "stream": True,
                                "stream_options": {"include_usage": True}}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
        usage = [json.loads(line[5:]).get("usage") for line in lines]
        return {"upstream_stream_chunks": len(lines), "upstream_stream_has_usage": any(usage)}

    return [run_case("text", True, text), run_case("stream with usage", True, stream),
            run_case("tools (named tool_choice)", True, tools_named), run_case("tools (auto)", False, tools_auto),
            run_case("json_object", True, json_object), run_case("json_schema", True, json_schema),
            run_case("n=2 refused", True, n_two), run_case("upstream: UUID request ids only", False, uuid_rule),
            run_case("upstream: usage in a stream", False, stream_usage_upstream)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H%M%SZ")
    parser.add_argument("--out", type=Path, default=RESULTS / f"llamacpp-upstream-{stamp}.json")
    args = parser.parse_args(argv)
    peer = ensure_peer("llamacpp")
    if not peer["ok"]:
        print(f"llama.cpp peer unavailable: {peer['message']}", file=sys.stderr)
        return 2
    gguf = embedded_model_path()
    note = llamacpp_probe(gguf)
    proc, upstream, log = start_llamacpp(gguf)
    server = ServerProcess(0, None)
    server.cmd += ["--catalog", str(catalog(server.workdir, upstream))]
    try:
        server.__enter__()
        print(f"llama.cpp server at {upstream}, flashserve at {server.base_url}", flush=True)
        with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=300) as client:
            rows = cases(client, server.base_url, upstream)
    finally:
        server.__exit__()
        proc.terminate()
        proc.wait(timeout=30)
    report = {"when": stamp, "llama_cpp_python": peer["versions"], "probe_note": note, "cases": rows,
              "repo": str(REPO)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["ok"] for r in rows if r["must_pass"]) else 1


if __name__ == "__main__":
    sys.exit(main())
