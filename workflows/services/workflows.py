"""Workflow use cases shared by every request type: creation, transitions, publishing."""

import contextlib
import datetime as dt
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import current_app
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from django_fsm import ConcurrentTransition

from workflows import metrics, statements
from workflows.models import (
    TERMINAL_STATES,
    EndingName,
    Status,
    TransitionName,
    WebhookDelivery,
    Workflow,
)
from workflows.services.webhooks import (
    Sending,
    webhook_deliveries_start,
    webhook_delivery_new,
    webhook_delivery_send_later,
)

# The task that consumes the queue: the request type's (linking/tasks.py), named by the queue's
# contract so that this app never imports the one above it.
PROCESS_WORKFLOWS_TASK = "workflows.process_workflows"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """One transition to apply: the state machine's method, the timeline's reason, and the
    method's other keyword arguments."""

    name: TransitionName
    reason: str = ""
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class WorkflowChange:
    """One workflow's change for workflows_save: the transitions to apply in order (the state
    machine checks each), and whether the consumer's claim is dropped with them."""

    workflow: Workflow
    steps: Sequence[Step] = ()
    release: bool = False


@dataclass
class Saved:
    """What workflows_save wrote: the workflows it saved, and each ending's webhook delivery."""

    workflows: list[Workflow]
    deliveries: list[WebhookDelivery]


def workflow_transition(
    *, workflow: Workflow, name: TransitionName, actor: str, reason: str = "", **kwargs: Any
) -> Workflow:
    """Apply the transition `name`, save it and record it, atomically.

    The save is guarded by the status the row had when loaded (as ConcurrentTransitionMixin's
    own save is), so a racing transition raises ConcurrentTransition and nothing is written.
    """
    _save_one(WorkflowChange(workflow, [Step(name, reason, kwargs)]), actor=actor)
    return workflow


def _save_one(change: WorkflowChange, *, actor: str) -> WebhookDelivery | None:
    loaded = change.workflow.status
    saved = workflows_save(changes=[change], actor=actor)
    if not saved.workflows:
        raise ConcurrentTransition(f"workflow {change.workflow.id} is no longer {loaded}")
    return saved.deliveries[0] if saved.deliveries else None


def workflows_save(*, changes: Sequence[WorkflowChange], actor: str) -> Saved:
    """Apply each change's steps and save them all in one statement (one round trip, atomic):
    every workflow, each one's timeline lines in order and, for those that end (COMPLETED or
    FAILED), the customer's webhook delivery, tied to the terminal line.

    The state machine's own checks run first: a refused transition raises before anything is
    written. Each save is guarded by the status its row had when loaded: a workflow a racing
    transition moved meanwhile is left out (with its lines and delivery), not an error; the
    caller learns which were saved. Call inside the caller's transaction when the rows must
    commit with others (the linking records of an ending)."""
    now = timezone.now()
    rows: dict[str, list[Any]] = {name: [] for name in _SAVE_COLUMNS}
    lines: dict[str, list[Any]] = {name: [] for name in _LINE_COLUMNS}
    deliveries: dict[str, list[Any]] = {name: [] for name in _DELIVERY_COLUMNS}
    pending: dict[uuid.UUID, WebhookDelivery] = {}
    by_id: dict[uuid.UUID, Workflow] = {}
    for change in changes:
        workflow = change.workflow
        loaded = workflow.status
        for step in change.steps:
            source = workflow.status
            getattr(workflow, step.name)(reason=step.reason, **step.kwargs)
            for name, value in zip(
                _LINE_COLUMNS,
                (workflow.id, source, workflow.status, step.reason, actor, now),
                strict=True,
            ):
                lines[name].append(value)
        if change.release:
            # It waits on something else now (a person, an asynchronous search's callback).
            workflow.claim_id = None
            workflow.claimed_until = None
            workflow.published_at = None
        if workflow.status in TERMINAL_STATES or workflow.status == Status.REVIEW:
            # Off the schedule: ended, or a person's to decide.
            workflow.due_at = None
            workflow.published_at = None
        workflow.updated_at = now
        by_id[workflow.id] = workflow
        for name, value in zip(
            _SAVE_COLUMNS,
            (
                workflow.id,
                loaded,
                workflow.status,
                workflow.result,
                workflow.reason,
                workflow.search_id,
                workflow.attempts,
                workflow.requeues,
                workflow.claim_id,
                workflow.claimed_until,
                workflow.deadline_at,
                workflow.due_at,
                workflow.published_at,
                now,
            ),
            strict=True,
        ):
            rows[name].append(value)
        if change.steps and workflow.status in TERMINAL_STATES:
            delivery = webhook_delivery_new(workflow=workflow)
            pending[workflow.id] = delivery
            for name, value in zip(
                _DELIVERY_COLUMNS,
                (
                    workflow.id,
                    workflow.status,
                    delivery.webhook_id,
                    delivery.customer_id,
                    delivery.event_type,
                    delivery.url,
                    delivery.payload,
                    delivery.created_at,
                ),
                strict=True,
            ):
                deliveries[name].append(value)
    if not changes:
        return Saved([], [])
    params = rows | {f"line_{k}": v for k, v in lines.items()}
    params |= {f"delivery_{k}": v for k, v in deliveries.items()}
    saved = Saved([], [])
    for kind, workflow_id, delivery_id in statements.execute(statements.SAVE, params):
        if kind == "w":
            workflow = by_id[workflow_id]
            # What ConcurrentTransitionMixin.save does after saving: later saves are guarded
            # on the new status.
            workflow._update_initial_state()
            saved.workflows.append(workflow)
        else:
            delivery = pending[workflow_id]
            delivery.id = delivery_id
            delivery._state.adding = False  # as save() leaves it: the row exists
            saved.deliveries.append(delivery)
    return saved


