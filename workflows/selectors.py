"""Reads for ops (stuck workflows and the report beat logs) and for the consumer (claims held)."""

import datetime as dt
from typing import Any

from django.conf import settings
from django.db.models import Count, Max, Min, OuterRef, Q, QuerySet, Subquery
from django.utils import timezone

from workflows.models import (
    PENDING_STATES,
    TERMINAL_STATES,
    DeliveryStatus,
    Status,
    WebhookDelivery,
    Workflow,
    WorkflowTransition,
)

# Age buckets of the stuck report, in seconds since the last update.
AGE_BUCKETS: list[tuple[str, int]] = [
    ("<1h", 3600),
    ("1h-24h", 86400),
    (">24h", 10**9),
]


def workflows_stuck(*, older_than_seconds: int | None = None) -> QuerySet[Workflow]:
    """Pending workflows not updated for `older_than_seconds` (default: the sweep threshold)."""
    seconds = (
        older_than_seconds
        if older_than_seconds is not None
        else settings.RECONCILE_STALE_AFTER_SECONDS
    )
    cutoff = timezone.now() - dt.timedelta(seconds=seconds)
    return Workflow.objects.filter(status__in=PENDING_STATES, updated_at__lt=cutoff)


def workflows_stuck_report(
    *, older_than_seconds: int | None = None, sample: int = 20
) -> dict[str, Any]:
    """Counts of stuck workflows by state and age, with the oldest few ids; and the reviews
    waiting, by age and reviewer (each ends at REVIEW_TIMEOUT_SECONDS: the sweep expires it)."""
    stuck = workflows_stuck(older_than_seconds=older_than_seconds)
    now = timezone.now()
    by_state = {row["status"]: row["n"] for row in stuck.values("status").annotate(n=Count("id"))}
    oldest = stuck.aggregate(oldest=Min("updated_at"))["oldest"]
    reviews = Workflow.objects.filter(status=Status.REVIEW)
    return {
        "total": sum(by_state.values()),
        "by_state": by_state,
        "by_age": _by_age(stuck, now),
        "oldest_updated_at": oldest.isoformat() if oldest else None,
        "oldest": [
            str(i) for i in stuck.order_by("updated_at").values_list("id", flat=True)[:sample]
        ],
        "reviews": {
            "total": reviews.count(),
            "by_reviewer": {
                row["customer__review_by"]: row["n"]
                for row in reviews.values("customer__review_by").annotate(n=Count("id"))
            },
            "by_age": _by_age(reviews, now),
            "timeout_seconds": settings.REVIEW_TIMEOUT_SECONDS,
            "oldest": [
                str(i) for i in reviews.order_by("updated_at").values_list("id", flat=True)[:sample]
            ],
        },
    }


def _by_age(workflows: QuerySet[Workflow], now: dt.datetime) -> dict[str, int]:
    """How many were last updated in each AGE_BUCKETS bucket."""
    by_age: dict[str, int] = {}
    lower = 0
    for label, upper in AGE_BUCKETS:
        by_age[label] = workflows.filter(
            updated_at__lte=now - dt.timedelta(seconds=lower),
            updated_at__gt=now - dt.timedelta(seconds=upper),
        ).count()
        lower = upper
    return by_age


# --- The ops console's dashboard (admin: /admin/workflows/workflow/dashboard/) ------------------

# Time in the current state (since the last update), for the pending states.
DASHBOARD_AGES: list[tuple[str, int | None]] = [
    ("<1 min", 60),
    ("1-10 min", 600),
    ("10-60 min", 3600),
    ("1-24 h", 86400),
    (">24 h", None),
]
TERMINAL_WINDOW_HOURS = 24


def ops_dashboard(*, sample: int = 20) -> dict[str, Any]:
    """What an operator checks first: pending work by state and age, what is stuck, what failed
    and why, which customers' webhook endpoints fail, and the reviews waiting. A handful of
    queries, each bounded (terminal counts over the last day only), so it stays quick on a large
    table."""
    now = timezone.now()
    buckets: dict[str, Any] = {}
    lower = 0
    for label, upper in DASHBOARD_AGES:
        condition = Q(updated_at__lte=now - dt.timedelta(seconds=lower))
        if upper is not None:
            condition &= Q(updated_at__gt=now - dt.timedelta(seconds=upper))
        buckets[label] = Count("id", filter=condition)
        lower = upper or lower
    pending_rows = {
        row["status"]: row
        for row in Workflow.objects.filter(status__in=PENDING_STATES)
        .values("status")
        .annotate(total=Count("id"), **{f"age_{i}": v for i, v in enumerate(buckets.values())})
    }
    pending = [
        {
            "status": str(state),
            "total": pending_rows.get(state, {}).get("total", 0),
            "ages": [pending_rows.get(state, {}).get(f"age_{i}", 0) for i in range(len(buckets))],
        }
        for state in PENDING_STATES
    ]
    since = now - dt.timedelta(hours=TERMINAL_WINDOW_HOURS)
    terminal = {
        row["status"]: row["n"]
        for row in Workflow.objects.filter(status__in=TERMINAL_STATES, updated_at__gte=since)
        .values("status")
        .annotate(n=Count("id"))
    }
    stuck = workflows_stuck()
    failing_endpoints = (
        WebhookDelivery.objects.filter(
            Q(status=DeliveryStatus.PENDING, attempts__gt=0)
            | Q(
                status__in=[DeliveryStatus.EXHAUSTED, DeliveryStatus.DISABLED],
                updated_at__gte=since,
            )
        )
        .values("customer_id", "customer__name", "customer__webhook_enabled", "url")
        .annotate(
            retrying=Count("id", filter=Q(status=DeliveryStatus.PENDING)),
            exhausted=Count("id", filter=Q(status=DeliveryStatus.EXHAUSTED)),
            disabled=Count("id", filter=Q(status=DeliveryStatus.DISABLED)),
            last_failure=Max("updated_at"),
        )
        .order_by("-last_failure")[:sample]
    )
    reviews = Workflow.objects.filter(status=Status.REVIEW)
    return {
        "now": now,
        "age_labels": [label for label, _ in DASHBOARD_AGES],
        "pending": pending,
        "pending_total": sum(row["total"] for row in pending),
        "terminal_window_hours": TERMINAL_WINDOW_HOURS,
        "terminal": [{"status": str(s), "total": terminal.get(s, 0)} for s in TERMINAL_STATES],
        "stuck_after_seconds": settings.RECONCILE_STALE_AFTER_SECONDS,
        "stuck_total": stuck.count(),
        "stuck": list(stuck.select_related("customer").order_by("updated_at")[:sample]),
        "failures": list(
            Workflow.objects.filter(status=Status.FAILED)
            .select_related("customer")
            .order_by("-updated_at")[:sample]
        ),
        "failing_endpoints": list(failing_endpoints),
        "reviews_total": reviews.count(),
        "review_timeout": dt.timedelta(seconds=settings.REVIEW_TIMEOUT_SECONDS),
        "reviews": list(
            reviews.select_related("customer")
            .annotate(
                # Why it went to review: said by the transition (the row's reason is FAILED's).
                review_reason=Subquery(
                    WorkflowTransition.objects.filter(workflow=OuterRef("pk"), target=Status.REVIEW)
                    .order_by("-at")
                    .values("reason")[:1]
                )
            )
            .order_by("updated_at")[:sample]
        ),
    }
