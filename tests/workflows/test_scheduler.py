"""The scheduler (workflows/scheduler.py) and the breaker it obeys (workflows/breaker.py): what
is published, in what order, how much, and when nothing is."""

import datetime as dt
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from django.db import connection
from django.utils import timezone
from prometheus_client import REGISTRY

import workflows.scheduler as scheduler_module
from linking.services import links_process
from merchant.models import Customer
from standin.server import make_server
from tests.conftest import (
    LinkClient,
    broker_messages,
    link_body,
    new_customer,
    queued_workflow_ids,
)
from tests.processes import serving
from workflows import breaker
from workflows.models import Status, Workflow, WorkflowTransition
from workflows.scheduler import PutBack, schedule_tick, workflows_put_back
from workflows.services import workflows_claim, workflows_publish


@pytest.fixture(autouse=True)
def _look_for_lost_work_every_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "RECOVER_EVERY_SECONDS", 0.0)


def conn() -> Any:
    connection.ensure_connection()
    return connection.connection


def due(customer: Customer, count: int, *, since: dt.datetime | None = None) -> list[Workflow]:
    """`count` workflows of this customer, due one millisecond apart from `since`."""
    start = since or timezone.now() - dt.timedelta(minutes=1)
    return [
        Workflow.objects.create(
            customer=customer,
            patient_id=uuid.uuid4(),
            due_at=start + dt.timedelta(milliseconds=i),
        )
        for i in range(count)
    ]


def published(redis_db: Any) -> list[str]:
    return queued_workflow_ids(broker_messages(redis_db))


@pytest.fixture
def customers(db: None) -> tuple[Customer, Customer]:
    return new_customer("Noisy Health").customer, new_customer("Quiet Clinics").customer


def test_a_backlog_does_not_hold_up_another_customer(customers, settings, redis_db) -> None:
    noisy, quiet = customers
    settings.WORKFLOW_IN_FLIGHT_MAX = 10
    backlog = due(noisy, 100)
    mine = due(quiet, 2, since=timezone.now() - dt.timedelta(seconds=1))  # due much later

    tick = schedule_tick(conn())

    # Round 1: the oldest of each customer, oldest first; round 2 the same; then only A's.
    names = {str(w.id): "A" for w in backlog} | {str(w.id): "B" for w in mine}
    assert [names[i] for i in tick.published] == ["A", "B", "A", "B", *["A"] * 6]
    assert tick.published[1] == str(mine[0].id)
    assert sorted(published(redis_db)) == sorted(tick.published)
    assert tick.full  # the bound stopped it


def test_weights_give_a_customer_more_of_each_round(customers, settings) -> None:
    heavy, light = customers
    Customer.objects.filter(id=heavy.id).update(weight=3)
    settings.WORKFLOW_IN_FLIGHT_MAX = 8
    due(heavy, 20)
    due(light, 20)

    tick = schedule_tick(conn())

    owner = dict(Workflow.objects.values_list("id", "customer_id"))
    shares = [owner[uuid.UUID(i)] for i in tick.published]
    assert shares.count(heavy.id) == 6 and shares.count(light.id) == 2


def test_work_in_flight_counts_against_the_bound(customers, settings) -> None:
    customer, _ = customers
    settings.WORKFLOW_IN_FLIGHT_MAX = 10
    flying = due(customer, 4)
    Workflow.objects.filter(id__in=[w.id for w in flying]).update(
        due_at=None, published_at=timezone.now()
    )
    due(customer, 20)

    tick = schedule_tick(conn())

    assert len(tick.published) == 6
    assert Workflow.objects.filter(published_at__isnull=False).count() == 10
    # Full: nothing more until some of it ends.
    assert schedule_tick(conn()).published == []


def test_the_bound_never_exceeds_the_internal_systems_concurrency(customers, settings) -> None:
    customer, _ = customers
    settings.WORKFLOW_IN_FLIGHT_MAX = 50
    settings.INTERNAL_SEARCH_MAX_CONCURRENCY = 3
    due(customer, 10)
    assert len(schedule_tick(conn()).published) == 3


def test_work_due_later_waits_for_its_time(customers) -> None:
    customer, _ = customers
    (later,) = due(customer, 1, since=timezone.now() + dt.timedelta(seconds=30))
    assert schedule_tick(conn()).published == []
    Workflow.objects.filter(id=later.id).update(due_at=timezone.now())
    assert schedule_tick(conn()).published == [str(later.id)]


