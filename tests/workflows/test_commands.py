"""The workflow management commands, as ops run them: requeue, reconcile, stuck_report and
redeliver_webhooks (each a thin shell over the services)."""

import datetime as dt
import json
import uuid
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from merchant.models import Customer
from merchant.services import CustomerCredentials
from tests.conftest import LinkClient, broker_messages, link_body, queued_delivery_ids
from workflows.models import DeliveryStatus, Status, WebhookDelivery, Workflow
from workflows.services import workflow_finish, workflow_mark_failed, workflow_transition

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def sweep_settings(settings: Any) -> None:
    settings.RECONCILE_STALE_AFTER_SECONDS = 420
    settings.RECONCILE_BATCH_SIZE = 500
    settings.WORKFLOW_MAX_ATTEMPTS = 5


@pytest.fixture
def customer(credentials: CustomerCredentials) -> Customer:
    return credentials.customer


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


def make(
    customer: Customer, status: str = Status.RECEIVED, *, age: dt.timedelta, due: bool = False
) -> Workflow:
    """A workflow untouched for `age`: waiting for its turn since then when `due`, else waiting
    on nothing the scheduler runs (idle: as a REQUESTED one whose search's callback never
    came)."""
    workflow = Workflow(customer=customer, patient_id=uuid.uuid4(), status=status)
    workflow.save()
    since = timezone.now() - age
    Workflow.objects.filter(id=workflow.id).update(
        updated_at=since, due_at=since if due else None, published_at=None
    )
    return Workflow.objects.get(id=workflow.id)


def failed(customer: Customer, reason: str = "broken") -> Workflow:
    workflow = make(customer, Status.IN_PROGRESS, age=dt.timedelta(0))
    return workflow_mark_failed(workflow_id=workflow.id, actor="test", reason=reason)


def completed(customer: Customer) -> Workflow:
    workflow = make(customer, Status.IN_PROGRESS, age=dt.timedelta(0))
    workflow = workflow_transition(workflow=workflow, name="mark_linked", actor="test")
    return workflow_finish(workflow=workflow, name="complete", actor="test")


def due_now(workflow: Workflow, since: dt.datetime) -> bool:
    """Made due at once (since `since`), not in flight: the scheduler publishes it in its
    turn."""
    row = Workflow.objects.get(id=workflow.id)
    return (
        row.due_at is not None
        and since <= row.due_at <= timezone.now()
        and (row.published_at, row.claim_id) == (None, None)
    )


# --- requeue ----------------------------------------------------------------------------------


def test_requeue_several_workflows_with_a_reason_makes_them_due(
    customer, redis_db, django_capture_on_commit_callbacks
):
    first, second = failed(customer), failed(customer)
    pending = make(customer, Status.IN_PROGRESS, age=dt.timedelta(hours=1))
    # In flight: published an hour ago, and its consumer's claim ended.
    Workflow.objects.filter(id=pending.id).update(
        published_at=timezone.now() - dt.timedelta(hours=1),
        claim_id=uuid.uuid4(),
        claimed_until=timezone.now() - dt.timedelta(minutes=59),
    )
    before = timezone.now()
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        output = run(
            "requeue", str(first.id), str(second.id), str(pending.id), "--reason", "INC-1234"
        )
    assert output.splitlines() == [
        f"{first.id}: re-queued (RECEIVED)",
        f"{second.id}: re-queued (RECEIVED)",
        f"{pending.id}: re-queued (IN_PROGRESS)",
    ]
    for workflow, source in ((first, "FAILED"), (second, "FAILED"), (pending, "IN_PROGRESS")):
        row = Workflow.objects.get(id=workflow.id)
        last = row.transitions.last()
        assert last is not None
        assert (last.source, last.actor, last.reason) == (source, "command:requeue", "INC-1234")
        assert row.status in (Status.RECEIVED, Status.IN_PROGRESS)
        assert due_now(row, before)
    assert Workflow.objects.get(id=pending.id).requeues == 1
    # Nothing is published by it: the scheduler publishes due work in its turn.
    assert callbacks == []
    assert broker_messages(redis_db) == []


def test_requeue_without_a_reason_records_the_default(customer):
    workflow = failed(customer)
    run("requeue", str(workflow.id))
    last = Workflow.objects.get(id=workflow.id).transitions.last()
    assert last is not None
    assert last.reason == "re-queued by an operator"


