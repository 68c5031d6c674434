"""A link request end to end: the real worker and beat, the FHIR stand-in over HTTP, the real
PostgreSQL and Redis, and a webhook receiver verifying Standard Webhooks signatures."""

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import transaction
from standardwebhooks.webhooks import Webhook

from linking.models import MappingStatus, PatientMapping, SearchCandidate
from linking.services import link_review_resolve
from merchant.models import Customer
from merchant.services import CustomerCredentials, customer_onboard
from standin.receiver import ReceiverServer, Step
from tests.conftest import LinkClient, link_body
from tests.e2e.conftest import script_standin, standin_stats, wait_until
from workflows.models import DeliveryStatus, Status, WebhookDelivery, Workflow
from workflows.services import workflows_publish

pytestmark = pytest.mark.django_db(transaction=True)

# link_body()'s defaults (Jane Q Doe, 1980-04-02) have exactly one certain match.
NO_MATCH = {"full_name": "Zed Nobody", "dob": "1901-01-01", "contact": {}}
AMBIGUOUS = {"full_name": "Alex Rivera", "dob": "1975-09-14", "contact": {}}
JANE_INTERNAL_ID = "0c8eca2a00d55380a788b6f950b8c635"


@pytest.fixture
def customer(receiver: ReceiverServer, standin: Any) -> Iterator[CustomerCredentials]:
    credentials = customer_onboard(name="E2E Health", webhook_url=f"{receiver.url}/hooks")
    receiver.state.secret = credentials.customer.webhook_secret
    yield credentials
    receiver.state.secret = None


@pytest.fixture
def client(customer: CustomerCredentials) -> LinkClient:
    return LinkClient(customer.token)


def terminal(workflow_id: str, timeout: float = 20) -> Workflow:
    def done() -> Workflow | None:
        workflow = Workflow.objects.get(id=workflow_id)
        return workflow if workflow.status in (Status.COMPLETED, Status.FAILED) else None

    result: Workflow = wait_until(done, timeout=timeout, what=f"workflow {workflow_id} to end")
    return result


def deliveries_for(receiver: ReceiverServer, workflow_id: str) -> list[Any]:
    return [d for d in receiver.deliveries() if d.json()["data"]["workflow-id"] == workflow_id]


def delivered(receiver: ReceiverServer, workflow_id: str, count: int = 1) -> list[Any]:
    def enough() -> list[Any] | None:
        found = deliveries_for(receiver, workflow_id)
        return found if len(found) >= count else None

    result: list[Any] = wait_until(enough, what=f"{count} webhook(s) for {workflow_id}")
    return result


def verify(customer: CustomerCredentials, delivery: Any) -> dict[str, Any]:
    """The receiver's side, as a customer would write it with the standardwebhooks library."""
    payload: dict[str, Any] = Webhook(customer.customer.webhook_secret).verify(
        delivery.body, delivery.headers
    )
    return payload


def post(client: LinkClient, **patient: Any) -> tuple[str, dict[str, Any]]:
    body = link_body(**patient)
    response = client.post_link(body, key=body["patient"]["id"])
    assert response.status_code == 202, response.content
    return response.json()["workflow-id"], body


def test_linked(client: LinkClient, customer: CustomerCredentials, receiver: ReceiverServer):
    workflow_id, body = post(client, full_name="Jane Q Doe")
    workflow = terminal(workflow_id)
    assert (workflow.status, workflow.result) == (Status.COMPLETED, "LINKED")
    mapping = PatientMapping.objects.get(workflow=workflow)
    assert mapping.internal_patient_id == JANE_INTERNAL_ID
    assert str(mapping.customer_patient_id) == body["patient"]["id"]
    assert mapping.status == MappingStatus.LINKED
    assert mapping.match_grade == "certain" and mapping.score is not None
    timeline = [(t.source, t.target) for t in workflow.transitions.all()]
    assert timeline == [
        ("", "RECEIVED"),
        ("RECEIVED", "IN_PROGRESS"),
        ("IN_PROGRESS", "LINKED"),
        ("LINKED", "COMPLETED"),
    ]

    [delivery] = delivered(receiver, workflow_id)
    assert delivery.verified is True
    payload = verify(customer, delivery)
    assert payload["type"] == "link.completed"
    assert payload["data"] == {
        "workflow-id": workflow_id,
        "status": "COMPLETED",
        "result": "LINKED",
        "customer-patient-id": body["patient"]["id"],
        "reason": None,
    }
    assert delivery.path == "/hooks"
    for demographic in ("Jane", "1980-04-02", "555-0100", "jane@example.org"):
        assert demographic not in delivery.body
    status = client.status(workflow_id).json()
    assert (status["status"], status["result"], status["reason"]) == ("COMPLETED", "LINKED", None)


