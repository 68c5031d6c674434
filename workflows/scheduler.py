"""What runs next, and why: the schedule of the workflows, read top to bottom.

PostgreSQL is the schedule and the broker carries only what is about to run. Every pending
workflow that a machine runs is in one of two places:

- **due** (`due_at` set): waiting for its turn. Its 202 makes it due at once; a transient
  failure puts it back due after its backoff (`retry_backoff`); work stopped by an outage of the
  internal system is put back due at once, with the attempt not counted, and waits for the
  breaker to close; a worker shutting down hands its unfinished work back due at once.
- **in flight** (`published_at` set): its queue message was published and it has not ended or
  been put back; a consumer's claim on it is kept alive by its worker's heartbeat
  (workflows/claims.py).

The scheduler runs in the dispatcher (workflows/dispatcher.py: one leader for the whole
deployment, woken by every 202's notification and at least every second). Each tick
(`schedule_tick`):

1. **Takes back lost work** (`RECOVER`): in flight, but its claim's lease ended (its worker died
   or lost PostgreSQL), or published and not claimed within RECONCILE_STALE_AFTER_SECONDS while
   the broker's queue is empty (its message was lost: a broker restarted without its data). Due
   again at once, counted (merchant_scheduler_recovered_total). Waiting is not lost: due work
   is never published twice, and a message waiting behind slow or stopped workers is left be.
2. **Pauses for the internal system** (workflows/breaker.py): while the breaker is open, or a 429
   asked for a pause, nothing is published. While open it probes `GET [base]/metadata` once per
   INTERNAL_SEARCH_BREAKER_PROBE_SECONDS, and the first answer closes it.
3. **Publishes due work, fairly and little at a time** (`SCHEDULE`): as many due workflows as
   the work in flight leaves room for under `in_flight_bound()`, in rounds across customers:
   each round takes up to `weight` (merchant.Customer.weight, default 1) of each customer's
   oldest due workflows, oldest first within the round. Another customer's backlog delays a
   request by about one round, not by its length; and the broker's queue stays short, so each
   of these decisions is taken as late as possible. The bound is also what keeps searches in
   flight under INTERNAL_SEARCH_MAX_CONCURRENCY: a workflow searches only while in flight, one
   search at a time.

The consumers (linking/services/process.py) claim what was published, search, and end the
workflow or put it back (`workflows_put_back`) with the reason in its timeline. The sweep
(workflows/services/reconcile.py) fails what passed its deadline, expires reviews, and makes due
what waits on nothing (an asynchronous search whose callback never came, to poll it).

Anchors: River's and Oban's PostgreSQL queues (a job row with its scheduled time, taken with
FOR UPDATE SKIP LOCKED; River's rescuer for stuck jobs), Temporal's fairness keys and activity
heartbeats, Hatchet's GROUP_ROUND_ROBIN. Those run their own fetchers against PostgreSQL; here
Celery's consumers stay and the scheduler feeds them, so the broker remains the one transport.
"""

import dataclasses
import datetime as dt
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from workflows import breaker, metrics, statements
from workflows.services.workflows import workflows_publish, workflows_queued

logger = logging.getLogger(__name__)

ACTOR = "scheduler"


def in_flight_bound() -> int:
    """The most workflows in flight at once: WORKFLOW_IN_FLIGHT_MAX, never above
    INTERNAL_SEARCH_MAX_CONCURRENCY (each workflow in flight searches at most once at a time)."""
    return min(settings.WORKFLOW_IN_FLIGHT_MAX, settings.INTERNAL_SEARCH_MAX_CONCURRENCY)


def retry_backoff(attempt: int, retry_after: float | None = None) -> float:
    """Seconds until a workflow whose search failed transiently is due again: exponential in
    its attempts with full jitter, at least what the server asked for, capped."""
    ceiling = min(
        settings.RETRY_BACKOFF_MAX_SECONDS, settings.RETRY_BACKOFF_BASE_SECONDS * 2 ** (attempt - 1)
    )
    wait = random.uniform(ceiling / 2, ceiling)  # noqa: S311 -- jitter, not security
    if retry_after is not None:
        wait = max(wait, retry_after)
    return min(wait, settings.RETRY_BACKOFF_MAX_SECONDS)


