"""Prometheus metrics (docs/operations.md "Metrics"): what is counted, and where it is exposed.

Web: `GET /metrics` (a plain Django view: no customer token, throttle or schema entry), allowed
with `Authorization: Bearer <METRICS_TOKEN>`, or, when METRICS_TOKEN is empty, from loopback and
private addresses only. Workers: their own HTTP server on METRICS_WORKER_PORT (worker_ready).

With PROMETHEUS_MULTIPROC_DIR set, every process writes its samples to files there and a scrape
adds them up (gunicorn's workers are separate processes: one process's counters alone would be a
random fraction); without it, each process's own registry is served.

Labels are small fixed sets (outcome, status, operation, kind, state), never an id: no patient
data, and no series per customer.

Built on prometheus_client (the library), not django-prometheus: that adds per-view and
per-model series through two middleware on every request, and serves its view to anyone (no
token); the series that matter here (acks, time to a final state, search latency, webhook
attempts, dispatcher and sweep counts) are ours either way.
"""

import datetime as dt
import functools
import hmac
import ipaddress
import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any, ParamSpec, TypeVar

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework.views import APIView

from merchant.problems import PROBLEM_CONTENT_TYPE, PROBLEMS, problem_body

# prometheus_client picks its storage when first imported, from the variable's mere presence:
# an empty one (`PROMETHEUS_MULTIPROC_DIR=` from an env file) would put the files in the working
# directory. Empty means off here. The directory is made if missing (a missing one fails later,
# on the first sample).
_MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
if _MULTIPROC_DIR:
    os.makedirs(_MULTIPROC_DIR, exist_ok=True)
else:
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

