"""Workflow use cases shared by every request type: creation, transitions, publishing."""

import contextlib
import datetime as dt
import functools
import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from django_fsm import ConcurrentTransition

from config import metrics
from config.sql import insert_select, update_guarded
from merchant.models import Customer
from workflows.models import RequestType, Status, WebhookDelivery, Workflow, WorkflowTransition
from workflows.services.webhooks import webhook_delivery_new, webhook_delivery_send_later

logger = logging.getLogger(__name__)


def workflow_create(
    *,
    customer: Customer,
    patient_id: uuid.UUID,
    request_id: uuid.UUID,
    request_type: str = RequestType.LINK,
    webhook_url: str = "",
    actor: str = "api",
) -> Workflow:
    """Insert a RECEIVED workflow and the first line of its timeline (caller holds the tx)."""
    workflow, first = workflow_new(
        customer=customer,
        patient_id=patient_id,
        request_id=request_id,
        request_type=request_type,
        webhook_url=webhook_url,
        actor=actor,
    )
    workflow.save(force_insert=True)
    first.save(force_insert=True)
    return workflow


def workflow_new(
    *,
    customer: Customer,
    patient_id: uuid.UUID,
    request_id: uuid.UUID,
    request_type: str = RequestType.LINK,
    webhook_url: str = "",
    actor: str = "api",
) -> tuple[Workflow, WorkflowTransition]:
    """A RECEIVED workflow and the first line of its timeline, not saved yet: workflow_create
    saves them, the ack path's single statement inserts them (linking/services/accept.py)."""
    now = timezone.now()
    workflow = Workflow(
        customer=customer,
        patient_id=patient_id,
        request_id=request_id,
        request_type=request_type,
        webhook_url=webhook_url,
        created_at=now,
        updated_at=now,
    )
    first = WorkflowTransition(
        workflow=workflow,
        source="",
        target=Status.RECEIVED,
        actor=actor,
        at=now,
        reason="accepted",
    )
    return workflow, first


@dataclass(frozen=True)
class Step:
    """One transition to apply: the state machine's method, the timeline's reason, and the
    method's other keyword arguments."""

    name: str
    reason: str = ""
    kwargs: Mapping[str, Any] = field(default_factory=dict)


def workflow_transition(
    *, workflow: Workflow, name: str, actor: str, reason: str = "", **kwargs: Any
) -> Workflow:
    """Apply the transition `name`, save it and record it, atomically.

    The save is guarded by the status the row had when loaded (ConcurrentTransitionMixin), so
    a racing transition raises ConcurrentTransition and this one rolls back.
    """
    _transitions(workflow=workflow, steps=[Step(name, reason, kwargs)], actor=actor)
    return workflow


def _transitions(
    *, workflow: Workflow, steps: Sequence[Step], actor: str, ending: bool = False
) -> WebhookDelivery | None:
    """Apply `steps` in order, then in one statement (so one round trip, and atomic): save the
    workflow, record every step in its timeline and, for an `ending`, insert the customer's
    webhook delivery, tied to the last step, which is returned.

    The save is guarded by the status the row had when loaded (as ConcurrentTransitionMixin's
    own save is): a racing transition makes it raise ConcurrentTransition, having written
    nothing, and the caller's transaction rolls back."""
    loaded = workflow.status
    # The state machine's own checks first: a refused transition raises before anything is
    # written.
    now = timezone.now()
    timeline = []
    for step in steps:
        source = workflow.status
        getattr(workflow, step.name)(reason=step.reason, **step.kwargs)
        timeline.append(
            WorkflowTransition(
                workflow=workflow,
                source=source,
                target=workflow.status,
                actor=actor,
                reason=step.reason,
                at=now,
            )
        )
    workflow.updated_at = now
    saved_sql, params = update_guarded(workflow, name="workflow", guard={"status": loaded})
    sql = f"WITH saved AS ({saved_sql} RETURNING 1)"
    # Each line is inserted from the one before: in order, so the timeline's (at, id) order is
    # the steps' order, and only if the save happened.
    previous = "saved"
    for index, line in enumerate(timeline):
        line_sql, line_params = insert_select(line, name=f"line{index}")
        sql += f", line{index} AS ({line_sql} FROM {previous} RETURNING id)"
        params |= line_params
        previous = f"line{index}"
    delivery = None
    if ending:
        delivery = webhook_delivery_new(workflow=workflow)
        delivery_sql, delivery_params = insert_select(
            delivery, name="delivery", computed={"transition_id": f"{previous}.id"}
        )
        sql += f", delivery AS ({delivery_sql} FROM {previous} RETURNING id)"
        params |= delivery_params
        previous = "delivery"
    sql += f" SELECT id FROM {previous}"  # noqa: S608 -- CTE names of this function
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    if row is None:
        raise ConcurrentTransition(f"workflow {workflow.id} is no longer {loaded}")
    # What ConcurrentTransitionMixin.save does after saving: later saves are guarded on the new
    # status.
    workflow._update_initial_state()
    if delivery is not None:
        delivery.id = row[0]
        delivery._state.adding = False  # as save() leaves it: the row exists
    return delivery


