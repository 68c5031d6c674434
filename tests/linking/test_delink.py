"""DELETE /link/<patient-id>, re-linking afterwards, and the link history."""

import json
import uuid
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from linking.models import LinkHistory, LinkRequest, MappingStatus, PatientMapping
from linking.services import link_process
from merchant.services import CustomerCredentials
from tests.conftest import LinkClient, link_body, not_found_body
from workflows.models import WebhookDelivery, Workflow

pytestmark = pytest.mark.django_db


def linked(api: LinkClient, body: dict[str, Any], key: str) -> Workflow:
    """Accept and process a request in this process (the stand-in knows Jane Q Doe)."""
    workflow_id = api.post_link(body, key=key).json()["workflow-id"]
    link_process(workflow_id=workflow_id)
    workflow = Workflow.objects.get(id=workflow_id)
    assert workflow.result == "LINKED"
    return workflow


def delete(api: LinkClient, patient_id: str, reason: str = "") -> Any:
    query = f"?reason={reason}" if reason else ""
    return api.client.delete(f"/link/{patient_id}{query}", HTTP_CUSTOMER_TOKEN=api.token)


def test_delink_relink_and_history(api: LinkClient, credentials: CustomerCredentials, standin):
    body = link_body()
    patient_id = body["patient"]["id"]
    first = linked(api, body, "first")

    response = delete(api, patient_id, reason="merged-record")
    assert response.status_code == 200
    data = response.json()
    assert (data["patient-id"], data["status"], data["workflow-id"]) == (
        patient_id,
        "DE-LINKED",
        str(first.id),
    )
    mapping = PatientMapping.objects.get(workflow=first)
    assert mapping.status == MappingStatus.DELINKED
    assert mapping.delinked_by == f"customer:{credentials.customer.id}"
    assert mapping.delinked_reason == "merged-record"
    delivery = WebhookDelivery.objects.get(event_type="link.delinked")
    payload = json.loads(delivery.payload)
    assert payload["type"] == "link.delinked"
    assert payload["data"] == {
        "workflow-id": str(first.id),
        "status": "DE-LINKED",
        "customer-patient-id": patient_id,
        "reason": "merged-record",
    }

    # Idempotent: the same answer, nothing done twice.
    again = delete(api, patient_id)
    assert again.status_code == 200 and again.json() == data
    assert WebhookDelivery.objects.filter(event_type="link.delinked").count() == 1

    # The patient can be linked again, and the history tells the whole story.
    second = linked(api, body, "second")
    assert second.id != first.id
    history = list(LinkHistory.objects.filter(customer_patient_id=patient_id))
    assert [(h.event, h.workflow_id, h.actor) for h in history] == [
        ("linked", first.id, "worker"),
        ("delinked", first.id, f"customer:{credentials.customer.id}"),
        ("relinked", second.id, "worker"),
    ]
    assert history[1].reason == "merged-record"
    assert history[0].score is not None and history[0].internal_patient_id


def test_unknown_foreign_and_malformed_are_the_same_404(
    api: LinkClient, other_api: LinkClient, standin
):
    body = link_body()
    linked(other_api, body, "theirs")
    bodies = [
        not_found_body(delete(api, body["patient"]["id"])),
        not_found_body(delete(api, str(uuid.uuid4()))),
        not_found_body(delete(api, "not-a-uuid")),
    ]
    assert all(b == bodies[0] for b in bodies)
    assert PatientMapping.objects.get().status == MappingStatus.LINKED


def test_reason_is_bounded(api: LinkClient, standin):
    body = link_body()
    linked(api, body, "k")
    response = delete(api, body["patient"]["id"], reason="x" * 501)
    assert response.status_code == 400
    assert PatientMapping.objects.get().status == MappingStatus.LINKED


def test_operator_delinks_in_the_admin(api: LinkClient, standin):
    body = link_body()
    linked(api, body, "k")
    mapping = PatientMapping.objects.get()
    operator = Client()
    operator.force_login(User.objects.create_superuser("ops", "ops@example.org", "pw-long-1234"))
    url = "/admin/linking/patientmapping/"
    form = operator.post(url, {"action": "delink", "_selected_action": [mapping.pk]})
    assert form.status_code == 200 and b"reason" in form.content
    operator.post(
        url,
        {
            "action": "delink",
            "_selected_action": [mapping.pk],
            "apply": "Apply",
            "reason": "duplicate internal record",
        },
    )
    mapping.refresh_from_db()
    assert (mapping.status, mapping.delinked_by, mapping.delinked_reason) == (
        MappingStatus.DELINKED,
        "operator:ops",
        "duplicate internal record",
    )
    assert LinkHistory.objects.filter(event="delinked", actor="operator:ops").exists()
    assert WebhookDelivery.objects.filter(event_type="link.delinked").count() == 1
    assert operator.get("/admin/linking/linkhistory/").status_code == 200


def test_a_patient_linked_meanwhile_is_not_linked_twice(api: LinkClient, standin):
    """An operator's re-queue of an old workflow can reach a patient linked since by another
    one: the second ends NO_RESULTS, saying why, and writes no mapping and no history."""
    body = link_body()
    first = linked(api, body, "first")
    request = LinkRequest.objects.get(request_id=first.request_id)
    again = LinkRequest.objects.create(
        request_id=uuid.uuid4(), customer_id=request.customer_id, data=request.data
    )
    old = Workflow.objects.create(
        customer_id=first.customer_id, patient_id=first.patient_id, request_id=again.request_id
    )

    link_process(workflow_id=old.id)

    old.refresh_from_db()
    assert (old.status, old.result, old.reason) == (
        "COMPLETED",
        "NO_RESULTS",
        "patient already linked by another workflow",
    )
    assert list(old.transitions.values_list("source", "target")) == [
        ("RECEIVED", "IN_PROGRESS"),
        ("IN_PROGRESS", "NO_RESULTS"),
        ("NO_RESULTS", "COMPLETED"),
    ]
    assert PatientMapping.objects.filter(customer_patient_id=first.patient_id).count() == 1
    assert LinkHistory.objects.filter(workflow=old).count() == 0
    assert json.loads(WebhookDelivery.objects.get(workflow=old).payload)["data"]["result"] == (
        "NO_RESULTS"
    )
