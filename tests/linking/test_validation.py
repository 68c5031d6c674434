"""Fail fast: every kind of bad input is a problem+json naming the field, nothing persisted."""

import datetime as dt
import json
from typing import Any

import pytest

from linking.models import IdempotencyRecord, LinkRequest
from tests.conftest import LinkClient, link_body
from workflows.models import Workflow

pytestmark = pytest.mark.django_db


def assert_nothing_persisted() -> None:
    assert Workflow.objects.count() == 0
    assert LinkRequest.objects.count() == 0
    assert IdempotencyRecord.objects.count() == 0


def fields_of(response: Any) -> set[str]:
    assert response.status_code == 400, response.content
    assert response["Content-Type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "/problems/validation-error"
    assert problem["status"] == 400
    assert problem["title"] and problem["detail"]
    return {error["field"] for error in problem["errors"]}


def without(body: dict[str, Any], field: str) -> dict[str, Any]:
    body["patient"].pop(field)
    return body


TOMORROW = (dt.date.today() + dt.timedelta(days=2)).isoformat()

BAD_PATIENTS = [
    ({"id": "not-a-uuid"}, "patient.id"),
    ({"id": 12345}, "patient.id"),
    ({"full_name": ""}, "patient.full_name"),
    ({"full_name": "   "}, "patient.full_name"),
    ({"full_name": 42}, "patient.full_name"),
    ({"full_name": "x" * 201}, "patient.full_name"),
    ({"full_name": "1234"}, "patient.full_name"),
    ({"full_name": "Jane\x00Doe"}, "patient.full_name"),
    ({"dob": "02/04/1980"}, "patient.dob"),
    ({"dob": "1980-13-40"}, "patient.dob"),
    ({"dob": TOMORROW}, "patient.dob"),
    ({"dob": "1800-01-01"}, "patient.dob"),
    ({"dob": 19800402}, "patient.dob"),
    ({"contact": {"email": "not-an-email"}}, "patient.contact.email"),
    ({"contact": {"phone": "call me maybe"}}, "patient.contact.phone"),
    ({"contact": {"phone": "12"}}, "patient.contact.phone"),
    ({"contact": {"address": "a" * 501}}, "patient.contact.address"),
    ({"contact": {"fax": "+1-555-0100"}}, "patient.contact.fax"),
    ({"contact": "1 Main St"}, "patient.contact"),
    ({"insurance": ["a", "b"]}, "patient.insurance"),
    ({"insurance": "Acme"}, "patient.insurance"),
    ({"ssn": "123-45-6789"}, "patient.ssn"),
]


@pytest.mark.parametrize(("override", "field"), BAD_PATIENTS)
def test_bad_patient_field(api: LinkClient, override: dict[str, Any], field: str) -> None:
    assert field in fields_of(api.post_link(link_body(**override)))
    assert_nothing_persisted()


@pytest.mark.parametrize("field", ["id", "full_name", "dob"])
def test_required_patient_field(api: LinkClient, field: str) -> None:
    assert f"patient.{field}" in fields_of(api.post_link(without(link_body(), field)))
    assert_nothing_persisted()


def test_missing_patient(api: LinkClient) -> None:
    assert "patient" in fields_of(api.post_link({}))
    assert_nothing_persisted()


def test_unknown_top_level_field_is_reported_with_other_errors(api: LinkClient) -> None:
    body = link_body(dob="yesterday")
    body["priority"] = "high"
    assert fields_of(api.post_link(body)) == {"priority", "patient.dob"}
    assert_nothing_persisted()


def test_body_must_be_an_object(api: LinkClient) -> None:
    response = api.post_link([link_body()])
    assert response.status_code == 400
    assert response["Content-Type"] == "application/problem+json"
    assert_nothing_persisted()


@pytest.mark.parametrize(
    ("webhook", "reason"),
    [
        # A well-formed URL naming a refused destination is a 422 (tests/merchant/test_webhook_urls)
        ("not a url", "spaces"),
        ("https://user:pw@hooks.acme.example/merchant", "credentials"),
    ],
)
def test_bad_request_webhook(api: LinkClient, webhook: str, reason: str) -> None:
    body = link_body()
    body["webhook"] = webhook
    response = api.post_link(body)
    assert "webhook" in fields_of(response)
    assert reason in json.dumps(response.json())
    assert_nothing_persisted()


def test_request_webhook_on_the_registered_host_is_accepted(api: LinkClient) -> None:
    body = link_body()
    body["webhook"] = "https://hooks.acme.example/merchant/patients?tag=1"
    assert api.post_link(body).status_code == 202
    assert LinkRequest.objects.get().data["webhook"] == body["webhook"]


def test_datetime_dob_keeps_its_date(api: LinkClient) -> None:
    assert api.post_link(link_body(dob="1980-04-02T23:15:00Z")).status_code == 202
    assert LinkRequest.objects.get().data["patient"]["dob"] == "1980-04-02"


def test_minimal_patient_is_accepted(api: LinkClient) -> None:
    body = {
        "patient": {"id": link_body()["patient"]["id"], "full_name": "Ann Lee", "dob": "1990-01-31"}
    }
    assert api.post_link(body).status_code == 202


def test_malformed_json_is_400(api: LinkClient) -> None:
    response = api.post_link('{"patient": {', key="k")
    assert response.status_code == 400
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["type"] == "/problems/malformed-json"
    assert_nothing_persisted()


def test_nan_is_not_json(api: LinkClient) -> None:
    response = api.post_link('{"patient": {"id": NaN}}', key="k")
    assert response.status_code == 400
    assert_nothing_persisted()


def test_not_json_is_415(api: LinkClient) -> None:
    response = api.client.post(
        "/link",
        "patient=1",
        content_type="application/x-www-form-urlencoded",
        HTTP_CUSTOMER_TOKEN=api.token,
        HTTP_IDEMPOTENCY_KEY="k",
    )
    assert response.status_code == 415
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["type"] == "/problems/unsupported-media-type"
    assert_nothing_persisted()


def test_body_over_64_kib_is_413(api: LinkClient) -> None:
    body = link_body(insurance={"notes": "x" * (64 * 1024)})
    response = api.post_link(body)
    assert response.status_code == 413
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["type"] == "/problems/payload-too-large"
    assert_nothing_persisted()


def test_body_just_under_64_kib_is_accepted(api: LinkClient) -> None:
    body = link_body(insurance={"notes": ""})
    room = 64 * 1024 - len(json.dumps(body))
    body["patient"]["insurance"]["notes"] = "x" * room
    assert len(json.dumps(body)) == 64 * 1024
    assert api.post_link(body).status_code == 202


def test_wrong_method_is_problem_json(api: LinkClient) -> None:
    response = api.client.get("/link", HTTP_CUSTOMER_TOKEN=api.token)
    assert response.status_code == 405
    assert response["Content-Type"] == "application/problem+json"


def test_unknown_url_is_problem_json(api: LinkClient) -> None:
    response = api.client.get("/nowhere")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["type"] == "/problems/not-found"


def test_problem_types_are_dereferenceable(api: LinkClient) -> None:
    response = api.client.get("/problems/validation-error")
    assert response.status_code == 200
    assert response.json()["status"] == 400
