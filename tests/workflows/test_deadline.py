"""WORKFLOW_DEADLINE_SECONDS: a workflow not ended by its deadline is FAILED, "deadline
exceeded", and the customer told, at the first look after it: the sweep, a claim, a retry."""

import datetime as dt
import json
import uuid
from typing import Any

import pytest
import requests
from django.utils import timezone

from linking.services import links_process
from merchant.services import CustomerCredentials
from standin.server import make_server
from tests.conftest import LinkClient, link_body
from tests.processes import serving
from workflows.models import Status, WebhookDelivery, Workflow
from workflows.services import (
    DEADLINE_EXCEEDED,
    workflow_deadline,
    workflow_mark_failed,
    workflow_requeue,
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


def test_the_sweep_fails_a_stale_workflow_past_its_deadline(api: LinkClient, settings: Any) -> None:
    settings.RECONCILE_STALE_AFTER_SECONDS = 60
    late, on_time = accepted(api), accepted(api)
    old = timezone.now() - dt.timedelta(seconds=120)
    Workflow.objects.filter(id__in=[late.id, on_time.id]).update(updated_at=old)
    past_deadline(late)
    report = workflows_reconcile()
    assert (report.failed, report.requeued) == ([late.id], [on_time.id])
    ended_by_deadline(late)


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
    assert processed.retries == []
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
    assert row.deadline_at is not None
    assert (
        before + dt.timedelta(seconds=599)
        <= row.deadline_at
        <= timezone.now() + dt.timedelta(seconds=600)
    )
