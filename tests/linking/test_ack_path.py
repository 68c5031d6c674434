"""The ack path's single statement (linking.statements.ACCEPT): one round trip for a new request,
every column of the four rows it writes, and what the models would write."""

import datetime as dt
import json
import re
from typing import Any

import psycopg
import pytest
from django.conf import settings
from django.db import connection
from django.forms.models import model_to_dict
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from linking import statements
from linking.models import IdempotencyRecord, LinkRequest, MappingStatus, PatientMapping
from linking.serializers.links import LinkCreateInputSerializer
from linking.services.accept import (
    IdempotencyKeyReused,
    LinkAcceptance,
    LinkInProgress,
    LinkItem,
    PatientAlreadyLinked,
    RequestInFlight,
    links_accept,
)
from tests.conftest import LinkClient, link_body
from workflows.models import Workflow, WorkflowTransition

pytestmark = pytest.mark.django_db

# Differ between any two requests by construction.
_OWN = {
    "id",
    "request_id",
    "request",
    "workflow",
    "created_at",
    "updated_at",
    "at",
    "expires_at",
    "deadline_at",
    "due_at",
}


def _rows(workflow_id: str) -> dict[str, Any]:
    workflow = Workflow.objects.get(id=workflow_id)
    return {
        "workflow": model_to_dict(workflow, exclude=_OWN),
        "timeline": [
            model_to_dict(t, exclude=_OWN)
            for t in WorkflowTransition.objects.filter(workflow=workflow)
        ],
        "request": LinkRequest.objects.get(request_id=workflow.request_id).data,
        # The stored answer names the workflow: compared with its id taken out.
        "record": json.loads(
            json.dumps(
                model_to_dict(IdempotencyRecord.objects.get(workflow=workflow), exclude=_OWN),
                default=str,
            ).replace(workflow_id, "<id>")
        ),
        "record_ttl": (lambda r: r.expires_at - r.created_at)(
            IdempotencyRecord.objects.get(workflow=workflow)
        ),
        "deadline": workflow.deadline_at and workflow.deadline_at - workflow.created_at,
        # Due at its 202: the scheduler's to publish.
        "due": workflow.due_at and workflow.due_at - workflow.created_at,
    }


def test_a_new_request_is_one_statement(api: LinkClient) -> None:
    api.post_link(link_body(), key="warm-up")  # the customer row, read once per request
    with CaptureQueriesContext(connection) as queries:
        response = api.post_link(link_body(), key="one")
    assert response.status_code == 202
    writes = [q["sql"] for q in queries.captured_queries if "merchant_customer" not in q["sql"]]
    # Inside the test's transaction a savepoint wraps it; in autocommit there is none.
    statements = [sql for sql in writes if "SAVEPOINT" not in sql]
    assert len(statements) == 1, statements
    assert statements[0].lstrip().startswith("WITH item AS (")


@pytest.mark.parametrize(
    "model",
    [LinkRequest, Workflow, WorkflowTransition, IdempotencyRecord],
    ids=lambda m: m.__name__,
)
def test_the_statement_writes_every_column(model: Any) -> None:
    # A column added to a model without a database default must be added to ACCEPT too.
    table = model._meta.db_table
    found = re.search(rf"INSERT INTO {table}\s*\(([^)]*)\)", statements.ACCEPT)
    assert found, table
    written = [name.strip() for name in found.group(1).split(",")]
    columns = [
        f.column for f in model._meta.concrete_fields if f.column != "id" or not f.auto_created
    ]
    assert sorted(written) == sorted(columns)


