"""Processing link requests, a batch at a time: claim, search, decide, record,
complete, notify.

One queue message names up to WORKER_BATCH_SIZE workflows. The batch is claimed in one
statement and its request data read in one; the searches run together on the batch pool; the
workflows whose answers came in together are ended together (one transaction of a few
statements, whatever their number) and their webhooks sent together. Each workflow keeps its
own attempt count, backoff, outcome and webhook: one's failure (a 5xx, a timeout, a bad Bundle,
a database refusal) never fails, delays or re-runs another.
"""

import datetime as dt
import functools
import logging
import random
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import DatabaseError, transaction
from django.utils import timezone

from linking import statements
from linking.internal_search import (
    Candidate,
    InternalSearchError,
    SearchJobLost,
    SearchRequested,
    internal_search_match,
    internal_search_poll,
)
from linking.services.answers import (
    LinkAnswer,
    link_answers_save,
    link_search_answer,
    stored_request_data,
)
from merchant.models import Customer
from workflows import concurrent, metrics
from workflows import statements as workflow_statements
from workflows.claims import (
    Held,
    claims_extend,
    claims_hand_back,
    claims_holding,
    claims_shutdown_deadline,
)
from workflows.models import Status, WebhookDelivery, Workflow
from workflows.selectors import workflows_held
from workflows.services import (
    DEADLINE_EXCEEDED,
    Step,
    webhook_deliveries_settle,
    workflow_past_deadline,
    workflows_claim,
    workflows_ended,
)
from workflows.services.webhooks import Sending

logger = logging.getLogger(__name__)

ACTOR = "worker"
# Answers that came in within this long of each other are ended in one transaction.
WAVE_LINGER_SECONDS = 0.2


@dataclass(frozen=True)
class Retry:
    """A workflow to try again after `retry_in` seconds, under the same claim."""

    workflow_id: uuid.UUID
    claim_id: uuid.UUID
    retry_in: float


@dataclass(frozen=True)
class ProcessOutcome:
    """What to do next about one workflow: nothing, or retry after `retry_in` seconds."""

    retry_in: float | None = None
    claim_id: uuid.UUID | None = None


DONE = ProcessOutcome()


def retry_backoff(attempt: int, retry_after: float | None = None) -> float:
    """Exponential backoff with full jitter, at least what the server asked for, capped."""
    ceiling = min(
        settings.RETRY_BACKOFF_MAX_SECONDS, settings.RETRY_BACKOFF_BASE_SECONDS * 2 ** (attempt - 1)
    )
    wait = random.uniform(ceiling / 2, ceiling)  # noqa: S311 -- jitter, not security
    if retry_after is not None:
        wait = max(wait, retry_after)
    return min(wait, settings.RETRY_BACKOFF_MAX_SECONDS)


@dataclass
class Processed:
    """What an attempt at a batch leaves to its task: the workflows to retry after their
    backoff; those to send again at once (handed back by a worker shutting down, or never
    claimed because it was); and, for a message the broker redelivered, those another claim
    still held, with when the last of those claims' leases ends."""

    retries: list[Retry] = field(default_factory=list)
    again: list[uuid.UUID] = field(default_factory=list)
    held: list[uuid.UUID] = field(default_factory=list)
    held_until: dt.datetime | None = None


def link_process(
    *, workflow_id: str | uuid.UUID, claim_id: uuid.UUID | None = None
) -> ProcessOutcome:
    """links_process for one workflow."""
    claims = {uuid.UUID(str(workflow_id)): claim_id} if claim_id else {}
    retries = links_process(workflow_ids=[workflow_id], claims=claims).retries
    return ProcessOutcome(retries[0].retry_in, retries[0].claim_id) if retries else DONE


