"""Webhook deliveries (Standard Webhooks) against a real receiver on 127.0.0.1: what is sent,
how each kind of answer is recorded, the retry schedule, disabling, SSRF refusal, dispatching by
beat and redelivery."""

import datetime as dt
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from merchant.models import Customer
from merchant.services import CustomerCredentials
from standin.receiver import ReceiverServer, Step, make_receiver
from tests.conftest import LinkClient, broker_messages, link_body, queued_delivery_ids
from tests.processes import serving
from workflows.models import (
    DeliveryStatus,
    TransitionName,
    WebhookAttempt,
    WebhookDelivery,
    Workflow,
)
from workflows.services import (
    webhook_delivery_attempt,
    webhook_dispatch_due,
    webhook_redeliver,
    workflow_finish,
    workflow_transition,
)

pytestmark = pytest.mark.django_db

SCHEDULE = [5, 60, 300]


@pytest.fixture(autouse=True)
def webhook_settings(settings: Any) -> None:
    settings.WEBHOOK_RETRY_SCHEDULE = list(SCHEDULE)
    settings.WEBHOOK_TIMEOUT_SECONDS = 2.0
    settings.WEBHOOK_ALLOW_PRIVATE_HOSTS = True


@pytest.fixture
def customer(credentials: CustomerCredentials) -> Customer:
    return credentials.customer


@pytest.fixture
def receiver(customer: Customer) -> Iterator[ReceiverServer]:
    """The customer's receiver, verifying signatures with the customer's secret."""
    server = make_receiver("127.0.0.1", 0, secret=customer.webhook_secret)
    with serving(server):
        customer.webhook_url = f"{server.url}/hooks"
        customer.save(update_fields=["webhook_url"])
        yield server


def finished(
    customer: Customer,
    *,
    outcome: TransitionName = "mark_linked",
    reason: str = "",
    patient: Any = None,
) -> Workflow:
    """A workflow taken to COMPLETED (outcome mark_linked / mark_no_results) or FAILED (fail)."""
    workflow = Workflow.objects.create(customer=customer, patient_id=patient or uuid.uuid4())
    workflow = workflow_transition(workflow=workflow, name="start", actor="test")
    if outcome == "fail":
        return workflow_finish(workflow=workflow, name="fail", actor="test", reason=reason)
    workflow = workflow_transition(workflow=workflow, name=outcome, actor="test", reason=reason)
    return workflow_finish(workflow=workflow, name="complete", actor="test")


def delivery_of(workflow: Workflow) -> WebhookDelivery:
    return WebhookDelivery.objects.get(workflow=workflow)


def make_due(delivery: WebhookDelivery) -> None:
    WebhookDelivery.objects.filter(id=delivery.id).update(
        next_attempt_at=timezone.now() - dt.timedelta(seconds=1)
    )


def attempt(delivery: WebhookDelivery) -> Any:
    outcome = webhook_delivery_attempt(delivery_id=delivery.id)
    delivery.refresh_from_db()
    return outcome


def seconds_until(moment: dt.datetime | None) -> float:
    assert moment is not None
    return (moment - timezone.now()).total_seconds()


# --- a successful delivery ---------------------------------------------------------------------


