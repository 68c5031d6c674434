"""GET /links: the customer's links, newest change first, keyset-paginated, tenant-scoped."""

import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from linking.models import MappingStatus, PatientMapping
from linking.selectors import LINKS_LIMIT_DEFAULT, LinksFilter, links_page
from linking.serializers.listing import LinksListItemSerializer, LinksListOutputSerializer
from merchant.models import Customer
from merchant.services import CustomerCredentials
from tests.conftest import LinkClient, link_body
from tests.test_tenant_isolation import linked
from workflows.models import Result, Status, Workflow

pytestmark = pytest.mark.django_db

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
ITEM_FIELDS = {"customer-patient-id", "status", "workflow-id", "linked-at", "updated-at"}


def links(client: LinkClient, query: str = "", **headers: str) -> Any:
    extra: dict[str, Any] = {"HTTP_CUSTOMER_TOKEN": client.token, **headers}
    return client.client.get(f"/links{query}", **extra)


def mappings(
    customer: Customer,
    count: int,
    *,
    at: dt.datetime | None = None,
    step: dt.timedelta = dt.timedelta(seconds=1),
    status: str = MappingStatus.LINKED,
) -> list[PatientMapping]:
    """`count` mappings of completed workflows, written directly: the n-th updated at
    `at + n * step` (step 0: all at the same instant). Returned in the list's order."""
    at = at or T0
    workflows = Workflow.objects.bulk_create(
        Workflow(
            customer=customer,
            patient_id=uuid.uuid4(),
            status=Status.COMPLETED,
            result=Result.LINKED,
        )
        for _ in range(count)
    )
    created = PatientMapping.objects.bulk_create(
        PatientMapping(
            customer=customer,
            customer_patient_id=workflow.patient_id,
            internal_patient_id=f"internal-{uuid.uuid4().hex}",
            status=status,
            workflow=workflow,
            created_at=at + n * step - dt.timedelta(days=1),
            updated_at=at + n * step,
            delinked_at=at + n * step if status == MappingStatus.DELINKED else None,
        )
        for n, workflow in enumerate(workflows)
    )
    return sorted(created, key=lambda m: (m.updated_at, m.id), reverse=True)


def patient_ids(response: Any) -> list[str]:
    assert response.status_code == 200, response.content
    return [item["customer-patient-id"] for item in response.json()["data"]]


def ids(rows: list[PatientMapping]) -> list[str]:
    return [str(m.customer_patient_id) for m in rows]


def walk(client: LinkClient, query: str, cursor: str | None = None) -> Iterator[dict[str, Any]]:
    """Every page of a listing from `cursor` on, following next-cursor (query: without `?`)."""
    while True:
        extra = f"&cursor={cursor}" if cursor else ""
        response = links(client, f"?{query}{extra}")
        assert response.status_code == 200, response.content
        page = response.json()
        yield page
        assert page["has-more"] is (page["next-cursor"] is not None)
        if not page["has-more"]:
            return
        cursor = page["next-cursor"]


def field_errors(response: Any) -> dict[str, str]:
    assert response.status_code == 400, response.content
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == "/problems/validation-error"
    return {error["field"]: error["detail"] for error in body["errors"]}


# --- what is listed -----------------------------------------------------------------------------


def test_links_of_real_requests_newest_change_first(api: LinkClient, standin: Any) -> None:
    first, second = link_body(), link_body()
    first_workflow = linked(api, first, "first")
    second_workflow = linked(api, second, "second")
    first_id = first["patient"]["id"]
    assert api.client.delete(f"/link/{first_id}", HTTP_CUSTOMER_TOKEN=api.token).status_code == 200

    response = links(api)
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"data", "has-more", "next-cursor"}
    assert (body["has-more"], body["next-cursor"]) == (False, None)
    delinked, still = body["data"]  # the de-link is the newest change
    assert set(delinked) == set(still) == ITEM_FIELDS
    by_patient = {m.customer_patient_id: m for m in PatientMapping.objects.all()}
    for item, workflow in ((delinked, first_workflow), (still, second_workflow)):
        mapping = by_patient[uuid.UUID(item["customer-patient-id"])]
        assert item == {
            "customer-patient-id": str(mapping.customer_patient_id),
            "status": mapping.status,
            "workflow-id": str(workflow.id),
            "linked-at": mapping.created_at.isoformat().replace("+00:00", "Z"),
            "updated-at": mapping.updated_at.isoformat().replace("+00:00", "Z"),
        }
        # Nothing of the internal patient.
        assert mapping.internal_patient_id.encode() not in response.content
    assert (delinked["status"], still["status"]) == ("DE-LINKED", "LINKED")
    assert delinked["customer-patient-id"] == first_id