_SAVE_COLUMNS = (
    "id",
    "loaded",
    "status",
    "result",
    "reason",
    "search_id",
    "attempts",
    "requeues",
    "claim_id",
    "claimed_until",
    "deadline_at",
    "due_at",
    "published_at",
    "updated_at",
)
_LINE_COLUMNS = ("workflow", "source", "target", "reason", "actor", "at")
_DELIVERY_COLUMNS = (
    "workflow",
    "target",
    "webhook_id",
    "customer",
    "event",
    "url",
    "payload",
    "at",
)


# Where an accepted workflow is announced to the dispatcher (workflows/dispatcher.py): the
# notification's payload is the workflow's id, nothing else.
WORKFLOW_CHANNEL = "workflows_received"


def workflow_announcement(*, workflow_id: uuid.UUID) -> list[str]:
    """pg_notify's arguments for this workflow: the channel, and the workflow id."""
    return [WORKFLOW_CHANNEL, str(workflow_id)]


def workflows_publish(*, workflow_ids: Sequence[uuid.UUID | str]) -> int:
    """Send these workflows to the queue, WORKER_BATCH_SIZE ids per message (each message is
    one task of PROCESS_WORKFLOWS_TASK); how many ids the broker took.

    Only the scheduler publishes (workflows/scheduler.py). Messages carry ids only, never
    demographics. A failure is logged and swallowed, and its batch counts as none sent: the
    scheduler makes what was not sent due again (a duplicate message is harmless: consumers
    claim the rows)."""
    ids = [str(workflow_id) for workflow_id in workflow_ids]
    size = settings.WORKER_BATCH_SIZE
    sent = 0
    try:
        with current_app.producer_or_acquire() as producer:
            for start in range(0, len(ids), size):
                batch = ids[start : start + size]
                current_app.send_task(PROCESS_WORKFLOWS_TASK, args=(batch,), producer=producer)
                sent += len(batch)
    except Exception as exc:
        logger.warning(
            "publish failed for workflow %s%s (%s)",
            ids[sent] if sent < len(ids) else None,
            f" and {len(ids) - sent - 1} others" if len(ids) - sent > 1 else "",
            type(exc).__name__,
        )
    return sent


def workflows_queued() -> int | None:
    """How many messages wait in the workflows' queue, as the broker counts them (not those a
    worker already holds); None when the broker could not be asked. A passive declare: it
    creates nothing (on Redis an empty queue is no key at all: 0)."""
    try:
        with current_app.connection_for_write() as connection_:
            channel: Any = connection_.default_channel  # kombu's stubs lack queue_declare
            try:
                declared = channel.queue_declare(
                    queue=settings.CELERY_TASK_DEFAULT_QUEUE, passive=True
                )
            except connection_.channel_errors:
                return 0
            return int(declared.message_count)
    except Exception as exc:
        logger.warning("the broker could not say how many messages wait (%s)", type(exc).__name__)
        return None


