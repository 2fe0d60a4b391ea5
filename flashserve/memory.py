"""Process-level workarounds for memory and threads at start-up, used by `server.py` while it loads a model.

Both exist because of what the C runtimes under PyTorch do, not because of anything in our code:

- `return_freed_memory`: loading dequantizes the checkpoint to float32 and then packs it; glibc keeps the
  freed heap pages for reuse, so without a `malloc_trim` the server's resident size would stay at its
  loading peak (twice the packed model) for its whole life.
- `off_main_thread`: libgomp keeps an OpenMP thread team for every thread that ever ran a parallel
  region; loading and packing are parallel PyTorch work, and if they ran on the main thread its team
  would outlive them beside the engine thread's own. Once libgomp manages more threads than there are
  cores it stops spin-waiting between regions, every parallel op pays a futex wake-up, and a decode step
  on 2 cores takes twice as long. Running the load in a thread that then exits ends its team with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def return_freed_memory() -> None:
    """Hand the float32 checkpoint's freed pages back to the OS (glibc only; elsewhere nothing to do)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def off_main_thread(fn: Callable[[], T]) -> T:
    """Run `fn` (loading and packing: parallel PyTorch work) in a thread that then exits; its result or
    its exception comes back to the caller."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # re-raised on the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="flashserve-load")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]
