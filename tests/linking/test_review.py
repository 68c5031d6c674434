"""The review band: candidates stored, REVIEW never re-run by a machine, an operator's link or
reject final, per-customer bands, and the admin page operators resolve it in."""

import json
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from linking.models import (
    AuditEvent,
    LinkEvent,
    LinkHistory,
    MappingStatus,
    PatientMapping,
    SearchCandidate,
)
from linking.services import ReviewError, link_process, link_review_resolve
from merchant.services import CustomerCredentials
from tests.conftest import LinkClient, broker_messages, link_body
from workflows.models import Status, WebhookDelivery, Workflow, WorkflowTransition
from workflows.services import workflow_requeue, workflows_reconcile

pytestmark = pytest.mark.django_db

NOTHING_TO_DO: dict[str, list[str]] = {"requeued": [], "failed": [], "expired": []}

# The stand-in's index: two `certain` 0.97 candidates, and a single `probable` 0.82 one.
RIVERA = {"full_name": "Alex Rivera", "dob": "1975-09-14", "contact": {}}
ELLIS = {"full_name": "Morgan Ellis", "dob": "1988-07-03", "contact": {}}


@pytest.fixture
def operator(db: None) -> Client:
    user = User.objects.create_superuser("ops", "ops@example.org", "a-long-password-1")
    client = Client()
    client.force_login(user)
    return client


def processed(api: LinkClient, patient: dict[str, Any], key: str = "k1") -> Workflow:
    workflow_id = api.post_link(link_body(**patient), key=key).json()["workflow-id"]
    link_process(workflow_id=workflow_id)
    return Workflow.objects.get(id=workflow_id)


def in_review(api: LinkClient) -> Workflow:
    workflow = processed(api, RIVERA)
    assert workflow.status == Status.REVIEW
    return workflow


def snapshot(workflow: Workflow) -> tuple[Any, ...]:
    row = Workflow.objects.get(id=workflow.id)
    return (
        row.status,
        row.result,
        row.attempts,
        row.requeues,
        row.updated_at,
        WorkflowTransition.objects.filter(workflow=workflow).count(),
        PatientMapping.objects.filter(workflow=workflow).count(),
        WebhookDelivery.objects.filter(workflow=workflow).count(),
    )


def test_close_candidates_go_to_review_with_their_candidates_stored(api, standin):
    workflow = in_review(api)
    assert workflow.result is None
    assert workflow.claim_id is None  # released: nobody is working on it
    candidates = list(SearchCandidate.objects.filter(workflow=workflow))
    assert [(c.attempt, c.rank, c.score, c.match_grade) for c in candidates] == [
        (1, 1, 0.97, "certain"),
        (1, 2, 0.97, "certain"),
    ]
    assert len({c.internal_patient_id for c in candidates}) == 2
    last = WorkflowTransition.objects.filter(workflow=workflow).last()
    assert last is not None
    assert (last.source, last.target, last.reason) == (
        "IN_PROGRESS",
        "REVIEW",
        "ambiguous: 2 certain candidates",
    )
    # Nothing for the customer yet but the status: no mapping, no webhook.
    assert not PatientMapping.objects.exists()
    assert not WebhookDelivery.objects.exists()
    status = api.status(str(workflow.id)).json()
    assert (status["status"], status["result"]) == ("REVIEW", None)


def test_a_single_probable_candidate_goes_to_review_too(api, standin):
    workflow = processed(api, ELLIS)
    assert workflow.status == Status.REVIEW
    [candidate] = SearchCandidate.objects.filter(workflow=workflow)
    assert (candidate.score, candidate.match_grade) == (0.82, "probable")


def test_every_search_stores_its_candidates(api, standin):
    linked = processed(api, {}, key="jane")
    assert linked.result == "LINKED"
    assert SearchCandidate.objects.filter(workflow=linked).count() == 1


