"""The ack path of POST /link: durable, published (by the dispatcher) after commit, ids only in
the message."""

import json
import time
import uuid

import pytest
from django.db import transaction

from linking.models import IdempotencyRecord, LinkRequest, MappingStatus, PatientMapping
from linking.services import link_accept
from tests.conftest import (
    LinkClient,
    broker_messages,
    link_body,
    queued_workflow_ids,
    wait_broker_messages,
)
from workflows.models import Status, Workflow, WorkflowTransition

pytestmark = pytest.mark.django_db(transaction=True)


def test_accepted_body_headers_and_rows(api: LinkClient, redis_db) -> None:
    body = link_body()
    response = api.post_link(body, key="abc-123")

    assert response.status_code == 202
    assert response["Content-Type"] == "application/json"
    data = response.json()
    assert set(data) == {"workflow-id", "status"}
    assert data["status"] == "RECEIVED"
    workflow = Workflow.objects.get(id=data["workflow-id"])
    assert response["Location"] == f"/link/status/{workflow.id}"
    assert int(response["Retry-After"]) > 0
    assert "Idempotent-Replayed" not in response

    assert workflow.status == Status.RECEIVED
    assert workflow.request_type == "LINK"
    assert str(workflow.patient_id) == body["patient"]["id"]
    assert workflow.attempts == 0
    stored = LinkRequest.objects.get(request_id=workflow.request_id)
    assert stored.customer_id == workflow.customer_id
    assert stored.data["patient"]["full_name"] == "Jane Q Doe"
    assert stored.data["patient"]["dob"] == "1980-04-02"
    record = IdempotencyRecord.objects.get(key="abc-123")
    assert record.workflow_id == workflow.id
    assert record.response_status == 202
    assert json.loads(record.response_body) == data
    timeline = list(WorkflowTransition.objects.filter(workflow=workflow))
    assert [(t.source, t.target) for t in timeline] == [("", "RECEIVED")]


def test_message_carries_ids_only(api: LinkClient, redis_db, dispatcher) -> None:
    body = link_body(full_name="Canary Zyxwvut", dob="1977-07-07")
    response = api.post_link(body)
    workflow = Workflow.objects.get(id=response.json()["workflow-id"])

    messages = wait_broker_messages(redis_db, 1)
    assert len(messages) == 1
    message = messages[0]
    assert message["task"] == "workflows.process_workflows"
    assert message["args"] == [[str(workflow.id)]]
    assert message["kwargs"] == {}
    for secret in ("Canary", "Zyxwvut", "1977-07-07", "jane@example.org", "555-0100", "Main St"):
        assert secret not in message["raw"]


def test_message_published_only_after_commit(credentials, redis_db, dispatcher) -> None:
    body = link_body()
    data = json.loads(json.dumps(body))
    with transaction.atomic():
        accepted = link_accept(
            customer=credentials.customer,
            idempotency_key="k",
            body=body,
            request_data=data,
        )
        assert Workflow.objects.filter(id=accepted.body["workflow-id"]).exists()
        time.sleep(0.2)
        assert broker_messages(redis_db) == []  # inside the transaction: nothing sent yet
    messages = wait_broker_messages(redis_db, 1)
    assert queued_workflow_ids(messages) == [accepted.body["workflow-id"]]


def test_rolled_back_request_publishes_nothing(credentials, redis_db, dispatcher) -> None:
    body = link_body()

    class Boom(Exception):
        pass

    with pytest.raises(Boom), transaction.atomic():
        link_accept(
            customer=credentials.customer,
            idempotency_key="k",
            body=body,
            request_data=json.loads(json.dumps(body)),
        )
        raise Boom
    assert Workflow.objects.count() == 0
    assert LinkRequest.objects.count() == 0
    assert IdempotencyRecord.objects.count() == 0
    time.sleep(0.2)
    assert broker_messages(redis_db) == []


def test_already_linked_patient_is_refused_with_its_workflow(api: LinkClient, credentials) -> None:
    body = link_body()
    first = api.post_link(body, key="first").json()["workflow-id"]
    workflow = Workflow.objects.get(id=first)
    PatientMapping.objects.create(
        customer=credentials.customer,
        customer_patient_id=workflow.patient_id,
        internal_patient_id="internal-1",
        status=MappingStatus.LINKED,
        workflow=workflow,
    )
    response = api.post_link(body, key="second")
    assert response.status_code == 409
    assert response["Content-Type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "/problems/patient-already-linked"
    assert problem["workflow-id"] == first
    assert Workflow.objects.count() == 1


def test_pending_workflow_for_same_patient_is_refused(api: LinkClient) -> None:
    body = link_body()
    first = api.post_link(body, key="first").json()["workflow-id"]
    response = api.post_link(body, key="second")
    assert response.status_code == 409
    problem = response.json()
    assert problem["type"] == "/problems/link-in-progress"
    assert problem["workflow-id"] == first
    assert Workflow.objects.count() == 1
    assert IdempotencyRecord.objects.count() == 1


def test_finished_unlinked_patient_can_be_asked_again(api: LinkClient) -> None:
    body = link_body()
    first = Workflow.objects.get(id=api.post_link(body, key="first").json()["workflow-id"])
    first.fail(reason="test")
    first.save()
    response = api.post_link(body, key="second")
    assert response.status_code == 202
    assert response.json()["workflow-id"] != str(first.id)


def test_same_patient_id_for_two_customers_is_two_workflows(
    api: LinkClient, other_api: LinkClient
) -> None:
    body = link_body()
    assert api.post_link(body).status_code == 202
    assert other_api.post_link(body).status_code == 202
    assert Workflow.objects.filter(patient_id=uuid.UUID(body["patient"]["id"])).count() == 2