def test_completed_workflow_is_delivered_signed_and_thin(
    api: LinkClient, customer: Customer, receiver: ReceiverServer
):
    body = link_body(
        full_name="Canary Zyxwvut",
        dob="1977-07-07",
        contact={"phone": "+1-555-0177", "email": "canary@example.org", "address": "7 Elm Rd"},
        insurance={"payer": "Canary Mutual", "member_id": "CM-42"},
    )
    response = api.post_link(body)
    assert response.status_code == 202
    workflow = Workflow.objects.get(id=response.json()["workflow-id"])
    workflow = workflow_transition(workflow=workflow, name="start", actor="test")
    workflow = workflow_transition(workflow=workflow, name="mark_linked", actor="test")
    workflow = workflow_finish(workflow=workflow, name="complete", actor="test")

    delivery = delivery_of(workflow)
    assert (delivery.status, delivery.attempts, delivery.event_type) == (
        DeliveryStatus.PENDING,
        0,
        "link.completed",
    )
    assert delivery.url == f"{receiver.url}/hooks"
    assert delivery.webhook_id.startswith("msg_")
    assert seconds_until(delivery.next_attempt_at) <= 0

    before = time.time()
    outcome = attempt(delivery)
    assert (outcome.status, outcome.status_code) == (DeliveryStatus.DELIVERED, 200)
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == (
        DeliveryStatus.DELIVERED,
        1,
        200,
    )
    assert delivery.next_attempt_at is None
    assert delivery.delivered_at is not None

    [sent] = receiver.deliveries()
    assert sent.path == "/hooks"
    assert sent.verified is True
    assert sent.headers["webhook-id"] == delivery.webhook_id
    assert abs(int(sent.headers["webhook-timestamp"]) - before) <= 5
    assert sent.headers["webhook-signature"].startswith("v1,")
    assert sent.headers["content-type"] == "application/json"
    assert sent.body == delivery.payload
    payload = sent.json()
    assert set(payload) == {"type", "timestamp", "data"}
    assert payload["type"] == "link.completed"
    assert payload["timestamp"].endswith("Z")
    dt.datetime.fromisoformat(payload["timestamp"].replace("Z", "+00:00"))
    assert payload["data"] == {
        "workflow-id": str(workflow.id),
        "status": "COMPLETED",
        "result": "LINKED",
        "customer-patient-id": body["patient"]["id"],
        "reason": None,
    }
    raw = sent.body + json.dumps(sent.headers)
    for secret in (
        "Canary",
        "Zyxwvut",
        "1977-07-07",
        "555-0177",
        "canary@example.org",
        "Elm Rd",
        "CM-42",
    ):
        assert secret not in raw

    [logged] = WebhookAttempt.objects.filter(delivery=delivery)
    assert (logged.status_code, logged.error) == (200, "")
    # Sent once: the delivery is no longer due for anybody.
    assert attempt(delivery) is None
    assert len(receiver.deliveries()) == 1


def test_no_results_and_failed_payloads_carry_the_reason(customer, receiver):
    no_results = finished(customer, outcome="mark_no_results", reason="ambiguous")
    failed = finished(customer, outcome="fail", reason="internal search refused the request (400)")
    for workflow in (no_results, failed):
        assert attempt(delivery_of(workflow)).status == DeliveryStatus.DELIVERED
    by_workflow = {d.json()["data"]["workflow-id"]: d for d in receiver.deliveries()}
    assert by_workflow[str(no_results.id)].json()["type"] == "link.completed"
    assert by_workflow[str(no_results.id)].json()["data"] == {
        "workflow-id": str(no_results.id),
        "status": "COMPLETED",
        "result": "NO_RESULTS",
        "customer-patient-id": str(no_results.patient_id),
        "reason": "ambiguous",
    }
    failed_payload = by_workflow[str(failed.id)].json()
    assert failed_payload["type"] == "link.failed"
    assert failed_payload["data"] == {
        "workflow-id": str(failed.id),
        "status": "FAILED",
        "result": None,
        "customer-patient-id": str(failed.patient_id),
        "reason": "internal search refused the request (400)",
    }
    assert all(d.verified for d in receiver.deliveries())


# --- failures and the retry schedule ------------------------------------------------------------


