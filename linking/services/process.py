"""Processing link requests, a batch at a time: claim, search, decide, record,
complete, notify.

One queue message names up to WORKER_BATCH_SIZE workflows. The batch is claimed in one
statement and its request data read in one; the searches run together on the batch pool; the
workflows whose answers came in together are ended together (one transaction of a few
statements, whatever their number) and their webhooks sent together. Each workflow keeps its
own attempt count, backoff, outcome and webhook: one's failure (a 5xx, a timeout, a bad Bundle,
a database refusal) never fails, delays or re-runs another.
"""

import functools
import logging
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import DatabaseError, transaction

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
from workflows.breaker import BreakerState, breaker_report, breaker_state
from workflows.claims import Held, claims_holding, claims_shutdown_deadline
from workflows.models import Status, WebhookDelivery, Workflow
from workflows.scheduler import PutBack, retry_backoff, workflows_put_back, workflows_unpublish
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
class ProcessOutcome:
    """What became of one workflow: nothing left to do, or due again in `retry_in` seconds."""

    retry_in: float | None = None


DONE = ProcessOutcome()


@dataclass
class Processed:
    """What an attempt at a batch left on the schedule: the workflows put back (retries after
    their backoff, work the internal system's outage stopped, work handed back by a worker
    shutting down), and those not claimed because it was shutting down."""

    put_back: list[PutBack] = field(default_factory=list)
    not_claimed: list[uuid.UUID] = field(default_factory=list)


def link_process(*, workflow_id: str | uuid.UUID) -> ProcessOutcome:
    """links_process for one workflow."""
    put = links_process(workflow_ids=[workflow_id]).put_back
    return ProcessOutcome(put[0].due_in) if put and not put[0].refund else DONE


def links_process(*, workflow_ids: Sequence[str | uuid.UUID]) -> Processed:
    """Run one attempt at each of these link workflows. Safe to call twice for the same ids:
    the second caller finds them claimed or finished and does nothing.

    A REQUESTED workflow (an asynchronous search that sent no callback in time) is polled
    instead of searched again; a LINKED or NO_RESULTS one (decided by an attempt that died
    before completing) is only completed. The claims are kept alive by this process's heartbeat
    while the batch runs (workflows/claims.py). What cannot finish now is put back on the
    schedule (workflows/scheduler.py): a transient failure after its backoff, counted; work the
    internal system's outage stopped (its circuit breaker open) at once, not counted, for when it
    answers again; a worker shutting down claims nothing more and hands back what its grace
    period did not see finish."""
    if claims_shutdown_deadline() is not None:
        processed = Processed(not_claimed=list(map(_as_uuid, workflow_ids)))
        workflows_unpublish(workflow_ids=processed.not_claimed)
        return processed
    claimed = workflows_claim(workflow_ids=workflow_ids, actor=ACTOR)
    processed = Processed()
    if not claimed:
        return processed
    _load_requests(claimed)
    with claims_holding({w.id: _claim_of(w) for w in claimed}) as heartbeat:
        sending = _attempt(claimed, heartbeat, processed)
    for started in sending:
        webhook_deliveries_settle(started)
    handed_back = sum(1 for p in processed.put_back if p.reason == HANDED_BACK)
    if handed_back:
        metrics.claims_handed_back(handed_back)
    return processed


def _attempt(claimed: list[Workflow], heartbeat: Held, processed: Processed) -> list[Sending]:
    """Search for each claimed workflow and end each as its answer comes; what is put back goes
    into `processed`. The webhooks started, to send after."""
    decided: list[LinkAnswer] = []
    searches: dict[Future[Any], Workflow] = {}
    waiting: list[PutBack] = []
    breaker = breaker_state()
    for workflow in claimed:
        if workflow.status in (Status.LINKED, Status.NO_RESULTS):
            decided.append(LinkAnswer(workflow, [Step("complete")]))
        elif workflow_past_deadline(workflow=workflow):
            decided.append(LinkAnswer(workflow, [Step("fail", DEADLINE_EXCEEDED)]))
        elif workflow.attempts > settings.WORKFLOW_MAX_ATTEMPTS:
            reason = f"attempt limit reached ({workflow.attempts - 1} attempts)"
            decided.append(LinkAnswer(workflow, [Step("fail", reason)]))
        elif breaker.blocks():
            # Published before the breaker opened: it waits for the internal system unsearched.
            waiting.append(_wait_for_internal_system(workflow, "not searched"))
        else:
            searches[concurrent.submit(functools.partial(_search, workflow))] = workflow
    if waiting:
        _put_back(waiting, heartbeat, processed)
    sending: list[Sending] = []
    if decided:
        sending.append(_end(decided))
    finished: set[Future[Any]] = set()
    for wave in concurrent.in_waves(
        list(searches), linger=WAVE_LINGER_SECONDS, deadline=claims_shutdown_deadline
    ):
        finished.update(wave)
        answers: list[LinkAnswer] = []
        failed: list[tuple[Workflow, InternalSearchError]] = []
        for future in wave:
            workflow = searches[future]
            if heartbeat.lost(workflow.id):
                continue  # taken over by another consumer: nothing of this attempt is written
            answered = _answered(workflow, future)
            if isinstance(answered, InternalSearchError):
                failed.append((workflow, answered))
            elif answered is not None:
                answers.append(answered)
        breaker = _report(breaker, answered=len(answers), failed=[exc for _, exc in failed])
        put: list[PutBack] = []
        for workflow, exc in failed:
            outcome = _after_transient(workflow, exc, breaker)
            if isinstance(outcome, PutBack):
                put.append(outcome)
            else:
                answers.append(outcome)
        if answers:
            sending.append(_end(answers))
        if put:
            _put_back(put, heartbeat, processed)
    unfinished = [w for f, w in searches.items() if f not in finished]
    if unfinished:
        # Shutting down: the searches still out are abandoned (their answers will find the
        # claim gone) and the workflows handed back for the next worker.
        _put_back(
            [PutBack(w.id, _claim_of(w), 0.0, HANDED_BACK, refund=True) for w in unfinished],
            heartbeat,
            processed,
        )
    return sending


