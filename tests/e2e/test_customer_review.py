"""A customer that decides its own reviews (issue 19: review_by=customer), end to end with the
real worker and beat: the `link.review_required` webhook, the candidates in the status (opaque
ids, how its own fields agree, nothing of the internal records), POST /link/<id>/decision and
its answers, and reviews that expire."""

import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.utils import timezone

from linking.models import LinkHistory, PatientMapping, ReviewDecision, SearchCandidate
from merchant.models import ReviewBy
from merchant.services import CustomerCredentials, customer_onboard
from standin.receiver import ReceiverServer
from tests.conftest import LinkClient
from tests.e2e.conftest import wait_until
from tests.e2e.test_processing import (
    AMBIGUOUS,
    delivered,
    in_review,
    post,
    terminal,
    verify,
)
from workflows.models import Status, Workflow

pytestmark = pytest.mark.django_db(transaction=True)

# The two certain "Alex Rivera" of the stand-in, whose records are never to be shown.
ALEX_INTERNAL = ("c683023a29175d0a99f8ce671ef80f99", "bef547d80bc951c0b70792b4248204e6")


def _customer(receiver: ReceiverServer, review_by: str) -> Iterator[CustomerCredentials]:
    credentials = customer_onboard(
        name=f"Review by {review_by}", webhook_url=f"{receiver.url}/hooks", review_by=review_by
    )
    receiver.state.secret = credentials.customer.webhook_secret
    yield credentials
    receiver.state.secret = None


@pytest.fixture
def reviewer(receiver: ReceiverServer, standin: Any) -> Iterator[CustomerCredentials]:
    yield from _customer(receiver, ReviewBy.CUSTOMER)


@pytest.fixture
def operated(receiver: ReceiverServer, standin: Any) -> Iterator[CustomerCredentials]:
    yield from _customer(receiver, ReviewBy.OPERATOR)


def problem(response: Any, status: int, slug: str) -> None:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["type"] == f"/problems/{slug}"


def review_started(
    client: LinkClient, customer: CustomerCredentials, receiver: ReceiverServer
) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """Post the ambiguous patient; the review webhook's data and the status' candidates."""
    workflow_id, body = post(client, **AMBIGUOUS)
    in_review(workflow_id)
    [delivery] = delivered(receiver, workflow_id)
    payload = verify(customer, delivery)
    assert payload["type"] == "link.review_required"
    status = client.status(workflow_id).json()
    assert status["status"] == "REVIEW"
    return workflow_id, payload["data"] | {"patient": body["patient"]}, status["candidates"]


@pytest.mark.parametrize("decision", ["link", "reject"])
def test_the_customer_is_asked_and_decides(
    reviewer: CustomerCredentials, receiver: ReceiverServer, decision: str
) -> None:
    client = LinkClient(reviewer.token)
    workflow_id, data, candidates = review_started(client, reviewer, receiver)
    assert {k: v for k, v in data.items() if k != "patient"} == {
        "workflow-id": workflow_id,
        "status": "REVIEW",
        "customer-patient-id": data["patient"]["id"],
    }
    # Opaque ids, the search's scores and grades, and only how its own fields compare.
    assert [(c["grade"], c["agreement"]) for c in candidates] == [
        ("certain", {"family": True, "given": True, "birth-date": True}),
        ("certain", {"family": True, "given": True, "birth-date": True}),
    ]
    assert len({c["candidate-id"] for c in candidates}) == 2
    shown = str(client.status(workflow_id).content)
    for internal in (*ALEX_INTERNAL, "Shelbyville", "555-0141", "alex.rivera@example.org"):
        assert internal not in shown

    body: dict[str, Any] = (
        {"candidate-id": candidates[1]["candidate-id"]}
        if decision == "link"
        else {"reject": True, "reason": "none of them"}
    )
    answer = client.decide(workflow_id, body)
    assert answer.status_code == 200, answer.content
    assert answer.json()["status"] == "COMPLETED"
    workflow = terminal(workflow_id)
    actor = f"customer:{reviewer.customer.id}"
    [_, completed] = delivered(receiver, workflow_id, count=2)
    ending = verify(reviewer, completed)
    assert ending["type"] == "link.completed"
    chosen = SearchCandidate.objects.get(workflow=workflow, rank=2).internal_patient_id
    if decision == "link":
        assert (workflow.result, ending["data"]["result"]) == ("LINKED", "LINKED")
        assert PatientMapping.objects.get(workflow=workflow).internal_patient_id == chosen
    else:
        assert ending["data"]["result"] == "NO_RESULTS"
        assert not PatientMapping.objects.filter(workflow=workflow).exists()
    # Recorded with the customer as the actor: the timeline, the link history, the decision.
    assert workflow.transitions.filter(source=Status.REVIEW, actor=actor).exists()
    assert LinkHistory.objects.get(workflow=workflow).actor == actor
    assert ReviewDecision.objects.get(workflow=workflow).actor == actor

    # The same decision again: the same answer, nothing more done; another one: 409.
    again = client.decide(workflow_id, body)
    assert (again.status_code, again.json()["status"]) == (200, "COMPLETED")
    other = (
        {"reject": True} if decision == "link" else {"candidate-id": candidates[0]["candidate-id"]}
    )
    problem(client.decide(workflow_id, other), 409, "review-decided")
    assert len(delivered(receiver, workflow_id, count=2)) == 2
    assert PatientMapping.objects.filter(workflow=workflow).count() == (decision == "link")


