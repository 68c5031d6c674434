"""GET /patient/<patient-id>: the linked internal patient, read from the FHIR stand-in, audited."""

import uuid
from typing import Any

import pytest

from linking.models import AuditEvent, MappingStatus, PatientMapping
from merchant.services import CustomerCredentials
from tests.conftest import LinkClient, link_body, not_found_body
from tests.processes import free_port
from workflows.models import Workflow

pytestmark = pytest.mark.django_db

JANE = "0c8eca2a00d55380a788b6f950b8c635"


def link(api: LinkClient, credentials: CustomerCredentials, internal_id: str = JANE) -> str:
    """A customer patient with a LINKED mapping (as the consumer leaves it)."""
    body = link_body()
    workflow = Workflow.objects.get(
        id=api.post_link(body, key=str(uuid.uuid4())).json()["workflow-id"]
    )
    PatientMapping.objects.create(
        customer=credentials.customer,
        customer_patient_id=workflow.patient_id,
        internal_patient_id=internal_id,
        status=MappingStatus.LINKED,
        workflow=workflow,
    )
    return str(workflow.patient_id)


def get(api: LinkClient, patient_id: str) -> Any:
    return api.client.get(f"/patient/{patient_id}", HTTP_CUSTOMER_TOKEN=api.token)


def test_linked_patient_details(api: LinkClient, credentials, standin) -> None:
    patient_id = link(api, credentials)
    response = get(api, patient_id)
    assert response.status_code == 200
    assert response.json() == {
        "patient-id": patient_id,
        "name": {"text": "Jane Q Doe", "family": "Doe", "given": ["Jane", "Q"]},
        "birth-date": "1980-04-02",
        "gender": "female",
        "telecom": [
            {"system": "phone", "value": "+1-555-0100", "use": "home"},
            {"system": "email", "value": "jane@example.org", "use": None},
        ],
        "address": [
            {
                "text": "1 Main St, Springfield 99001",
                "line": ["1 Main St"],
                "city": "Springfield",
                "postal-code": "99001",
                "country": "US",
                "use": "home",
            }
        ],
        "identifiers": [{"system": "urn:standin:mrn", "value": "SYN-0001"}],
    }
    [event] = AuditEvent.objects.all()
    assert (event.actor, event.action, event.subject, event.outcome) == (
        f"customer:{credentials.customer.id}",
        "patient.read",
        patient_id,
        "ok",
    )


def test_unlinked_foreign_unknown_and_malformed_are_the_same_404(
    api: LinkClient, other_api: LinkClient, credentials, other_credentials, standin
) -> None:
    foreign = link(other_api, other_credentials)
    pending = api.post_link(link_body(), key="pending").json()["workflow-id"]
    pending_patient = str(Workflow.objects.get(id=pending).patient_id)
    bodies = [
        not_found_body(get(api, foreign)),
        not_found_body(get(api, pending_patient)),
        not_found_body(get(api, str(uuid.uuid4()))),
        not_found_body(get(api, "not-a-uuid")),
    ]
    assert all(body == bodies[0] for body in bodies)
    assert get(other_api, foreign).status_code == 200
    outcomes = list(
        AuditEvent.objects.filter(customer=credentials.customer).values_list("outcome", flat=True)
    )
    assert outcomes == ["not-found"] * 4


def test_delinked_mapping_is_404(api: LinkClient, credentials, standin) -> None:
    patient_id = link(api, credentials)
    PatientMapping.objects.update(status=MappingStatus.DELINKED)
    not_found_body(get(api, patient_id))


def test_internal_record_gone_is_404_and_audited(api: LinkClient, credentials, standin) -> None:
    patient_id = link(api, credentials, internal_id="no-such-patient")
    not_found_body(get(api, patient_id))
    assert AuditEvent.objects.get().outcome == "internal-not-found"


def test_internal_system_down_is_503_and_audited(api: LinkClient, credentials, settings) -> None:
    settings.INTERNAL_SEARCH_URL = f"http://127.0.0.1:{free_port()}/fhir"
    patient_id = link(api, credentials)
    response = get(api, patient_id)
    assert response.status_code == 503
    assert response["Content-Type"] == "application/problem+json"
    assert int(response["Retry-After"]) > 0
    assert AuditEvent.objects.get().outcome == "unavailable"


def test_needs_a_token(standin) -> None:
    from rest_framework.test import APIClient

    assert APIClient().get(f"/patient/{uuid.uuid4()}").status_code == 401
