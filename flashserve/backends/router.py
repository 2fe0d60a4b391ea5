"""Replicas of one model behind one `Backend`: a routing policy, health checks, and failover.

Policies:
- `round_robin`: each request to the next healthy replica;
- `least_load`: to the healthy replica with the fewest requests in flight;
- `prefix_aware`: each replica keeps a bounded record of the prefix blocks it served recently (hashes of
  the conversation's text in 256-character blocks, chained, salted with the tenant so that one tenant's
  record never steers another's requests). A request goes to the replica holding the longest run of its
  blocks, where that replica's prompt cache most likely still holds them, unless that replica has more
  than `margin` requests in flight beyond the least loaded one; then to the least loaded.

A replica whose health check fails, or that fails to open a request with a server-side error, leaves the
rotation until a health check passes again. A request whose replica fails before anything was returned
goes to the next replica; one whose replica dies mid-stream ends with an error (the API layer records the
usage known so far).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import httpx

from flashserve import metrics
from flashserve.backends.base import Backend
from flashserve.catalog import POLICIES
from flashserve.errors import FlashserveError, server_error
from flashserve.generation import ChoiceDelta, Generation, GenerationRequest, RequestContext, Usage

log = logging.getLogger(__name__)
PREFIX_BLOCK_CHARS = 256


def prefix_hashes(request: GenerationRequest, tenant: str) -> list[bytes]:
    """Chained hashes of the conversation's text in blocks of PREFIX_BLOCK_CHARS, salted with the tenant:
    two requests share the first k hashes exactly when their first k blocks (and tenant) are the same."""
    conversation: list[list[str | None]] = [[m.role, m.content] for m in request.messages]
    if request.raw_prompt is not None:
        conversation.append(["prompt", request.raw_prompt])
    text = json.dumps(conversation, ensure_ascii=False)
    hashes: list[bytes] = []
    parent = hashlib.blake2b(tenant.encode(), digest_size=16).digest()
    for start in range(0, len(text) - PREFIX_BLOCK_CHARS + 1, PREFIX_BLOCK_CHARS):
        parent = hashlib.blake2b(parent + text[start:start + PREFIX_BLOCK_CHARS].encode(), digest_size=16).digest()
        hashes.append(parent)
    return hashes


@dataclass(eq=False)
class Replica:
    name: str  # the upstream URL, for logs and stats
    backend: Backend  # a RemoteBackend in practice (an upstream, or a local worker process)
    health_url: str | None = None
    pid: int | None = None  # of a local worker process
    healthy: bool = True
    active: int = 0
    served: int = 0
    prefixes: OrderedDict[bytes, None] = field(default_factory=OrderedDict)

    def matched(self, hashes: list[bytes]) -> int:
        count = 0
        for h in hashes:
            if h not in self.prefixes:
                break
            count += 1
        return count

    def remember(self, hashes: list[bytes], limit: int) -> None:
        for h in hashes:
            self.prefixes[h] = None
            self.prefixes.move_to_end(h)
        while len(self.prefixes) > limit:
            self.prefixes.popitem(last=False)


class Router:
    name = "router"

    def __init__(self, replicas: list[Replica], policy: str = "prefix_aware", margin: int = 4,
                 max_prefixes: int = 16384, health_interval_s: float = 2.0) -> None:
        if policy not in POLICIES:
            raise ValueError(f"routing policy must be one of {POLICIES}, not {policy!r}")
        if not replicas:
            raise ValueError("a router needs at least one replica")
        self.replicas = replicas
        for replica in replicas:
            metrics.REPLICA_HEALTHY.labels(replica.name).set(1 if replica.healthy else 0)
        self.policy = policy
        self.margin = margin
        self.max_prefixes = max_prefixes
        self.health_interval_s = health_interval_s
        self.system_fingerprint = replicas[0].backend.system_fingerprint
        self._turn = itertools.count()
        self._health: asyncio.Task[None] | None = None
        self._open: set[RoutedGeneration] = set()  # for abort_all (the server's drain)
        self.on_close: Callable[[], None] | None = None  # e.g. stop the worker processes behind the replicas

    async def open(self, request: GenerationRequest, ctx: RequestContext) -> RoutedGeneration:
        self._start_health_checks()
        hashes = prefix_hashes(request, ctx.tenant)
        tried: list[Replica] = []
        while True:
            replica = self.pick(hashes, exclude=tried)
            if replica is None:
                raise server_error(503, "No replica of this model is available; retry shortly.",
                                   "no_replica_available", retry_after_s=2)
            tried.append(replica)
            with _Slot(replica) as slot:  # counted from here; given back on any exit but the hand-over
                try:
                    generation = await replica.backend.open(request, ctx)
                except FlashserveError as exc:
                    if exc.status < 500:
                        raise  # the request's own fault: another replica would say the same
                    self._eject(replica, exc.message)
                    continue  # nothing has reached the client: the next replica may serve it
                replica.served += 1
                metrics.ROUTING_DECISIONS.labels(self.policy, replica.name,
                                                 self._reason(replica, hashes, failover=len(tried) > 1)).inc()
                replica.remember(hashes, self.max_prefixes)
                routed = RoutedGeneration(generation, replica, self)
                slot.hand_over()  # RoutedGeneration owns the count now, until it ends
                self._open.add(routed)
                return routed

    async def count_tokens(self, request: GenerationRequest) -> int:
        """The replicas serve one model: the first healthy one counts (any one when none is)."""
        replica = next((r for r in self.replicas if r.healthy), self.replicas[0])
        return await replica.backend.count_tokens(request)

    def _any_replica(self) -> Replica:
        return next((r for r in self.replicas if r.healthy), self.replicas[0])

    @property
    def max_model_len(self) -> int | None:
        return self.replicas[0].backend.max_model_len

    async def tokenize(self, request: GenerationRequest, add_generation_prompt: bool = True) -> list[int]:
        """The replicas serve one model: the first healthy one tokenizes."""
        return await self._any_replica().backend.tokenize(request, add_generation_prompt)

    async def detokenize(self, token_ids: list[int]) -> str:
        return await self._any_replica().backend.detokenize(token_ids)

    @property
    def load(self) -> int:
        return sum(r.active for r in self.replicas)

    async def abort_all(self) -> int:
        """Abort every request in flight through this router (shutdown after the drain time)."""
        open_now = list(self._open)
        for routed in open_now:
            await routed.abort()
        return len(open_now)

    def pick(self, hashes: list[bytes], exclude: Sequence[Replica] = ()) -> Replica | None:
        candidates = [r for r in self.replicas if r.healthy and r not in exclude]
        if not candidates:
            return None
        if self.policy == "round_robin":
            return candidates[next(self._turn) % len(candidates)]
        least = min(candidates, key=lambda r: r.active)
        if self.policy == "least_load":
            return least
        best = max(candidates, key=lambda r: (r.matched(hashes), -r.active))
        if best.matched(hashes) == 0 or best.active > least.active + self.margin:
            return least
        return best

    def _reason(self, replica: Replica, hashes: list[bytes], failover: bool) -> str:
        """Why this replica, for the routing counter: failover (an earlier one failed), turn (round robin),
        prefix (it holds part of the conversation) or load (the least loaded)."""
        if failover:
            return "failover"
        if self.policy == "round_robin":
            return "turn"
        return "prefix" if self.policy == "prefix_aware" and replica.matched(hashes) else "load"

    def _eject(self, replica: Replica, why: str) -> None:
        if replica.healthy:
            log.warning("replica %s leaves the rotation: %s", replica.name, why)
        replica.healthy = False
        metrics.REPLICA_HEALTHY.labels(replica.name).set(0)

    def _start_health_checks(self) -> None:
        if self._health is None and any(r.health_url for r in self.replicas):
            self._health = asyncio.get_running_loop().create_task(self._check_health())

    async def _check_health(self) -> None:
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                for replica in self.replicas:
                    if replica.health_url is None:
                        continue
                    try:
                        ok = (await client.get(replica.health_url)).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    if ok and not replica.healthy:
                        log.warning("replica %s is back in the rotation", replica.name)
                    if not ok:
                        self._eject(replica, "health check failed")
                    replica.healthy = ok
                    metrics.REPLICA_HEALTHY.labels(replica.name).set(1 if ok else 0)
                await asyncio.sleep(self.health_interval_s)

    def stats(self) -> dict[str, object]:
        return {"policy": self.policy, "replicas": [
            {"name": r.name, "pid": r.pid, "healthy": r.healthy, "active": r.active, "served": r.served,
             "prefix_blocks": len(r.prefixes)} for r in self.replicas]}

    async def inspect(self) -> dict[str, object]:
        """For /admin/engine: the router's view of its replicas."""
        return self.stats()

    async def close(self) -> None:
        if self._health is not None:
            self._health.cancel()
        for replica in self.replicas:
            await replica.backend.close()
        if self.on_close is not None:
            await asyncio.to_thread(self.on_close)


