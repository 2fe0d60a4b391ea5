"""The remote backend's default upstream client (`backends/upstream_http.py: AiohttpUpstream`) against a real
HTTP/1.1 server on a local socket: SSE lines as they arrive (a line longer than aiohttp's buffer included),
kept-alive connections reused once a body is read to its end and dropped when it is not, and its two errors
for a server that is too slow or not there."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from flashserve.backends.upstream_http import AiohttpUpstream, UpstreamTimeout, UpstreamUnreachable

BIG = "x" * 300_000


class Server:
    """Answers POST /stream with a chunked SSE body, /partial with its first event and the rest 5 s later,
    /big with one 300 kB line, /slow never."""

    def __init__(self) -> None:
        self.connections = 0
        self.bodies: list[dict] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                path = lines[0].split()[1]
                length = next(int(h.split(":")[1]) for h in lines if h.lower().startswith("content-length"))
                self.bodies.append(json.loads(await reader.readexactly(length)))
                if path == "/slow":
                    await asyncio.sleep(30)
                events = [f"data: {BIG}\n\n"] if path == "/big" else \
                    [f'data: {{"n": {i}}}\n\n' for i in range(3)] + ["data: [DONE]\n\n"]
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                for i, event in enumerate(events):
                    data = event.encode()
                    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    await writer.drain()
                    if path == "/partial" and i == 0:
                        await asyncio.sleep(5)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serving() -> AsyncIterator[tuple[Server, str]]:
    server = Server()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        listener.close()


async def lines_of(client: AiohttpUpstream, url: str) -> list[str]:
    response = await client.post(url, {"model": "m"}, {"authorization": "Bearer up"})
    try:
        assert response.status_code == 200 and response.headers["content-type"] == "text/event-stream"
        return [line async for line in response.lines()]
    finally:
        await response.close()


def test_lines_arrive_and_a_read_body_gives_its_connection_back() -> None:
    async def main() -> None:
        async with serving() as (server, base):
            client = AiohttpUpstream(timeout_s=5, connect_timeout_s=5)
            try:
                first = await lines_of(client, f"{base}/stream")
                assert [x for x in first if x] == ['data: {"n": 0}', 'data: {"n": 1}', 'data: {"n": 2}',
                                                   "data: [DONE]"]
                await lines_of(client, f"{base}/stream")
                assert server.connections == 1  # kept alive and reused
                assert server.bodies[0] == {"model": "m"}
                big = await lines_of(client, f"{base}/big")
                assert big[0] == f"data: {BIG}"  # past aiohttp's own line limit

                # Closed before its end: the connection is dropped, the next request opens another.
                response = await client.post(f"{base}/partial", {}, {})
                async for _ in response.lines():
                    break
                await response.close()
                await lines_of(client, f"{base}/stream")
                assert server.connections == 2
            finally:
                await client.aclose()

    asyncio.run(main())


def test_a_slow_upstream_times_out_and_a_missing_one_is_unreachable() -> None:
    async def main() -> None:
        async with serving() as (_, base):
            client = AiohttpUpstream(timeout_s=0.3, connect_timeout_s=2)
            try:
                with pytest.raises(UpstreamTimeout):
                    await client.post(f"{base}/slow", {}, {})
            finally:
                await client.aclose()
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        client = AiohttpUpstream(timeout_s=2, connect_timeout_s=2)
        try:
            with pytest.raises(UpstreamUnreachable):
                await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", {}, {})
        finally:
            await client.aclose()

    asyncio.run(main())
