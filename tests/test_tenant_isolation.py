"""Tenant isolation: every customer endpoint is scoped by the token's customer.

Customers have separate patient-id namespaces: the same `patient.id` from two customers is two
patients, each with its own workflow, mapping and history. Another customer's ids, in any state,
must be indistinguishable from ids that never existed (same 404, byte for byte once the id in
`instance` is set aside, same headers), and asking about them must change nothing of theirs.

Already covered elsewhere, and not repeated here: foreign/unknown/malformed ids give equal 404
bodies on each endpoint (tests/linking/test_status.py, test_patient.py, test_delink.py, the last
also checking the foreign mapping stays LINKED); the same Idempotency-Key from two customers with
different bodies, and the same patient id pending for one customer and posted by another
(tests/linking/test_idempotency.py, test_link_create.py).
"""

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework.permissions import IsAuthenticated

from linking.models import AuditEvent, LinkHistory, MappingStatus, PatientMapping
from linking.services import link_process
from merchant.auth import CustomerTokenAuthentication
from merchant.models import Customer
from tests.conftest import LinkClient, link_body
from workflows.models import WebhookDelivery, Workflow

pytestmark = pytest.mark.django_db

JANE = "0c8eca2a00d55380a788b6f950b8c635"
SAM = "1a0d7d313f8b5bbd8de5d41790ad55b8"  # another stand-in patient (Sam Lindqvist)


def linked(client: LinkClient, body: dict[str, Any], key: str) -> Workflow:
    """Accept and process a request in this process, as the worker would (Jane Q Doe)."""
    response = client.post_link(body, key=key)
    assert response.status_code == 202, response.content
    link_process(workflow_id=response.json()["workflow-id"])
    workflow = Workflow.objects.get(id=response.json()["workflow-id"])
    assert workflow.result == "LINKED"
    return workflow


# --- the endpoints ------------------------------------------------------------------------------

# Every customer endpoint that takes an id, and how to call it. A new one must be added here
# (test_every_customer_endpoint_with_an_id_is_covered fails until it is).
ENDPOINTS: dict[str, Callable[[LinkClient, str], Any]] = {
    "link-status": lambda c, i: c.client.get(f"/link/status/{i}", HTTP_CUSTOMER_TOKEN=c.token),
    "patient-detail": lambda c, i: c.client.get(f"/patient/{i}", HTTP_CUSTOMER_TOKEN=c.token),
    "link-delete": lambda c, i: c.client.delete(f"/link/{i}", HTTP_CUSTOMER_TOKEN=c.token),
    "link-decision": lambda c, i: c.decide(i, {"reject": True}),
    "link-batch-status": lambda c, i: c.batch(i),
}


def _routes(patterns: list[Any], prefix: str = "") -> Iterator[tuple[str, URLPattern]]:
    for entry in patterns:
        if isinstance(entry, URLResolver):
            yield from _routes(entry.url_patterns, prefix + str(entry.pattern))
        elif isinstance(entry, URLPattern):
            yield prefix + str(entry.pattern), entry


def test_every_customer_endpoint_with_an_id_is_covered() -> None:
    """Walks the URLconf: a view behind the customer token with a path parameter is a tenant
    boundary, and must be in ENDPOINTS."""
    found = set()
    for route, pattern in _routes(get_resolver().url_patterns):
        view = getattr(pattern.callback, "cls", None)
        if view is None or "<" not in route:
            continue
        auth = getattr(view, "authentication_classes", [])
        permissions = getattr(view, "permission_classes", [])
        if CustomerTokenAuthentication in auth and IsAuthenticated in permissions:
            found.add(pattern.name)
    assert found == set(ENDPOINTS)


# --- another customer's ids look like unknown ids ------------------------------------------------


@dataclass
class Theirs:
    """The other customer's objects, in every state an id can be in."""

    linked_workflow: Workflow
    linked_patient: str
    delinked_workflow: Workflow
    delinked_patient: str
    pending_workflow: Workflow
    pending_patient: str

    def ids(self) -> dict[str, str]:
        return {
            "their linked workflow": str(self.linked_workflow.id),
            "their linked patient": self.linked_patient,
            "their de-linked workflow": str(self.delinked_workflow.id),
            "their de-linked patient": self.delinked_patient,
            "their pending workflow": str(self.pending_workflow.id),
            "their pending patient": self.pending_patient,
            "their workflow's request id": str(self.linked_workflow.request_id),
            "their customer id": str(self.linked_workflow.customer_id),
        }


@pytest.fixture
def theirs(other_api: LinkClient, standin: Any) -> Theirs:
    linked_body, delinked_body, pending_body = link_body(), link_body(), link_body()
    linked_workflow = linked(other_api, linked_body, "linked")
    delinked_workflow = linked(other_api, delinked_body, "delinked")
    assert ENDPOINTS["link-delete"](other_api, delinked_body["patient"]["id"]).status_code == 200
    pending = other_api.post_link(pending_body, key="pending")
    assert pending.status_code == 202
    return Theirs(
        linked_workflow=linked_workflow,
        linked_patient=linked_body["patient"]["id"],
        delinked_workflow=delinked_workflow,
        delinked_patient=delinked_body["patient"]["id"],
        pending_workflow=Workflow.objects.get(id=pending.json()["workflow-id"]),
        pending_patient=pending_body["patient"]["id"],
    )


