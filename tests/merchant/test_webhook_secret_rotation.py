"""Rotating a customer's webhook secret without downtime: during the overlap every delivery
carries two Standard Webhooks signatures (new, then old), so a receiver holding either secret
accepts it; afterwards only the new one signs. Deliveries go to a real receiver on 127.0.0.1."""

import datetime as dt
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.contrib.messages import get_messages
from django.core.management import CommandError, call_command
from django.db import IntegrityError, transaction
from django.test import Client
from django.utils import timezone
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from merchant import services
from merchant.models import Customer
from merchant.services import (
    CustomerCredentials,
    customer_webhook_secret_rotate,
    token_verify,
)
from standin.receiver import Delivery, ReceiverServer, make_receiver
from tests.processes import ROOT, child_env, serving
from workflows.models import DeliveryStatus, WebhookDelivery, Workflow
from workflows.services import webhook_delivery_attempt, webhook_event_create

pytestmark = pytest.mark.django_db

SECRET_PATTERN = r"^whsec_[A-Za-z0-9+/]{43}=$"


@pytest.fixture(autouse=True)
def webhook_settings(settings: Any) -> None:
    settings.WEBHOOK_TIMEOUT_SECONDS = 2.0
    settings.WEBHOOK_ALLOW_PRIVATE_HOSTS = True


@pytest.fixture
def receiver(credentials: CustomerCredentials) -> Iterator[ReceiverServer]:
    """A receiver recording what arrives (the tests verify with each secret themselves)."""
    server = make_receiver("127.0.0.1", 0)
    with serving(server):
        customer = credentials.customer
        customer.webhook_url = f"{server.url}/hooks"
        customer.save(update_fields=["webhook_url"])
        yield server


def deliver(customer: Customer, receiver: ReceiverServer) -> Delivery:
    """One webhook through the real delivery path; what the receiver got."""
    workflow = Workflow.objects.create(customer=customer, patient_id=uuid.uuid4())
    delivery = webhook_event_create(
        workflow=workflow, event_type="link.completed", data={"workflow-id": str(workflow.id)}
    )
    before = len(receiver.deliveries())
    outcome = webhook_delivery_attempt(delivery_id=delivery.id)
    assert outcome is not None and outcome.status == DeliveryStatus.DELIVERED
    assert WebhookDelivery.objects.get(id=delivery.id).status == DeliveryStatus.DELIVERED
    received = receiver.deliveries()
    assert len(received) == before + 1
    return received[-1]


def verifies(secret: str, delivery: Delivery) -> bool:
    try:
        Webhook(secret).verify(delivery.body, delivery.headers)
    except WebhookVerificationError:
        return False
    return True


def signatures(delivery: Delivery) -> list[str]:
    return delivery.headers["webhook-signature"].split(" ")


def end_overlap(customer: Customer) -> None:
    """As if the window had passed (a queryset update: the delivery path reads the row)."""
    Customer.objects.filter(id=customer.id).update(
        webhook_secret_previous_until=timezone.now() - dt.timedelta(seconds=1)
    )


# --- the service and the delivery path ---------------------------------------------------------


def test_during_the_overlap_both_secrets_verify_then_only_the_new_one(
    credentials: CustomerCredentials, receiver: ReceiverServer
) -> None:
    customer = credentials.customer
    old = customer.webhook_secret
    assert signatures(before := deliver(customer, receiver)) == [
        Webhook(old).sign(
            msg_id=before.headers["webhook-id"],
            timestamp=dt.datetime.fromtimestamp(int(before.headers["webhook-timestamp"]), dt.UTC),
            data=before.body,
        )
    ]

    started = timezone.now()
    new = customer_webhook_secret_rotate(
        customer=customer, overlap=dt.timedelta(hours=2), actor="test"
    )
    assert new != old
    assert re.match(SECRET_PATTERN, new)
    row = Customer.objects.get(id=customer.id)
    assert (row.webhook_secret, row.webhook_secret_previous) == (new, old)
    assert row.webhook_secret_previous_until is not None
    window = row.webhook_secret_previous_until - started
    assert dt.timedelta(hours=2) <= window < dt.timedelta(hours=2, seconds=5)
    # The caller's instance is the row as saved.
    assert (customer.webhook_secret, customer.webhook_secret_previous_until) == (
        new,
        row.webhook_secret_previous_until,
    )

    during = deliver(customer, receiver)
    assert len(signatures(during)) == 2
    assert verifies(new, during) and verifies(old, during)
    # New first, then old: each signature is the one that secret makes.
    moment = dt.datetime.fromtimestamp(int(during.headers["webhook-timestamp"]), dt.UTC)
    expected = [
        Webhook(secret).sign(
            msg_id=during.headers["webhook-id"], timestamp=moment, data=during.body
        )
        for secret in (new, old)
    ]
    assert signatures(during) == expected

    end_overlap(customer)
    after = deliver(customer, receiver)
    assert len(signatures(after)) == 1
    assert verifies(new, after)
    assert not verifies(old, after)


