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
import json
import logging
import random
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, cast

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from linking import statements
from linking.agreement import candidate_agreement
from linking.fields import EncryptedJSONDocumentField
from linking.internal_search import (
    Candidate,
    InternalSearchError,
    SearchJobLost,
    SearchRequested,
    internal_search_match,
    internal_search_poll,
)
from linking.models import LinkRequest
from linking.policy import Bands, Outcome, link_decide
from merchant.models import Customer, ReviewBy
from workflows import concurrent, metrics
from workflows import statements as workflow_statements
from workflows.models import Status, WebhookDelivery, Workflow
from workflows.services import (
    Step,
    WorkflowChange,
    webhook_deliveries_settle,
    webhook_deliveries_start,
    workflows_claim,
    workflows_save,
)
from workflows.services.webhooks import Sending, webhook_event_new

logger = logging.getLogger(__name__)

ACTOR = "worker"
REVIEW_REQUIRED = "link.review_required"
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


def link_process(
    *, workflow_id: str | uuid.UUID, claim_id: uuid.UUID | None = None
) -> ProcessOutcome:
    """links_process for one workflow."""
    claims = {uuid.UUID(str(workflow_id)): claim_id} if claim_id else {}
    retries = links_process(workflow_ids=[workflow_id], claims=claims)
    return ProcessOutcome(retries[0].retry_in, retries[0].claim_id) if retries else DONE


@dataclass
class _Answer:
    """What one workflow's attempt came to: the change to save, and for a search that answered,
    its candidates (stored) and the one to link."""

    workflow: Workflow
    steps: list[Step] = field(default_factory=list)
    release: bool = False
    candidates: Sequence[Candidate] = ()
    link: Candidate | None = None
    link_reason: str = ""


def links_process(
    *,
    workflow_ids: Sequence[str | uuid.UUID],
    claims: Mapping[uuid.UUID, uuid.UUID] | None = None,
) -> list[Retry]:
    """Run one attempt at each of these link workflows; the ones to retry later. Safe to call
    twice for the same ids: the second caller finds them claimed or finished and does nothing.

    A REQUESTED workflow (an asynchronous search that sent no callback in time) is polled
    instead of searched again; a LINKED or NO_RESULTS one (decided by an attempt that died
    before completing) is only completed."""
    claimed = workflows_claim(workflow_ids=workflow_ids, claims=claims, actor=ACTOR)
    if not claimed:
        return []
    _load_requests(claimed)
    decided: list[_Answer] = []
    searches: dict[Future[Any], Workflow] = {}
    for workflow in claimed:
        if workflow.status in (Status.LINKED, Status.NO_RESULTS):
            decided.append(_Answer(workflow, [Step("complete")]))
        elif workflow.attempts > settings.WORKFLOW_MAX_ATTEMPTS:
            reason = f"attempt limit reached ({workflow.attempts - 1} attempts)"
            decided.append(_Answer(workflow, [Step("fail", reason)]))
        else:
            searches[concurrent.submit(functools.partial(_search, workflow))] = workflow
    retries: list[Retry] = []
    sending: list[Sending] = []
    if decided:
        sending.append(_end(decided))
    for wave in concurrent.in_waves(list(searches), linger=WAVE_LINGER_SECONDS):
        answers = []
        for future in wave:
            answered = _answered(searches[future], future)
            if isinstance(answered, Retry):
                retries.append(answered)
            elif answered is not None:
                answers.append(answered)
        if answers:
            sending.append(_end(answers))
    for started in sending:
        webhook_deliveries_settle(started)
    return retries


# The request's data stays encrypted until a search needs it.
_REQUEST_DATA = cast(EncryptedJSONDocumentField, LinkRequest._meta.get_field("data"))


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
    stored = getattr(workflow, "_request_data", None)
    if stored is None:
        raise _RequestMissing()
    data: dict[str, Any] = _REQUEST_DATA.from_db_value(stored, None, connection)
    return internal_search_match(data["patient"])


