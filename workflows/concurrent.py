"""One thread pool per process for a batch's outbound calls (searches, webhooks).

A batch's HTTP calls wait on the network, not on the CPU: run together they take about as long
as the slowest one, instead of the sum. The pool is shared by every task thread of the worker
process and made again after a fork (a prefork child does not inherit the parent's threads).
"""

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

from django.conf import settings

T = TypeVar("T")

_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None


def pool() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None or _pool[0] != os.getpid():
            # Enough for a few batches in flight at once in this process.
            size = max(8, 4 * settings.WORKER_BATCH_SIZE)
            _pool = (os.getpid(), ThreadPoolExecutor(size, thread_name_prefix="batch-io"))
        return _pool[1]


def submit(fn: Callable[[], T]) -> "Future[T]":
    return pool().submit(fn)


def in_waves(futures: Sequence["Future[T]"], *, linger: float) -> Iterator[list["Future[T]"]]:
    """The futures as they finish, in groups: each group is what finished by `linger` seconds
    after its first one. One slow call never holds back the calls that finished before it."""
    pending = set(futures)
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        if pending:
            more, pending = wait(pending, timeout=linger)
            done |= more
        yield [future for future in futures if future in done]
