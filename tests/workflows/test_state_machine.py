"""Every allowed and every forbidden transition of the workflow state machine."""

import datetime as dt
import itertools
from typing import Any, get_args

import pytest
from django.db import transaction
from django_fsm import ConcurrentTransition, TransitionNotAllowed

from merchant.models import Customer
from tests.conftest import new_customer
from workflows.models import (
    PENDING_STATES,
    EndingName,
    Status,
    TransitionName,
    WebhookDelivery,
    Workflow,
    WorkflowTransition,
)
from workflows.services import Step, workflow_finish, workflow_transition

pytestmark = pytest.mark.django_db

# An operator's re-queue sets a new deadline.
DEADLINE = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)

S = Status
# (transition, its keyword arguments) -> allowed sources and the target (docs/api.md, "Workflow
# states").
TRANSITIONS: dict[TransitionName, tuple[dict[str, Any], set[str], str]] = {
    "start": ({}, {S.RECEIVED}, S.IN_PROGRESS),
    # REQUESTED -> REQUESTED: a lost job searched again.
    "request_search": ({"search_id": "job-1"}, {S.IN_PROGRESS, S.REQUESTED}, S.REQUESTED),
    "request_review": ({}, {S.IN_PROGRESS, S.REQUESTED}, S.REVIEW),
    "mark_linked": ({}, {S.IN_PROGRESS, S.REQUESTED, S.REVIEW}, S.LINKED),
    "mark_no_results": (
        {"reason": "no match"},
        {S.IN_PROGRESS, S.REQUESTED, S.REVIEW},
        S.NO_RESULTS,
    ),
    "complete": ({}, {S.LINKED, S.NO_RESULTS}, S.COMPLETED),
    "fail": ({"reason": "broken"}, set(PENDING_STATES), S.FAILED),
    "requeue": ({"deadline_at": DEADLINE}, {S.FAILED}, S.RECEIVED),
}


def workflow_in(customer: Customer, status: str) -> Workflow:
    import uuid

    workflow = Workflow(customer=customer, patient_id=uuid.uuid4(), status=status)
    workflow.save()
    return Workflow.objects.get(id=workflow.id)


@pytest.fixture
def customer(db: None) -> Customer:
    return new_customer().customer


CASES = list(itertools.product(TRANSITIONS, Status.values))


@pytest.mark.parametrize(("name", "source"), CASES)
def test_transition_table(customer: Customer, name: TransitionName, source: str) -> None:
    kwargs, allowed, target = TRANSITIONS[name]
    workflow = workflow_in(customer, source)
    if source in allowed:
        workflow_transition(workflow=workflow, name=name, actor="test", **kwargs)
        workflow.refresh_from_db()
        assert workflow.status == target
        last = WorkflowTransition.objects.filter(workflow=workflow).last()
        assert last is not None
        assert (last.source, last.target, last.actor) == (source, target, "test")
    else:
        with pytest.raises(TransitionNotAllowed):
            workflow_transition(workflow=workflow, name=name, actor="test", **kwargs)
        workflow.refresh_from_db()
        assert workflow.status == source
        assert not WorkflowTransition.objects.filter(workflow=workflow).exists()


def test_the_transition_names_are_the_state_machines() -> None:
    declared = list(Workflow._meta.get_field("status").get_all_transitions(Workflow))
    assert set(get_args(TransitionName)) == {t.name for t in declared} == set(TRANSITIONS)
    assert set(get_args(EndingName)) == {
        t.name for t in declared if t.target in (S.COMPLETED, S.FAILED)
    }


def test_terminal_states_have_no_way_out_but_requeue(customer: Customer) -> None:
    for name, (_, allowed, _) in TRANSITIONS.items():
        assert S.COMPLETED not in allowed
        assert (S.FAILED in allowed) == (name == "requeue")


def test_status_cannot_be_assigned_directly(customer: Customer) -> None:
    workflow = workflow_in(customer, S.RECEIVED)
    with pytest.raises(AttributeError):
        workflow.status = S.COMPLETED


