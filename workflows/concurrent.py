"""One thread pool per process for a batch's outbound calls (searches, webhooks).

A batch's HTTP calls wait on the network, not on the CPU: run together they take about as long
as the slowest one, instead of the sum. The pool is shared by every task thread of the worker
process (PerProcess: made again after a fork, a prefork child does not inherit the parent's
threads).
"""

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Generic, TypeVar

from django.conf import settings

T = TypeVar("T")


class PerProcess(Generic[T]):
    """One object per process, shared by its threads, made on first use and again after a fork:
    a prefork child must share neither its parent's threads nor its sockets."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._made: tuple[int, T] | None = None

    def get(self) -> T:
        with self._lock:
            if self._made is None or self._made[0] != os.getpid():
                self._made = (os.getpid(), self._make())
            return self._made[1]

    def forget(self) -> None:
        """The next get() makes a new one (tests: no connection outlives its test)."""
        with self._lock:
            self._made = None


def io_threads() -> int:
    """Threads for a process's outbound calls: enough for a few batches in flight at once. Also
    the keep-alive connections worth keeping per host, one per thread that may use it."""
    return max(8, 4 * settings.WORKER_BATCH_SIZE)


_threads = PerProcess(lambda: ThreadPoolExecutor(io_threads(), thread_name_prefix="batch-io"))


def submit(fn: Callable[[], T]) -> "Future[T]":
    return _threads.get().submit(fn)


def in_waves(
    futures: Sequence["Future[T]"], *, linger: float, deadline: Callable[[], float | None]
) -> Iterator[list["Future[T]"]]:
    """The futures as they finish, in groups: each group is what finished by `linger` seconds
    after its first one. One slow call never holds back the calls that finished before it.

    Stops early, leaving the rest unfinished, once the time.monotonic() that `deadline` names
    has passed (a worker shutting down); None is no deadline. It is read at least every
    _DEADLINE_POLL seconds, since it may be set while the calls are waited for."""
    pending = set(futures)
    while pending:
        done: set[Future[T]] = set()
        while not done:
            until = deadline()
            if until is not None and time.monotonic() >= until:
                return
            wait_for = _DEADLINE_POLL
            if until is not None:
                wait_for = max(0.0, min(wait_for, until - time.monotonic()))
            done, pending = wait(pending, timeout=wait_for, return_when=FIRST_COMPLETED)
        if pending:
            more, pending = wait(pending, timeout=linger)
            done |= more
        yield [future for future in futures if future in done]


# How often a wait for calls looks at the deadline again.
_DEADLINE_POLL = 0.5