# --- the consumers' side: putting work back ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PutBack:
    """One claimed workflow to put back on the schedule: due again in `due_in` seconds;
    `refund`: its claim's attempt is not counted (the internal system was down, or the worker
    shut down: nothing about this workflow failed). `reason` goes to its timeline."""

    workflow_id: uuid.UUID
    claim_id: uuid.UUID
    due_in: float
    reason: str
    refund: bool = False


def workflows_put_back(*, put: Sequence[PutBack], actor: str) -> list[uuid.UUID]:
    """Put these claimed workflows back, due again each at its time (one statement); the ids
    put back (a claim that is no longer the one named is left alone)."""
    if not put:
        return []
    now = timezone.now()
    rows = statements.execute(
        statements.PUT_BACK,
        {
            "ids": [p.workflow_id for p in put],
            "claims": [p.claim_id for p in put],
            "due_at": [now + dt.timedelta(seconds=p.due_in) for p in put],
            "refund": [p.refund for p in put],
            "reason": [p.reason for p in put],
            "claimable": statements.CLAIMABLE_VALUES,
            "now": now,
            "actor": actor,
        },
    )
    return [row[0] for row in rows]


def workflows_unpublish(*, workflow_ids: Sequence[uuid.UUID | str]) -> None:
    """These published workflows were not claimed (a worker shutting down received them): due
    again at once, for another worker."""
    if workflow_ids:
        statements.execute(
            statements.UNPUBLISH,
            {"ids": [str(i) for i in workflow_ids], "now": timezone.now()},
        )


# --- the scheduler's tick ------------------------------------------------------------------------

# The probe of the internal system (GET [base]/metadata): registered by the app that knows it
# (linking/apps.py), so that this app never imports the one above it. True when it answered.
_probe: Callable[[], bool] | None = None


def probe_register(probe: Callable[[], bool]) -> None:
    global _probe
    _probe = probe


@dataclasses.dataclass
class Tick:
    """What one tick did: ids published and recovered, the room that was left for more, and
    whether the breaker held everything back."""

    published: list[str] = dataclasses.field(default_factory=list)
    recovered: int = 0
    room: int = 0
    paused: bool = False

    @property
    def full(self) -> bool:
        """The bound stopped it: more may be due as soon as work in flight ends."""
        return not self.paused and self.room <= len(self.published)


def schedule_tick(conn: Any) -> Tick:
    """One round of the schedule on `conn` (the dispatcher's own psycopg connection, in
    autocommit): take back lost work, probe the internal system when the breaker wants it, and
    publish what is due within the bound."""
    tick = Tick()
    now = timezone.now()
    tick.recovered = _recover(conn, now)
    state = breaker.breaker_state()
    if state.open and breaker.breaker_probe_due() and _probe is not None and _probe():
        breaker.breaker_close()
        state = breaker.breaker_state()
    if state.blocks():
        tick.paused = True
        return tick
    rows = conn.execute(
        statements.SCHEDULE,
        {
            "bound": in_flight_bound(),
            "now": now,
            "claimable": statements.CLAIMABLE_VALUES,
        },
    ).fetchall()
    tick.room = rows[0][1] if rows else 0
    tick.published = [str(row[0]) for row in rows if row[0] is not None]
    if tick.published:
        sent = workflows_publish(workflow_ids=tick.published)
        metrics.dispatcher_published(sent)
        if sent < len(tick.published):
            # The broker refused the rest: due again at once, for the next tick.
            conn.execute(
                statements.UNPUBLISH, {"ids": tick.published[sent:], "now": timezone.now()}
            )
            tick.published = tick.published[:sent]
    return tick


# Lost work is looked for at most this often (one statement over the work in flight).
RECOVER_EVERY_SECONDS = 1.0
_last_recover = 0.0


def _recover(conn: Any, now: dt.datetime) -> int:
    global _last_recover
    if time.monotonic() - _last_recover < RECOVER_EVERY_SECONDS:
        return 0
    _last_recover = time.monotonic()
    stale = settings.RECONCILE_STALE_AFTER_SECONDS
    # A message not taken for the stale window is lost only if it no longer waits in the queue:
    # behind slow or stopped workers it is only waiting (the broker is asked only then).
    untaken = conn.execute(statements.UNTAKEN, {"now": now, "stale": stale}).fetchone()[0]
    rows = conn.execute(
        statements.RECOVER,
        {
            "now": now,
            "stale": stale,
            "take_unclaimed": bool(untaken) and workflows_queued() == 0,
            "limit": 10 * settings.RECONCILE_BATCH_SIZE,
            "lease_reason": "due again: its worker stopped renewing its claim",
            "lost_reason": f"due again: its queue message was lost (not taken within {stale} s)",
            "actor": ACTOR,
        },
    ).fetchall()
    if rows:
        lease = sum(1 for row in rows if row[1] == "lease ended")
        metrics.scheduler_recovered(lease_ended=lease, not_taken=len(rows) - lease)
        logger.info(
            "scheduler: %d workflows due again (%d claims whose lease ended, %d messages not "
            "taken)",
            len(rows),
            lease,
            len(rows) - lease,
        )
    return len(rows)