def test_nothing_automatic_touches_a_review(api, standin, redis_db):
    workflow = in_review(api)
    before = snapshot(workflow)
    broker_before = len(broker_messages(redis_db))
    # A redelivered message, the sweep however stale, an operator's re-queue.
    link_process(workflow_id=workflow.id)
    assert workflows_reconcile(stale_after_seconds=0).as_dict() == {
        "requeued": [],
        "failed": [],
        "expired": [],
    }
    with pytest.raises(ValueError, match="awaits review"):
        workflow_requeue(workflow_id=workflow.id, actor="operator:ops")
    assert snapshot(workflow) == before
    assert len(broker_messages(redis_db)) == broker_before


def test_operator_links_a_candidate_and_it_is_final(api, standin, redis_db):
    workflow = in_review(api)
    second = SearchCandidate.objects.get(workflow=workflow, rank=2)
    link_review_resolve(
        workflow_id=workflow.id,
        internal_patient_id=second.internal_patient_id,
        actor="operator:ops",
        reason="same insurance member id on file",
    )
    workflow.refresh_from_db()
    assert (workflow.status, workflow.result) == (Status.COMPLETED, "LINKED")
    mapping = PatientMapping.objects.get(workflow=workflow)
    assert (mapping.internal_patient_id, mapping.status, mapping.score, mapping.match_grade) == (
        second.internal_patient_id,
        MappingStatus.LINKED,
        0.97,
        "certain",
    )
    [history] = LinkHistory.objects.filter(workflow=workflow)
    assert (history.event, history.actor, history.reason, history.mapping_id) == (
        LinkEvent.LINKED,
        "operator:ops",
        "review: same insurance member id on file",
        mapping.id,
    )
    timeline = [
        (t.source, t.target, t.actor) for t in WorkflowTransition.objects.filter(workflow=workflow)
    ][-2:]
    assert timeline == [
        ("REVIEW", "LINKED", "operator:ops"),
        ("LINKED", "COMPLETED", "operator:ops"),
    ]
    [delivery] = WebhookDelivery.objects.filter(workflow=workflow)
    payload = json.loads(delivery.payload)
    assert (payload["type"], payload["data"]["result"]) == ("link.completed", "LINKED")
    assert api.status(str(workflow.id)).json()["status"] == "COMPLETED"

    # Final: no re-run, no re-queue, no second resolution changes it.
    before = snapshot(workflow)
    link_process(workflow_id=workflow.id)
    workflows_reconcile(stale_after_seconds=0)
    with pytest.raises(ValueError, match="COMPLETED"):
        workflow_requeue(workflow_id=workflow.id, actor="operator:ops")
    with pytest.raises(ReviewError, match="not awaiting review"):
        link_review_resolve(
            workflow_id=workflow.id, internal_patient_id=None, actor="operator:x", reason="undo"
        )
    assert snapshot(workflow) == before


def test_operator_rejects_and_the_customer_reads_no_match(api, standin):
    workflow = in_review(api)
    link_review_resolve(
        workflow_id=workflow.id,
        internal_patient_id=None,
        actor="operator:ops",
        reason="different middle names; called the clinic",
    )
    workflow.refresh_from_db()
    assert (workflow.status, workflow.result) == (Status.COMPLETED, "NO_RESULTS")
    assert not PatientMapping.objects.exists()
    [history] = LinkHistory.objects.filter(workflow=workflow)
    assert (history.event, history.mapping, history.internal_patient_id, history.actor) == (
        LinkEvent.REVIEW_REJECTED,
        None,
        "",
        "operator:ops",
    )
    assert history.reason == "different middle names; called the clinic"
    rejected = WorkflowTransition.objects.get(workflow=workflow, target="NO_RESULTS")
    assert rejected.reason == "review rejected: different middle names; called the clinic"
    # The operator's note stays inside: the customer reads a fixed reason.
    [delivery] = WebhookDelivery.objects.filter(workflow=workflow)
    data = json.loads(delivery.payload)["data"]
    assert (data["result"], data["reason"]) == ("NO_RESULTS", "no match (reviewed)")
    assert "clinic" not in delivery.payload
    # A new request for the patient is accepted afterwards (the review ended it).
    again = api.post_link(link_body(**RIVERA, id=str(workflow.patient_id)), key="again")
    assert again.status_code == 202


