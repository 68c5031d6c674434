"""The OpenAPI document describes the API as it is."""

import pytest
from rest_framework.test import APIClient

from merchant.schema import DOCS_CONTENT_SECURITY_POLICY

pytestmark = pytest.mark.django_db


def test_schema_describes_link_api() -> None:
    response = APIClient().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    paths = schema["paths"]
    post = paths["/link"]["post"]
    assert set(post["responses"]) >= {"202", "400", "401", "409", "413", "415", "422", "503"}
    assert "application/problem+json" in post["responses"]["422"]["content"]
    headers = {p["name"] for p in post["parameters"] if p["in"] == "header"}
    assert "Idempotency-Key" in headers
    accepted = schema["components"]["schemas"]["LinkAccepted"]
    assert set(accepted["properties"]) == {"workflow-id", "status"}
    status = paths["/link/status/{workflow_id}"]["get"]
    assert set(status["responses"]) >= {"200", "401", "404"}
    delink = paths["/link/{patient_id}"]["delete"]
    assert set(delink["responses"]) >= {"200", "401", "404"}
    patient = paths["/patient/{patient_id}"]["get"]
    assert set(patient["responses"]) >= {"200", "401", "404", "503"}
    schemes = schema["components"]["securitySchemes"]
    assert schemes["customerToken"] == {
        "type": "apiKey",
        "in": "header",
        "name": "customer-token",
        "description": schemes["customerToken"]["description"],
    }
    assert post["security"] == [{"customerToken": []}]
    decide = paths["/link/{workflow_id}/decision"]["post"]
    assert set(decide["responses"]) >= {"200", "400", "401", "404", "409", "422"}
    # Either a candidate or a rejection, never neither or both: said by the schema, so a body
    # must be sent (drf-spectacular alone would call it optional).
    assert decide["requestBody"]["required"] is True
    decision = schema["components"]["schemas"]["LinkDecisionInputRequest"]
    assert [branch["required"] for branch in decision["oneOf"]] == [["candidate-id"], ["reject"]]
    status_body = schema["components"]["schemas"]["LinkStatusOutput"]["properties"]
    assert "candidates" in status_body


@pytest.mark.parametrize(
    ("path", "asset"), [("/api/docs/", b"swagger-ui"), ("/api/redoc/", b"redoc")]
)
def test_the_docs_pages_load_only_our_files(path: str, asset: bytes) -> None:
    response = APIClient().get(path)
    assert response.status_code == 200
    assert b"/static/drf_spectacular_sidecar/" + asset in response.content
    assert b"https://" not in response.content  # no CDN, no web fonts (tests/test_docs_browser.py)
    assert response["Content-Security-Policy"] == DOCS_CONTENT_SECURITY_POLICY


def test_schema_generates_without_warnings(tmp_path) -> None:
    from django.core.management import call_command

    target = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(target))
    text = target.read_text()
    assert "Idempotent-Replayed" in text and "Location" in text