def test_the_answer_is_what_the_schema_says(credentials: CustomerCredentials) -> None:
    mappings(credentials.customer, 2)
    page = links_page(customer=credentials.customer, filters=LinksFilter(), limit=1)
    assert set(page) == set(LinksListOutputSerializer().fields)
    assert set(page["data"][0]) == set(LinksListItemSerializer().fields) == ITEM_FIELDS


def test_nothing_yet_is_an_empty_page(api: LinkClient) -> None:
    response = links(api)
    assert response.json() == {"data": [], "has-more": False, "next-cursor": None}


def test_ties_in_updated_at_newest_link_first(
    api: LinkClient, credentials: CustomerCredentials
) -> None:
    """Many links share one updated-at (a batch links them in one statement): the id breaks
    the tie, in the order and in the cursor."""
    rows = mappings(credentials.customer, 7, step=dt.timedelta(0))
    assert [m.id for m in rows] == sorted((m.id for m in rows), reverse=True)
    assert patient_ids(links(api)) == ids(rows)
    walked = [item["customer-patient-id"] for page in walk(api, "limit=2") for item in page["data"]]
    assert walked == ids(rows)


def test_status_filter(api: LinkClient, credentials: CustomerCredentials) -> None:
    linked_rows = mappings(credentials.customer, 3)
    delinked_rows = mappings(
        credentials.customer, 2, at=T0 + dt.timedelta(minutes=1), status=MappingStatus.DELINKED
    )
    assert patient_ids(links(api, "?status=LINKED")) == ids(linked_rows)
    assert patient_ids(links(api, "?status=DE-LINKED")) == ids(delinked_rows)
    assert patient_ids(links(api)) == ids(delinked_rows + linked_rows)
    for bad in ("linked", "DELINKED", "", "LINKED,DE-LINKED"):
        assert set(field_errors(links(api, f"?status={bad}"))) == {"status"}, bad


def test_updated_since_is_inclusive_and_needs_a_time_zone(
    api: LinkClient, credentials: CustomerCredentials
) -> None:
    rows = mappings(credentials.customer, 4)  # T0 .. T0+3s, newest first
    since = T0 + dt.timedelta(seconds=2)
    for spelling in ("2026-03-01T12:00:02Z", "2026-03-01T14:00:02%2B02:00", "2026-03-01t12:00:02z"):
        assert patient_ids(links(api, f"?updated-since={spelling}")) == ids(rows[:2]), spelling
    assert patient_ids(links(api, "?updated-since=2026-03-01T12:00:02.000001Z")) == ids(rows[:1])
    assert patient_ids(links(api, "?updated-since=2030-01-01T00:00:00Z")) == []
    after = (since - dt.timedelta(microseconds=1)).isoformat().replace("+", "%2B")
    assert patient_ids(links(api, f"?updated-since={after}")) == ids(rows[:2])
    # Offsets RFC 3339 allows and PostgreSQL does not (beyond ±15:59), and times whose UTC
    # falls outside years 1-9999.
    assert patient_ids(links(api, "?updated-since=2026-03-02T05:41:02%2B17:41")) == ids(rows[:2])
    assert patient_ids(links(api, "?updated-since=0001-01-01T00:00:00%2B05:00")) == ids(rows)
    assert patient_ids(links(api, "?updated-since=9999-12-31T23:00:00-05:00")) == []

    naive = field_errors(links(api, "?updated-since=2026-03-01T12:00:02"))
    assert set(naive) == {"updated-since"}
    assert "time zone" in naive["updated-since"]
    for bad in ("yesterday", "2026-03-01", "2026-03-01 12:00:02Z", "2026-02-30T00:00:00Z", "1"):
        assert set(field_errors(links(api, f"?updated-since={bad}"))) == {"updated-since"}, bad


