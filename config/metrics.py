"""Prometheus metrics (docs/operations.md "Metrics"): where they are exposed. Each app defines
and records its own (linking/metrics.py, workflows/metrics.py); this module serves them.

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

import functools
import hmac
import ipaddress
import logging
from collections.abc import Iterator

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from merchant.problems import PROBLEM_CONTENT_TYPE, problem_body
from workflows.metrics import WorkflowCollector
from workflows.scheduler import ScheduleCollector

# No `*_created` series: a counter's start time is noise next to its value (and multiprocess
# mode has none), so every exposition looks the same.
disable_created_metrics()

logger = logging.getLogger(__name__)


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


class _ProcessMetrics(Collector):
    """This process's default registry, inside another registry."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def _process_registry() -> CollectorRegistry:
    """Every process's samples in multiprocess mode, else this process's own."""
    registry = CollectorRegistry()
    if settings.PROMETHEUS_MULTIPROC_DIR:
        MultiProcessCollector(registry, path=settings.PROMETHEUS_MULTIPROC_DIR)
    else:
        registry.register(_ProcessMetrics())
    return registry


@functools.cache
def _web_registry() -> CollectorRegistry:
    registry = _process_registry()
    registry.register(WorkflowCollector())
    registry.register(ScheduleCollector())
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