def test_requeue_unknown_id_is_an_error_naming_it_and_the_others_still_run(customer):
    known = failed(customer)
    unknown = uuid.uuid4()
    out = StringIO()
    with pytest.raises(CommandError, match=str(unknown)) as caught:
        call_command("requeue", str(unknown), str(known.id), stdout=out)
    assert "no such workflow" in str(caught.value)
    assert str(known.id) not in str(caught.value)
    assert Workflow.objects.get(id=known.id).status == Status.RECEIVED
    assert f"{known.id}: re-queued" in out.getvalue()


def test_requeue_completed_workflow_is_an_error(customer):
    done = completed(customer)
    with pytest.raises(CommandError, match=f"{done.id} is COMPLETED"):
        run("requeue", str(done.id))
    assert Workflow.objects.get(id=done.id).status == Status.COMPLETED


def test_requeue_needs_a_valid_id():
    with pytest.raises(CommandError):
        run("requeue")
    with pytest.raises(CommandError, match="not-a-uuid"):
        run("requeue", "not-a-uuid")


def test_requeue_conflicting_with_a_newer_request_is_a_command_error(customer, api: LinkClient):
    body = link_body()
    old = Workflow.objects.get(id=api.post_link(body, key="first").json()["workflow-id"])
    workflow_mark_failed(workflow_id=old.id, actor="test", reason="broken")
    assert api.post_link(body, key="second").status_code == 202  # asked again: a new workflow
    with pytest.raises(CommandError, match=str(old.id)):
        run("requeue", str(old.id))


# --- reconcile --------------------------------------------------------------------------------


def test_reconcile_dry_run_prints_json_and_changes_nothing(
    customer, redis_db, django_capture_on_commit_callbacks
):
    stale = make(customer, Status.REQUESTED, age=dt.timedelta(hours=1))
    spent = make(customer, Status.IN_PROGRESS, age=dt.timedelta(hours=1))
    Workflow.objects.filter(id=spent.id).update(attempts=5)
    waiting = make(customer, age=dt.timedelta(hours=1), due=True)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        output = run("reconcile", "--dry-run")
    assert json.loads(output) == {
        "dry_run": True,
        "requeued": [str(stale.id)],
        "failed": [str(spent.id)],
        "expired": [],
    }
    assert callbacks == []
    assert broker_messages(redis_db) == []
    row = Workflow.objects.get(id=stale.id)
    assert (row.requeues, row.due_at, row.updated_at) == (0, None, stale.updated_at)
    assert Workflow.objects.get(id=spent.id).status == Status.IN_PROGRESS
    assert Workflow.objects.get(id=waiting.id).due_at == waiting.due_at
    assert not WebhookDelivery.objects.exists()


def test_reconcile_makes_idle_workflows_due_and_publishes_nothing(
    customer, redis_db, django_capture_on_commit_callbacks
):
    stale = make(customer, Status.REQUESTED, age=dt.timedelta(hours=1))
    fresh = make(customer, Status.REQUESTED, age=dt.timedelta(seconds=5))
    waiting = make(customer, age=dt.timedelta(hours=1), due=True)
    before = timezone.now()
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        output = run("reconcile")
    assert json.loads(output) == {
        "dry_run": False,
        "requeued": [str(stale.id)],
        "failed": [],
        "expired": [],
    }
    assert Workflow.objects.get(id=stale.id).requeues == 1
    assert due_now(stale, before)
    assert (Workflow.objects.get(id=fresh.id).requeues, fresh.due_at) == (0, None)
    # Due already, waiting for its turn: the scheduler's, not the sweep's.
    row = Workflow.objects.get(id=waiting.id)
    assert (row.requeues, row.due_at) == (0, waiting.due_at)
    assert callbacks == []
    assert broker_messages(redis_db) == []


def test_reconcile_stale_after_zero_makes_every_idle_workflow_due(
    customer, redis_db, django_capture_on_commit_callbacks
):
    fresh = make(customer, Status.LINKED, age=dt.timedelta(seconds=1))
    waiting = make(customer, age=dt.timedelta(seconds=1), due=True)
    done = completed(customer)
    before = timezone.now()
    with django_capture_on_commit_callbacks(execute=True):
        output = run("reconcile", "--stale-after", "0")
    assert json.loads(output)["requeued"] == [str(fresh.id)]
    assert Workflow.objects.get(id=fresh.id).requeues == 1
    assert due_now(fresh, before)
    assert Workflow.objects.get(id=waiting.id).requeues == 0
    assert Workflow.objects.get(id=done.id).requeues == 0
    assert broker_messages(redis_db) == []


def test_reconcile_stale_after_must_be_a_number():
    with pytest.raises(CommandError, match="stale-after"):
        run("reconcile", "--stale-after", "soon")


