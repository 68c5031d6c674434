"""The ops actions of the Django admin (re-queue, mark FAILED, redeliver), the stuck filter, the
webhook delivery log and the patient mapping list, driven through the real admin views."""

import datetime as dt
import uuid
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.contrib.messages import get_messages
from django.test import Client
from django.utils import timezone

from linking.models import MappingStatus, PatientMapping
from merchant.models import Customer
from merchant.services import CustomerCredentials
from tests.conftest import broker_messages, queued_delivery_ids
from workflows.models import (
    DeliveryStatus,
    Status,
    WebhookAttempt,
    WebhookDelivery,
    Workflow,
)
from workflows.services import workflow_finish, workflow_mark_failed, workflow_transition

pytestmark = pytest.mark.django_db

WORKFLOWS = "/admin/workflows/workflow/"
DELIVERIES = "/admin/workflows/webhookdelivery/"


@pytest.fixture
def operator(db: None) -> Client:
    user = User.objects.create_superuser("ops", "ops@example.org", "a-long-password-1")
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def customer(credentials: CustomerCredentials) -> Customer:
    return credentials.customer


@pytest.fixture(autouse=True)
def sweep_settings(settings: Any) -> None:
    settings.RECONCILE_STALE_AFTER_SECONDS = 420


def make(
    customer: Customer, status: str = Status.RECEIVED, *, age: dt.timedelta | None = None
) -> Workflow:
    workflow = Workflow(customer=customer, patient_id=uuid.uuid4(), status=status)
    workflow.save()
    if age is not None:
        Workflow.objects.filter(id=workflow.id).update(updated_at=timezone.now() - age)
    return Workflow.objects.get(id=workflow.id)


def completed(customer: Customer) -> Workflow:
    workflow = make(customer, Status.IN_PROGRESS)
    workflow = workflow_transition(workflow=workflow, name="mark_linked", actor="test")
    return workflow_finish(workflow=workflow, name="complete", actor="test")


def act(client: Client, url: str, action: str, ids: list[Any], **extra: str) -> Any:
    data: dict[str, Any] = {"action": action, "_selected_action": [str(i) for i in ids], **extra}
    return client.post(url, data)


def flashed(response: Any) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def status_of(workflow: Workflow) -> str:
    return str(Workflow.objects.get(id=workflow.id).status)


# --- re-queue ---------------------------------------------------------------------------------


def test_requeue_action_makes_the_workflows_due_and_publishes_nothing(
    operator, customer, redis_db, django_capture_on_commit_callbacks
):
    failed = workflow_mark_failed(
        workflow_id=make(customer, Status.IN_PROGRESS).id, actor="test", reason="broken"
    )
    pending = make(customer, Status.IN_PROGRESS, age=dt.timedelta(hours=1))
    # In flight, published an hour ago, and nobody took it.
    Workflow.objects.filter(id=pending.id).update(
        due_at=None, published_at=timezone.now() - dt.timedelta(hours=1)
    )
    done = completed(customer)
    before = timezone.now()
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = act(operator, WORKFLOWS, "requeue", [failed.id, pending.id, done.id])
    assert response.status_code == 302
    assert status_of(failed) == Status.RECEIVED
    assert Workflow.objects.get(id=pending.id).requeues == 1
    assert status_of(done) == Status.COMPLETED
    messages = flashed(response)
    assert "Re-queued 2 workflow(s)." in messages
    assert any(str(done.id) in m and "COMPLETED" in m for m in messages)
    for workflow in (failed, pending):
        row = Workflow.objects.get(id=workflow.id)
        # Due at once, out of flight: the scheduler publishes it in its turn.
        assert row.due_at is not None and before <= row.due_at <= timezone.now()
        assert row.published_at is None
        last = row.transitions.last()
        assert last is not None
        assert last.actor == "operator:ops"
    done_row = Workflow.objects.get(id=done.id)
    assert (done_row.due_at, done_row.published_at) == (None, None)
    assert callbacks == []
    assert broker_messages(redis_db) == []


# --- mark FAILED (an intermediate form) -------------------------------------------------------


def test_mark_failed_shows_its_form_first_and_changes_nothing(operator, customer):
    first, second = make(customer, Status.IN_PROGRESS), make(customer, Status.REQUESTED)
    response = act(operator, WORKFLOWS, "mark_failed", [first.id, second.id])
    assert response.status_code == 200
    assert "admin/action_with_reason.html" in [t.name for t in response.templates]
    html = response.content.decode()
    for workflow in (first, second):
        assert f'name="_selected_action" value="{workflow.id}"' in html
    assert 'name="reason"' in html
    assert 'name="apply"' in html
    assert 'name="action" value="mark_failed"' in html
    assert (status_of(first), status_of(second)) == (Status.IN_PROGRESS, Status.REQUESTED)
    assert not WebhookDelivery.objects.exists()


def test_mark_failed_applies_the_reason_to_pending_workflows_only(operator, customer):
    first, second = make(customer, Status.IN_PROGRESS), make(customer, Status.LINKED)
    done = completed(customer)
    response = act(
        operator,
        WORKFLOWS,
        "mark_failed",
        [first.id, second.id, done.id],
        apply="Mark FAILED",
        reason="internal system outage INC-9",
    )
    assert response.status_code == 302
    assert "Marked 2 workflow(s) FAILED." in flashed(response)
    for workflow in (first, second):
        row = Workflow.objects.get(id=workflow.id)
        assert (row.status, row.reason) == (Status.FAILED, "internal system outage INC-9")
        last = row.transitions.last()
        assert last is not None
        assert (last.target, last.actor) == ("FAILED", "operator:ops")
        delivery = WebhookDelivery.objects.get(workflow=workflow)
        assert (delivery.event_type, delivery.status) == ("link.failed", DeliveryStatus.PENDING)
        assert "internal system outage INC-9" in delivery.payload
    assert status_of(done) == Status.COMPLETED
    assert WebhookDelivery.objects.filter(workflow=done, event_type="link.failed").count() == 0