def test_transitions_set_their_fields(customer: Customer) -> None:
    workflow = workflow_in(customer, S.RECEIVED)
    steps: list[tuple[TransitionName, dict[str, Any]]] = [
        ("start", {}),
        ("request_search", {"search_id": "job-9"}),
        ("mark_no_results", {"reason": "ambiguous"}),
    ]
    for name, kwargs in steps:
        workflow = workflow_transition(workflow=workflow, name=name, actor="t", **kwargs)
    workflow.refresh_from_db()
    assert (workflow.search_id, workflow.result, workflow.reason) == (
        "job-9",
        "NO_RESULTS",
        "ambiguous",
    )
    workflow = workflow_transition(workflow=workflow, name="fail", actor="t", reason="x")
    workflow = workflow_transition(
        workflow=workflow, name="requeue", actor="operator", deadline_at=DEADLINE
    )
    workflow.refresh_from_db()
    assert (
        workflow.status,
        workflow.result,
        workflow.reason,
        workflow.attempts,
        workflow.search_id,
        workflow.deadline_at,
    ) == (S.RECEIVED, None, "", 0, None, DEADLINE)
    timeline = [(t.source, t.target) for t in workflow.transitions.all()]
    assert timeline == [
        ("RECEIVED", "IN_PROGRESS"),
        ("IN_PROGRESS", "REQUESTED"),
        ("REQUESTED", "NO_RESULTS"),
        ("NO_RESULTS", "FAILED"),
        ("FAILED", "RECEIVED"),
    ]


def test_concurrent_transition_is_refused(customer: Customer) -> None:
    workflow = workflow_in(customer, S.RECEIVED)
    stale = Workflow.objects.get(id=workflow.id)
    workflow_transition(workflow=workflow, name="start", actor="worker-1")
    with pytest.raises(ConcurrentTransition), transaction.atomic():
        workflow_transition(workflow=stale, name="fail", actor="worker-2", reason="late")
    workflow.refresh_from_db()
    assert workflow.status == S.IN_PROGRESS
    assert [t.target for t in workflow.transitions.all()] == ["IN_PROGRESS"]


def test_database_refuses_an_unknown_status(customer: Customer) -> None:
    from django.db import IntegrityError

    workflow = workflow_in(customer, S.RECEIVED)
    with pytest.raises(IntegrityError), transaction.atomic():
        Workflow.objects.filter(id=workflow.id).update(status="SOMETHING")


def test_database_refuses_two_pending_workflows_for_one_patient(customer: Customer) -> None:
    from django.db import IntegrityError

    first = workflow_in(customer, S.IN_PROGRESS)
    with pytest.raises(IntegrityError), transaction.atomic():
        Workflow.objects.create(customer=customer, patient_id=first.patient_id)
    Workflow.objects.create(customer=customer, patient_id=first.patient_id, status=S.COMPLETED)


def test_an_ending_saves_its_steps_in_order_and_ties_the_webhook_to_the_last(
    customer: Customer,
) -> None:
    workflow = workflow_in(customer, S.IN_PROGRESS)

    workflow_finish(
        workflow=workflow,
        name="complete",
        actor="worker",
        first=[Step("mark_no_results", "no match")],
    )

    stored = Workflow.objects.get(id=workflow.id)
    assert (stored.status, stored.result, stored.reason) == (S.COMPLETED, "NO_RESULTS", "no match")
    timeline = list(stored.transitions.all())
    assert [(t.source, t.target, t.reason) for t in timeline] == [
        (S.IN_PROGRESS, S.NO_RESULTS, "no match"),
        (S.NO_RESULTS, S.COMPLETED, ""),
    ]
    delivery = WebhookDelivery.objects.get(workflow=workflow)
    assert delivery.transition_id == timeline[-1].id
    assert delivery.event_type == "link.completed"
    # The instance agrees with the row: the ORM's own save is now guarded on COMPLETED.
    workflow.reason = "edited"
    workflow.save()
    assert Workflow.objects.get(id=workflow.id).reason == "edited"


def test_an_ending_that_lost_a_race_writes_nothing(customer: Customer) -> None:
    workflow = workflow_in(customer, S.IN_PROGRESS)
    stale = Workflow.objects.get(id=workflow.id)
    workflow_transition(workflow=workflow, name="request_review", actor="worker-1")

    with pytest.raises(ConcurrentTransition), transaction.atomic():
        workflow_finish(
            workflow=stale,
            name="complete",
            actor="worker-2",
            first=[Step("mark_linked", "late")],
        )

    stored = Workflow.objects.get(id=workflow.id)
    assert (stored.status, stored.result) == (S.REVIEW, None)
    assert [t.target for t in stored.transitions.all()] == [S.REVIEW]
    assert not WebhookDelivery.objects.filter(workflow=workflow).exists()