def workflow_message(*, workflow: Workflow) -> dict[str, str]:
    """The queue message of seed section 3.3: ids only, never demographics."""
    return {
        "workflow-id": str(workflow.id),
        "request-id": str(workflow.request_id),
        "customer-id": str(workflow.customer_id),
        "patient-id": str(workflow.patient_id),
        "request-type": workflow.request_type,
    }


# Where an accepted workflow is announced to the dispatcher (workflows/dispatcher.py).
WORKFLOW_CHANNEL = "workflows_received"


def workflow_announcement(*, workflow: Workflow) -> list[str]:
    """pg_notify's arguments for this workflow: the channel, and the queue message as JSON
    (ids only, ~250 bytes of PostgreSQL's 8,000)."""
    return [WORKFLOW_CHANNEL, json.dumps(workflow_message(workflow=workflow))]


def workflow_announce(*, workflow: Workflow) -> None:
    """Tell the dispatcher about a new workflow, inside the caller's transaction.

    PostgreSQL delivers a NOTIFY when, and only if, its transaction commits: the message is sent
    after the commit, never for a rolled-back row, and the request path touches only PostgreSQL
    (design decision 2's outbox). A notification nobody was listening for (the dispatcher was
    down) is published by the next dispatcher's catch-up or, older, by the reconciliation sweep.
    """
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", workflow_announcement(workflow=workflow))


def workflow_publish(*, workflow: Workflow) -> bool:
    """Send the workflow's message to the queue; True if the broker took it.

    A failure is logged and swallowed: the workflow row is committed, and the reconciliation
    sweep re-publishes every pending workflow that nobody picked up.
    """
    return workflows_publish(workflows=[workflow]) == 1


def workflows_publish(*, workflows: list[Workflow]) -> int:
    """Send these workflows' messages in one batch (one Redis round trip); how many were sent."""
    return workflow_messages_publish(
        messages=[workflow_message(workflow=workflow) for workflow in workflows]
    )


def workflow_messages_publish(*, messages: list[dict[str, str]]) -> int:
    """Send these queue messages (workflow_message's) in one batch; how many were sent.

    A failure is logged and swallowed, as in workflow_publish, and counts as none sent: part of
    the batch may have reached the broker, and a duplicate message is harmless (consumers claim
    the workflow row), while the sweep re-queues whatever was lost.

    The messages are Celery's own (protocol 2, built by `app.amqp.as_task_v2`, what
    `apply_async` sends) but published straight through the pooled kombu producer: apply_async's
    per-message routing, option merging and queue declaration were 70% of a 1,000-row sweep and
    most of the web's former publishing thread in `make bench`'s profiles. The queue is
    declared once per batch instead.
    """
    from kombu.common import maybe_declare

    from workflows.tasks import process_workflow

    app = process_workflow.app
    try:
        with app.producer_or_acquire() as producer:
            target = _publish_target(app)
            maybe_declare(target.queue, producer.channel, retry=True, **target.retry_policy)
            with producer.batch():
                for body in messages:
                    task_id = str(uuid.uuid4())
                    message = app.amqp.as_task_v2(
                        task_id,
                        process_workflow.name,
                        args=(body,),
                        kwargs={},
                        # The id says it all; Celery would format the arguments with saferepr.
                        argsrepr=f"(workflow {body['workflow-id']})",
                        kwargsrepr="{}",
                        ignore_result=True,
                        origin=target.origin,
                    )
                    producer.publish(
                        message.body,
                        exchange="",  # the default exchange, as apply_async does for direct
                        routing_key=target.queue.name,
                        serializer=target.serializer,
                        delivery_mode=target.delivery_mode,
                        headers=message.headers,
                        retry=True,
                        retry_policy=target.retry_policy,
                        **message.properties,
                    )
    except Exception as exc:
        logger.warning(
            "publish failed for workflow %s%s (%s)",
            messages[0]["workflow-id"] if messages else None,
            f" and {len(messages) - 1} others" if len(messages) > 1 else "",
            type(exc).__name__,
        )
        return 0
    return len(messages)


@dataclass(frozen=True)
class _PublishTarget:
    queue: Any  # kombu.Queue
    serializer: str
    delivery_mode: Any
    retry_policy: dict[str, Any]
    origin: str


@functools.cache
def _publish_target(app: Any) -> _PublishTarget:
    """What apply_async would work out for every message of process_workflow, once per process:
    the default queue (CELERY_TASK_DEFAULT_QUEUE), its delivery mode, the serializer, the
    bounded publish retries (CELERY_TASK_PUBLISH_RETRY_POLICY) and the sender's node name."""
    from celery.utils.nodenames import anon_nodename

    conf = app.conf
    queue = app.amqp.queues[conf.task_default_queue]
    return _PublishTarget(
        queue=queue,
        serializer=conf.task_serializer,
        delivery_mode=queue.exchange.delivery_mode or conf.task_default_delivery_mode,
        retry_policy=dict(conf.task_publish_retry_policy or {}),
        origin=anon_nodename(),
    )