def test_limit(api: LinkClient, credentials: CustomerCredentials) -> None:
    rows = mappings(credentials.customer, LINKS_LIMIT_DEFAULT + 1)
    page = links(api).json()
    assert len(page["data"]) == LINKS_LIMIT_DEFAULT and page["has-more"] is True
    assert patient_ids(links(api, "?limit=1")) == ids(rows[:1])
    assert patient_ids(links(api, "?limit=500")) == ids(rows)
    for bad in ("0", "501", "x", "-1", "1.0", "", " 5", "\u0665", "99999999999"):
        assert set(field_errors(links(api, f"?limit={bad}"))) == {"limit"}, bad


def test_unknown_and_repeated_parameters_are_refused(api: LinkClient) -> None:
    assert field_errors(links(api, "?limt=5&starting_after=x")) == {
        "limt": "Unknown field.",
        "starting_after": "Unknown field.",
    }
    repeated = field_errors(links(api, "?limit=5&limit=6"))
    assert repeated == {"limit": "Given more than once."}


# --- pages --------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [23, 20])  # a last page part-full, and one exactly full
def test_pages_walk_every_link_exactly_once(
    api: LinkClient, credentials: CustomerCredentials, count: int
) -> None:
    rows = mappings(credentials.customer, count, step=dt.timedelta(milliseconds=1))
    pages = list(walk(api, "limit=5"))
    assert [len(p["data"]) for p in pages] == [5] * (count // 5) + (
        [count % 5] if count % 5 else []
    )
    assert [i["customer-patient-id"] for p in pages for i in p["data"]] == ids(rows)
    assert (pages[-1]["has-more"], pages[-1]["next-cursor"]) == (False, None)


def test_pages_with_filters(api: LinkClient, credentials: CustomerCredentials) -> None:
    mappings(credentials.customer, 6)
    wanted = mappings(
        credentials.customer, 9, at=T0 + dt.timedelta(minutes=1), status=MappingStatus.DELINKED
    )
    mappings(credentials.customer, 4, at=T0 + dt.timedelta(minutes=2))
    since = "2026-03-01T12:01:02Z"
    walked = [
        item["customer-patient-id"]
        for page in walk(api, f"status=DE-LINKED&updated-since={since}&limit=2")
        for item in page["data"]
    ]
    assert walked == ids(wanted[:7])  # T0+1min+2s .. T0+1min+8s


def test_new_and_changed_links_never_shift_later_pages(
    api: LinkClient, credentials: CustomerCredentials
) -> None:
    customer = credentials.customer
    rows = mappings(customer, 10, at=timezone.now() - dt.timedelta(hours=1))
    first = links(api, "?limit=4").json()
    assert [i["customer-patient-id"] for i in first["data"]] == ids(rows[:4])

    # Meanwhile: new links, one at the same instant as the cursor's row, and a link of page 1
    # changed (it moves to the front, and is seen by listing again).
    mappings(customer, 3, at=timezone.now())
    tie = mappings(customer, 1, at=rows[3].updated_at)
    assert tie[0].id > rows[3].id  # newer, so before the cursor's row in the order
    PatientMapping.objects.filter(id=rows[0].id).update(
        status=MappingStatus.DELINKED, updated_at=timezone.now()
    )

    rest = [
        item["customer-patient-id"]
        for page in walk(api, "limit=4", first["next-cursor"])
        for item in page["data"]
    ]
    assert rest == ids(rows[4:])


# --- cursors ------------------------------------------------------------------------------------


def _flip(text: str, index: int) -> str:
    return text[:index] + ("A" if text[index] != "A" else "B") + text[index + 1 :]


def test_a_tampered_or_made_up_cursor_is_refused(
    api: LinkClient, credentials: CustomerCredentials
) -> None:
    mappings(credentials.customer, 3)
    cursor = links(api, "?limit=1").json()["next-cursor"]
    assert patient_ids(links(api, f"?limit=1&cursor={cursor}"))
    payload = cursor.split(":", 1)[0]
    for bad in (
        _flip(cursor, 3),  # the position
        _flip(cursor, len(cursor) - 2),  # the signature
        f"{payload}:",
        payload,
        "abc",
        "eyJ4IjoxfQ",
        cursor + "x",
    ):
        errors = field_errors(links(api, f"?limit=1&cursor={bad}"))
        assert errors == {"cursor": "Not a cursor of this endpoint."}, bad
    assert set(field_errors(links(api, "?cursor="))) == {"cursor"}