# --- stuck_report -----------------------------------------------------------------------------


@pytest.fixture
def stuck(customer: Customer) -> dict[str, Workflow]:
    return {
        "recent": make(customer, Status.RECEIVED, age=dt.timedelta(minutes=20)),
        "hours": make(customer, Status.RECEIVED, age=dt.timedelta(hours=2)),
        "hours_b": make(customer, Status.REQUESTED, age=dt.timedelta(hours=5)),
        "days": make(customer, Status.IN_PROGRESS, age=dt.timedelta(hours=30)),
        "done": make(customer, Status.COMPLETED, age=dt.timedelta(days=3)),
        "failed": make(customer, Status.FAILED, age=dt.timedelta(days=3)),
    }


def test_stuck_report_json_counts_by_state_and_age(stuck):
    report = json.loads(run("stuck_report", "--older-than", "1h", "--json"))
    assert report["total"] == 3
    assert report["by_state"] == {"RECEIVED": 1, "REQUESTED": 1, "IN_PROGRESS": 1}
    assert report["by_age"] == {"<1h": 0, "1h-24h": 2, ">24h": 1}
    assert report["oldest"] == [str(stuck[k].id) for k in ("days", "hours_b", "hours")]
    oldest = dt.datetime.fromisoformat(report["oldest_updated_at"])
    assert oldest == Workflow.objects.get(id=stuck["days"].id).updated_at


def test_stuck_report_defaults_to_the_sweep_threshold(stuck, settings):
    report = json.loads(run("stuck_report", "--json"))
    assert report["total"] == 4
    assert report["by_age"]["<1h"] == 1
    settings.RECONCILE_STALE_AFTER_SECONDS = 3 * 3600
    assert json.loads(run("stuck_report", "--json"))["total"] == 2


@pytest.mark.parametrize(
    ("older_than", "total"),
    [("90", 4), ("90s", 4), ("30m", 3), ("1h", 3), ("3h", 2), ("1d", 1), ("2d", 0)],
)
def test_stuck_report_durations(stuck, older_than, total):
    assert json.loads(run("stuck_report", "--older-than", older_than, "--json"))["total"] == total


def test_stuck_report_text(stuck):
    output = run("stuck_report", "--older-than", "1h")
    lines = output.splitlines()
    assert lines[0] == "stuck workflows: 3"
    body = [line.split() for line in lines[1:]]
    assert ["IN_PROGRESS", "1"] in body
    assert ["RECEIVED", "1"] in body
    assert ["REQUESTED", "1"] in body
    assert ["age", "1h-24h", "2"] in body
    assert ["age", ">24h", "1"] in body
    waiting = lines.index("reviews waiting: 0 (expire after 604800 s)")
    assert lines[waiting - 3 : waiting] == [
        f"  {stuck[k].id}" for k in ("days", "hours_b", "hours")
    ]
    for key in ("recent", "done", "failed"):
        assert str(stuck[key].id) not in output


def test_stuck_report_with_nothing_stuck(customer):
    make(customer, age=dt.timedelta(seconds=10))
    report = json.loads(run("stuck_report", "--json"))
    assert report == {
        "total": 0,
        "by_state": {},
        "by_age": {"<1h": 0, "1h-24h": 0, ">24h": 0},
        "oldest_updated_at": None,
        "oldest": [],
        "reviews": {
            "total": 0,
            "by_reviewer": {},
            "by_age": {"<1h": 0, "1h-24h": 0, ">24h": 0},
            "timeout_seconds": 604800,
            "oldest": [],
        },
    }


def test_stuck_report_counts_the_reviews_waiting_by_reviewer_and_age(customer, other_credentials):
    Customer.objects.filter(id=customer.id).update(review_by="customer")
    by_customer = make(customer, Status.REVIEW, age=dt.timedelta(hours=30))
    operator = other_credentials.customer
    by_operator = make(operator, Status.REVIEW, age=dt.timedelta(minutes=5))
    make(customer, Status.COMPLETED, age=dt.timedelta(days=3))
    reviews = json.loads(run("stuck_report", "--json"))["reviews"]
    assert reviews == {
        "total": 2,
        "by_reviewer": {"customer": 1, "operator": 1},
        "by_age": {"<1h": 1, "1h-24h": 0, ">24h": 1},
        "timeout_seconds": 604800,
        "oldest": [str(by_customer.id), str(by_operator.id)],
    }
    lines = run("stuck_report").splitlines()
    waiting = lines.index("reviews waiting: 2 (expire after 604800 s)")
    assert [line.split() for line in lines[waiting + 1 :]] == [
        ["by", "customer", "1"],
        ["by", "operator", "1"],
        ["age", "<1h", "1"],
        ["age", "1h-24h", "0"],
        ["age", ">24h", "1"],
    ]