def test_mark_failed_without_a_reason_shows_the_form_again(operator, customer):
    workflow = make(customer, Status.IN_PROGRESS)
    response = act(
        operator, WORKFLOWS, "mark_failed", [workflow.id], apply="Mark FAILED", reason=""
    )
    assert response.status_code == 200
    assert "This field is required." in response.content.decode()
    assert status_of(workflow) == Status.IN_PROGRESS
    assert not WebhookDelivery.objects.exists()


# --- redeliver ---------------------------------------------------------------------------------


def exhaust(workflow: Workflow) -> WebhookDelivery:
    WebhookDelivery.objects.filter(workflow=workflow).update(
        status=DeliveryStatus.EXHAUSTED, attempts=8, next_attempt_at=None
    )
    return WebhookDelivery.objects.get(workflow=workflow)


def test_redeliver_webhooks_action_on_workflows(
    operator, customer, redis_db, django_capture_on_commit_callbacks
):
    chosen, other = completed(customer), completed(customer)
    delivery, other_delivery = exhaust(chosen), exhaust(other)
    with django_capture_on_commit_callbacks(execute=True):
        response = act(operator, WORKFLOWS, "redeliver_webhooks", [chosen.id])
    assert response.status_code == 302
    assert "Re-queued 1 webhook delivery(ies)." in flashed(response)
    delivery.refresh_from_db()
    other_delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.PENDING, 0)
    assert (other_delivery.status, other_delivery.attempts) == (DeliveryStatus.EXHAUSTED, 8)
    assert queued_delivery_ids(broker_messages(redis_db)) == [delivery.id]


def test_redeliver_action_on_deliveries(operator, customer):
    chosen, other = completed(customer), completed(customer)
    delivery, other_delivery = exhaust(chosen), exhaust(other)
    response = act(operator, DELIVERIES, "redeliver", [delivery.id])
    assert response.status_code == 302
    assert "Re-queued 1 delivery(ies)." in flashed(response)
    delivery.refresh_from_db()
    other_delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.PENDING, 0)
    assert other_delivery.status == DeliveryStatus.EXHAUSTED


# --- the stuck filter, the delivery log, the mappings -----------------------------------------


def test_stuck_filter_lists_only_stale_pending_workflows(operator, customer, settings):
    stale = make(customer, Status.IN_PROGRESS, age=dt.timedelta(minutes=30))
    fresh = make(customer, Status.RECEIVED, age=dt.timedelta(minutes=2))
    old_done = make(customer, Status.COMPLETED, age=dt.timedelta(days=2))
    old_failed = make(customer, Status.FAILED, age=dt.timedelta(days=2))
    everything = operator.get(WORKFLOWS).content.decode()
    for workflow in (stale, fresh, old_done, old_failed):
        assert str(workflow.id) in everything

    response = operator.get(WORKFLOWS, {"stuck": "yes"})
    assert response.status_code == 200
    html = response.content.decode()
    assert "pending &gt; 420 s" in html or "pending > 420 s" in html
    assert str(stale.id) in html
    for workflow in (fresh, old_done, old_failed):
        assert str(workflow.id) not in html

    settings.RECONCILE_STALE_AFTER_SECONDS = 3600
    assert str(stale.id) not in operator.get(WORKFLOWS, {"stuck": "yes"}).content.decode()


def test_delivery_page_shows_its_attempts(operator, customer):
    delivery = WebhookDelivery.objects.get(workflow=completed(customer))
    now = timezone.now()
    WebhookAttempt.objects.create(
        delivery=delivery, at=now, status_code=503, latency_ms=123, error="HTTP 503"
    )
    WebhookAttempt.objects.create(
        delivery=delivery, at=now, status_code=None, latency_ms=15007, error="timed out"
    )
    listing = operator.get(DELIVERIES).content.decode()
    assert delivery.webhook_id in listing
    response = operator.get(f"{DELIVERIES}{delivery.id}/change/")
    assert response.status_code == 200
    html = response.content.decode()
    for text in ("HTTP 503", "503", "123", "timed out", "15007", delivery.webhook_id):
        assert text in html
    # The log is read-only: no inline form inputs for attempts.
    assert 'name="attempt_log-0-error"' not in html


def test_patient_mapping_admin_lists_a_mapping(operator, customer):
    workflow = completed(customer)
    mapping = PatientMapping.objects.create(
        customer=customer,
        customer_patient_id=workflow.patient_id,
        internal_patient_id="0c8eca2a00d55380a788b6f950b8c635",
        status=MappingStatus.LINKED,
        workflow=workflow,
        score=0.99,
        match_grade="certain",
    )
    response = operator.get("/admin/linking/patientmapping/")
    assert response.status_code == 200
    html = response.content.decode()
    assert mapping.internal_patient_id in html
    assert str(mapping.customer_patient_id) in html
    found = operator.get("/admin/linking/patientmapping/", {"q": mapping.internal_patient_id})
    assert str(mapping.customer_patient_id) in found.content.decode()
    missing = operator.get("/admin/linking/patientmapping/", {"q": "no-such-internal-id"})
    assert str(mapping.customer_patient_id) not in missing.content.decode()
    page = operator.get(f"/admin/linking/patientmapping/{mapping.id}/change/")
    assert page.status_code == 200
    assert 'name="internal_patient_id"' not in page.content.decode()
