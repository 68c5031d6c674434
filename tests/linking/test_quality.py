"""Input quality: placeholder names and thin demographics are refused with 422, nothing stored."""

from typing import Any

import pytest

from linking.models import IdempotencyRecord, LinkRequest
from linking.quality import WEIGHTS, demographics_quality
from tests.conftest import LinkClient, link_body
from workflows.models import Workflow

pytestmark = pytest.mark.django_db


def assert_refused(response: Any, words: str) -> None:
    assert response.status_code == 422, response.content
    assert response["Content-Type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "/problems/insufficient-demographics"
    assert words in problem["detail"]
    assert Workflow.objects.count() == LinkRequest.objects.count() == 0
    assert IdempotencyRecord.objects.count() == 0


@pytest.mark.parametrize(
    "name", ["John Doe", "JANE DOE", "Jané  Doe", "Test Patient", "Unknown", "Baby Girl", "N/A"]
)
def test_placeholder_names_are_refused(api: LinkClient, name: str) -> None:
    assert_refused(api.post_link(link_body(full_name=name)), "placeholder")


def test_thin_demographics_are_refused(api: LinkClient) -> None:
    body = {
        "patient": {"id": link_body()["patient"]["id"], "full_name": "Madonna", "dob": "1958-08-16"}
    }
    assert_refused(api.post_link(body), "score 4, at least 6")


def test_a_single_name_with_a_phone_is_enough(api: LinkClient) -> None:
    body = {
        "patient": {
            "id": link_body()["patient"]["id"],
            "full_name": "Madonna",
            "dob": "1958-08-16",
            "contact": {"phone": "+1-555-0199"},
        }
    }
    assert api.post_link(body).status_code == 202


def test_full_name_and_birth_date_are_enough(api: LinkClient) -> None:
    body = {
        "patient": {"id": link_body()["patient"]["id"], "full_name": "Ann Lee", "dob": "1990-01-31"}
    }
    assert api.post_link(body).status_code == 202


def test_the_minimum_is_a_setting(api: LinkClient, settings: Any) -> None:
    settings.MIN_DEMOGRAPHICS_SCORE = 20
    assert_refused(api.post_link(link_body()), "at least 20")


def test_weights_add_up() -> None:
    quality = demographics_quality(link_body()["patient"])
    assert quality.score == sum(
        WEIGHTS[k]
        for k in (
            "full name (given and family)",
            "birth date",
            "phone",
            "email",
            "address",
            "insurance",
        )
    )
    assert not quality.placeholder