@pytest.mark.parametrize("value", ["1x", "h", "5y", "1.5h", "1h30m", ""])
def test_stuck_report_refuses_bad_durations(value):
    with pytest.raises(CommandError, match="not a duration"):
        run("stuck_report", "--older-than", value)


# --- redeliver_webhooks -----------------------------------------------------------------------


def delivery_of(workflow: Workflow) -> WebhookDelivery:
    return WebhookDelivery.objects.get(workflow=workflow)


def settle(workflow: Workflow, status: str, *, age: dt.timedelta) -> WebhookDelivery:
    WebhookDelivery.objects.filter(workflow=workflow).update(
        status=status, attempts=8, next_attempt_at=None, updated_at=timezone.now() - age
    )
    return delivery_of(workflow)


def test_redeliver_by_workflow(customer, redis_db, django_capture_on_commit_callbacks):
    first, second, untouched = completed(customer), failed(customer), completed(customer)
    for workflow in (first, second, untouched):
        settle(workflow, DeliveryStatus.EXHAUSTED, age=dt.timedelta(days=2))
    ids = {w.id: delivery_of(w).webhook_id for w in (first, second)}
    with django_capture_on_commit_callbacks(execute=True):
        output = run(
            "redeliver_webhooks", "--workflow", str(first.id), "--workflow", str(second.id)
        )
    assert output.strip() == "re-queued 2 delivery(ies)"
    for workflow_id, webhook_id in ids.items():
        delivery = WebhookDelivery.objects.get(workflow_id=workflow_id)
        assert (delivery.status, delivery.attempts, delivery.webhook_id) == (
            DeliveryStatus.PENDING,
            0,
            webhook_id,
        )
    assert delivery_of(untouched).status == DeliveryStatus.EXHAUSTED
    assert sorted(queued_delivery_ids(broker_messages(redis_db))) == sorted(
        delivery_of(w).id for w in (first, second)
    )


def test_redeliver_failed_since_a_duration(customer):
    recent = settle(completed(customer), DeliveryStatus.EXHAUSTED, age=dt.timedelta(minutes=30))
    disabled = settle(failed(customer), DeliveryStatus.DISABLED, age=dt.timedelta(minutes=100))
    old = settle(completed(customer), DeliveryStatus.EXHAUSTED, age=dt.timedelta(hours=3))
    fine = settle(completed(customer), DeliveryStatus.DELIVERED, age=dt.timedelta(minutes=5))
    assert run("redeliver_webhooks", "--failed-since", "2h").strip() == "re-queued 2 delivery(ies)"
    for delivery, status in [
        (recent, DeliveryStatus.PENDING),
        (disabled, DeliveryStatus.PENDING),
        (old, DeliveryStatus.EXHAUSTED),
        (fine, DeliveryStatus.DELIVERED),
    ]:
        delivery.refresh_from_db()
        assert delivery.status == status


def test_redeliver_failed_since_an_iso_date(customer):
    recent = settle(completed(customer), DeliveryStatus.EXHAUSTED, age=dt.timedelta(hours=1))
    since = (timezone.now() - dt.timedelta(hours=2)).replace(tzinfo=None).isoformat()
    assert run("redeliver_webhooks", "--failed-since", since).strip() == "re-queued 1 delivery(ies)"
    recent.refresh_from_db()
    assert recent.status == DeliveryStatus.PENDING
    future = (timezone.now() + dt.timedelta(days=1)).isoformat()
    assert (
        run("redeliver_webhooks", "--failed-since", future).strip() == "re-queued 0 delivery(ies)"
    )


def test_redeliver_needs_a_workflow_or_a_date(customer):
    settle(completed(customer), DeliveryStatus.EXHAUSTED, age=dt.timedelta(minutes=1))
    with pytest.raises(CommandError, match="--workflow ID or --failed-since WHEN"):
        run("redeliver_webhooks")
    assert WebhookDelivery.objects.get().status == DeliveryStatus.EXHAUSTED


@pytest.mark.parametrize(
    "args",
    [("--failed-since", "yesterday"), ("--failed-since", "2 hours"), ("--workflow", "abc")],
)
def test_redeliver_refuses_bad_arguments(args):
    with pytest.raises(CommandError):
        run("redeliver_webhooks", *args)