def test_overlap_zero_stops_the_old_secret_at_once(
    credentials: CustomerCredentials, receiver: ReceiverServer
) -> None:
    customer = credentials.customer
    old = customer.webhook_secret
    new = customer_webhook_secret_rotate(customer=customer, overlap=dt.timedelta(0), actor="test")
    row = Customer.objects.get(id=customer.id)
    # Nothing of the old secret is kept.
    assert (row.webhook_secret, row.webhook_secret_previous) == (new, "")
    assert row.webhook_secret_previous_until is None
    delivery = deliver(customer, receiver)
    assert len(signatures(delivery)) == 1
    assert verifies(new, delivery)
    assert not verifies(old, delivery)


def test_rotating_again_keeps_only_the_latest_previous_secret(
    credentials: CustomerCredentials, receiver: ReceiverServer
) -> None:
    customer = credentials.customer
    first = customer.webhook_secret
    second = customer_webhook_secret_rotate(
        customer=customer, overlap=dt.timedelta(hours=1), actor="test"
    )
    third = customer_webhook_secret_rotate(
        customer=customer, overlap=dt.timedelta(hours=1), actor="test"
    )
    delivery = deliver(customer, receiver)
    assert verifies(third, delivery) and verifies(second, delivery)
    assert not verifies(first, delivery)


def test_a_negative_or_too_long_overlap_is_refused(credentials: CustomerCredentials) -> None:
    customer = credentials.customer
    old = customer.webhook_secret
    for overlap in (dt.timedelta(seconds=-1), dt.timedelta(days=31)):
        with pytest.raises(ValueError, match="overlap"):
            customer_webhook_secret_rotate(customer=customer, overlap=overlap, actor="test")
    assert Customer.objects.get(id=customer.id).webhook_secret == old


def test_the_database_refuses_a_previous_secret_without_an_end(
    credentials: CustomerCredentials,
) -> None:
    with pytest.raises(IntegrityError), transaction.atomic():
        Customer.objects.filter(id=credentials.customer.id).update(
            webhook_secret_previous=credentials.customer.webhook_secret
        )


@pytest.mark.django_db(transaction=True)
def test_the_customer_cache_sees_the_new_secret_at_once(
    settings: Any, monkeypatch: pytest.MonkeyPatch, credentials: CustomerCredentials
) -> None:
    settings.CUSTOMER_CACHE_SECONDS = 60
    monkeypatch.setattr(services.time, "monotonic", lambda: 1000.0)  # the window never ends
    services._customers.clear()
    try:
        old = token_verify(token=credentials.token).webhook_secret
        assert credentials.customer.id in services._customers
        new = customer_webhook_secret_rotate(
            customer=Customer.objects.get(id=credentials.customer.id),
            overlap=dt.timedelta(hours=1),
            actor="test",
        )
        cached = token_verify(token=credentials.token)
        assert (cached.webhook_secret, cached.webhook_secret_previous) == (new, old)
    finally:
        services._customers.clear()


# --- the management command --------------------------------------------------------------------


def run(*args: str) -> str:
    out = StringIO()
    call_command("rotate_webhook_secret", *args, stdout=out)
    return out.getvalue()