def links_process(
    *,
    workflow_ids: Sequence[str | uuid.UUID],
    claims: Mapping[uuid.UUID, uuid.UUID] | None = None,
    redelivered: bool = False,
) -> Processed:
    """Run one attempt at each of these link workflows. Safe to call twice for the same ids:
    the second caller finds them claimed or finished and does nothing.

    A REQUESTED workflow (an asynchronous search that sent no callback in time) is polled
    instead of searched again; a LINKED or NO_RESULTS one (decided by an attempt that died
    before completing) is only completed. The claims are kept alive by this process's heartbeat
    while the batch runs (workflows/claims.py); a worker shutting down claims nothing more, and
    hands back what its grace period did not see finish."""
    if claims_shutdown_deadline() is not None:
        return Processed(again=list(map(_as_uuid, workflow_ids)))
    claimed = workflows_claim(workflow_ids=workflow_ids, claims=claims, actor=ACTOR)
    processed = Processed()
    if redelivered:
        # A dead consumer's message, handed over at once (RabbitMQ): its workflows resume as
        # soon as the dead claims' leases end, not at the next sweep after that.
        taken = {w.id for w in claimed}
        held = workflows_held(
            workflow_ids=[i for i in map(_as_uuid, workflow_ids) if i not in taken]
        )
        processed.held = list(held)
        processed.held_until = max(held.values(), default=None)
    if not claimed:
        return processed
    _load_requests(claimed)
    with claims_holding({w.id: _claim_of(w) for w in claimed}) as heartbeat:
        sending = _attempt(claimed, heartbeat, processed)
        if processed.retries:
            _hold_for_retries(processed.retries, heartbeat)
    for started in sending:
        webhook_deliveries_settle(started)
    if processed.again:
        metrics.claims_handed_back(len(processed.again))
    return processed


def _attempt(claimed: list[Workflow], heartbeat: Held, processed: Processed) -> list[Sending]:
    """Search for each claimed workflow and end each as its answer comes; what was handed back
    or is to be retried goes into `processed`. The webhooks started, to send after."""
    decided: list[LinkAnswer] = []
    searches: dict[Future[Any], Workflow] = {}
    for workflow in claimed:
        if workflow.status in (Status.LINKED, Status.NO_RESULTS):
            decided.append(LinkAnswer(workflow, [Step("complete")]))
        elif workflow_past_deadline(workflow=workflow):
            decided.append(LinkAnswer(workflow, [Step("fail", DEADLINE_EXCEEDED)]))
        elif workflow.attempts > settings.WORKFLOW_MAX_ATTEMPTS:
            reason = f"attempt limit reached ({workflow.attempts - 1} attempts)"
            decided.append(LinkAnswer(workflow, [Step("fail", reason)]))
        else:
            searches[concurrent.submit(functools.partial(_search, workflow))] = workflow
    sending: list[Sending] = []
    if decided:
        sending.append(_end(decided))
    finished: set[Future[Any]] = set()
    for wave in concurrent.in_waves(
        list(searches), linger=WAVE_LINGER_SECONDS, deadline=claims_shutdown_deadline
    ):
        finished.update(wave)
        answers = []
        for future in wave:
            workflow = searches[future]
            if heartbeat.lost(workflow.id):
                continue  # taken over by another consumer: nothing of this attempt is written
            answered = _answered(workflow, future)
            if isinstance(answered, Retry):
                processed.retries.append(answered)
            elif answered is not None:
                answers.append(answered)
        if answers:
            sending.append(_end(answers))
    unfinished = {w.id: _claim_of(w) for f, w in searches.items() if f not in finished}
    if unfinished:
        # Shutting down: the searches still out are abandoned (their answers will find the
        # claim gone) and the workflows handed back for the next worker.
        heartbeat.drop(unfinished)
        processed.again += claims_hand_back(claims=unfinished, actor=ACTOR)
    return sending


def _hold_for_retries(retries: list[Retry], heartbeat: Held) -> None:
    """A workflow waiting for its retry keeps its claim (the retry's message renews it) for its
    backoff and one lease more: should the message be lost with its worker, the sweep resumes
    the workflow then."""
    heartbeat.drop(retry.workflow_id for retry in retries)
    now = timezone.now()
    lease = dt.timedelta(seconds=settings.WORKFLOW_CLAIM_LEASE_SECONDS)
    claims_extend(
        claims={retry.workflow_id: retry.claim_id for retry in retries},
        until={
            retry.workflow_id: now + dt.timedelta(seconds=retry.retry_in) + lease
            for retry in retries
        },
    )


def _as_uuid(workflow_id: str | uuid.UUID) -> uuid.UUID:
    return uuid.UUID(str(workflow_id))


def _claim_of(workflow: Workflow) -> uuid.UUID:
    assert workflow.claim_id is not None  # a claimed workflow
    return workflow.claim_id