from prometheus_client import (  # noqa: E402
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric  # noqa: E402
from prometheus_client.exposition import choose_encoder  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402

# No `*_created` series: a counter's start time is noise next to its value (and multiprocess
# mode has none), so every exposition looks the same.
disable_created_metrics()

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# --- the metrics ---------------------------------------------------------------------------------

LINK_ACKS = Counter(
    "merchant_link_acks",
    "POST /link answers, by outcome (accepted, replayed, or the problem type's slug) and status.",
    ["outcome", "status"],
)
LINK_ACK_SECONDS = Histogram(
    "merchant_link_ack_seconds",
    "Time to answer POST /link, inside the view (authentication, throttle, validation, the "
    "transaction, the response).",
    buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
WORKFLOW_TERMINAL_SECONDS = Histogram(
    "merchant_workflow_time_to_terminal_seconds",
    "From the 202 (the workflow's creation) to COMPLETED or FAILED, observed at that commit.",
    ["status"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 21600, 86400),
)
INTERNAL_SEARCH_SECONDS = Histogram(
    "merchant_internal_search_seconds",
    "Calls to the internal system, errors included, by operation (match, poll, read).",
    ["operation"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SEARCH_ERROR_KINDS = (
    "timeout",
    "connection",
    "unavailable",
    "refused",
    "invalid_response",
    "job_lost",
    "other",
)
INTERNAL_SEARCH_ERRORS = Counter(
    "merchant_internal_search_errors",
    "Calls to the internal system that failed, by operation and kind (timeout, connection, "
    "unavailable, refused, invalid_response, job_lost, other).",
    ["operation", "kind"],
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
    "Queue messages of accepted workflows the dispatcher published (catch-ups included).",
)
RECONCILE_RUNS = Counter("merchant_reconcile_runs", "Reconciliation sweeps run.")
RECONCILE_REQUEUED = Counter(
    "merchant_reconcile_requeued", "Stale pending workflows re-queued by the sweep."
)
RECONCILE_FAILED = Counter(
    "merchant_reconcile_failed", "Stale workflows the sweep failed (out of attempts)."
)

# Series that exist (at 0) from the start, so that the alert rules' ratios have a denominator
# and a first failure shows as an increase.
for _outcome, _status in (
    ("accepted", 202),
    ("replayed", 202),
    ("internal-error", 500),
    ("service-unavailable", 503),
):
    LINK_ACKS.labels(_outcome, str(_status))
for _outcome in ("delivered", "retrying", "exhausted", "disabled"):
    WEBHOOK_ATTEMPTS.labels(_outcome)
for _operation in ("match", "poll", "read"):
    INTERNAL_SEARCH_SECONDS.labels(_operation)
    for _kind in SEARCH_ERROR_KINDS:
        INTERNAL_SEARCH_ERRORS.labels(_operation, _kind)

# --- the ack path: one counter increment and one histogram observation per request -------------

_PROBLEM_SLUGS = {problem.uri: slug for slug, problem in PROBLEMS.items()}
# (outcome, status) -> its counter child: labels() validates and locks on every call.
_ack_children: dict[tuple[str, int], Any] = {}


def _ack_outcome(response: HttpResponseBase) -> str:
    if response.status_code == 202:
        return "replayed" if response.has_header("Idempotent-Replayed") else "accepted"
    data = getattr(response, "data", None)
    slug = _PROBLEM_SLUGS.get(data.get("type", "")) if isinstance(data, dict) else None
    return slug or "other"  # only catalogued slugs: the label set stays bounded


def _ack_observe(outcome: str, status: int, started: float) -> None:
    LINK_ACK_SECONDS.observe(time.perf_counter() - started)
    child = _ack_children.get((outcome, status))
    if child is None:
        child = _ack_children[(outcome, status)] = LINK_ACKS.labels(outcome, str(status))
    child.inc()


class AckMeteredApi(APIView):
    """Base of POST /link's view: counts every POST answer by outcome and times it. DRF's
    dispatch runs authentication, the throttle and the handler and turns every exception into
    a problem response, so all outcomes (401, 429, 503 ...) pass here."""

    def dispatch(self, request: Any, *args: Any, **kwargs: Any) -> HttpResponseBase:
        started = time.perf_counter()
        try:
            response = super().dispatch(request, *args, **kwargs)
        except BaseException:
            if request.method == "POST":
                _ack_observe("internal-error", 500, started)
            raise
        if request.method == "POST":
            _ack_observe(_ack_outcome(response), response.status_code, started)
        return response


# --- the worker side ---------------------------------------------------------------------------


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


def reconcile_ran(*, requeued: int, failed: int) -> None:
    RECONCILE_RUNS.inc()
    RECONCILE_REQUEUED.inc(requeued)
    RECONCILE_FAILED.inc(failed)


def worker_metrics_server_start() -> None:
    """The worker's own /metrics on METRICS_WORKER_PORT (0: none). Called on worker_ready."""
    port = settings.METRICS_WORKER_PORT
    if not port:
        return
    try:
        start_http_server(port, settings.METRICS_WORKER_ADDR, registry=_process_registry())
    except OSError as exc:
        # Another worker on this host holds the port: this one goes unscraped, but works.
        logger.warning("worker metrics server not started on port %s: %s", port, exc)
        return
    logger.info("worker metrics on %s:%s", settings.METRICS_WORKER_ADDR, port)


# --- the scrape ----------------------------------------------------------------------------------


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


class _ProcessMetrics(Collector):
    """This process's default registry, inside another registry."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def _process_registry() -> CollectorRegistry:
    """Every process's samples in multiprocess mode, else this process's own."""
    registry = CollectorRegistry()
    if _MULTIPROC_DIR:
        MultiProcessCollector(registry, path=_MULTIPROC_DIR)
    else:
        registry.register(_ProcessMetrics())
    return registry


@functools.cache
def _web_registry() -> CollectorRegistry:
    registry = _process_registry()
    registry.register(WorkflowCollector())
    return registry


def _private(remote_addr: str) -> bool:
    try:
        address = ipaddress.ip_address(remote_addr)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or address.is_private


def _refused(request: HttpRequest) -> JsonResponse | None:
    token: str = settings.METRICS_TOKEN
    if token:
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            presented.strip().encode(), token.encode()
        ):
            return None
        body = problem_body(
            "unauthorized",
            detail="GET /metrics needs Authorization: Bearer <METRICS_TOKEN>.",
            instance=request.path,
        )
        response = JsonResponse(body, status=401, content_type=PROBLEM_CONTENT_TYPE)
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    if _private(request.META.get("REMOTE_ADDR", "")):
        return None
    body = problem_body(
        "forbidden",
        detail="GET /metrics is served to loopback and private addresses only, or with "
        "METRICS_TOKEN.",
        instance=request.path,
    )
    return JsonResponse(body, status=403, content_type=PROBLEM_CONTENT_TYPE)


@csrf_exempt
def metrics_view(request: HttpRequest) -> HttpResponse:
    """`GET /metrics`: every web process's metrics and the workflow counts."""
    if request.method not in ("GET", "HEAD"):
        body = problem_body("method-not-allowed", instance=request.path)
        response = JsonResponse(body, status=405, content_type=PROBLEM_CONTENT_TYPE)
        response["Allow"] = "GET, HEAD"
        return response
    refused = _refused(request)
    if refused is not None:
        return refused
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encoder(_web_registry()), content_type=content_type)
