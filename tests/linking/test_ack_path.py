"""The ack path's single statement (linking/services/accept.py `_accept_new`): one round trip for
a new request, and exactly the rows the one-query-at-a-time path writes."""

import datetime as dt
import json
from typing import Any

import pytest
from django.db import connection
from django.forms.models import model_to_dict
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from linking.models import IdempotencyRecord, LinkRequest
from tests.conftest import LinkClient, link_body
from workflows.models import Workflow, WorkflowTransition

pytestmark = pytest.mark.django_db

# Differ between any two requests by construction.
_OWN = {"id", "request_id", "request", "workflow", "created_at", "updated_at", "at", "expires_at"}


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
    assert statements[0].startswith("WITH request AS (INSERT INTO")


def test_the_statement_writes_what_the_other_path_writes(api: LinkClient) -> None:
    body = link_body()
    fast = api.post_link(body, key="k").json()["workflow-id"]
    written = _rows(fast)
    # An expired record for the same key sends the same body down the other path.
    Workflow.objects.filter(id=fast).update(status="FAILED")
    IdempotencyRecord.objects.update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    with CaptureQueriesContext(connection) as queries:
        slow = api.post_link(body, key="k").json()["workflow-id"]
    assert any("pg_try_advisory_xact_lock" in q["sql"] for q in queries.captured_queries)
    assert fast != slow
    assert _rows(slow) == written
    assert written["timeline"] == [
        {"source": "", "target": "RECEIVED", "reason": "accepted", "actor": "api"}
    ]


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