# States a consumer may pick up: RECEIVED to start, REQUESTED to poll an asynchronous search
# that sent no callback, the others to resume after a crash. Never REVIEW: that is a person's.
CLAIMABLE_STATES = (
    Status.RECEIVED,
    Status.IN_PROGRESS,
    Status.REQUESTED,
    Status.LINKED,
    Status.NO_RESULTS,
)


def _started_by(name: str) -> tuple[str, str]:
    """The (source, target) of a one-source transition, as the state machine declares it."""
    field = Workflow._meta.get_field("status")
    (found,) = (t for t in field.get_all_transitions(Workflow) if t.name == name)
    return str(found.source), str(found.target)


# The claim's own transition: RECEIVED -> IN_PROGRESS (Workflow.start).
_START_SOURCE, _START_TARGET = _started_by("start")
_WORKFLOW_COLUMNS = ", ".join(f"w.{f.column}" for f in Workflow._meta.concrete_fields)
_CLAIMABLE_SQL = ", ".join(f"'{state}'" for state in CLAIMABLE_STATES)  # constants of the code
# One statement (so one round trip, and its own transaction): lock the row if it is free for
# this consumer, take the claim, count the attempt, start a RECEIVED workflow and record it.
# The lock is taken before the conditions are final: a row a concurrent consumer has just
# claimed is read again once it commits, and then skipped.
_CLAIM = f"""
WITH target AS (
  SELECT id, status FROM workflows_workflow
   WHERE id = %(id)s AND status IN ({_CLAIMABLE_SQL})
     AND (claimed_until IS NULL OR claimed_until <= %(now)s OR claim_id = %(renew)s)
   FOR UPDATE
), claimed AS (
  UPDATE workflows_workflow AS w
     SET claim_id = %(claim)s, claimed_until = %(until)s, attempts = w.attempts + 1,
         status = CASE WHEN target.status = %(source)s THEN %(target)s ELSE target.status END,
         updated_at = %(now)s
    FROM target
   WHERE w.id = target.id
  RETURNING {_WORKFLOW_COLUMNS}, target.status AS claimed_from
), started AS (
  INSERT INTO workflows_workflowtransition (workflow_id, source, target, reason, actor, at)
  SELECT id, %(source)s, %(target)s, '', %(actor)s, %(now)s FROM claimed
   WHERE claimed_from = %(source)s
)
SELECT * FROM claimed
"""  # noqa: S608 -- built from model metadata and constants; every value is a parameter


def workflow_claim(
    *, workflow_id: uuid.UUID | str, claim_id: uuid.UUID | None = None, actor: str
) -> Workflow | None:
    """Claim a workflow for one consumer, counting the attempt; None if there is nothing to do.

    Nothing to do: unknown, terminal, waiting for an operator (REVIEW), or claimed by another
    consumer whose claim has not expired. `claim_id` renews our own claim (a Celery
    retry of the same work). The claim is committed before any work, so a worker that dies
    mid-task still used up an attempt. A RECEIVED workflow is started (IN_PROGRESS) by the claim.
    """
    now = timezone.now()
    params = {
        "id": workflow_id,
        "now": now,
        "renew": claim_id,
        "claim": claim_id or uuid.uuid4(),
        "until": now + dt.timedelta(seconds=settings.WORKFLOW_CLAIM_LEASE_SECONDS),
        "source": _START_SOURCE,
        "target": _START_TARGET,
        "actor": actor,
    }
    # A savepoint only inside an outer transaction (tests, the admin); otherwise the statement
    # is its own transaction.
    with transaction.atomic() if connection.in_atomic_block else contextlib.nullcontext():
        claimed = list(Workflow.objects.raw(_CLAIM, params))
    return claimed[0] if claimed else None


def workflow_release(*, workflow: Workflow) -> None:
    """Drop our claim (caller holds the row lock): the workflow now waits on someone else."""
    workflow.claim_id = None
    workflow.claimed_until = None
    workflow.save(update_fields=["claim_id", "claimed_until"])


def workflow_finish(
    *,
    workflow: Workflow,
    name: str,
    actor: str,
    reason: str = "",
    first: Sequence[Step] = (),
) -> Workflow:
    """Move to a terminal state and queue the customer's webhook, in one transaction.

    `name` is "complete" or "fail"; `first` the transitions that lead there (a worker's
    decision), saved with it. The delivery row commits with the terminal state, so the
    customer is told even if every process dies right after.
    """
    delivery = _transitions(
        workflow=workflow, steps=[*first, Step(name, reason)], actor=actor, ending=True
    )
    assert delivery is not None
    webhook_delivery_send_later(delivery=delivery)
    metrics.workflow_ended(status=workflow.status, created_at=workflow.created_at)
    return workflow
