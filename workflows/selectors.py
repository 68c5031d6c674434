"""Reads for ops: stuck workflows and the report beat logs."""

import datetime as dt
from typing import Any

from django.conf import settings
from django.db.models import Count, Min, QuerySet
from django.utils import timezone

from workflows.models import PENDING_STATES, Workflow

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
    """Counts of stuck workflows by state and age, with the oldest few ids."""
    stuck = workflows_stuck(older_than_seconds=older_than_seconds)
    now = timezone.now()
    by_state = {row["status"]: row["n"] for row in stuck.values("status").annotate(n=Count("id"))}
    by_age: dict[str, int] = {}
    lower = 0
    for label, upper in AGE_BUCKETS:
        by_age[label] = stuck.filter(
            updated_at__lte=now - dt.timedelta(seconds=lower),
            updated_at__gt=now - dt.timedelta(seconds=upper),
        ).count()
        lower = upper
    oldest = stuck.aggregate(oldest=Min("updated_at"))["oldest"]
    return {
        "total": sum(by_state.values()),
        "by_state": by_state,
        "by_age": by_age,
        "oldest_updated_at": oldest.isoformat() if oldest else None,
        "oldest": [
            str(i) for i in stuck.order_by("updated_at").values_list("id", flat=True)[:sample]
        ],
    }