def their_state(customer: Customer) -> dict[str, Any]:
    """Everything of one customer a foreign request could change."""
    return {
        "workflows": sorted(
            Workflow.objects.filter(customer=customer).values_list(
                "id", "status", "result", "updated_at"
            )
        ),
        "mappings": sorted(
            PatientMapping.objects.filter(customer=customer).values_list(
                "id", "status", "delinked_at", "delinked_by", "updated_at"
            )
        ),
        "history": LinkHistory.objects.filter(customer=customer).count(),
        "audit": AuditEvent.objects.filter(customer=customer).count(),
        "webhooks": sorted(
            WebhookDelivery.objects.filter(workflow__customer=customer).values_list(
                "id", "event_type"
            )
        ),
    }


def seen(response: Any, asked: str) -> tuple[int, bytes, dict[str, str]]:
    """What a client can tell from a response, with the id it asked for blanked out of the body
    (`instance` echoes the path), Content-Length dropped (it follows the id's length) and
    X-Request-ID (new on every request, whoever asks)."""
    headers = {
        k: v
        for k, v in response.headers.items()
        if k.lower() not in ("content-length", "x-request-id")
    }
    return response.status_code, response.content.replace(asked.encode(), b"<id>"), headers


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_their_ids_get_the_unknown_id_answer_and_change_nothing(
    endpoint: str, api: LinkClient, other_api: LinkClient, theirs: Theirs
) -> None:
    call = ENDPOINTS[endpoint]
    unknown = str(uuid.uuid4())
    reference = seen(call(api, unknown), unknown)
    assert reference[0] == 404
    assert json.loads(reference[1])["type"] == "/problems/not-found"
    other = Customer.objects.get(id=theirs.linked_workflow.customer_id)
    before = their_state(other)

    asked = {**theirs.ids(), "malformed": "not-a-uuid", "quote": "1' OR '1'='1"}
    for what, their_id in asked.items():
        assert seen(call(api, their_id), their_id) == reference, what

    assert their_state(other) == before
    # ... and they still see their own things as before.
    assert ENDPOINTS["link-status"](other_api, str(theirs.linked_workflow.id)).status_code == 200
    assert ENDPOINTS["patient-detail"](other_api, theirs.linked_patient).status_code == 200
    assert (
        PatientMapping.objects.get(customer=other, customer_patient_id=theirs.linked_patient).status
        == MappingStatus.LINKED
    )


# --- one patient id, two customers --------------------------------------------------------------


def test_post_link_for_a_patient_id_another_customer_linked(
    api: LinkClient, other_api: LinkClient, credentials: Any, other_credentials: Any, standin: Any
) -> None:
    """The other customer's LINKED patient is no obstacle and no information: a 202 with a new
    workflow, never their 409 with their workflow-id; the same key and body are no replay."""
    body = link_body()
    patient_id = body["patient"]["id"]
    theirs = linked(other_api, body, "same-key")
    their_mapping = PatientMapping.objects.get(customer=other_credentials.customer)
    before = their_state(other_credentials.customer)

    response = api.post_link(body, key="same-key")
    assert response.status_code == 202, response.content
    assert "Idempotent-Replayed" not in response
    assert str(theirs.id) not in response.content.decode()
    mine = Workflow.objects.get(id=response.json()["workflow-id"])
    assert (mine.customer_id, str(mine.patient_id)) == (credentials.customer.id, patient_id)

    link_process(workflow_id=mine.id)
    assert their_state(other_credentials.customer) == before
    assert (
        PatientMapping.objects.filter(
            customer_patient_id=patient_id, status=MappingStatus.LINKED
        ).count()
        == 2
    )

    # Each customer's conflict names its own workflow only.
    mine_again = api.post_link(body, key="again")
    theirs_again = other_api.post_link(body, key="again")
    assert mine_again.status_code == theirs_again.status_code == 409
    assert mine_again.json()["workflow-id"] == str(mine.id)
    assert theirs_again.json()["workflow-id"] == str(their_mapping.workflow_id)


def test_the_same_patient_id_reads_and_delinks_each_customer_own_patient(
    api: LinkClient, other_api: LinkClient, credentials: Any, other_credentials: Any, standin: Any
) -> None:
    body = link_body()
    patient_id = body["patient"]["id"]
    mine = linked(api, body, "k")
    theirs = linked(other_api, body, "k")
    # Two different people who happen to share a customer-side id.
    PatientMapping.objects.filter(customer=credentials.customer).update(internal_patient_id=SAM)

    mine_read = ENDPOINTS["patient-detail"](api, patient_id)
    theirs_read = ENDPOINTS["patient-detail"](other_api, patient_id)
    assert mine_read.json()["name"]["text"] == "Sam Lindqvist"
    assert theirs_read.json()["name"]["text"] == "Jane Q Doe"
    audit = AuditEvent.objects.values_list("customer_id", "subject", "outcome")
    assert sorted(audit) == sorted(
        [
            (credentials.customer.id, patient_id, "ok"),
            (other_credentials.customer.id, patient_id, "ok"),
        ]
    )

    before = their_state(other_credentials.customer)
    delinked = ENDPOINTS["link-delete"](api, patient_id)
    assert delinked.status_code == 200
    assert delinked.json()["workflow-id"] == str(mine.id)
    assert their_state(other_credentials.customer) == before
    assert PatientMapping.objects.get(customer=other_credentials.customer).status == (
        MappingStatus.LINKED
    )
    assert ENDPOINTS["patient-detail"](other_api, patient_id).json()["name"]["text"] == (
        "Jane Q Doe"
    )
    assert ENDPOINTS["patient-detail"](api, patient_id).status_code == 404
    [webhook] = WebhookDelivery.objects.filter(event_type="link.delinked")
    assert webhook.workflow_id == mine.id
    assert ENDPOINTS["link-status"](other_api, str(theirs.id)).json()["result"] == "LINKED"