def _answered(workflow: Workflow, future: Future[Any]) -> _Answer | Retry | None:
    try:
        answer = future.result()
    except _RequestMissing:
        return _Answer(workflow, [Step("fail", "request data missing")])
    except InternalSearchError as exc:
        if exc.permanent:
            return _Answer(workflow, [Step("fail", exc.reason)])
        if workflow.attempts >= settings.WORKFLOW_MAX_ATTEMPTS:
            return _Answer(workflow, [Step("fail", f"attempt limit reached: {exc.reason}")])
        logger.info("workflow %s: %s; retrying", workflow.id, exc.reason)
        return _retry(workflow, exc.retry_after)
    except Exception:
        # A bug of ours for this one workflow: the others go on; it keeps its claim, and the
        # sweep re-queues it once the lease has ended, within its attempts.
        logger.exception("workflow %s: the attempt failed", workflow.id)
        return None
    if isinstance(answer, SearchRequested):
        step = Step(
            "request_search", "asynchronous search accepted", {"search_id": answer.search_id}
        )
        return _Answer(workflow, [step], release=True)
    if answer is None:
        # Still running on the internal side: the callback, or the sweep's next poll, ends it.
        return _Answer(workflow, release=True)
    return link_search_answer(workflow=workflow, candidates=answer)


def _retry(workflow: Workflow, retry_after: float | None) -> Retry:
    assert workflow.claim_id is not None
    return Retry(workflow.id, workflow.claim_id, retry_backoff(workflow.attempts, retry_after))


def link_search_answer(*, workflow: Workflow, candidates: list[Candidate]) -> _Answer:
    """What a search's candidates mean for the workflow (the linking policy): link and
    complete, send to review, or end with no match."""
    decision = link_decide(candidates, bands=Bands.for_customer(workflow.customer))
    kept = candidates[: settings.INTERNAL_SEARCH_COUNT]
    if decision.outcome == Outcome.REVIEW:
        patient = _request_patient(workflow)
        if patient is not None:
            # What a reviewing customer may see of each candidate: stored with the candidates.
            kept = [replace(c, agreement=candidate_agreement(patient, c.resource)) for c in kept]
        return _Answer(
            workflow, [Step("request_review", decision.reason)], release=True, candidates=kept
        )
    if decision.candidate is None:
        steps = [Step("mark_no_results", decision.reason), Step("complete")]
        return _Answer(workflow, steps, candidates=kept)
    return _Answer(workflow, candidates=kept, link=decision.candidate, link_reason=decision.reason)


