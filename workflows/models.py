import datetime as dt
import uuid
from typing import Literal

from django.db import models
from django.db.models import Q
from django.utils import timezone
from django_fsm import ConcurrentTransitionMixin, FSMField, transition


class Status(models.TextChoices):
    RECEIVED = "RECEIVED"
    IN_PROGRESS = "IN_PROGRESS"
    REQUESTED = "REQUESTED"
    REVIEW = "REVIEW"
    LINKED = "LINKED"
    NO_RESULTS = "NO_RESULTS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


# Pending states must each reach an end state; at most one per customer patient.
PENDING_STATES = (
    Status.RECEIVED,
    Status.IN_PROGRESS,
    Status.REQUESTED,
    Status.REVIEW,
    Status.LINKED,
    Status.NO_RESULTS,
)
# What the reconciliation sweep re-queues. REVIEW waits for a person, not for a machine: the
# sweep reports it (stuck report) but never re-runs it, so no automatic run can overtake the
# operator's decision.
SWEPT_STATES = tuple(s for s in PENDING_STATES if s != Status.REVIEW)
TERMINAL_STATES = (Status.COMPLETED, Status.FAILED)


class RequestType(models.TextChoices):
    LINK = "LINK"


class Result(models.TextChoices):
    LINKED = "LINKED"
    NO_RESULTS = "NO_RESULTS"


# The state machine's transitions by name, for the services that apply them (a Step, an
# operator's action): a misspelt one is a type error, and tests/workflows/test_state_machine.py
# holds this list equal to the transitions Workflow declares.
TransitionName = Literal[
    "start",
    "request_search",
    "request_review",
    "mark_linked",
    "mark_no_results",
    "complete",
    "fail",
    "requeue",
]
# The transitions into an end state (COMPLETED, FAILED).
EndingName = Literal["complete", "fail"]


