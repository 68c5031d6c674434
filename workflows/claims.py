"""How long a consumer's claim lives: exactly as long as the worker process that holds it.

A claim (workflows_claim) is taken with a short lease, WORKFLOW_CLAIM_LEASE_SECONDS. While a
worker process holds claims, its heartbeat thread renews all of them every
WORKFLOW_HEARTBEAT_SECONDS, in one statement whatever their number (statements.RENEW). A worker
that dies (SIGKILL, OOM, a lost host) stops beating, its claims' leases end within one lease,
and the scheduler makes those workflows due again within a second (workflows/scheduler.py):
the lease measures "is the worker still there?" directly, not with the task's worst-case
duration. A renewal that finds a claim no longer its own (the lease ended during a long pause
and someone else took the workflow) marks it lost, and the consumer drops that work before
writing anything (the ending's claim check refuses it too). A claim held past
CELERY_TASK_TIME_LIMIT is no longer renewed: a task stuck for good (the threads pool enforces
no time limit) cannot hold a workflow forever.

On warm shutdown (SIGTERM: a deploy, a scale-down; config/celery.py calls claims_shutdown_begin)
the worker takes no new batch, gives the searches in flight WORKER_SHUTDOWN_GRACE_SECONDS to
finish, ends what finished and hands the rest back (workflows.scheduler.workflows_put_back: due
at once, the attempt not counted), so that the next worker resumes them without waiting out a
lease.

Hand-written, after the job queues that do this: Solid Queue and Oban keep a row per process
with its heartbeat and release the jobs of processes whose heartbeat is too old; River and
Temporal renew a per-job deadline (Temporal's activity heartbeat timeout). Here the deadline is
the workflow row's own `claimed_until`, so the scheduler's test stays one column and there is no
process table to keep; no Celery or Django library renews rows of our own.
"""

import datetime as dt
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from django.conf import settings
from django.db import connection
from django.utils import timezone

from workflows import metrics, statements
from workflows.concurrent import PerProcess

logger = logging.getLogger(__name__)


@dataclass
class _Claim:
    claim_id: uuid.UUID
    taken: float  # time.monotonic() when taken


class Held:
    """The claims one worker process holds, and the heartbeat that keeps them alive."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._claims: dict[uuid.UUID, _Claim] = {}
        self._lost: set[uuid.UUID] = set()
        self._thread: threading.Thread | None = None

    def hold(self, claims: Mapping[uuid.UUID, uuid.UUID]) -> None:
        now = time.monotonic()
        with self._lock:
            for workflow_id, claim_id in claims.items():
                self._claims[workflow_id] = _Claim(claim_id, now)
                self._lost.discard(workflow_id)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._beat_forever, name="claims-heartbeat", daemon=True
                )
                self._thread.start()

    def drop(self, workflow_ids: Iterable[uuid.UUID]) -> None:
        with self._lock:
            for workflow_id in workflow_ids:
                self._claims.pop(workflow_id, None)
                self._lost.discard(workflow_id)

    def lost(self, workflow_id: uuid.UUID) -> bool:
        """True once a renewal found this claim no longer ours: its work must stop."""
        with self._lock:
            return workflow_id in self._lost

    def held(self) -> dict[uuid.UUID, uuid.UUID]:
        with self._lock:
            return {workflow_id: claim.claim_id for workflow_id, claim in self._claims.items()}

    def beat(self) -> int:
        """Renew every claim held (one statement); how many were renewed."""
        cap = time.monotonic() - settings.CELERY_TASK_TIME_LIMIT
        with self._lock:
            overdue = [w for w, claim in self._claims.items() if claim.taken < cap]
            for workflow_id in overdue:
                logger.warning(
                    "workflow %s: held past CELERY_TASK_TIME_LIMIT; letting its claim lapse",
                    workflow_id,
                )
                del self._claims[workflow_id]
            beating = {w: claim.claim_id for w, claim in self._claims.items()}
        if not beating:
            return 0
        started, cpu = time.perf_counter(), time.thread_time()
        until = timezone.now() + dt.timedelta(seconds=settings.WORKFLOW_CLAIM_LEASE_SECONDS)
        renewed, lost = claims_extend(claims=beating, until={w: until for w in beating})
        with self._lock:
            for workflow_id in lost:
                current = self._claims.get(workflow_id)
                if current is None or current.claim_id != beating[workflow_id]:
                    continue  # dropped, or taken again, meanwhile
                logger.info("workflow %s: its claim was taken over; dropping the work", workflow_id)
                del self._claims[workflow_id]
                self._lost.add(workflow_id)
        metrics.heartbeat_ran(
            renewed=len(renewed),
            cpu_seconds=time.thread_time() - cpu,
            seconds=time.perf_counter() - started,
        )
        return len(renewed)

    def _beat_forever(self) -> None:
        """Beat while claims are held; then end, closing this thread's connection (hold()
        starts another thread when claims come again), so an idle worker keeps none open."""
        try:
            while True:
                time.sleep(settings.WORKFLOW_HEARTBEAT_SECONDS)
                with self._lock:
                    if not self._claims:
                        self._thread = None
                        return
                try:
                    self.beat()
                except Exception as exc:
                    # PostgreSQL away for a moment: the next beat tries again; if none gets
                    # through within a lease, the claims lapse and another worker resumes them.
                    logger.warning("claims heartbeat failed (%s)", type(exc).__name__)
                    connection.close()
        finally:
            connection.close()


_held = PerProcess(Held)


def held_claims() -> Held:
    """This process's claims (one per process, made again after a fork)."""
    return _held.get()


@contextmanager
def claims_holding(claims: Mapping[uuid.UUID, uuid.UUID]) -> Iterator[Held]:
    """Keep these claims alive while the block runs; they stop being renewed after it."""
    held = held_claims()
    held.hold(claims)
    try:
        yield held
    finally:
        held.drop(claims)


def claims_extend(
    *, claims: Mapping[uuid.UUID, uuid.UUID], until: Mapping[uuid.UUID, dt.datetime]
) -> tuple[set[uuid.UUID], set[uuid.UUID]]:
    """Move each claim's lease to its `until`, where the claim is still the one named: the ids
    renewed, and those whose claim is not (anymore). A row locked right now is in neither:
    it is left for the next renewal."""
    rows = statements.execute(
        statements.RENEW,
        {"ids": list(claims), "claims": list(claims.values()), "until": [until[w] for w in claims]},
    )
    return {row[0] for row in rows if row[1]}, {row[0] for row in rows if not row[1]}


# --- warm shutdown -------------------------------------------------------------------------------

# Set once, from Celery's signal handler (so no lock: a handler must not wait for one the
# interrupted thread may hold); read by every task thread.
_shutdown_deadline: float | None = None


def claims_shutdown_begin(*, grace: float | None = None) -> None:
    """The worker is shutting down: no new batch is claimed, and searches in flight have
    `grace` seconds (WORKER_SHUTDOWN_GRACE_SECONDS) to finish."""
    global _shutdown_deadline
    if _shutdown_deadline is None:
        wait = settings.WORKER_SHUTDOWN_GRACE_SECONDS if grace is None else grace
        _shutdown_deadline = time.monotonic() + wait
        logger.info("worker shutting down: unfinished work is handed back in %.0f s", wait)


def claims_shutdown_cancel() -> None:
    """Forget a shutdown (tests)."""
    global _shutdown_deadline
    _shutdown_deadline = None


def claims_shutdown_deadline() -> float | None:
    """time.monotonic() by which unfinished work is handed back; None while not shutting down."""
    return _shutdown_deadline