def test_a_500_schedules_the_first_retry_and_logs_the_attempt(customer, receiver):
    receiver.respond_with(Step(status=500, delay_ms=40))
    delivery = delivery_of(finished(customer))
    before = timezone.now()
    outcome = attempt(delivery)
    after = timezone.now()
    assert (outcome.status, outcome.status_code, outcome.error) == (
        DeliveryStatus.PENDING,
        500,
        "HTTP 500",
    )
    assert delivery.status == DeliveryStatus.PENDING
    assert delivery.attempts == 1
    assert (delivery.last_status_code, delivery.last_error) == (500, "HTTP 500")
    assert delivery.next_attempt_at is not None
    assert before + dt.timedelta(seconds=SCHEDULE[0]) <= delivery.next_attempt_at
    assert delivery.next_attempt_at <= after + dt.timedelta(seconds=SCHEDULE[0])
    [logged] = WebhookAttempt.objects.filter(delivery=delivery)
    assert (logged.status_code, logged.error) == (500, "HTTP 500")
    assert logged.latency_ms >= 40
    # Not due again before the schedule says so.
    assert attempt(delivery) is None
    assert len(receiver.deliveries()) == 1


def test_attempts_follow_the_schedule_then_exhaust(customer, receiver):
    receiver.respond_with(*[Step(status=503)] * (len(SCHEDULE) + 1))
    delivery = delivery_of(finished(customer))
    for number, wait in enumerate(SCHEDULE, start=1):
        outcome = attempt(delivery)
        assert outcome.status == DeliveryStatus.PENDING
        assert delivery.attempts == number
        assert wait - 2 <= seconds_until(delivery.next_attempt_at) <= wait
        make_due(delivery)
    outcome = attempt(delivery)
    assert (outcome.status, outcome.status_code) == (DeliveryStatus.EXHAUSTED, 503)
    assert delivery.status == DeliveryStatus.EXHAUSTED
    assert delivery.attempts == len(SCHEDULE) + 1
    assert delivery.next_attempt_at is None
    assert delivery.delivered_at is None
    # Exhausted is final: nothing more is sent.
    make_due(delivery)
    assert attempt(delivery) is None

    sent = receiver.deliveries()
    assert len(sent) == len(SCHEDULE) + 1
    assert {d.headers["webhook-id"] for d in sent} == {delivery.webhook_id}
    assert {d.body for d in sent} == {delivery.payload}
    assert all(d.verified for d in sent)
    codes = list(
        WebhookAttempt.objects.filter(delivery=delivery).values_list("status_code", flat=True)
    )
    assert codes == [503] * (len(SCHEDULE) + 1)


def test_a_retry_that_succeeds_is_delivered_with_the_same_id(customer, receiver):
    receiver.respond_with(Step(status=500), Step(status=502))
    delivery = delivery_of(finished(customer))
    assert attempt(delivery).status == DeliveryStatus.PENDING
    make_due(delivery)
    assert attempt(delivery).status == DeliveryStatus.PENDING
    assert 55 <= seconds_until(delivery.next_attempt_at) <= SCHEDULE[1]
    make_due(delivery)
    assert attempt(delivery).status == DeliveryStatus.DELIVERED
    assert (delivery.attempts, delivery.last_status_code, delivery.last_error) == (3, 200, "")
    assert [d.answered for d in receiver.deliveries()] == [500, 502, 200]
    assert len({d.headers["webhook-id"] for d in receiver.deliveries()}) == 1


def test_a_redirect_is_a_failure_and_its_location_is_never_requested(customer, receiver):
    receiver.respond_with(Step(status=301, location=f"{receiver.url}/elsewhere"))
    delivery = delivery_of(finished(customer))
    outcome = attempt(delivery)
    assert (outcome.status, outcome.status_code) == (DeliveryStatus.PENDING, 301)
    assert delivery.last_error == "redirect not followed"
    assert seconds_until(delivery.next_attempt_at) > SCHEDULE[0] - 2
    time.sleep(0.2)  # a follow-up request, if any, would have arrived by now
    assert [d.path for d in receiver.deliveries()] == ["/hooks"]