def test_no_results(client: LinkClient, customer: CustomerCredentials, receiver: ReceiverServer):
    workflow_id, _ = post(client, **NO_MATCH)
    workflow = terminal(workflow_id)
    assert (workflow.status, workflow.result, workflow.reason) == (
        Status.COMPLETED,
        "NO_RESULTS",
        "no match",
    )
    assert not PatientMapping.objects.filter(workflow=workflow).exists()
    [delivery] = delivered(receiver, workflow_id)
    assert verify(customer, delivery)["data"]["result"] == "NO_RESULTS"


def in_review(workflow_id: str) -> Workflow:
    def waiting() -> Workflow | None:
        workflow = Workflow.objects.get(id=workflow_id)
        assert workflow.status not in (Status.COMPLETED, Status.FAILED), workflow.status
        return workflow if workflow.status == Status.REVIEW else None

    result: Workflow = wait_until(waiting, what=f"workflow {workflow_id} in review")
    return result


@pytest.mark.parametrize("decision", ["link", "reject"])
def test_ambiguous_goes_to_review_and_the_operator_decides(
    client: LinkClient, customer: CustomerCredentials, receiver: ReceiverServer, decision: str
):
    workflow_id, _ = post(client, **AMBIGUOUS)
    workflow = in_review(workflow_id)
    candidates = list(SearchCandidate.objects.filter(workflow=workflow))
    assert [(c.rank, c.match_grade) for c in candidates] == [(1, "certain"), (2, "certain")]
    assert client.status(workflow_id).json()["status"] == "REVIEW"
    # Past the sweep threshold (5 s) and several sweeps (every 1 s): still waiting, untouched,
    # and the customer has not been told anything yet.
    time.sleep(7)
    workflow.refresh_from_db()
    assert (workflow.status, workflow.requeues, workflow.attempts) == (Status.REVIEW, 0, 1)
    assert deliveries_for(receiver, workflow_id) == []

    chosen = candidates[1].internal_patient_id if decision == "link" else None
    link_review_resolve(
        workflow_id=workflow.id,
        internal_patient_id=chosen,
        actor="operator:e2e",
        reason="checked against the chart",
    )
    [delivery] = delivered(receiver, workflow_id)
    data = verify(customer, delivery)["data"]
    workflow.refresh_from_db()
    assert workflow.status == Status.COMPLETED
    if decision == "link":
        assert (data["status"], data["result"]) == ("COMPLETED", "LINKED")
        assert PatientMapping.objects.get(workflow=workflow).internal_patient_id == chosen
    else:
        assert (data["result"], data["reason"]) == ("NO_RESULTS", "no match (reviewed)")
        assert not PatientMapping.objects.filter(workflow=workflow).exists()
    # Final: more sweeps, a re-published message, and still one answer.
    workflows_publish(workflow_ids=[workflow.id])
    time.sleep(3)
    assert Workflow.objects.get(id=workflow.id).status == Status.COMPLETED
    assert len(deliveries_for(receiver, workflow_id)) == 1


