"""The workflows' Prometheus metrics: time to a final state, webhook attempts, the dispatcher,
the sweep, and the workflow counts read at scrape time (docs/operations.md "Metrics"). Exposed
by config/metrics.py; the multiprocess storage is settled by config/settings.py before any of
these is created.

Labels are small fixed sets, never an id: no patient data, and no series per customer (but for
the few customers with the most due work, by name).
"""

import datetime as dt
import logging
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

WORKFLOW_TERMINAL_SECONDS = Histogram(
    "merchant_workflow_time_to_terminal_seconds",
    "From the 202 (the workflow's creation) to COMPLETED or FAILED, observed at that commit.",
    ["status"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 21600, 86400),
)
WEBHOOK_ATTEMPTS = Counter(
    "merchant_webhook_attempts",
    "Webhook delivery attempts, by the delivery's state after it (delivered, retrying, "
    "exhausted, disabled).",
    ["outcome"],
)
DISPATCHER_LEADING = Gauge(
    "merchant_dispatcher_leading",
    "1 while this process's dispatcher holds the lead (publishes accepted workflows), else 0.",
    # Across processes sharing PROMETHEUS_MULTIPROC_DIR: how many of the live ones lead.
    multiprocess_mode="livesum",
)
DISPATCHER_PUBLISHED = Counter(
    "merchant_dispatcher_published",
    "Workflows the scheduler published to the queue (each is one id in a message of up to "
    "WORKER_BATCH_SIZE; taken-back work published again included).",
)
SCHEDULER_RECOVERED = Counter(
    "merchant_scheduler_recovered",
    "Workflows in flight that nobody was doing, made due again by the scheduler: their claim's "
    "lease ended (worker died), or their message was not taken within the stale window (lost).",
    ["why"],
)
BREAKER_TRANSITIONS = Counter(
    "merchant_breaker_transitions",
    "Changes of the internal system's circuit breaker, by the state it changed to.",
    ["to"],
)
RECONCILE_RUNS = Counter("merchant_reconcile_runs", "Reconciliation sweeps run.")
RECONCILE_REQUEUED = Counter(
    "merchant_reconcile_requeued", "Stale pending workflows re-queued by the sweep."
)
RECONCILE_FAILED = Counter(
    "merchant_reconcile_failed", "Stale workflows the sweep failed (out of attempts)."
)

CLAIM_HEARTBEATS = Counter(
    "merchant_claim_heartbeats",
    "Claim renewals run by the workers' heartbeats (one statement each, workflows/claims.py).",
)
CLAIM_HEARTBEAT_RENEWED = Counter(
    "merchant_claim_heartbeat_renewed", "Claims renewed by the heartbeats."
)
CLAIM_HEARTBEAT_CPU = Counter(
    "merchant_claim_heartbeat_cpu_seconds",
    "CPU time the heartbeat threads spent renewing claims (their own thread's, the statement's"
    " round trip included; PostgreSQL's side is not).",
)
CLAIM_HEARTBEAT_SECONDS = Counter(
    "merchant_claim_heartbeat_seconds",
    "Wall time of the claim renewal statements (PostgreSQL's work on them included).",
)
CLAIMS_HANDED_BACK = Counter(
    "merchant_claims_handed_back",
    "Claims a worker shutting down handed back unfinished (resumed by another, no attempt lost).",
)

# Series that exist (at 0) from the start (the alert rules' ratios need a denominator).
for _outcome in ("delivered", "retrying", "exhausted", "disabled"):
    WEBHOOK_ATTEMPTS.labels(_outcome)
for _why in ("lease_ended", "not_taken"):
    SCHEDULER_RECOVERED.labels(_why)
for _to in ("open", "closed"):
    BREAKER_TRANSITIONS.labels(_to)


def workflow_ended(*, status: str, created_at: Any) -> None:
    """Observe a workflow's time from 202 to its ending once that ending commits."""
    from django.db import transaction
    from django.utils import timezone

    def observe() -> None:
        seconds = (timezone.now() - created_at).total_seconds()
        WORKFLOW_TERMINAL_SECONDS.labels(str(status)).observe(max(0.0, seconds))

    transaction.on_commit(observe)


_WEBHOOK_OUTCOMES = {"PENDING": "retrying"}


def webhook_attempt_settled(status: str) -> None:
    WEBHOOK_ATTEMPTS.labels(_WEBHOOK_OUTCOMES.get(status, str(status).lower())).inc()


def dispatcher_leading(leading: bool) -> None:
    DISPATCHER_LEADING.set(1 if leading else 0)


def dispatcher_published(count: int) -> None:
    DISPATCHER_PUBLISHED.inc(count)


def scheduler_recovered(*, lease_ended: int, not_taken: int) -> None:
    SCHEDULER_RECOVERED.labels("lease_ended").inc(lease_ended)
    SCHEDULER_RECOVERED.labels("not_taken").inc(not_taken)


def breaker_changed(*, opened: bool) -> None:
    BREAKER_TRANSITIONS.labels("open" if opened else "closed").inc()


def heartbeat_ran(*, renewed: int, cpu_seconds: float, seconds: float) -> None:
    CLAIM_HEARTBEATS.inc()
    CLAIM_HEARTBEAT_RENEWED.inc(renewed)
    CLAIM_HEARTBEAT_CPU.inc(max(0.0, cpu_seconds))
    CLAIM_HEARTBEAT_SECONDS.inc(max(0.0, seconds))


def claims_handed_back(count: int) -> None:
    CLAIMS_HANDED_BACK.inc(count)


def reconcile_ran(*, requeued: int, failed: int) -> None:
    RECONCILE_RUNS.inc()
    RECONCILE_REQUEUED.inc(requeued)
    RECONCILE_FAILED.inc(failed)


class WorkflowCollector(Collector):
    """Workflows by state and the stuck ones (pending, REVIEW included, not updated for
    RECONCILE_STALE_AFTER_SECONDS: workflows.selectors.workflows_stuck), from one grouped COUNT
    at scrape time. Web only: every worker would report the same rows again."""

    def collect(self) -> Iterable[Metric]:
        from django.db import DatabaseError
        from django.db.models import Count, Q
        from django.utils import timezone

        from workflows.models import PENDING_STATES, Status, Workflow

        cutoff = timezone.now() - dt.timedelta(seconds=settings.RECONCILE_STALE_AFTER_SECONDS)
        stuck_rows = Q(status__in=PENDING_STATES, updated_at__lt=cutoff)
        up = GaugeMetricFamily(
            "merchant_workflows_collect_success",
            "1 when the workflow counts below could be read from PostgreSQL at this scrape.",
        )
        try:
            rows = {
                row["status"]: row
                for row in Workflow.objects.order_by()
                .values("status")
                .annotate(total=Count("id"), stuck=Count("id", filter=stuck_rows))
            }
        except DatabaseError as exc:
            logger.warning("metrics: workflow counts unavailable (%s)", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        total = GaugeMetricFamily(
            "merchant_workflows", "Workflows by state, now.", labels=["state"]
        )
        stuck = GaugeMetricFamily(
            "merchant_workflows_stuck",
            "Pending workflows not updated for RECONCILE_STALE_AFTER_SECONDS, by state.",
            labels=["state"],
        )
        for state in Status:
            row = rows.get(state.value, {})
            total.add_metric([state.value], row.get("total", 0))
            if state in PENDING_STATES:
                stuck.add_metric([state.value], row.get("stuck", 0))
        yield total
        yield stuck