class Workflow(ConcurrentTransitionMixin, models.Model):
    """One accepted request, tracked until it reaches COMPLETED or FAILED.

    Transitions change fields only; the services save them (with optimistic locking on the
    status) and run side effects after the commit.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    request_id = models.UUIDField(unique=True, default=uuid.uuid4, editable=False)
    # Indexed by workflow_customer_patient, which starts with it.
    customer = models.ForeignKey(
        "merchant.Customer", on_delete=models.PROTECT, related_name="workflows", db_index=False
    )
    # The customer's own patient id (not ours): what the customer asked us to link.
    patient_id = models.UUIDField()
    request_type = models.CharField(
        max_length=16, choices=RequestType.choices, default=RequestType.LINK
    )
    status = FSMField(
        max_length=16, choices=Status.choices, default=Status.RECEIVED, protected=True
    )
    result = models.CharField(max_length=16, choices=Result.choices, null=True, blank=True)
    reason = models.TextField(blank=True, default="")
    # Consumer claims so far (each Celery try counts): bounds a poison message that crashes
    # workers, which Celery alone would redeliver forever.
    attempts = models.PositiveIntegerField(default=0)
    # Re-dispatches by the reconciliation sweep, for operators; not capped: a re-queue whose
    # message finds nothing to do costs nothing, and one that re-runs the work is an attempt.
    requeues = models.PositiveIntegerField(default=0)
    # The consumer currently working on it; a claim expires at claimed_until (crashed worker).
    claim_id = models.UUIDField(null=True, blank=True)
    claimed_until = models.DateTimeField(null=True, blank=True)
    # Not ended by then, it is FAILED ("deadline exceeded"): its 202 (or an operator's re-queue)
    # + WORKFLOW_DEADLINE_SECONDS. NULL only on rows older than the column (their 202 + it).
    deadline_at = models.DateTimeField(null=True, blank=True)
    # The schedule (workflows/scheduler.py). due_at: when a pending workflow that no consumer has
    # is next to run (its 202; after a retry's backoff; when the internal system is back); NULL
    # while it is in flight or waits on something else (a person, an asynchronous search).
    # published_at: when its queue message was published; NULL once it ended or was put back.
    # A workflow is in flight from its publication to its ending or put-back.
    due_at = models.DateTimeField(null=True, blank=True, default=timezone.now)
    published_at = models.DateTimeField(null=True, blank=True)
    # Where this request's webhook goes when it is not the customer's registered URL.
    webhook_url = models.URLField(max_length=2000, blank=True, default="")
    # The internal system's asynchronous search job; NULL until a search answers 202.
    search_id = models.CharField(max_length=200, null=True, blank=True, unique=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=Status.values), name="workflow_status_valid"
            ),
            models.CheckConstraint(
                condition=Q(result__isnull=True) | Q(result__in=Result.values),
                name="workflow_result_valid",
            ),
            # "Already in progress" is an invariant, not only a check: two concurrent requests
            # for one patient cannot both create a pending workflow.
            models.UniqueConstraint(
                fields=["customer", "patient_id"],
                condition=Q(status__in=PENDING_STATES),
                name="workflow_one_pending_per_patient",
            ),
        ]
        indexes = [
            # The reconciliation sweep reads only the rows it re-queues, oldest first.
            models.Index(
                fields=["updated_at"],
                condition=Q(status__in=SWEPT_STATES),
                name="workflow_pending_updated",
            ),
            # The scheduler's due work, each customer's oldest first.
            models.Index(
                fields=["customer", "due_at"],
                condition=Q(due_at__isnull=False),
                name="workflow_due",
            ),
            # The work in flight: the scheduler counts it and looks in it for lost work.
            models.Index(
                fields=["published_at"],
                condition=Q(published_at__isnull=False),
                name="workflow_in_flight",
            ),
            # The sweep's expiry of reviews nobody decided (REVIEW_TIMEOUT_SECONDS).
            models.Index(
                fields=["updated_at"],
                condition=Q(status=Status.REVIEW),
                name="workflow_review_updated",
            ),
            # A patient's workflows, whatever their status; and a customer's (its prefix). Every
            # index that starts with customer_id must go on to something as selective: given
            # (customer_id, status) the planner used it, with stale statistics, for a quarter
            # of the acks' "nothing pending for this patient" check, reading every pending
            # workflow of the customer.
            models.Index(fields=["customer", "patient_id"], name="workflow_customer_patient"),
        ]

    def __str__(self) -> str:
        return f"{self.id} {self.status}"

    # --- transitions: fields only; the services save and record them ---------------------------
    # Each takes `reason` (kept in the timeline); only the outcomes that explain themselves to
    # the customer (NO_RESULTS, FAILED) also store it on the workflow.

    @transition(field=status, source=Status.RECEIVED, target=Status.IN_PROGRESS)
    def start(self, *, reason: str = "") -> None:
        pass

    # REQUESTED -> REQUESTED: the job was lost on the internal side and the search sent again.
    @transition(
        field=status, source=[Status.IN_PROGRESS, Status.REQUESTED], target=Status.REQUESTED
    )
    def request_search(self, *, search_id: str, reason: str = "") -> None:
        self.search_id = search_id

    @transition(field=status, source=[Status.IN_PROGRESS, Status.REQUESTED], target=Status.REVIEW)
    def request_review(self, *, reason: str = "") -> None:
        pass

    @transition(
        field=status,
        source=[Status.IN_PROGRESS, Status.REQUESTED, Status.REVIEW],
        target=Status.LINKED,
    )
    def mark_linked(self, *, reason: str = "") -> None:
        self.result = Result.LINKED

    @transition(
        field=status,
        source=[Status.IN_PROGRESS, Status.REQUESTED, Status.REVIEW],
        target=Status.NO_RESULTS,
    )
    def mark_no_results(self, *, reason: str = "", public_reason: str | None = None) -> None:
        # `public_reason` when the timeline's reason is not for the customer (an operator's note).
        self.result = Result.NO_RESULTS
        self.reason = reason if public_reason is None else public_reason

    @transition(field=status, source=[Status.LINKED, Status.NO_RESULTS], target=Status.COMPLETED)
    def complete(self, *, reason: str = "") -> None:
        pass

    @transition(field=status, source=list(PENDING_STATES), target=Status.FAILED)
    def fail(self, *, reason: str) -> None:
        self.reason = reason

    @transition(field=status, source=Status.FAILED, target=Status.RECEIVED)
    def requeue(self, *, deadline_at: dt.datetime, reason: str = "") -> None:
        # An operator's fresh start: the attempt budget, the deadline and the old outcome are
        # reset; due at once.
        self.deadline_at = deadline_at
        self.due_at = timezone.now()
        self.published_at = None
        self.attempts = 0
        self.requeues = 0
        self.claim_id = None
        self.claimed_until = None
        self.result = None
        self.reason = ""
        self.search_id = None


class WorkflowTransition(models.Model):
    """Append-only timeline of a workflow: every change of status, when, why and by whom."""

    # Indexed by transition_workflow_at, which starts with it.
    workflow = models.ForeignKey(
        Workflow, on_delete=models.CASCADE, related_name="transitions", db_index=False
    )
    source = models.CharField(max_length=16, blank=True)  # "" for the creation
    target = models.CharField(max_length=16)
    reason = models.TextField(blank=True, default="")
    actor = models.CharField(max_length=150, default="system")
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["at", "id"]
        indexes = [models.Index(fields=["workflow", "at"], name="transition_workflow_at")]

    def __str__(self) -> str:
        return f"{self.source or '-'} -> {self.target}"


class DeliveryStatus(models.TextChoices):
    PENDING = "PENDING"
    DELIVERED = "DELIVERED"
    EXHAUSTED = "EXHAUSTED"  # the retry schedule ran out, or the URL can never be delivered to
    DISABLED = "DISABLED"  # the customer's endpoint answered 410 Gone, or was disabled before


class WebhookDelivery(models.Model):
    """One webhook message (Standard Webhooks) and its delivery state; retries are rows, not
    Celery countdowns: beat sends whatever is due."""

    webhook_id = models.CharField(max_length=64, unique=True)  # the same on every retry
    workflow = models.ForeignKey(Workflow, on_delete=models.CASCADE, related_name="deliveries")
    # The terminal transition this message announces: one message per ending (a workflow an
    # operator re-queues can end, and be announced, again). None for other events (de-link).
    transition = models.OneToOneField(
        WorkflowTransition,
        on_delete=models.PROTECT,
        related_name="delivery",
        null=True,
        blank=True,
    )
    customer = models.ForeignKey(
        "merchant.Customer", on_delete=models.PROTECT, related_name="webhook_deliveries"
    )
    event_type = models.CharField(max_length=32)
    url = models.URLField(max_length=2000)
    # The exact body that is signed and sent, byte for byte the same on every retry.
    payload = models.TextField()
    status = models.CharField(
        max_length=16, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING
    )
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "webhook deliveries"
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=DeliveryStatus.values), name="delivery_status_valid"
            ),
            models.CheckConstraint(
                condition=~Q(status=DeliveryStatus.PENDING) | Q(next_attempt_at__isnull=False),
                name="delivery_pending_has_next_attempt",
            ),
        ]
        indexes = [
            models.Index(
                fields=["next_attempt_at"],
                condition=Q(status=DeliveryStatus.PENDING),
                name="delivery_due",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.webhook_id} {self.event_type} {self.status}"


class WebhookAttempt(models.Model):
    """The delivery log: one row per HTTP attempt."""

    delivery = models.ForeignKey(
        WebhookDelivery, on_delete=models.CASCADE, related_name="attempt_log"
    )
    at = models.DateTimeField(default=timezone.now)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    latency_ms = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["at", "id"]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.status_code or self.error}"