def test_410_disables_the_endpoint_and_later_deliveries_are_not_sent(customer, receiver):
    receiver.respond_with(Step(status=410))
    first = delivery_of(finished(customer))
    outcome = attempt(first)
    assert (outcome.status, outcome.status_code) == (DeliveryStatus.DISABLED, 410)
    assert first.status == DeliveryStatus.DISABLED
    assert first.next_attempt_at is None
    customer.refresh_from_db()
    assert customer.webhook_enabled is False

    second = delivery_of(finished(customer))
    outcome = attempt(second)
    assert (outcome.status, outcome.status_code) == (DeliveryStatus.DISABLED, None)
    assert second.status == DeliveryStatus.DISABLED
    assert second.last_error == "endpoint disabled"
    assert len(receiver.deliveries()) == 1
    [logged] = WebhookAttempt.objects.filter(delivery=second)
    assert (logged.status_code, logged.error) == (None, "endpoint disabled")


def test_a_receiver_slower_than_the_timeout_is_retried(customer, receiver, settings):
    settings.WEBHOOK_TIMEOUT_SECONDS = 0.3
    receiver.respond_with(Step(status=200, delay_ms=1200))
    delivery = delivery_of(finished(customer))
    started = time.monotonic()
    outcome = attempt(delivery)
    assert time.monotonic() - started < 1.0
    assert (outcome.status, outcome.status_code, outcome.error) == (
        DeliveryStatus.PENDING,
        None,
        "timed out",
    )
    assert (delivery.status, delivery.last_status_code, delivery.last_error) == (
        DeliveryStatus.PENDING,
        None,
        "timed out",
    )
    assert SCHEDULE[0] - 2 <= seconds_until(delivery.next_attempt_at) <= SCHEDULE[0]
    [logged] = WebhookAttempt.objects.filter(delivery=delivery)
    assert logged.error == "timed out"
    assert logged.latency_ms >= 300


def test_a_delivery_that_is_not_due_is_not_attempted(customer, receiver):
    delivery = delivery_of(finished(customer))
    WebhookDelivery.objects.filter(id=delivery.id).update(
        next_attempt_at=timezone.now() + dt.timedelta(minutes=5)
    )
    assert attempt(delivery) is None
    assert delivery.attempts == 0
    for status in (DeliveryStatus.DELIVERED, DeliveryStatus.EXHAUSTED, DeliveryStatus.DISABLED):
        WebhookDelivery.objects.filter(id=delivery.id).update(status=status, next_attempt_at=None)
        assert attempt(delivery) is None
    assert webhook_delivery_attempt(delivery_id=delivery.id + 10_000) is None
    assert receiver.deliveries() == []
    assert not WebhookAttempt.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_two_workers_attempting_one_due_delivery_send_it_once(customer, receiver):
    receiver.respond_with(Step(status=200, delay_ms=300))
    delivery = delivery_of(finished(customer))
    barrier = threading.Barrier(2)
    outcomes: list[Any] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait(timeout=5)
            outcomes.append(webhook_delivery_attempt(delivery_id=delivery.id))
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert errors == []
    assert sorted(outcome is None for outcome in outcomes) == [False, True]
    assert len(receiver.deliveries()) == 1
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.DELIVERED, 1)
    assert WebhookAttempt.objects.filter(delivery=delivery).count() == 1


@pytest.mark.parametrize(
    ("template", "error"),
    [
        ("{url}/hooks", "https"),
        ("https://127.0.0.1:{port}/hooks", "non-public"),
        ("https://localhost:{port}/hooks", "non-public"),
        ("https://[::1]:{port}/hooks", "non-public"),
        ("ftp://127.0.0.1:{port}/hooks", "unsupported"),
    ],
)
def test_private_hosts_are_refused_without_a_request(customer, receiver, settings, template, error):
    settings.WEBHOOK_ALLOW_PRIVATE_HOSTS = False
    delivery = delivery_of(finished(customer))
    port = receiver.server_address[1]
    url = template.format(url=receiver.url, port=port)
    WebhookDelivery.objects.filter(id=delivery.id).update(url=url)
    outcome = attempt(delivery)
    assert outcome.status == DeliveryStatus.EXHAUSTED
    assert error in outcome.error
    assert (delivery.status, delivery.next_attempt_at) == (DeliveryStatus.EXHAUSTED, None)
    assert error in delivery.last_error
    assert receiver.deliveries() == []
    assert WebhookAttempt.objects.filter(delivery=delivery, status_code=None).count() == 1