def test_low_scores_are_no_match(client: LinkClient, customer: CustomerCredentials, receiver):
    # Morgan Ellis scores 0.82 (probable): under this customer's review minimum, no match.
    customer.customer.review_min_score = 0.9
    customer.customer.save()
    workflow_id, _ = post(client, full_name="Morgan Ellis", dob="1988-07-03", contact={})
    workflow = terminal(workflow_id)
    assert (workflow.result, workflow.reason) == ("NO_RESULTS", "no match")
    assert SearchCandidate.objects.filter(workflow=workflow).count() == 1
    [delivery] = delivered(receiver, workflow_id)
    assert verify(customer, delivery)["data"]["result"] == "NO_RESULTS"


def test_internal_500_then_success_is_retried(client: LinkClient, standin: Any):
    script_standin(standin, {"status": 500})
    workflow_id, _ = post(client)
    workflow = terminal(workflow_id)
    assert (workflow.status, workflow.result) == (Status.COMPLETED, "LINKED")
    assert workflow.attempts == 2
    assert standin_stats(standin)["match_calls"] == 2


def test_internal_429_honours_retry_after(client: LinkClient, standin: Any):
    script_standin(standin, {"status": 429, "retry_after": 1})
    workflow_id, _ = post(client)
    workflow = terminal(workflow_id)
    assert workflow.result == "LINKED"
    started, retried = [t.at for t in workflow.transitions.all()][1], workflow.updated_at
    assert (retried - started).total_seconds() >= 1


def test_internal_timeout_is_retried(client: LinkClient, standin: Any):
    script_standin(standin, {"delay_ms": 2500})  # longer than INTERNAL_SEARCH_READ_TIMEOUT=1
    workflow_id, _ = post(client)
    workflow = terminal(workflow_id)
    assert (workflow.status, workflow.result, workflow.attempts) == (Status.COMPLETED, "LINKED", 2)


def test_internal_400_fails_and_tells_the_customer(
    client: LinkClient, customer: CustomerCredentials, standin: Any, receiver: ReceiverServer
):
    script_standin(standin, {"status": 400})
    workflow_id, _ = post(client)
    workflow = terminal(workflow_id)
    assert workflow.status == Status.FAILED
    assert "refused the request (400)" in workflow.reason
    assert standin_stats(standin)["match_calls"] == 1
    [delivery] = delivered(receiver, workflow_id)
    payload = verify(customer, delivery)
    assert payload["type"] == "link.failed"
    assert payload["data"]["status"] == "FAILED" and "400" in payload["data"]["reason"]
    status = client.status(workflow_id).json()
    assert status["status"] == "FAILED" and "400" in status["reason"]


def test_attempt_limit_fails_and_tells_the_customer(
    client: LinkClient, customer: CustomerCredentials, standin: Any, receiver: ReceiverServer
):
    script_standin(standin, *[{"status": 503}] * 10)
    workflow_id, _ = post(client)
    workflow = terminal(workflow_id, timeout=30)
    assert workflow.status == Status.FAILED
    assert workflow.reason.startswith("attempt limit reached")
    assert workflow.attempts == 3  # WORKFLOW_MAX_ATTEMPTS in the e2e settings
    assert standin_stats(standin)["match_calls"] == 3
    [delivery] = delivered(receiver, workflow_id)
    assert verify(customer, delivery)["type"] == "link.failed"


def test_webhook_500_then_200_is_retried_with_the_same_id(
    client: LinkClient, customer: CustomerCredentials, receiver: ReceiverServer
):
    receiver.respond_with(Step(status=500))
    workflow_id, _ = post(client)
    first, second = delivered(receiver, workflow_id, count=2)
    assert (first.answered, second.answered) == (500, 200)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body
    verify(customer, first)
    verify(customer, second)
    delivery = wait_until(
        lambda: WebhookDelivery.objects.filter(
            workflow_id=workflow_id, status=DeliveryStatus.DELIVERED
        ).first(),
        what="delivery marked DELIVERED",
    )
    assert delivery.attempts == 2
    assert [a.status_code for a in delivery.attempt_log.all()] == [500, 200]