def test_nothing_is_published_while_the_breaker_is_open_or_paused(customers) -> None:
    customer, _ = customers
    due(customer, 3)
    breaker.breaker_report(successes=0, failures=100)
    tick = schedule_tick(conn())
    assert (tick.paused, tick.published) == (True, [])
    breaker.breaker_close()
    breaker.breaker_report(successes=0, failures=0, retry_after=30)  # a 429
    assert schedule_tick(conn()).published == []
    breaker.breaker_reset()
    assert len(schedule_tick(conn()).published) == 3


def test_a_refused_publication_is_due_again_at_once(customers, monkeypatch) -> None:
    customer, _ = customers
    due(customer, 3)
    monkeypatch.setattr(scheduler_module, "workflows_publish", lambda *, workflow_ids: 1)
    tick = schedule_tick(conn())
    assert len(tick.published) == 1
    assert Workflow.objects.filter(published_at__isnull=False).count() == 1
    assert Workflow.objects.filter(due_at__isnull=False).count() == 2


def test_lost_work_in_flight_is_due_again_and_waiting_work_is_not(customers, settings) -> None:
    customer, _ = customers
    settings.RECONCILE_STALE_AFTER_SECONDS = 60
    settings.WORKFLOW_IN_FLIGHT_MAX = 1  # nothing more is published: only recovery is seen
    now = timezone.now()
    dead, lost, queued, waiting = due(customer, 4)
    Workflow.objects.filter(id=dead.id).update(
        due_at=None,
        published_at=now - dt.timedelta(seconds=5),
        claim_id=uuid.uuid4(),
        claimed_until=now - dt.timedelta(seconds=1),
    )
    Workflow.objects.filter(id=lost.id).update(
        due_at=None, published_at=now - dt.timedelta(seconds=61)
    )
    Workflow.objects.filter(id=queued.id).update(
        due_at=None, published_at=now - dt.timedelta(seconds=30)
    )
    Workflow.objects.filter(id=waiting.id).update(due_at=now - dt.timedelta(hours=2))

    tick = schedule_tick(conn())

    assert tick.recovered == 2
    rows = {w.id: w for w in Workflow.objects.all()}
    for workflow_id in (dead.id, lost.id):
        row = rows[workflow_id]
        assert (row.claim_id, row.published_at, row.requeues) == (None, None, 1)
        assert row.due_at is not None
    assert rows[queued.id].published_at is not None  # in the queue, not lost: untouched
    assert rows[waiting.id].requeues == 0  # waiting its turn is not stale
    reasons = set(WorkflowTransition.objects.values_list("reason", flat=True))
    assert "due again: its worker stopped renewing its claim" in reasons
    assert "due again: its queue message was lost (not taken within 60 s)" in reasons


def test_a_message_still_waiting_in_the_queue_is_not_lost(customers, settings) -> None:
    # Behind slow or stopped workers a message waits: the broker still has it.
    customer, _ = customers
    settings.RECONCILE_STALE_AFTER_SECONDS = 60
    settings.WORKFLOW_IN_FLIGHT_MAX = 1
    (waiting,) = due(customer, 1)
    Workflow.objects.filter(id=waiting.id).update(
        due_at=None, published_at=timezone.now() - dt.timedelta(seconds=61)
    )
    assert workflows_publish(workflow_ids=[waiting.id]) == 1  # its message, still queued

    assert schedule_tick(conn()).recovered == 0
    assert Workflow.objects.get(id=waiting.id).published_at is not None


def test_put_back_leaves_the_work_in_flight_and_refunds_only_when_asked(customers) -> None:
    customer, _ = customers
    one, two = due(customer, 2)
    claimed = {w.id: w for w in workflows_claim(workflow_ids=[one.id, two.id], actor="worker")}
    assert all(w.attempts == 1 and w.published_at for w in claimed.values())
    claims = {w.id: w.claim_id for w in claimed.values() if w.claim_id}
    workflows_put_back(
        put=[
            PutBack(one.id, claims[one.id], 30.0, "retry"),
            PutBack(two.id, claims[two.id], 0.0, "outage", refund=True),
        ],
        actor="worker",
    )
    rows = {w.id: w for w in Workflow.objects.all()}
    later, now = rows[one.id].due_at, rows[two.id].due_at
    assert later is not None and now is not None
    assert rows[one.id].attempts == 1 and later > timezone.now()
    assert rows[two.id].attempts == 0 and now <= timezone.now()
    assert all(r.published_at is None and r.claim_id is None for r in rows.values())


# --- the breaker --------------------------------------------------------------------------------