@dataclasses.dataclass(frozen=True)
class Summary:
    """The schedule now, for the ops dashboard and /metrics."""

    due_now: int
    due_later: int
    in_flight: int
    bound: int
    oldest_due_seconds: float
    top_customers: list[tuple[str, int]]
    breaker: breaker.BreakerState


def schedule_summary(*, top: int = 5) -> Summary:
    """Work due and in flight, the oldest due, the `top` customers with the most due work (by
    name), and the breaker: two statements and one Redis read."""
    now = timezone.now()
    claimable = statements.CLAIMABLE_VALUES
    counts = statements.execute(statements.SCHEDULE_COUNTS, {"now": now, "claimable": claimable})
    customers = statements.execute(
        statements.SCHEDULE_TOP_CUSTOMERS, {"now": now, "claimable": claimable, "limit": top}
    )
    due_now, due_later, in_flight, oldest = counts[0]
    return Summary(
        due_now=due_now,
        due_later=due_later,
        in_flight=in_flight,
        bound=in_flight_bound(),
        oldest_due_seconds=(
            max(0.0, (now - oldest).total_seconds()) if oldest and oldest <= now else 0.0
        ),
        top_customers=[(name, count) for name, count in customers],
        breaker=breaker.breaker_state(),
    )


# --- what /metrics shows of it -------------------------------------------------------------------

# The customers with the most due work shown in /metrics (a bounded set of series).
TOP_CUSTOMERS = 5


class ScheduleCollector(Collector):
    """The schedule at scrape time (web only, as workflows.metrics.WorkflowCollector): work due
    and in flight, the oldest due, the customers with the most due work (by name), and the
    internal system's breaker."""

    def collect(self) -> Iterable[Metric]:
        try:
            summary = schedule_summary(top=TOP_CUSTOMERS)
        except DatabaseError as exc:
            logger.warning("metrics: schedule unavailable (%s)", type(exc).__name__)
            return
        due = GaugeMetricFamily(
            "merchant_scheduler_due",
            "Pending workflows waiting for their turn: due now, or due later (a retry's backoff).",
            labels=["when"],
        )
        due.add_metric(["now"], summary.due_now)
        due.add_metric(["later"], summary.due_later)
        yield due
        yield GaugeMetricFamily(
            "merchant_scheduler_in_flight",
            "Workflows published and not yet ended or put back.",
            value=summary.in_flight,
        )
        yield GaugeMetricFamily(
            "merchant_scheduler_in_flight_bound",
            "The most workflows in flight at once (WORKFLOW_IN_FLIGHT_MAX, at most "
            "INTERNAL_SEARCH_MAX_CONCURRENCY).",
            value=summary.bound,
        )
        yield GaugeMetricFamily(
            "merchant_scheduler_oldest_due_seconds",
            "How long the longest-waiting due workflow has been due (0 when none is).",
            value=summary.oldest_due_seconds,
        )
        customers = GaugeMetricFamily(
            "merchant_scheduler_due_by_customer",
            f"Work due now of the {TOP_CUSTOMERS} customers with the most, by the customer's "
            "name (a bounded set of series; ids stay out of labels).",
            labels=["customer"],
        )
        for name, count in summary.top_customers:
            customers.add_metric([name], count)
        yield customers
        state = summary.breaker
        yield GaugeMetricFamily(
            "merchant_breaker_open",
            "1 while the internal system's circuit breaker is open (no search is published).",
            value=1 if state.open else 0,
        )
        yield GaugeMetricFamily(
            "merchant_breaker_changed_timestamp_seconds",
            "When the breaker last opened or closed (Unix time; 0: never).",
            value=state.since,
        )
        yield GaugeMetricFamily(
            "merchant_breaker_paused_until_timestamp_seconds",
            "No search before this (a 429's Retry-After), Unix time; 0 for none.",
            value=state.paused_until,
        )
