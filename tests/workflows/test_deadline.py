"""WORKFLOW_DEADLINE_SECONDS: a workflow not ended by its deadline is FAILED, "deadline
exceeded", and the customer told, at the first look after it: the sweep, a claim, a retry."""

import datetime as dt
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import requests
from django.conf import settings as conf
from django.utils import timezone

from linking.services import links_process
from merchant.services import CustomerCredentials
from standin.server import make_server
from tests.conftest import LinkClient, link_body
from tests.processes import serving
from workflows.breaker import breaker_report, breaker_state
from workflows.models import Status, WebhookDelivery, Workflow
from workflows.scheduler import PutBack, workflows_put_back
from workflows.services import (
    DEADLINE_EXCEEDED,
    ReconcileReport,
    workflow_deadline,
    workflow_mark_failed,
    workflow_requeue,
    workflows_claim,
    workflows_reconcile,
)

pytestmark = pytest.mark.django_db


def accepted(api: LinkClient) -> Workflow:
    response = api.post_link(link_body(), key=uuid.uuid4().hex)
    assert response.status_code == 202, response.content
    return Workflow.objects.get(id=response.json()["workflow-id"])


def past_deadline(workflow: Workflow) -> None:
    Workflow.objects.filter(id=workflow.id).update(
        deadline_at=timezone.now() - dt.timedelta(seconds=1)
    )


def ended_by_deadline(workflow: Workflow) -> None:
    row = Workflow.objects.get(id=workflow.id)
    assert (row.status, row.reason) == (Status.FAILED, DEADLINE_EXCEEDED)
    (delivery,) = WebhookDelivery.objects.filter(workflow=workflow)
    payload = json.loads(delivery.payload)
    assert (payload["type"], payload["data"]["reason"]) == ("link.failed", DEADLINE_EXCEEDED)


def test_the_deadline_is_the_202_plus_the_setting(api: LinkClient, settings: Any) -> None:
    settings.WORKFLOW_DEADLINE_SECONDS = 3600
    workflow = accepted(api)
    assert workflow.deadline_at == workflow.created_at + dt.timedelta(seconds=3600)
    # Rows from before the column: their 202 + the setting.
    Workflow.objects.filter(id=workflow.id).update(deadline_at=None)
    workflow.refresh_from_db()
    assert workflow_deadline(workflow=workflow) == workflow.created_at + dt.timedelta(hours=1)


def test_the_sweep_fails_a_due_workflow_past_its_deadline_at_once(
    api: LinkClient, settings: Any
) -> None:
    settings.RECONCILE_STALE_AFTER_SECONDS = 60
    late, on_time = accepted(api), accepted(api)
    # Both due and just touched; on_time's search went asynchronous and its callback never came
    # (idle for longer than the stale window). The deadline waits for no stale window.
    Workflow.objects.filter(id=on_time.id).update(
        status=Status.REQUESTED, due_at=None, updated_at=timezone.now() - dt.timedelta(seconds=120)
    )
    past_deadline(late)
    report = workflows_reconcile()
    assert (report.failed, report.requeued) == ([late.id], [on_time.id])
    ended_by_deadline(late)
    row = Workflow.objects.get(id=late.id)
    assert (row.due_at, row.published_at) == (None, None)  # off the schedule
    last = row.transitions.order_by("id").last()
    assert last is not None and last.actor == "sweep"
    assert Workflow.objects.get(id=on_time.id).status == Status.REQUESTED


def claimed(workflow: Workflow) -> uuid.UUID:
    """Claimed by a consumer, as a published message would be (in flight)."""
    (row,) = workflows_claim(workflow_ids=[workflow.id], actor="worker")
    assert row.claim_id is not None and row.published_at is not None
    return row.claim_id


def due_after_a_backoff(workflow: Workflow) -> None:
    # A transient failure put it back, due again in ten minutes.
    put = PutBack(workflow.id, claimed(workflow), 600.0, "HTTP 503: due again in 600.0 s")
    assert workflows_put_back(put=[put], actor="worker") == [workflow.id]


def waiting_for_the_internal_system(workflow: Workflow) -> None:
    # The breaker opened: the consumer put it back unsearched, due when the system answers.
    breaker_report(successes=0, failures=conf.INTERNAL_SEARCH_BREAKER_FAILURES)
    assert breaker_state().open
    [put] = links_process(workflow_ids=[workflow.id]).put_back
    assert put.refund
    row = Workflow.objects.get(id=workflow.id)
    assert (row.attempts, row.claim_id, row.published_at) == (0, None, None)
    assert row.due_at is not None


def in_flight_not_claimed(workflow: Workflow) -> None:
    # Published by the scheduler (as its SCHEDULE statement leaves it); no consumer took it.
    Workflow.objects.filter(id=workflow.id).update(due_at=None, published_at=timezone.now())