def test_consecutive_failures_open_the_breaker_and_an_answer_in_between_resets_them(
    db: None, settings: Any
) -> None:
    settings.INTERNAL_SEARCH_BREAKER_FAILURES = 5
    assert breaker.breaker_report(successes=0, failures=3).failures == 3
    assert breaker.breaker_report(successes=2, failures=0).failures == 0  # answered: reset
    assert not breaker.breaker_report(successes=0, failures=4).open
    opened = breaker.breaker_report(successes=0, failures=1)
    assert opened.open and opened.since > 0
    transitions = REGISTRY.get_sample_value("merchant_breaker_transitions_total", {"to": "open"})
    assert transitions and transitions >= 1


def test_one_probe_per_interval_and_the_first_answer_closes_it(
    db: None, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.INTERNAL_SEARCH_BREAKER_FAILURES = 1
    settings.INTERNAL_SEARCH_BREAKER_PROBE_SECONDS = 0.3
    breaker.breaker_report(successes=0, failures=1)
    assert not breaker.breaker_probe_due()  # the first probe is one interval after opening
    time.sleep(0.35)
    assert breaker.breaker_probe_due()
    assert not breaker.breaker_probe_due()  # booked: one probe per interval, whoever asks
    probes: list[bool] = []

    def probe() -> bool:
        probes.append(True)
        return True

    monkeypatch.setattr(scheduler_module, "_probe", probe)
    time.sleep(0.35)
    schedule_tick(conn())
    assert probes == [True]
    assert not breaker.breaker_state().open


def test_redis_unreachable_reads_closed(settings: Any) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    breaker._redis.forget()
    try:
        state = breaker.breaker_state()
        assert (state.open, state.known) == (False, False)
    finally:
        settings.REDIS_URL = "redis://127.0.0.1:6379/0"
        breaker._redis.forget()


# --- the consumer's side: an outage costs no attempt --------------------------------------------


@pytest.fixture
def standin_down(settings: Any) -> Iterator[Any]:
    server = make_server("127.0.0.1", 0)
    settings.INTERNAL_SEARCH_URL = server.base_url
    with serving(server):
        control = f"{server.base_url.removesuffix('/fhir')}/_control/config"
        requests.post(control, json={"outage": "503"}, timeout=5)
        yield server


@pytest.mark.django_db(transaction=True)
def test_an_outage_puts_the_batch_back_without_counting_the_attempt(
    settings: Any, credentials: Any, standin_down: Any
) -> None:
    settings.INTERNAL_SEARCH_BREAKER_FAILURES = 3
    api = LinkClient(credentials.token)
    ids = [api.post_link(link_body(), key=f"k-{i}").json()["workflow-id"] for i in range(5)]

    processed = links_process(workflow_ids=ids)

    # Five 503s together: the breaker opened on them, so none is counted.
    assert breaker.breaker_state().open
    assert {p.refund for p in processed.put_back} == {True}
    rows = Workflow.objects.filter(id__in=ids)
    assert {(r.status, r.attempts, r.claim_id, r.published_at) for r in rows} == {
        (Status.IN_PROGRESS, 0, None, None)
    }
    assert all(r.due_at is not None for r in rows)
    # Published meanwhile (a message sent before it opened): not even searched.
    calls = requests.get(
        f"{standin_down.base_url.removesuffix('/fhir')}/_control/stats", timeout=5
    ).json()
    before = calls["calls_during_outage"]
    links_process(workflow_ids=ids)
    after = requests.get(
        f"{standin_down.base_url.removesuffix('/fhir')}/_control/stats", timeout=5
    ).json()
    assert after["calls_during_outage"] == before
    assert Workflow.objects.filter(id__in=ids, attempts=0).count() == 5


@pytest.mark.django_db(transaction=True)
def test_a_failure_while_the_system_answers_counts_and_waits_its_backoff(
    settings: Any, credentials: Any, standin_down: Any
) -> None:
    settings.INTERNAL_SEARCH_BREAKER_FAILURES = 3
    api = LinkClient(credentials.token)
    workflow_id = api.post_link(link_body(), key="one").json()["workflow-id"]

    processed = links_process(workflow_ids=[workflow_id])

    (put,) = processed.put_back
    assert not put.refund and put.due_in >= settings.RETRY_BACKOFF_BASE_SECONDS / 2
    row = Workflow.objects.get(id=workflow_id)
    assert (row.attempts, row.claim_id, row.published_at) == (1, None, None)
    assert row.due_at is not None and row.due_at > timezone.now()
    assert not breaker.breaker_state().open
    last = row.transitions.last()
    assert last is not None and "(attempt 1 of" in last.reason