def test_the_statement_writes_what_the_models_would(api: LinkClient) -> None:
    body = link_body()
    workflow_id = api.post_link(body, key="k").json()["workflow-id"]
    written = _rows(workflow_id)
    defaults = model_to_dict(Workflow(), exclude=_OWN | {"customer", "patient_id", "webhook_url"})
    assert {k: written["workflow"][k] for k in defaults} == defaults
    assert written["timeline"] == [
        {"source": "", "target": "RECEIVED", "reason": "accepted", "actor": "api"}
    ]
    assert written["record_ttl"] == dt.timedelta(seconds=settings.IDEMPOTENCY_TTL_SECONDS)
    assert written["deadline"] == dt.timedelta(seconds=settings.WORKFLOW_DEADLINE_SECONDS)
    assert written["due"] == dt.timedelta(0)
    # An expired record for the same key is forgotten, and the statement run again writes the
    # same rows under the key's lock.
    Workflow.objects.filter(id=workflow_id).update(status="FAILED")
    IdempotencyRecord.objects.update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    with CaptureQueriesContext(connection) as queries:
        again = api.post_link(body, key="k").json()["workflow-id"]
    assert any(
        "pg_try_advisory_xact_lock(hashtextextended(" in q["sql"] for q in queries.captured_queries
    )
    assert again != workflow_id
    assert _rows(again) == written


def test_a_refused_request_writes_nothing_and_says_why(api: LinkClient) -> None:
    body = link_body()
    first = api.post_link(body, key="a")
    assert first.status_code == 202
    again = api.post_link(body, key="b")
    assert again.status_code == 409
    assert again.json()["type"] == "/problems/link-in-progress"
    assert again.json()["workflow-id"] == first.json()["workflow-id"]
    assert Workflow.objects.count() == LinkRequest.objects.count() == 1
    assert IdempotencyRecord.objects.count() == WorkflowTransition.objects.count() == 1


def _item(customer: Any, key: str, body: dict[str, Any]) -> LinkItem:
    serializer = LinkCreateInputSerializer(data=body, context={"customer": customer})
    serializer.is_valid(raise_exception=True)
    return LinkItem(idempotency_key=key, body=body, request_data=serializer.canonical())


def test_the_statement_says_why_it_took_nothing(api: LinkClient, credentials: Any) -> None:
    # Every refusal rule is the statement's: one run answers each item, taken or not, and why.
    customer = credentials.customer
    known = link_body()
    first = api.post_link(known, key="known").json()["workflow-id"]
    pending = link_body()
    pending_id = api.post_link(pending, key="pending").json()["workflow-id"]
    linked = link_body()
    linked_id = api.post_link(linked, key="linked").json()["workflow-id"]
    Workflow.objects.filter(id=linked_id).update(status="COMPLETED")
    PatientMapping.objects.create(
        customer=customer,
        customer_patient_id=linked["patient"]["id"],
        internal_patient_id="internal-1",
        status=MappingStatus.LINKED,
        workflow_id=linked_id,
    )
    items = [
        _item(customer, "known", known),
        _item(customer, "pending", link_body()),
        _item(customer, "pending-again", pending),
        _item(customer, "linked-again", linked),
        _item(customer, "busy", link_body()),
        _item(customer, "new", link_body()),
    ]
    db = connection.settings_dict
    with psycopg.connect(
        dbname=db["NAME"], host=db["HOST"], port=db["PORT"], user=db["USER"], autocommit=True
    ) as other:
        # Another session accepting the key "busy" right now.
        other.execute(
            "SELECT pg_advisory_lock(hashtextextended(%s, 0))",
            [f"idempotency:{customer.id}:busy"],
        )
        with CaptureQueriesContext(connection) as queries:
            replay, reused, in_progress, already, in_flight, new = links_accept(
                customer=customer, items=items
            )
    ran = [q["sql"] for q in queries.captured_queries if "SAVEPOINT" not in q["sql"]]
    assert len(ran) == 1 and ran[0].lstrip().startswith("WITH item AS ("), ran
    assert isinstance(replay, LinkAcceptance) and replay.replayed
    assert replay.body["workflow-id"] == first
    assert isinstance(reused, IdempotencyKeyReused)
    assert isinstance(in_progress, LinkInProgress) and str(in_progress.workflow_id) == pending_id
    assert isinstance(already, PatientAlreadyLinked) and str(already.workflow_id) == linked_id
    assert isinstance(in_flight, RequestInFlight)
    assert isinstance(new, LinkAcceptance) and not new.replayed
    assert Workflow.objects.filter(id=new.body["workflow-id"], status="RECEIVED").exists()
    assert Workflow.objects.count() == 4