def test_a_per_request_webhook_url_is_the_one_used(
    api: LinkClient, customer: Customer, receiver: ReceiverServer
):
    body = {**link_body(), "webhook": f"{receiver.url}/per-request/7?tag=x"}
    response = api.post_link(body)
    assert response.status_code == 202
    workflow = Workflow.objects.get(id=response.json()["workflow-id"])
    assert workflow.webhook_url == body["webhook"]
    workflow = workflow_transition(workflow=workflow, name="start", actor="test")
    workflow = workflow_finish(workflow=workflow, name="fail", actor="test", reason="x")
    delivery = delivery_of(workflow)
    assert delivery.url == body["webhook"]
    assert attempt(delivery).status == DeliveryStatus.DELIVERED
    [sent] = receiver.deliveries()
    assert sent.path == "/per-request/7?tag=x"
    assert sent.verified is True
    # Another receiver (another port of the same host) is refused at the API.
    other = {**link_body(), "webhook": "http://127.0.0.1:1/hooks"}
    assert api.post_link(other, key="key-2").status_code == 422


# --- beat's dispatch and redelivery -------------------------------------------------------------


def test_dispatch_enqueues_only_due_pending_deliveries(customer, redis_db):
    now = timezone.now()
    deliveries = [delivery_of(finished(customer)) for _ in range(6)]
    due_old, due_new, later, delivered, exhausted, disabled = deliveries
    for delivery, status, at in [
        (due_old, DeliveryStatus.PENDING, now - dt.timedelta(minutes=5)),
        (due_new, DeliveryStatus.PENDING, now - dt.timedelta(seconds=1)),
        (later, DeliveryStatus.PENDING, now + dt.timedelta(minutes=5)),
        (delivered, DeliveryStatus.DELIVERED, None),
        (exhausted, DeliveryStatus.EXHAUSTED, None),
        (disabled, DeliveryStatus.DISABLED, None),
    ]:
        WebhookDelivery.objects.filter(id=delivery.id).update(status=status, next_attempt_at=at)
    assert broker_messages(redis_db) == []

    assert webhook_dispatch_due() == 2
    messages = broker_messages(redis_db)
    # One message for the batch (WORKER_BATCH_SIZE ids at most), ids only.
    assert sorted(queued_delivery_ids(messages)) == sorted([due_old.id, due_new.id])
    assert all(len(m["args"]) == 1 and m["kwargs"] == {} for m in messages)
    assert len(messages) == 1
    # Dispatching sends nothing itself and changes no row.
    assert WebhookDelivery.objects.filter(attempts__gt=0).count() == 0


def test_dispatch_takes_the_oldest_first_within_its_limit(customer, redis_db):
    now = timezone.now()
    deliveries = [delivery_of(finished(customer)) for _ in range(3)]
    for age, delivery in zip((1, 30, 10), deliveries, strict=True):
        WebhookDelivery.objects.filter(id=delivery.id).update(
            next_attempt_at=now - dt.timedelta(minutes=age)
        )
    assert webhook_dispatch_due(limit=2) == 2
    assert set(queued_delivery_ids(broker_messages(redis_db))) == {
        deliveries[1].id,
        deliveries[2].id,
    }