def test_webhook_410_disables_the_endpoint(
    client: LinkClient, customer: CustomerCredentials, receiver: ReceiverServer
):
    receiver.respond_with(Step(status=410))
    workflow_id, _ = post(client)
    delivered(receiver, workflow_id)
    wait_until(
        lambda: not Customer.objects.get(id=customer.customer.id).webhook_enabled,
        what="endpoint disabled",
    )
    assert WebhookDelivery.objects.get(workflow_id=workflow_id).status == DeliveryStatus.DISABLED

    second_id, _ = post(client, **NO_MATCH)
    terminal(second_id)
    wait_until(
        lambda: WebhookDelivery.objects.filter(
            workflow_id=second_id, status=DeliveryStatus.DISABLED
        ).exists(),
        what="second delivery disabled",
    )
    assert deliveries_for(receiver, second_id) == []


def _unheard(*, workflow_id: uuid.UUID) -> list[str]:
    """An announcement on a channel no dispatcher listens on."""
    return ["nobody_listens", "{}"]


def test_an_ack_nobody_heard_of_is_run_at_the_schedulers_next_look(
    client: LinkClient, receiver: ReceiverServer, monkeypatch: pytest.MonkeyPatch
):
    # No dispatcher hears of it (none was listening then): it is due all the same, and the
    # scheduler looks at what is due at least every second.
    monkeypatch.setattr("linking.services.accept.workflow_announcement", _unheard)
    started = time.monotonic()
    workflow_id, _ = post(client)
    workflow = terminal(workflow_id, timeout=30)
    assert time.monotonic() - started < 5  # not the sweep's stale window (5 s here)
    assert workflow.result == "LINKED"
    assert workflow.requeues == 0
    assert not workflow.transitions.filter(actor="sweep").exists()
    delivered(receiver, workflow_id)


def test_task_delivered_twice_has_one_effect(
    client: LinkClient, standin: Any, receiver: ReceiverServer, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr("linking.services.accept.workflow_announcement", _unheard)
    workflow_id, _ = post(client)
    workflow = Workflow.objects.get(id=workflow_id)
    with transaction.atomic():
        for _ in range(3):
            workflows_publish(workflow_ids=[workflow.id])
    workflow = terminal(workflow_id)
    assert workflow.result == "LINKED"
    assert PatientMapping.objects.filter(workflow=workflow).count() == 1
    assert workflow.transitions.filter(target=Status.COMPLETED).count() == 1
    assert WebhookDelivery.objects.filter(workflow=workflow).count() == 1
    delivered(receiver, workflow_id)
    assert len(deliveries_for(receiver, workflow_id)) == 1
    assert standin_stats(standin)["match_calls"] == 1


def test_linked_patient_details_after_the_link(client: LinkClient, standin: Any, settings: Any):
    settings.INTERNAL_SEARCH_URL = standin.base_url
    workflow_id, body = post(client)
    assert terminal(workflow_id).result == "LINKED"
    patient_id = body["patient"]["id"]
    response = client.client.get(f"/patient/{patient_id}", HTTP_CUSTOMER_TOKEN=client.token)
    assert response.status_code == 200
    details = response.json()
    assert details["patient-id"] == patient_id
    assert details["name"]["family"] == "Doe" and details["birth-date"] == "1980-04-02"


def test_delink_sends_a_signed_webhook_and_allows_a_new_link(
    client: LinkClient, customer: CustomerCredentials, receiver: ReceiverServer
):
    workflow_id, body = post(client)
    assert terminal(workflow_id).result == "LINKED"
    delivered(receiver, workflow_id)
    patient_id = body["patient"]["id"]
    response = client.client.delete(
        f"/link/{patient_id}?reason=wrong-person", HTTP_CUSTOMER_TOKEN=client.token
    )
    assert response.status_code == 200
    completed, delinked = delivered(receiver, workflow_id, count=2)
    payload = verify(customer, delinked)
    assert payload["type"] == "link.delinked"
    assert payload["data"]["reason"] == "wrong-person"
    assert delinked.headers["webhook-id"] != completed.headers["webhook-id"]
    again = client.post_link(body, key="after-delink")
    assert again.status_code == 202
    assert terminal(again.json()["workflow-id"]).result == "LINKED"
