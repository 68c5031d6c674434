"""The link use case's Prometheus metrics: POST /link's answers and their time, and the calls to
the internal system (docs/operations.md "Metrics"). Exposed by config/metrics.py with every
other process-level metric; the multiprocess storage is settled by config/settings.py before
any of these is created.

Labels are small fixed sets, never an id: no patient data, and no series per customer.
"""

import time
from typing import Any

from django.http import HttpResponseBase
from prometheus_client import Counter, Histogram
from rest_framework.views import APIView

from merchant.problems import PROBLEMS

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
INTERNAL_SEARCH_SECONDS = Histogram(
    "merchant_internal_search_seconds",
    "Calls to the internal system, errors included, by operation (match, poll, read, probe).",
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

# Series that exist (at 0) from the start, so that the alert rules' ratios have a denominator
# and a first failure shows as an increase.
for _outcome, _status in (
    ("accepted", 202),
    ("replayed", 202),
    ("internal-error", 500),
    ("service-unavailable", 503),
):
    LINK_ACKS.labels(_outcome, str(_status))
for _operation in ("match", "poll", "read", "probe"):
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