def _json_or_none(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _request_patient(workflow: Workflow) -> dict[str, Any] | None:
    """The patient the customer sent: from the batch's read when there was one, else read."""
    stored = getattr(workflow, "_request_data", None)
    if stored is not None:
        data: dict[str, Any] = _REQUEST_DATA.from_db_value(stored, None, connection)
        return cast(dict[str, Any], data["patient"])
    request = LinkRequest.objects.filter(request_id=workflow.request_id).first()
    return None if request is None else cast(dict[str, Any], request.data["patient"])


def _end(answers: list[_Answer]) -> Sending:
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
    return webhook_deliveries_start(delivery_ids=[d.id for d in deliveries], known=deliveries)


def _save(answers: list[_Answer]) -> list[WebhookDelivery]:
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
        deliveries = link_answers_save(answers=ours, actor=ACTOR)
    for delivery in deliveries:
        if delivery.event_type != REVIEW_REQUIRED:  # a review is no ending
            metrics.workflow_ended(
                status=delivery.workflow.status, created_at=delivery.workflow.created_at
            )
    return deliveries


def link_answers_save(*, answers: Sequence[_Answer], actor: str) -> list[WebhookDelivery]:
    """Write these answers (caller holds the transaction and the rows' locks): the candidates,
    the mappings and their history, then every workflow's steps and the deliveries of those
    that end, each a single statement for all of them. A patient linked meanwhile by another
    workflow is not linked twice: that workflow ends NO_RESULTS and says why."""
    if not answers:
        return []
    now = timezone.now()
    rows: dict[str, list[Any]] = {
        k: []
        for k in ("workflow", "attempt", "rank", "internal", "score", "grade", "agreement", "at")
    }
    for answer in answers:
        for rank, candidate in enumerate(answer.candidates, start=1):
            for name, value in (
                ("workflow", answer.workflow.id),
                ("attempt", answer.workflow.attempts),
                ("rank", rank),
                ("internal", candidate.internal_patient_id),
                ("score", candidate.score),
                ("grade", candidate.grade),
                (
                    "agreement",
                    None if candidate.agreement is None else json.dumps(candidate.agreement),
                ),
                ("at", now),
            ):
                rows[name].append(value)
    if rows["workflow"]:
        workflow_statements.execute(statements.CANDIDATES, rows)
    linking = [a for a in answers if a.link is not None]
    linked = links_record(
        links=[(a.workflow, cast(Candidate, a.link), a.link_reason) for a in linking], actor=actor
    )
    for answer in linking:
        if answer.workflow.id in linked:
            answer.steps = [Step("mark_linked", answer.link_reason), Step("complete")]
        else:
            answer.steps = [
                Step("mark_no_results", "patient already linked by another workflow"),
                Step("complete"),
            ]
    saved = workflows_save(
        changes=[WorkflowChange(a.workflow, a.steps, release=a.release) for a in answers],
        actor=actor,
    )
    reviews = [
        review_required_new(workflow=w)
        for w in saved.workflows
        if w.status == Status.REVIEW and w.customer.review_by == ReviewBy.CUSTOMER
    ]
    if reviews:
        WebhookDelivery.objects.bulk_create(reviews)
    return saved.deliveries + reviews


def review_required_new(*, workflow: Workflow) -> WebhookDelivery:
    """`link.review_required`, to a customer who decides its own reviews (not saved yet)."""
    return webhook_event_new(
        workflow=workflow,
        event_type=REVIEW_REQUIRED,
        data={
            "workflow-id": str(workflow.id),
            "status": Status.REVIEW.value,
            "customer-patient-id": str(workflow.patient_id),
        },
    )


def links_record(*, links: Sequence[tuple[Workflow, Candidate, str]], actor: str) -> set[uuid.UUID]:
    """The mapping and its history line of each (workflow, candidate, reason), in one
    statement; the workflows that linked (not those whose patient is linked already)."""
    if not links:
        return set()
    params: dict[str, Any] = {
        k: [] for k in ("workflow", "customer", "patient", "internal", "score", "grade", "reason")
    }
    for workflow, candidate, reason in links:
        for name, value in (
            ("workflow", workflow.id),
            ("customer", workflow.customer_id),
            ("patient", workflow.patient_id),
            ("internal", candidate.internal_patient_id),
            ("score", candidate.score),
            ("grade", candidate.grade),
            ("reason", reason),
        ):
            params[name].append(value)
    params |= {"now": timezone.now(), "actor": actor}
    return {row[0] for row in workflow_statements.execute(statements.LINK, params)}


def link_record(*, workflow: Workflow, candidate: Candidate, actor: str, reason: str) -> Step:
    """The mapping and its history line; the step the caller applies with the ending (it holds
    the transaction and the row lock): LINKED, or NO_RESULTS when the patient is linked by
    another workflow already."""
    if workflow.id in links_record(links=[(workflow, candidate, reason)], actor=actor):
        return Step("mark_linked", reason)
    return Step("mark_no_results", "patient already linked by another workflow")


def link_search_apply(*, workflow: Workflow, candidates: list[Candidate], actor: str) -> Workflow:
    """Store a search's candidates and act on them: link and complete, send to review, or end
    with no match (an asynchronous search's callback). The caller holds the workflow's row lock
    inside a transaction, and has checked that the workflow still waits for this answer; the
    customer is told after the commit."""
    from workflows.services.webhooks import webhook_delivery_send_later

    answer = link_search_answer(workflow=workflow, candidates=candidates)
    for delivery in link_answers_save(answers=[answer], actor=actor):
        webhook_delivery_send_later(delivery=delivery)
        if delivery.event_type != REVIEW_REQUIRED:
            metrics.workflow_ended(status=workflow.status, created_at=workflow.created_at)
    return workflow
