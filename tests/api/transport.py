"""An httpx transport that runs an ASGI app in-process and *streams* its response.

httpx's own `ASGITransport` runs the app to completion and hands back the whole body at once, so a test
could never read the first chunk of a stream while the rest is still being generated, nor leave in the
middle. This one (about the same size) returns as soon as the app sends its response headers; the body
arrives chunk by chunk as the app sends it; and closing the response early (`async with
client.stream(...)` left after a few lines, or a request task cancelled while waiting) is the client's
disconnect: the app's next `receive()` answers `http.disconnect`, as a real server's would.

`idle()` waits until every app call this transport started has returned, so a test can check the ledger
right after a disconnect without sleeping. The same transport serves fake upstreams to
`backends/remote.py: RemoteBackend` (its `client` parameter), with the client's read timeout enforced as over a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.types import ASGIApp

_END = object()
_CLOSED = object()  # the client closed the response: a read still waiting fails, as on a closed socket


class _Body(httpx.AsyncByteStream):
    def __init__(self, chunks: asyncio.Queue[Any], call: _Call, read_timeout: float | None) -> None:
        self._chunks = chunks
        self._call = call
        self._read_timeout = read_timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            try:
                chunk = await asyncio.wait_for(self._chunks.get(), self._read_timeout)
            except TimeoutError:
                raise httpx.ReadTimeout("no body chunk within the read timeout") from None
            if chunk is _END:
                return
            if chunk is _CLOSED:
                raise httpx.ReadError("the response was closed by the client")
            if isinstance(chunk, BaseException):
                raise httpx.ReadError(f"the app failed mid-response: {chunk!r}") from chunk
            yield chunk

    async def aclose(self) -> None:
        self._chunks.put_nowait(_CLOSED)
        await self._call.disconnect()


class _Call:
    """One request's run of the app: its task, and the client's side of the connection."""

    def __init__(self, transport: StreamingASGITransport) -> None:
        self.transport = transport
        self.disconnected = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def disconnect(self) -> None:
        self.disconnected.set()
        if self.task is not None and not self.task.done():
            # The app sees the disconnect and unwinds (usage recorded, engine aborted); wait for it, bounded.
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(self.task), self.transport.close_timeout_s)


class StreamingASGITransport(httpx.AsyncBaseTransport):
    def __init__(self, app: ASGIApp, close_timeout_s: float = 10.0) -> None:
        self.app = app
        self.close_timeout_s = close_timeout_s
        self.tasks: set[asyncio.Task[None]] = set()

    async def idle(self, timeout_s: float = 10.0) -> None:
        """Wait until every app call has returned (a disconnected request finishing its bookkeeping)."""
        pending = [t for t in self.tasks if not t.done()]
        if pending:
            await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), timeout_s)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
            "headers": [(k.lower(), v) for k, v in request.headers.raw], "scheme": request.url.scheme,
            "path": request.url.path, "raw_path": request.url.raw_path.split(b"?")[0],
            "query_string": request.url.query, "server": (request.url.host, request.url.port),
            "client": ("127.0.0.1", 123), "root_path": "",
        }
        body = b"".join([part async for part in request.stream])  # type: ignore[union-attr]
        call = _Call(self)
        chunks: asyncio.Queue[Any] = asyncio.Queue()
        started: asyncio.Future[tuple[int, list[tuple[bytes, bytes]]]] = asyncio.get_running_loop().create_future()
        body_sent = False
        complete = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await call.disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal complete
            if message["type"] == "http.response.start":
                if not started.done():
                    started.set_result((message["status"], list(message.get("headers", []))))
            elif message["type"] == "http.response.body":
                if call.disconnected.is_set() or complete:
                    return  # nobody reads it any more
                if message.get("body"):
                    chunks.put_nowait(message["body"])
                if not message.get("more_body", False):
                    complete = True
                    chunks.put_nowait(_END)
                    call.disconnected.set()  # the exchange is over: a later receive() says so, as a server's

        async def run() -> None:
            try:
                await self.app(scope, receive, send)  # type: ignore[arg-type]
            except BaseException as exc:
                if not started.done():
                    started.set_exception(exc)
                else:
                    chunks.put_nowait(exc)
                raise
            finally:
                if not started.done():
                    started.set_exception(RuntimeError("the app returned without a response"))
                if not complete:
                    chunks.put_nowait(_END)

        call.task = asyncio.get_running_loop().create_task(run())
        self.tasks.add(call.task)
        call.task.add_done_callback(self.tasks.discard)
        call.task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no warning
        # The client's read timeout holds here as over a socket: for the headers, then between body chunks.
        read_timeout = (request.extensions.get("timeout") or {}).get("read")
        try:
            status, headers = await asyncio.wait_for(asyncio.shield(started), read_timeout)
        except TimeoutError:
            call.disconnected.set()
            raise httpx.ReadTimeout("no response headers within the read timeout", request=request) from None
        except asyncio.CancelledError:
            # The client gave up before the headers (a non-streaming request abandoned): that is a disconnect.
            call.disconnected.set()
            raise
        return httpx.Response(status, headers=headers, stream=_Body(chunks, call, read_timeout), request=request)