def test_redeliver_by_workflow_restarts_the_schedule_with_the_same_id(
    customer, receiver, settings, redis_db, django_capture_on_commit_callbacks
):
    settings.WEBHOOK_RETRY_SCHEDULE = [5]
    receiver.respond_with(Step(status=500), Step(status=500))
    workflow = finished(customer)
    delivery = delivery_of(workflow)
    attempt(delivery)
    make_due(delivery)
    assert attempt(delivery).status == DeliveryStatus.EXHAUSTED
    webhook_id = delivery.webhook_id

    with django_capture_on_commit_callbacks(execute=True):
        assert webhook_redeliver(workflow_ids=[workflow.id]) == 1
        assert broker_messages(redis_db) == []  # the worker is asked only after commit
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.webhook_id) == (
        DeliveryStatus.PENDING,
        0,
        webhook_id,
    )
    assert delivery.delivered_at is None
    assert seconds_until(delivery.next_attempt_at) <= 0
    messages = broker_messages(redis_db)
    assert queued_delivery_ids(messages) == [delivery.id]

    assert attempt(delivery).status == DeliveryStatus.DELIVERED
    sent = receiver.deliveries()
    assert [d.answered for d in sent] == [500, 500, 200]
    assert {d.headers["webhook-id"] for d in sent} == {webhook_id}
    assert {d.body for d in sent} == {delivery.payload}


def test_redeliver_failed_since_takes_only_recent_failures(customer):
    now = timezone.now()
    rows = {name: delivery_of(finished(customer)) for name in ("new_x", "new_d", "old_x", "ok")}
    for name, status, age in [
        ("new_x", DeliveryStatus.EXHAUSTED, dt.timedelta(minutes=30)),
        ("new_d", DeliveryStatus.DISABLED, dt.timedelta(minutes=90)),
        ("old_x", DeliveryStatus.EXHAUSTED, dt.timedelta(hours=3)),
        ("ok", DeliveryStatus.DELIVERED, dt.timedelta(minutes=10)),
    ]:
        WebhookDelivery.objects.filter(id=rows[name].id).update(
            status=status, next_attempt_at=None, attempts=8, updated_at=now - age
        )
    pending = delivery_of(finished(customer))

    assert webhook_redeliver(failed_since=now - dt.timedelta(hours=2)) == 2
    for name, row in rows.items():
        row.refresh_from_db()
        if name.startswith("new"):
            assert (row.status, row.attempts) == (DeliveryStatus.PENDING, 0), name
            assert seconds_until(row.next_attempt_at) <= 0
        else:
            assert row.attempts == 8, name
    assert rows["old_x"].status == DeliveryStatus.EXHAUSTED
    assert rows["ok"].status == DeliveryStatus.DELIVERED
    pending.refresh_from_db()
    assert (pending.status, pending.attempts) == (DeliveryStatus.PENDING, 0)


def test_redeliver_needs_workflows_or_a_date(customer):
    delivery_of(finished(customer))
    with pytest.raises(ValueError):
        webhook_redeliver()


# --- a receiver that answers its status line and then stalls ------------------------------------


@contextmanager
def stalling_receiver() -> Iterator[tuple[str, list[bytes]]]:
    """Sends `200 OK` with a Content-Length, then never sends the body (until closed)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(5)
    received: list[bytes] = []
    done = threading.Event()

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            received.append(conn.recv(65536))
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nok")
            done.wait(5)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/hooks", received
    finally:
        done.set()
        listener.close()
        thread.join(timeout=5)


def test_a_receiver_that_stalls_its_body_is_an_attempt_not_a_crash(customer, settings):
    settings.WEBHOOK_TIMEOUT_SECONDS = 0.3
    delivery = delivery_of(finished(customer))
    with stalling_receiver() as (url, received):
        WebhookDelivery.objects.filter(id=delivery.id).update(url=url)
        outcome = webhook_delivery_attempt(delivery_id=delivery.id)
    assert received  # the request did reach the receiver
    assert outcome is not None
    assert WebhookAttempt.objects.filter(delivery=delivery).count() == 1
