"""The HTTP client a remote backend talks to its upstream with: one small seam, two implementations.

- `AiohttpUpstream`, the default: aiohttp's client. Its C HTTP parser and lean connection pool cost a
  forwarded streaming request about a quarter of httpx's CPU (measured against the bench's fake upstream:
  ~0.22 ms against ~0.7-0.8 ms), which was the largest part of the gateway's own cost per request (README
  "Gateway overhead").
- `HttpxUpstream`: an `httpx.AsyncClient` the caller brings (the tests' in-process transports).

Both raise the same errors, `UpstreamTimeout` and `UpstreamUnreachable` (a connection that cannot be made,
or breaks mid-body), and answer an `UpstreamResponse`: the status, the headers, the body's lines as they
arrive, or the whole body. Connections are kept alive and reused; a response read to its end returns its
connection to the pool, one closed early drops it.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

import aiohttp
import httpx


class UpstreamTimeout(Exception):
    """The upstream did not connect or answer in time."""


class UpstreamUnreachable(Exception):
    """The connection could not be made, or broke before the body's end."""


class UpstreamResponse(Protocol):
    status_code: int
    headers: Mapping[str, str]

    def lines(self) -> AsyncIterator[str]:
        """The body's lines (without their line ends) as they arrive."""
        ...

    async def read(self) -> bytes: ...

    async def close(self) -> None:
        """Done with it: read to its end, its connection is reused; else the connection is dropped."""
        ...


class UpstreamClient(Protocol):
    async def post(self, url: str, body: dict[str, Any], headers: Mapping[str, str]) -> UpstreamResponse:
        """POST `body` as JSON; the response once its headers are in (its body is read from it)."""
        ...

    async def aclose(self) -> None: ...


# -- aiohttp -----------------------------------------------------------------------------------------------
# Shorter than the usual upstream server's idle keep-alive (uvicorn's 5 s), so a pooled connection is not
# reused just as the server closes it.
_KEEPALIVE_S = 4.0


class AiohttpUpstream:
    def __init__(self, timeout_s: float, connect_timeout_s: float) -> None:
        # As httpx's Timeout(timeout_s, connect=...): each read may wait timeout_s, a connection attempt less.
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[str, str | None] = {}  # by origin (scheme://host:port)

    def _started(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the running event loop, which the backend's constructor
        # (at start-up, before uvicorn's loop) does not have.
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=_KEEPALIVE_S)
            # trust_env off: aiohttp would read the proxy variables and ~/.netrc on a worker thread for every
            # request; `_proxy` reads the variables once per upstream instead.
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout, trust_env=False)
        return self._session

    def _proxy(self, url: str) -> str | None:
        """The proxy for `url` from HTTP(S)_PROXY / NO_PROXY (as httpx applied them), read once per origin."""
        origin = url.split("/", 3)[:3]
        key = "/".join(origin)
        if key not in self._proxies:
            scheme, host = origin[0].rstrip(":"), origin[2].rsplit("@", 1)[-1]
            bypass = urllib.request.proxy_bypass(host.split(":")[0]) if host else True
            self._proxies[key] = None if bypass else urllib.request.getproxies().get(scheme)
        return self._proxies[key]

    async def post(self, url: str, body: dict[str, Any], headers: Mapping[str, str]) -> AiohttpResponse:
        try:
            response = await self._started().post(url, data=json.dumps(body).encode(), proxy=self._proxy(url),
                                                  headers={**headers, "content-type": "application/json"})
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(str(exc)) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnreachable(str(exc)) from exc
        return AiohttpResponse(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class AiohttpResponse:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status_code = response.status
        self.headers: Mapping[str, str] = response.headers

    async def lines(self) -> AsyncIterator[str]:
        # Split here rather than with aiohttp's readline, which refuses a line past its buffer's size.
        rest = b""
        try:
            async for data in self._response.content.iter_any():
                lines = (rest + data).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    yield line.rstrip(b"\r").decode("utf-8", errors="replace")
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(str(exc)) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnreachable(str(exc)) from exc
        if rest:
            yield rest.rstrip(b"\r").decode("utf-8", errors="replace")

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(str(exc)) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnreachable(str(exc)) from exc

    async def close(self) -> None:
        # release: back to the pool when the body was read to its end, closed otherwise (aiohttp decides).
        self._response.release()


# -- httpx -------------------------------------------------------------------------------------------------
class HttpxUpstream:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def post(self, url: str, body: dict[str, Any], headers: Mapping[str, str]) -> HttpxResponse:
        try:
            response = await self._client.send(self._client.build_request("POST", url, json=body,
                                                                          headers=dict(headers)), stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(str(exc)) from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnreachable(str(exc)) from exc
        return HttpxResponse(response)

    async def aclose(self) -> None:
        await self._client.aclose()


class HttpxResponse:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status_code = response.status_code
        self.headers: Mapping[str, str] = response.headers

    async def lines(self) -> AsyncIterator[str]:
        try:
            async for line in self._response.aiter_lines():
                yield line
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(str(exc)) from exc
        except (httpx.HTTPError, httpx.StreamError) as exc:
            raise UpstreamUnreachable(str(exc)) from exc

    async def read(self) -> bytes:
        try:
            return await self._response.aread()
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(str(exc)) from exc
        except (httpx.HTTPError, httpx.StreamError) as exc:
            raise UpstreamUnreachable(str(exc)) from exc

    async def close(self) -> None:
        await self._response.aclose()