HANDED_BACK = "handed back by a worker shutting down (attempt not counted)"


def _put_back(put: list[PutBack], heartbeat: Held, processed: Processed) -> None:
    heartbeat.drop(p.workflow_id for p in put)
    done = set(workflows_put_back(put=put, actor=ACTOR))
    processed.put_back += [p for p in put if p.workflow_id in done]


def _report(
    breaker: BreakerState, *, answered: int, failed: list[InternalSearchError]
) -> BreakerState:
    """Tell the shared circuit breaker what this wave saw of the internal system, when there is
    something to tell (a failure, or answers while failures were being counted): the breaker
    after it."""
    outages = sum(1 for exc in failed if exc.outage)
    pause = max((exc.retry_after or 0.0 for exc in failed if exc.throttled), default=0.0)
    if not outages and not pause and not (answered and breaker.failures):
        return breaker
    return breaker_report(successes=answered, failures=outages, retry_after=pause or None)


def _after_transient(
    workflow: Workflow, exc: InternalSearchError, breaker: BreakerState
) -> PutBack | LinkAnswer:
    """A transient failure's outcome. While the internal system is down (the breaker open, or a
    429's pause) the workflow waits for it, the attempt not counted; otherwise the failure
    counts: FAILED past its deadline or at the attempt limit, else due again after its
    backoff."""
    if breaker.blocks():
        return _wait_for_internal_system(workflow, exc.reason)
    if workflow_past_deadline(workflow=workflow):
        return LinkAnswer(workflow, [Step("fail", f"{DEADLINE_EXCEEDED}: {exc.reason}")])
    if workflow.attempts >= settings.WORKFLOW_MAX_ATTEMPTS:
        return LinkAnswer(workflow, [Step("fail", f"attempt limit reached: {exc.reason}")])
    wait = retry_backoff(workflow.attempts, exc.retry_after)
    logger.info("workflow %s: %s; due again in %.1f s", workflow.id, exc.reason, wait)
    reason = (
        f"{exc.reason}: due again in {wait:.1f} s "
        f"(attempt {workflow.attempts} of {settings.WORKFLOW_MAX_ATTEMPTS})"
    )
    return PutBack(workflow.id, _claim_of(workflow), wait, reason)


def _wait_for_internal_system(workflow: Workflow, why: str) -> PutBack:
    reason = f"{why}: the internal system is unavailable; due when it answers (attempt not counted)"
    return PutBack(workflow.id, _claim_of(workflow), 0.0, reason, refund=True)


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


def _answered(workflow: Workflow, future: Future[Any]) -> LinkAnswer | InternalSearchError | None:
    """The answer to save; a transient failure (decided with the wave's others); or None."""
    try:
        answer = future.result()
    except _RequestMissing:
        return LinkAnswer(workflow, [Step("fail", "request data missing")])
    except InternalSearchError as exc:
        if exc.permanent:
            return LinkAnswer(workflow, [Step("fail", exc.reason)])
        return exc
    except Exception:
        # A bug of ours for this one workflow: the others go on; it keeps its claim, no longer
        # renewed, and the scheduler takes it back once the lease has ended, within its
        # attempts.
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


def _end(answers: list[LinkAnswer]) -> Sending:
    """Save these answers in one transaction, each only for a workflow still ours (a consumer
    or a search callback that took one over meanwhile wins it), and start sending the
    webhooks of those that ended. Should the batch's transaction fail, each answer is saved on
    its own, so that one bad row fails only itself (it stays claimed: after its lease the
    scheduler takes it back, within its attempts)."""
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