@pytest.mark.parametrize(
    ("candidate", "reason", "error"),
    [
        ("0000000000000000000000000000dead", "looks right", "not a candidate"),
        (None, "   ", "reason is required"),
    ],
)
def test_a_bad_resolution_changes_nothing(api, standin, candidate, reason, error):
    workflow = in_review(api)
    before = snapshot(workflow)
    with pytest.raises(ReviewError, match=error):
        link_review_resolve(
            workflow_id=workflow.id,
            internal_patient_id=candidate,
            actor="operator:ops",
            reason=reason,
        )
    assert snapshot(workflow) == before


def test_a_workflow_not_in_review_cannot_be_resolved(api, standin):
    jane = processed(api, {}, key="jane")
    with pytest.raises(ReviewError, match="not awaiting review"):
        link_review_resolve(
            workflow_id=jane.id, internal_patient_id=None, actor="operator:ops", reason="x"
        )


@pytest.mark.parametrize(
    ("bands", "status", "result"),
    [
        ({}, Status.REVIEW, None),
        # This customer sends poorer records: nothing under 0.9 is worth a person's time.
        ({"review_min_score": 0.9}, Status.COMPLETED, "NO_RESULTS"),
        # This one trusts a clear probable match at 0.8 with a 0.1 lead.
        ({"auto_link_score": 0.8}, Status.COMPLETED, "LINKED"),
    ],
)
def test_bands_can_be_set_per_customer(
    api, credentials: CustomerCredentials, other_api, standin, bands, status, result
):
    customer = credentials.customer
    for field, value in bands.items():
        setattr(customer, field, value)
    customer.save()
    workflow = processed(api, ELLIS)
    assert (workflow.status, workflow.result) == (status, result)
    # The other customer keeps the settings' bands.
    other = processed(other_api, ELLIS, key="other")
    assert other.status == Status.REVIEW


# --- the admin page -------------------------------------------------------------------------


def test_admin_lists_only_workflows_in_review(operator, api, standin):
    waiting = in_review(api)
    done = processed(api, {}, key="jane")
    listing = operator.get("/admin/linking/linkreview/").content.decode()
    assert str(waiting.id) in listing
    assert str(done.id) not in listing
    assert operator.get(f"/admin/linking/linkreview/{done.id}/change/").status_code == 404


def test_admin_page_shows_both_sides_and_is_audited(operator, api, standin):
    workflow = in_review(api)
    page = operator.get(f"/admin/linking/linkreview/{workflow.id}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "Alex Rivera" in html and "1975-09-14" in html  # what the customer sent
    for candidate in SearchCandidate.objects.filter(workflow=workflow):
        assert candidate.internal_patient_id in html
    assert html.count("0.97") >= 2
    event = AuditEvent.objects.get(action="review.read")
    assert (event.actor, event.subject, event.outcome) == (
        "operator:ops",
        str(workflow.patient_id),
        "ok",
    )


def test_admin_resolves_a_review_by_linking(operator, api, standin):
    workflow = in_review(api)
    first = SearchCandidate.objects.get(workflow=workflow, rank=1)
    response = operator.post(
        f"/admin/linking/linkreview/{workflow.id}/change/",
        {"decision": first.internal_patient_id, "reason": "confirmed by phone"},
    )
    assert response.status_code == 302
    workflow.refresh_from_db()
    assert (workflow.status, workflow.result) == (Status.COMPLETED, "LINKED")
    mapping = PatientMapping.objects.get(workflow=workflow)
    assert mapping.internal_patient_id == first.internal_patient_id
    assert LinkHistory.objects.get(workflow=workflow).actor == "operator:ops"


def test_admin_rejects_and_refuses_bad_input(operator, api, standin):
    workflow = in_review(api)
    url = f"/admin/linking/linkreview/{workflow.id}/change/"
    for bad in (
        {"decision": "reject", "reason": ""},
        {"decision": "not-a-candidate", "reason": "x"},
    ):
        page = operator.post(url, bad)
        assert page.status_code == 200  # the form again, with its error
        assert "errorlist" in page.content.decode()
    assert Workflow.objects.get(id=workflow.id).status == Status.REVIEW
    assert operator.post(url, {"decision": "reject", "reason": "nobody"}).status_code == 302
    workflow.refresh_from_db()
    assert workflow.result == "NO_RESULTS"