def _load_requests(workflows: list[Workflow]) -> None:
    """Each workflow's customer (its bands, its webhook) and its request data, still
    encrypted, in one query: kept on the workflow (the data as `_request_data`, None when
    purged)."""
    by_id = {w.id: w for w in workflows}
    for customer in Customer.objects.raw(statements.REQUESTS, {"ids": list(by_id)}):
        extra = vars(customer)
        workflow = by_id[extra.pop("batch_workflow_id")]
        # Taken off the customer, which stays on the workflow and so must carry no request data.
        workflow._request_data = extra.pop("request_data")  # type: ignore[attr-defined]
        workflow.customer = customer


class _RequestMissing(Exception):
    pass


def _search(workflow: Workflow) -> list[Candidate] | SearchRequested | None:
    """The search's answer (runs on the batch pool): candidates, a job the internal system made
    of it, or None for a polled job still pending."""
    if workflow.status == Status.REQUESTED and workflow.search_id:
        try:
            return internal_search_poll(workflow.search_id)
        except SearchJobLost:
            logger.info("workflow %s: search job lost; searching again", workflow.id)
    data = stored_request_data(workflow)
    if data is None:
        raise _RequestMissing()
    return internal_search_match(data["patient"])


def _answered(workflow: Workflow, future: Future[Any]) -> LinkAnswer | Retry | None:
    try:
        answer = future.result()
    except _RequestMissing:
        return LinkAnswer(workflow, [Step("fail", "request data missing")])
    except InternalSearchError as exc:
        if exc.permanent:
            return LinkAnswer(workflow, [Step("fail", exc.reason)])
        if workflow_past_deadline(workflow=workflow):
            return LinkAnswer(workflow, [Step("fail", f"{DEADLINE_EXCEEDED}: {exc.reason}")])
        if workflow.attempts >= settings.WORKFLOW_MAX_ATTEMPTS:
            return LinkAnswer(workflow, [Step("fail", f"attempt limit reached: {exc.reason}")])
        logger.info("workflow %s: %s; retrying", workflow.id, exc.reason)
        return _retry(workflow, exc.retry_after)
    except Exception:
        # A bug of ours for this one workflow: the others go on; it keeps its claim, no longer
        # renewed, and the sweep re-queues it once the lease has ended, within its attempts.
        logger.exception("workflow %s: the attempt failed", workflow.id)
        return None
    if isinstance(answer, SearchRequested):
        step = Step(
            "request_search", "asynchronous search accepted", {"search_id": answer.search_id}
        )
        return LinkAnswer(workflow, [step], release=True)
    if answer is None:
        # Still running on the internal side: the callback, or the sweep's next poll, ends it.
        return LinkAnswer(workflow, release=True)
    return link_search_answer(workflow=workflow, candidates=answer)


def _retry(workflow: Workflow, retry_after: float | None) -> Retry:
    return Retry(workflow.id, _claim_of(workflow), retry_backoff(workflow.attempts, retry_after))


def _end(answers: list[LinkAnswer]) -> Sending:
    """Save these answers in one transaction, each only for a workflow still ours (a consumer
    or a search callback that took one over meanwhile wins it), and start sending the
    webhooks of those that ended. Should the batch's transaction fail, each answer is saved on
    its own, so that one bad row fails only itself (it stays claimed: after its lease the
    sweep re-queues it, within its attempts)."""
    try:
        deliveries = _save(answers)
    except DatabaseError:
        logger.exception("a batch of %d endings failed; saving them one by one", len(answers))
        deliveries = []
        for answer in answers:
            try:
                deliveries += _save([answer])
            except DatabaseError:
                logger.exception("workflow %s: its ending failed", answer.workflow.id)
    return workflows_ended(deliveries=deliveries, send=True)


def _save(answers: list[LinkAnswer]) -> list[WebhookDelivery]:
    with transaction.atomic():
        current = {
            row[0]: (row[1], row[2])
            for row in workflow_statements.execute(
                workflow_statements.LOCK, {"ids": [a.workflow.id for a in answers]}
            )
        }
        ours = []
        for answer in answers:
            workflow = answer.workflow
            if current.get(workflow.id) == (workflow.status, workflow.claim_id):
                ours.append(answer)
            else:
                logger.info("workflow %s was taken over; dropping this attempt", workflow.id)
        return link_answers_save(answers=ours, actor=ACTOR)