# The reason of a workflow ended by its deadline (WORKFLOW_DEADLINE_SECONDS).
DEADLINE_EXCEEDED = "deadline exceeded"


def workflow_deadline(*, workflow: Workflow) -> dt.datetime:
    """When the workflow is FAILED if it has not ended (rows from before the column: their 202
    + WORKFLOW_DEADLINE_SECONDS)."""
    if workflow.deadline_at is not None:
        return workflow.deadline_at
    return workflow.created_at + dt.timedelta(seconds=settings.WORKFLOW_DEADLINE_SECONDS)


def workflow_past_deadline(*, workflow: Workflow, now: dt.datetime | None = None) -> bool:
    return workflow_deadline(workflow=workflow) <= (now or timezone.now())


def workflow_claim(*, workflow_id: uuid.UUID | str, actor: str) -> Workflow | None:
    """workflows_claim for one workflow: the workflow claimed, or None."""
    claimed = workflows_claim(workflow_ids=[workflow_id], actor=actor)
    return claimed[0] if claimed else None


def workflows_claim(*, workflow_ids: Sequence[uuid.UUID | str], actor: str) -> list[Workflow]:
    """Claim these workflows for one consumer in one statement, counting an attempt on each;
    the ones claimed (each id once).

    Left out: unknown, terminal, waiting for a person (REVIEW), locked by another transaction
    right now, claimed by another consumer whose claim has not expired, or not due yet (a
    retry's backoff: workflows/scheduler.py). The claim is committed before any work, so
    a worker that dies mid-task still used up an attempt. A RECEIVED workflow is started
    (IN_PROGRESS) by the claim.
    """
    now = timezone.now()
    params = {
        "ids": [str(workflow_id) for workflow_id in workflow_ids],
        "claimable": statements.CLAIMABLE_VALUES,
        "now": now,
        "until": now + dt.timedelta(seconds=settings.WORKFLOW_CLAIM_LEASE_SECONDS),
        "source": _START_SOURCE,
        "target": _START_TARGET,
        "actor": actor,
    }
    # A savepoint only inside an outer transaction (tests, the admin); otherwise the statement
    # is its own transaction.
    with transaction.atomic() if connection.in_atomic_block else contextlib.nullcontext():
        return list(Workflow.objects.raw(statements.CLAIM, params))


def _started_by(name: TransitionName) -> tuple[str, str]:
    """The (source, target) of a one-source transition, as the state machine declares it."""
    field = Workflow._meta.get_field("status")
    (found,) = (t for t in field.get_all_transitions(Workflow) if t.name == name)
    return str(found.source), str(found.target)


# The claim's own transition: RECEIVED -> IN_PROGRESS (Workflow.start).
_START_SOURCE, _START_TARGET = _started_by("start")


def workflow_finish(
    *,
    workflow: Workflow,
    name: EndingName,
    actor: str,
    reason: str = "",
    first: Sequence[Step] = (),
) -> Workflow:
    """Move to a terminal state and queue the customer's webhook, in one transaction.

    `name` is the ending's transition; `first` the transitions that lead there (an operator's
    decision), saved with it. The delivery row commits with the terminal state, so the
    customer is told even if every process dies right after; a worker sends it after the
    commit (workflows_ended).
    """
    delivery = _save_one(WorkflowChange(workflow, [*first, Step(name, reason)]), actor=actor)
    assert delivery is not None
    workflows_ended(deliveries=[delivery], send=False)
    return workflow


def workflows_ended(*, deliveries: Sequence[WebhookDelivery], send: bool) -> Sending:
    """What follows saving changes that end workflows, whoever saved them (a consumer's batch,
    a search's callback, an operator, the sweep): each ending's time from its 202 is observed
    once it commits, and its webhook goes out. `send`: the caller sends them itself, now (a
    consumer's batch, over its kept connections: it settles the Sending returned); otherwise a
    worker sends them after the commit. A review is no ending: its delivery
    (link.review_required) is sent, but its workflow has not ended."""
    for delivery in deliveries:
        workflow = delivery.workflow
        if workflow.status in TERMINAL_STATES:
            metrics.workflow_ended(status=workflow.status, created_at=workflow.created_at)
    if send:
        return webhook_deliveries_start(delivery_ids=[d.id for d in deliveries], known=deliveries)
    for delivery in deliveries:
        webhook_delivery_send_later(delivery=delivery)
    return Sending([])