def in_flight_with_a_dead_claim(workflow: Workflow) -> None:
    claimed(workflow)
    Workflow.objects.filter(id=workflow.id).update(
        claimed_until=timezone.now() - dt.timedelta(seconds=1)
    )


def waiting_for_its_callback(workflow: Workflow) -> None:
    claim = claimed(workflow)
    Workflow.objects.filter(id=workflow.id, claim_id=claim).update(
        status=Status.REQUESTED, claim_id=None, claimed_until=None, published_at=None
    )


@pytest.mark.parametrize(
    "where",
    [
        None,
        due_after_a_backoff,
        waiting_for_the_internal_system,
        in_flight_not_claimed,
        in_flight_with_a_dead_claim,
        waiting_for_its_callback,
    ],
    ids=lambda where: "due" if where is None else where.__name__,
)
def test_the_sweep_fails_an_unclaimed_workflow_past_its_deadline_wherever_it_waits(
    api: LinkClient, where: Callable[[Workflow], None] | None
) -> None:
    workflow = accepted(api)
    if where is not None:
        where(workflow)
    untouched = Workflow.objects.get(id=workflow.id)
    assert workflows_reconcile() == ReconcileReport()  # not late yet: nothing to do
    assert Workflow.objects.get(id=workflow.id).updated_at == untouched.updated_at
    past_deadline(workflow)
    assert workflows_reconcile(dry_run=True).failed == [workflow.id]
    report = workflows_reconcile()
    assert (report.failed, report.requeued) == ([workflow.id], [])
    ended_by_deadline(workflow)
    row = Workflow.objects.get(id=workflow.id)
    assert (row.due_at, row.published_at) == (None, None)
    last = row.transitions.order_by("id").last()
    assert last is not None
    assert (last.source, last.target, last.actor) == (untouched.status, Status.FAILED, "sweep")


def test_a_live_claim_past_its_deadline_is_left_to_its_consumer(api: LinkClient) -> None:
    workflow = accepted(api)
    claim = claimed(workflow)
    past_deadline(workflow)
    before = Workflow.objects.get(id=workflow.id)
    assert workflows_reconcile() == ReconcileReport()
    row = Workflow.objects.get(id=workflow.id)
    assert (row.status, row.claim_id, row.updated_at) == (
        Status.IN_PROGRESS,
        claim,
        before.updated_at,
    )
    assert not WebhookDelivery.objects.filter(workflow=workflow).exists()


def test_a_claim_past_the_deadline_fails_without_searching(api: LinkClient) -> None:
    workflow = accepted(api)
    past_deadline(workflow)
    # No internal system configured at all: a search would fail, not end it this way.
    links_process(workflow_ids=[workflow.id])
    ended_by_deadline(workflow)
    assert Workflow.objects.get(id=workflow.id).attempts == 1


@pytest.mark.django_db(transaction=True)
def test_a_transient_error_past_the_deadline_fails_instead_of_retrying(
    credentials: CustomerCredentials, settings: Any
) -> None:
    server = make_server("127.0.0.1", 0)
    settings.INTERNAL_SEARCH_URL = server.base_url
    workflow = accepted(LinkClient(credentials.token))
    with serving(server):
        control = f"{server.base_url.removesuffix('/fhir')}/_control/script"
        answer = {"status": 503, "delay_ms": 200}
        requests.post(control, json={"responses": [answer]}, timeout=5)
        # The deadline passes while the search is out: the 503 would be retried otherwise.
        Workflow.objects.filter(id=workflow.id).update(
            deadline_at=timezone.now() + dt.timedelta(milliseconds=50)
        )
        processed = links_process(workflow_ids=[workflow.id])
    assert processed.put_back == []
    row = Workflow.objects.get(id=workflow.id)
    assert row.status == Status.FAILED
    assert row.reason.startswith(f"{DEADLINE_EXCEEDED}: ")


def test_an_operators_requeue_sets_a_new_deadline(api: LinkClient, settings: Any) -> None:
    settings.WORKFLOW_DEADLINE_SECONDS = 600
    workflow = accepted(api)
    past_deadline(workflow)
    workflow_mark_failed(workflow_id=workflow.id, actor="ops", reason="stop")
    before = timezone.now()
    workflow_requeue(workflow_id=workflow.id, actor="ops")
    row = Workflow.objects.get(id=workflow.id)
    assert row.status == Status.RECEIVED
    assert row.due_at is not None and before <= row.due_at  # due at once, for the scheduler
    assert row.published_at is None
    assert row.deadline_at is not None
    assert (
        before + dt.timedelta(seconds=599)
        <= row.deadline_at
        <= timezone.now() + dt.timedelta(seconds=600)
    )