def test_a_cursor_with_other_filters_is_refused(
    api: LinkClient, credentials: CustomerCredentials
) -> None:
    mappings(credentials.customer, 4)
    since = "2026-03-01T12:00:01Z"
    cursor = links(api, f"?limit=1&status=LINKED&updated-since={since}").json()["next-cursor"]
    for other in ("", "&status=LINKED", f"&updated-since={since}", "&status=DE-LINKED"):
        errors = field_errors(links(api, f"?limit=1&cursor={cursor}{other}"))
        assert set(errors) == {"cursor"}, other
        assert "other filters" in errors["cursor"]
    for other in ("2026-03-01T12:00:02Z", "2026-03-01T12:00:01.000001Z"):
        query = f"?limit=1&cursor={cursor}&status=LINKED&updated-since={other}"
        assert set(field_errors(links(api, query))) == {"cursor"}, other
    # The same filters, spelled otherwise; and another limit: the next page.
    same = f"?limit=2&cursor={cursor}&status=LINKED&updated-since=2026-03-01T13:00:01%2B01:00"
    assert len(patient_ids(links(api, same))) == 2


# --- tenants and authentication -----------------------------------------------------------------


def test_other_customers_links_are_never_listed_nor_reachable(
    api: LinkClient,
    other_api: LinkClient,
    credentials: CustomerCredentials,
    other_credentials: CustomerCredentials,
) -> None:
    mine = mappings(credentials.customer, 3)
    theirs = mappings(other_credentials.customer, 5, at=T0 + dt.timedelta(seconds=1))
    # The same patient id for both: still only one's own link.
    PatientMapping.objects.filter(id=theirs[0].id).update(
        customer_patient_id=mine[0].customer_patient_id
    )
    assert patient_ids(links(api)) == ids(mine)
    assert len(patient_ids(links(other_api))) == 5

    their_cursor = links(other_api, "?limit=1").json()["next-cursor"]
    errors = field_errors(links(api, f"?limit=1&cursor={their_cursor}"))
    assert errors == {"cursor": "Not a cursor of this endpoint."}
    my_cursor = links(api, "?limit=1").json()["next-cursor"]
    assert set(field_errors(links(other_api, f"?cursor={my_cursor}"))) == {"cursor"}
    walked = [i["customer-patient-id"] for page in walk(api, "limit=1") for i in page["data"]]
    assert walked == ids(mine)


def test_without_a_valid_token_401(api: LinkClient) -> None:
    no_token: dict[str, Any] = {}
    for headers in (no_token, {"HTTP_CUSTOMER_TOKEN": "not-a-token"}):
        response = api.client.get("/links", **headers)
        assert response.status_code == 401
        assert response["Content-Type"] == "application/problem+json"
        assert response.json()["type"] == "/problems/unauthorized"
        assert "WWW-Authenticate" in response


def test_read_rate_limit_applies(api: LinkClient, settings: Any) -> None:
    settings.RATE_LIMIT_READ = "2/min"
    assert [links(api).status_code for _ in range(3)] == [200, 200, 429]


# --- cost ---------------------------------------------------------------------------------------


def test_one_query_per_page(
    api: LinkClient,
    credentials: CustomerCredentials,
    django_assert_max_num_queries: Any,
) -> None:
    mappings(credentials.customer, 60)
    cursor = links(api, "?limit=20&status=LINKED").json()["next-cursor"]
    for query in ("?limit=500", f"?limit=20&status=LINKED&cursor={cursor}"):
        with (
            CaptureQueriesContext(connection) as captured,
            django_assert_max_num_queries(2),  # the page, and the token's customer
        ):
            assert links(api, query).status_code == 200
        reads = [
            q["sql"] for q in captured.captured_queries if "linking_patientmapping" in q["sql"]
        ]
        assert len(reads) == 1, reads
        assert "internal_patient_id" not in reads[0]