class _Slot:
    """One request counted against a replica's load: raised on entry, lowered on exit (an error, a
    cancellation, a failover) unless `hand_over` passed the count to the generation that now owns it."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self._owned = False

    def __enter__(self) -> _Slot:
        self.replica.active += 1
        self._owned = True
        return self

    def hand_over(self) -> None:
        self._owned = False

    def __exit__(self, *exc: object) -> None:
        if self._owned:
            self._owned = False
            self.replica.active -= 1


class RoutedGeneration:
    """A replica's generation, counted against its load until it ends; a replica that fails mid-stream
    leaves the rotation (the error itself reaches the client)."""

    def __init__(self, inner: Generation, replica: Replica, router: Router) -> None:
        self._inner = inner
        self._replica = replica
        self._router = router
        self._done = False

    @property
    def usage(self) -> Usage:
        return self._inner.usage

    def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[ChoiceDelta]:
        try:
            async for delta in self._inner:
                yield delta
        except FlashserveError as exc:
            if exc.status >= 500:
                self._router._eject(self._replica, exc.message)
            raise
        finally:
            self._release()

    async def abort(self) -> None:
        self._release()
        await self._inner.abort()

    def _release(self) -> None:
        if not self._done:
            self._done = True
            self._replica.active -= 1
            self._router._open.discard(self)