def test_decisions_that_cannot_be_taken(
    reviewer: CustomerCredentials, operated: CustomerCredentials, receiver: ReceiverServer
) -> None:
    client = LinkClient(reviewer.token)
    workflow_id, _, candidates = review_started(client, reviewer, receiver)
    # Neither or both of candidate-id and reject; unknown fields; an unknown candidate.
    problem(client.decide(workflow_id, {}), 400, "validation-error")
    both = {"candidate-id": candidates[0]["candidate-id"], "reject": True}
    problem(client.decide(workflow_id, both), 400, "validation-error")
    problem(client.decide(workflow_id, {"reject": True, "x": 1}), 400, "validation-error")
    # A control character is no candidate-id (make fuzz: DRF stripped it to a blank, a 400 the
    # schema's minLength allowed); the schema's pattern now says so too.
    problem(client.decide(workflow_id, {"candidate-id": "\u001e"}), 400, "validation-error")
    problem(client.decide(workflow_id, {"candidate-id": "cand_nope"}), 422, "unknown-candidate")
    # The internal patient id is not a candidate-id.
    internal = {"candidate-id": ALEX_INTERNAL[0]}
    problem(client.decide(workflow_id, internal), 422, "unknown-candidate")
    # Another customer's workflow, an unknown one and a malformed id: the same 404.
    problem(LinkClient(operated.token).decide(workflow_id, {"reject": True}), 404, "not-found")
    problem(client.decide(str(uuid.uuid4()), {"reject": True}), 404, "not-found")
    problem(client.decide("not-a-uuid", {"reject": True}), 404, "not-found")
    assert Workflow.objects.get(id=workflow_id).status == Status.REVIEW

    # A workflow that is not in review.
    linked_id, _ = post(client, full_name="Jane Q Doe")
    terminal(linked_id)
    problem(client.decide(linked_id, {"reject": True}), 409, "not-in-review")


def test_an_operators_customer_is_not_asked(
    operated: CustomerCredentials, receiver: ReceiverServer
) -> None:
    client = LinkClient(operated.token)
    workflow_id, _ = post(client, **AMBIGUOUS)
    in_review(workflow_id)
    status = client.status(workflow_id).json()
    assert status["status"] == "REVIEW" and "candidates" not in status
    problem(client.decide(workflow_id, {"reject": True}), 409, "review-by-operator")
    assert receiver.deliveries() == []


@pytest.mark.parametrize("review_by", [ReviewBy.CUSTOMER, ReviewBy.OPERATOR])
def test_a_review_nobody_decides_expires(
    receiver: ReceiverServer, standin: Any, review_by: str
) -> None:
    """Beat's sweep (every second here) ends a review older than REVIEW_TIMEOUT_SECONDS (7
    days): the review is made to look 8 days old."""
    credentials = next(_customer(receiver, review_by))
    client = LinkClient(credentials.token)
    workflow_id, _ = post(client, **AMBIGUOUS)
    in_review(workflow_id)
    Workflow.objects.filter(id=workflow_id).update(updated_at=timezone.now() - dt.timedelta(days=8))
    workflow = terminal(workflow_id)
    assert (workflow.status, workflow.result, workflow.reason) == (
        Status.COMPLETED,
        "NO_RESULTS",
        "review expired",
    )
    assert workflow.transitions.filter(source=Status.REVIEW, actor="sweep").exists()
    ending = verify(credentials, delivered(receiver, workflow_id, count=1)[-1])
    wait_until(
        lambda: any(
            verify(credentials, d)["type"] == "link.completed"
            for d in delivered(receiver, workflow_id)
        ),
        what="link.completed",
    )
    assert ending["data"]["workflow-id"] == workflow_id
    status = client.status(workflow_id).json()
    assert (status["status"], status["result"]) == ("COMPLETED", "NO_RESULTS")
    receiver.state.secret = None
