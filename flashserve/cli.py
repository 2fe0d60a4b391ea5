"""The `flashserve` command line: `serve` loads a model and starts the HTTP API.

Start-up shows progress while the weights load and ends with a banner that
names the base URL, the API key and every served model with its weights.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flashserve.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="flashserve: the DeepSeek-V4-Flash API.")
console = Console(stderr=True)


@app.callback()
def main() -> None:
    """flashserve command line."""


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(help="GGUF file or Hugging Face safetensors folder.")] = None,
    host: Annotated[str | None, typer.Option(help="Interface to bind.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where the server keeps its state.")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML settings file (\\[server] table).")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16.")] = None,
    weight_dtype: Annotated[str | None, typer.Option(help="Dense matmul weights: bfloat16 or float32.")] = None,
    weight_quant: Annotated[str | None, typer.Option(help="Decode weights: int4, int8 or none.")] = None,
    kv_cache_tokens: Annotated[int | None, typer.Option(help="Tokens of KV cache to preallocate.")] = None,
    catalog: Annotated[Path | None, typer.Option(help="TOML catalog file (models, prices, backends).")] = None,
    workers: Annotated[int | None, typer.Option(help="Engine worker processes behind one router.")] = None,
) -> None:
    """Load the model and serve the chat completions API."""
    import uvicorn

    settings = Settings.load(config, model=model, host=host, port=port, data_dir=data_dir, dtype=dtype,
                             weight_dtype=weight_dtype, weight_quant=weight_quant,
                             kv_cache_tokens=kv_cache_tokens, catalog=catalog, workers=workers)
    from flashserve.request_scope import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    from flashserve.server import build_server

    with Progress(TextColumn("[bold]loading weights"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("", total=None)

        def on_tensor(done: int, total: int, name: str) -> None:
            progress.update(task, completed=done, total=total, description=name)

        server = build_server(settings, on_tensor)
    _banner(settings, server)
    sys.stdout.flush()
    # log_config=None: uvicorn's loggers go through the root handler, in the chosen format with request ids.
    config = uvicorn.Config(server.app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=30, log_config=None)
    _DrainingServer(config, settings.shutdown_drain_s).run()


@app.command("make-tiny-v4")
def make_tiny_v4(
    folder: Annotated[Path, typer.Argument(help="Folder to write the checkpoint into (created if needed).")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    max_position_embeddings: Annotated[int | None, typer.Option(
        min=1, help="Context length in the config (default 4096); an agent CLI's ~12k-token prompt needs "
                    "16384 or more.")] = None,
) -> None:
    """Write a small random DeepSeek-V4 checkpoint in the official format (serve it with --model FOLDER)."""
    from flashserve.models.tiny_v4 import make_tiny_v4 as write

    path = write(folder, seed, max_position_embeddings)
    console.print(f"wrote a tiny DeepSeek-V4 checkpoint to [bold]{path}[/bold]; "
                  f"serve it with: flashserve serve --model {path}")


@app.command("chat")
def chat(
    model: Annotated[str | None, typer.Option(help="Model id (default deepseek/deepseek-v4-flash).")] = None,
    base_url: Annotated[str | None, typer.Option(
        help="The API's base URL (default $FLASHSERVE_BASE_URL, else http://127.0.0.1:8000/v1).")] = None,
    api_key: Annotated[str | None, typer.Option(help="API key (default $FLASHSERVE_API_KEY).")] = None,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="Longest answer, in tokens (default: the "
                                                               "server's).")] = None,
) -> None:
    """Chat in the terminal with a running server: streamed answers, /help for the commands."""
    from flashserve.terminal_chat import run

    raise typer.Exit(run(base_url, api_key, model, max_tokens))


class _DrainingServer:
    """uvicorn's server with a graceful first SIGTERM/SIGINT: the app drains (api/app.py: `drain`: new
    requests get 503, those in flight get `drain_s` to finish, then are aborted with their usage recorded)
    before uvicorn's own shutdown, and the process then exits 0 instead of re-raising the signal. A second
    signal stops at once."""

    def __init__(self, config: object, drain_s: float) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(inner, sig: int, frame: object) -> None:  # noqa: N805 - `self` is the outer object
                if self.draining or not inner.started:  # a second signal, or one during start-up: stop now
                    inner.force_exit = self.draining
                    inner.should_exit = True
                    return
                self.draining = True  # not recorded as a captured signal: uvicorn would re-raise it at exit
                self.loop.call_soon_threadsafe(self._start_drain, inner)

        self.draining = False
        self.drain_s = drain_s
        self.server = Server(config)  # type: ignore[arg-type]
        self.loop: asyncio.AbstractEventLoop

    def _start_drain(self, server: object) -> None:
        from flashserve.api.app import drain

        async def run() -> None:
            try:
                await drain(server.config.app, self.drain_s)  # type: ignore[attr-defined]
            finally:
                server.should_exit = True  # type: ignore[attr-defined]

        self.task = self.loop.create_task(run())

    def run(self) -> None:
        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve()

        # Everything built so far (the model, torch, the app) lives as long as the process: frozen out of the
        # garbage collector's sweeps, whose full passes over it paused every request in flight for tens of
        # milliseconds (the gateway's p99, README "Gateway overhead").
        gc.collect()
        gc.freeze()
        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            runner.run(serve())


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (a pinned dependency): its C transports and scheduler cost a
    forwarded request or streamed chunk a fraction of the pure-Python loop's CPU (README "Gateway
    overhead"). None: asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _banner(settings: Settings, server: object) -> None:
    base = f"http://{settings.host}:{settings.port}/v1"
    table = Table(title="flashserve is ready", show_header=True, title_justify="left", width=100)
    table.add_column("model")
    table.add_column("weights")
    for card in server.catalog.cards():  # type: ignore[attr-defined]
        table.add_row(card.id, card.weights)
    out = Console(soft_wrap=True)
    out.print(table)
    out.print(f"base URL: [bold]{base}[/bold]")
    out.print(f"console:  [bold]http://{settings.host}:{settings.port}/console/[/bold] (sign in with a key below)")
    source = "from FLASHSERVE_API_KEY" if os.environ.get("FLASHSERVE_API_KEY") else "generated for this run"
    key = server.api_key  # type: ignore[attr-defined]
    out.print(f"API key:  [bold]{key}[/bold] ({source}; default account)")
    admin_source = "from FLASHSERVE_ADMIN_KEY" if os.environ.get("FLASHSERVE_ADMIN_KEY") else "generated for this run"
    out.print(f"admin key: [bold]{server.admin_key}[/bold] ({admin_source}; for /admin/*)")  # type: ignore[attr-defined]
    if settings.redis_url:
        from flashserve.accounts.redis_limits import redacted

        limits = (f"shared in Redis at {redacted(settings.redis_url)} "
                  f"(redis_failure_mode = {settings.redis_failure_mode})")
    else:
        limits = "this process's own (set FLASHSERVE_REDIS_URL to share them across gateways)"
    out.print(f"limits:   {limits}")
    out.print(f"try:      curl {base}/chat/completions -H 'Authorization: Bearer {key}' "
              "-H 'Content-Type: application/json' "
              "-d '{\"model\": \"deepseek/deepseek-v4-flash\", \"messages\": [{\"role\": \"user\", "
              "\"content\": \"Hello!\"}]}'", markup=False, highlight=False)

from flashserve.accounts import cli as accounts_cli  # noqa: E402 - registered after `app` exists

app.add_typer(accounts_cli.accounts_app, name="accounts")
app.add_typer(accounts_cli.keys_app, name="keys")
app.command("usage")(accounts_cli.usage)

if __name__ == "__main__":
    app()
