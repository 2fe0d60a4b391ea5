"""Connects the synchronous engine to asyncio.

A dedicated thread owns the `LLMEngine` and loops on `step()`. Coroutines
talk to it through a command inbox (add, abort) and each request gets an
asyncio queue that the thread fills with `RequestOutput`s via
`call_soon_threadsafe`. Every accepted request ends with either a finished
output or an exception on its queue, so no client can hang on a request the
engine dropped. Aborts are awaited: `abort()` returns once the engine thread
has freed the request's blocks.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from flashserve.engine.engine import LLMEngine
from flashserve.engine.request import RequestOutput, SamplingParams, ThinkingControl, TokenConstraint

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread failed; the request cannot complete."""


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


class RequestStream:
    """The outputs of one engine request, as an async iterator."""

    def __init__(self, request_id: str, stream: _Stream, engine: AsyncEngine) -> None:
        self.request_id = request_id
        self._stream = stream
        self._engine = engine
        self.last: RequestOutput | None = None

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while True:
            item = await self._stream.queue.get()
            if isinstance(item, BaseException):
                raise item
            self.last = item
            yield item
            if item.finished:
                return

    async def abort(self) -> None:
        await self._engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._streams: dict[str, _Stream] = {}
        self._commands: list[Callable[[], None]] = []
        self._wakeup = threading.Condition()
        self._stopping = False
        self._closed = False
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="flashserve-engine", daemon=True)

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join(timeout)

    @property
    def num_active(self) -> int:
        return len(self._streams)

    def request_ids(self) -> set[str]:
        """The ids of the requests the engine holds (a copy: the engine thread adds and removes them)."""
        return set(list(self._streams))

    # -- requests -----------------------------------------------------------
    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                          cache_salt: str = "", constraint: TokenConstraint | None = None,
                          thinking: ThinkingControl | None = None) -> RequestStream:
        if self._closed:
            raise EngineDeadError("the inference engine has stopped") from self._dead
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        added: asyncio.Future[None] = stream.loop.create_future()

        def add() -> None:
            if self._closed:
                stream.loop.call_soon_threadsafe(_settle, added, EngineDeadError("the inference engine is stopped"))
                return
            try:
                self.engine.add_request(request_id, prompt_token_ids, params, cache_salt, constraint, thinking)
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                stream.loop.call_soon_threadsafe(_settle, added, exc)
                return
            self._streams[request_id] = stream
            stream.loop.call_soon_threadsafe(_settle, added, None)

        self._submit(add)
        await added
        return RequestStream(request_id, stream, self)

    async def abort(self, request_id: str) -> None:
        """Abort a request and wait until the engine has freed it. Idempotent."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def abort() -> None:
            final = self.engine.abort_request(request_id)
            stream = self._streams.pop(request_id, None)
            if stream is not None and final is not None:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, final)
            loop.call_soon_threadsafe(_settle, done, None)

        self._submit(abort)
        await done

    async def inspect(self) -> dict[str, object]:
        """The engine's block accounting, read on the engine thread between steps: the pool's counts, whether
        its invariants hold, and how many used blocks no live request holds (leaked; 0 when all is well)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[dict[str, object]] = loop.create_future()

        def inspect() -> None:
            engine = self.engine
            try:
                engine.kv.check_invariants()
                problem = None
            except AssertionError as exc:
                problem = str(exc) or "invariant broken"
            live = [*engine.scheduler.running, *engine.scheduler.waiting]
            held = len({b for r in live for b in r.block_ids})
            report: dict[str, object] = {**engine.stats(), "invariants_ok": problem is None, "problem": problem,
                                         "held_blocks": held, "leaked_blocks": engine.kv.num_used_blocks - held,
                                         "active_requests": len(self._streams)}
            loop.call_soon_threadsafe(_resolve, done, report)

        self._submit(inspect)
        return await done

    async def abort_all(self) -> int:
        """Abort every request the engine holds (shutdown after the drain time); returns how many."""
        ids = list(self._streams)
        for request_id in ids:
            await self.abort(request_id)
        return len(ids)

    def _submit(self, command: Callable[[], None]) -> None:
        with self._wakeup:
            if not self._closed:
                self._commands.append(command)
                self._wakeup.notify()
                return
        command()  # the engine thread is gone, so touching the engine here is safe

    # -- the engine thread --------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._wakeup:
                    while not (self._commands or self._stopping or self.engine.has_unfinished_requests()):
                        self._wakeup.wait()
                    if self._stopping:
                        break
                    commands, self._commands = self._commands, []
                for command in commands:
                    command()
                try:
                    outputs = self.engine.step()
                except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
                    log.exception("engine step failed; failing the requests in flight")
                    self._fail_requests(exc)
                    continue
                self._deliver(outputs)
        except BaseException as exc:  # noqa: BLE001 - every waiting client must hear of it
            log.exception("engine thread failed")
            self._dead = exc
        with self._wakeup:
            self._closed = True
            commands, self._commands = self._commands, []
        for command in commands:  # pending adds fail, pending aborts return to their awaiters
            command()
        self._fail_requests(self._dead or EngineDeadError("the inference engine is shutting down"))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one wake-up per event loop, not one per request (each
        wake-up is a syscall under the GIL, and a batch of 32 made 32)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            by_loop.setdefault(stream.loop, []).append((stream.queue, output))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _fail_requests(self, exc: BaseException) -> None:
        """End every in-flight request with an error (its blocks freed first)."""
        error = exc if isinstance(exc, EngineDeadError) else EngineDeadError(f"generation failed: {exc}")
        for request_id, stream in list(self._streams.items()):
            self.engine.abort_request(request_id)
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
        self._streams.clear()


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, output in items:
        queue.put_nowait(output)


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)


def _resolve(future: asyncio.Future[dict[str, object]], value: dict[str, object]) -> None:
    if not future.done():
        future.set_result(value)
