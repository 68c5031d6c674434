"""A link request's statements read one patient's rows, never a customer's.

The ack and the worker's whole path (accept, claim, search, link, end, webhook) run for a new
patient of a customer who already has hundreds of workflows (pending and ended), mappings
(linked and de-linked), idempotency records and history lines; every statement is first run
under EXPLAIN ANALYZE (in a savepoint, rolled back) and the rows its scans read are counted.
The same for POST /link/batch: its statements read its patients' rows.

`make bench` found two ways to read a whole customer: a query with no index that fits (a
patient's linked and de-linked mappings: 1,500 rows read per workflow), and an index on
customer_id alone beside the composite one meant for the query, which the planner took when its
statistics were stale (every pending workflow, every idempotency record of the customer).
"""

import datetime as dt
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from linking.models import (
    IdempotencyRecord,
    LinkEvent,
    LinkHistory,
    LinkRequest,
    MappingStatus,
    PatientMapping,
)
from linking.services import link_process
from merchant.services import CustomerCredentials
from tests.conftest import LinkClient, link_body
from workflows.models import Status, Workflow

pytestmark = pytest.mark.django_db

EXISTING = 300  # of each kind, for the same customer
MAX_ROWS_READ = 20  # by any one statement; reading the customer's rows would be >= EXISTING


def _existing_rows(credentials: CustomerCredentials) -> None:
    customer = credentials.customer
    now = timezone.now()
    workflows = [
        Workflow(
            customer=customer,
            patient_id=uuid.uuid4(),
            request_id=uuid.uuid4(),
            status=Status.RECEIVED if index % 2 else Status.COMPLETED,
            created_at=now,
            updated_at=now,
        )
        for index in range(EXISTING)
    ]
    Workflow.objects.bulk_create(workflows)
    LinkRequest.objects.bulk_create(
        LinkRequest(request_id=w.request_id, customer=customer, data={"patient": {}})
        for w in workflows
    )
    IdempotencyRecord.objects.bulk_create(
        IdempotencyRecord(
            customer=customer,
            key=f"earlier-{index}",
            fingerprint="0" * 64,
            workflow=workflow,
            response_status=202,
            response_body="{}",
            expires_at=now + dt.timedelta(days=1),
        )
        for index, workflow in enumerate(workflows)
    )
    ended = [w for w in workflows if w.status == Status.COMPLETED]
    mappings = PatientMapping.objects.bulk_create(
        PatientMapping(
            customer=customer,
            customer_patient_id=w.patient_id,
            internal_patient_id=f"p{index}",
            status=MappingStatus.LINKED if index % 3 else MappingStatus.DELINKED,
            workflow=w,
        )
        for index, w in enumerate(ended)
    )
    LinkHistory.objects.bulk_create(
        LinkHistory(
            customer=customer,
            customer_patient_id=m.customer_patient_id,
            event=LinkEvent.LINKED,
            mapping=m,
            workflow=m.workflow,
            actor="worker",
        )
        for m in mappings
    )


def _rows_read(node: dict[str, Any]) -> int:
    """Rows the scans under a plan node read: returned, or read and then filtered out; and the
    rows a join compared and threw away (a batch joined against a customer's rows)."""
    rows = node.get("Rows Removed by Join Filter", 0) * node.get("Actual Loops", 1)
    if "Scan" in node["Node Type"] and node.get("Relation Name"):
        loops = node.get("Actual Loops", 1)
        rows += (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)) * loops
        rows += node.get("Rows Removed by Index Recheck", 0)
    return rows + sum(_rows_read(child) for child in node.get("Plans", []))


def _explaining(reads: list[tuple[int, str]]) -> Callable[..., Any]:
    def wrapper(
        execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        if not many and sql.lstrip().split(None, 1)[0].upper() in {
            "SELECT",
            "INSERT",
            "UPDATE",
            "DELETE",
            "WITH",
        }:
            raw = context["cursor"].cursor  # psycopg's own: not through this wrapper again
            raw.execute("SAVEPOINT query_scale")
            raw.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", params)
            plan = raw.fetchone()[0]
            raw.execute("ROLLBACK TO SAVEPOINT query_scale")
            plan = json.loads(plan) if isinstance(plan, str) else plan
            reads.append((_rows_read(plan[0]["Plan"]), " ".join(sql.split())))
        return execute(sql, params, many, context)

    return wrapper


def _heavy(reads: list[tuple[int, str]], limit: int) -> list[tuple[int, str]]:
    return [(rows, sql[:200]) for rows, sql in reads if rows > limit]


def test_a_link_request_reads_one_patients_rows(
    standin: Any, credentials: CustomerCredentials, api: LinkClient
) -> None:
    _existing_rows(credentials)
    reads: list[tuple[int, str]] = []
    with connection.execute_wrapper(_explaining(reads)):
        response = api.post_link(link_body(), key="new-patient")
        assert response.status_code == 202, response.content
        link_process(workflow_id=response.json()["workflow-id"])
    workflow = Workflow.objects.get(id=response.json()["workflow-id"])
    assert workflow.status == Status.COMPLETED and workflow.result == "LINKED"
    statements = [sql for _, sql in reads]
    assert any("linking_idempotencyrecord" in sql for sql in statements)  # the ack's
    assert any("INSERT INTO linking_patientmapping" in sql for sql in statements)  # the link's
    assert _heavy(reads, MAX_ROWS_READ) == []


BATCH = 10


def test_a_batch_reads_its_patients_rows(
    standin: Any, credentials: CustomerCredentials, api: LinkClient
) -> None:
    # `make bench` found the batch's refusal checks joined against every pending workflow of
    # the customer (15,000,000 comparisons for a 1,000-item batch, 0.9 s) while the table's
    # statistics, not yet analyzed, said it was empty.
    _existing_rows(credentials)
    reads: list[tuple[int, str]] = []
    requests = [
        {"idempotency-key": f"batch-item-{n}", "patient": link_body()["patient"]}
        for n in range(BATCH)
    ]
    with connection.execute_wrapper(_explaining(reads)):
        response = api.post_batch({"requests": requests}, key="new-batch")
    assert response.status_code == 202, response.content
    assert response.json()["accepted"] == BATCH
    assert any("unnest(" in sql and "linking_idempotencyrecord" in sql for _, sql in reads)
    # None per item but the inserts'; a customer's rows are >= EXISTING. (The worker's batch
    # statements select by arrays of primary keys: on tables this small a sequential scan is
    # the planner's right choice, so this does not bound them; `make bench` runs them at scale.)
    assert _heavy(reads, MAX_ROWS_READ + 3 * BATCH) == []


def test_a_page_of_links_reads_that_page(credentials: CustomerCredentials, api: LinkClient) -> None:
    # mapping_listing: without it each page read and sorted every mapping of the customer.
    _existing_rows(credentials)
    reads: list[tuple[int, str]] = []
    pages = []
    with connection.execute_wrapper(_explaining(reads)):
        query = "?limit=5"
        for _ in range(2):
            response = api.client.get(f"/links{query}", HTTP_CUSTOMER_TOKEN=api.token)
            assert response.status_code == 200, response.content
            pages.append(response.json())
            query = f"?limit=5&cursor={response.json()['next-cursor']}"
    assert [len(page["data"]) for page in pages] == [5, 5] and pages[1]["has-more"]
    assert sum("linking_patientmapping" in sql for _, sql in reads) == 2
    assert _heavy(reads, MAX_ROWS_READ) == []