def test_command_prints_the_new_secret_and_when_the_old_one_stops(
    credentials: CustomerCredentials, receiver: ReceiverServer
) -> None:
    customer = credentials.customer
    old = customer.webhook_secret
    output = run(str(customer.id))
    lines = dict(line.split(": ", 1) for line in output.splitlines() if ": " in line)
    row = Customer.objects.get(id=customer.id)
    assert lines["customer_id"] == str(customer.id)
    assert lines["webhook_secret"] == row.webhook_secret != old
    assert row.webhook_secret_previous == old
    assert row.webhook_secret_previous_until is not None
    assert lines["old_secret_stops_at"] == row.webhook_secret_previous_until.isoformat()
    # The default overlap: 24 hours.
    window = row.webhook_secret_previous_until - timezone.now()
    assert dt.timedelta(hours=23, minutes=59) < window <= dt.timedelta(hours=24)
    assert "shown once" in output
    delivery = deliver(row, receiver)
    assert verifies(lines["webhook_secret"], delivery) and verifies(old, delivery)


def test_command_json_and_overlap_hours(credentials: CustomerCredentials) -> None:
    customer = credentials.customer
    values = json.loads(run(str(customer.id), "--overlap-hours", "1.5", "--json"))
    assert set(values) == {"customer_id", "webhook_secret", "old_secret_stops_at"}
    row = Customer.objects.get(id=customer.id)
    assert values["webhook_secret"] == row.webhook_secret
    assert row.webhook_secret_previous_until is not None
    stops = dt.datetime.fromisoformat(values["old_secret_stops_at"])
    assert stops == row.webhook_secret_previous_until
    window = stops - timezone.now()
    assert dt.timedelta(minutes=89) < window <= dt.timedelta(minutes=90)


def test_command_overlap_zero(credentials: CustomerCredentials) -> None:
    customer = credentials.customer
    values = json.loads(run(str(customer.id), "--overlap-hours", "0", "--json"))
    row = Customer.objects.get(id=customer.id)
    assert (row.webhook_secret, row.webhook_secret_previous) == (values["webhook_secret"], "")
    # The old secret stopped with the rotation.
    stops = dt.datetime.fromisoformat(values["old_secret_stops_at"])
    assert abs(stops - timezone.now()) < dt.timedelta(seconds=5)


def test_command_refuses_a_bad_overlap(credentials: CustomerCredentials) -> None:
    old = credentials.customer.webhook_secret
    for hours in ("-1", "nan", "100000"):
        with pytest.raises(CommandError, match="overlap-hours"):
            run(str(credentials.customer.id), "--overlap-hours", hours)
    assert Customer.objects.get(id=credentials.customer.id).webhook_secret == old


def test_command_unknown_customer_is_a_command_error() -> None:
    with pytest.raises(CommandError, match="No customer"):
        run(str(uuid.uuid4()))


def manage(*args: str) -> subprocess.CompletedProcess[str]:
    """The command as ops run it: its own process, exit status and stderr."""
    return subprocess.run(
        [sys.executable, "manage.py", "rotate_webhook_secret", *args],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_command_unknown_customer_exits_non_zero_without_a_traceback() -> None:
    missing = str(uuid.uuid4())
    result = manage(missing)
    assert (result.returncode, result.stdout) == (1, "")
    assert f"No customer {missing}" in result.stderr
    assert "Traceback" not in result.stderr
    malformed = manage("not-a-uuid")
    assert malformed.returncode != 0 and malformed.stdout == ""
    assert "Traceback" not in malformed.stderr


# --- the admin action --------------------------------------------------------------------------


def test_admin_action_rotates_and_shows_the_new_secret(credentials: CustomerCredentials) -> None:
    user = User.objects.create_superuser("ops", "ops@example.org", "a-long-password-1")
    client = Client()
    client.force_login(user)
    customer = credentials.customer
    old = customer.webhook_secret
    response = client.post(
        "/admin/merchant/customer/",
        {"action": "rotate_webhook_secret", "_selected_action": [str(customer.id)]},
    )
    assert response.status_code == 302
    row = Customer.objects.get(id=customer.id)
    assert row.webhook_secret != old and row.webhook_secret_previous == old
    assert row.webhook_secret_previous_until is not None
    window = row.webhook_secret_previous_until - timezone.now()
    assert dt.timedelta(hours=23, minutes=59) < window <= dt.timedelta(hours=24)
    shown = [str(message) for message in get_messages(response.wsgi_request)]
    assert len(shown) == 1 and row.webhook_secret in shown[0] and old not in shown[0]
