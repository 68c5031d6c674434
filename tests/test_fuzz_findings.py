"""Regression tests for what the fuzzer (schemathesis, `make fuzz`, tests/fuzz) found.

Each finding was a disagreement between the OpenAPI document and the service: data the schema
allows that the service refuses, answers the schema does not describe, or a schema that broke
itself. Each test puts the two side by side on the fuzzer's counterexamples and fails without
its fix. The responses are checked with schemathesis's own checks, in-process.
"""

import copy
import datetime as dt
import json
import re
import sys
from collections.abc import Iterator
from typing import Any

# schemathesis's own dependency; it ships no type stubs.
import jsonschema  # type: ignore[import-untyped]
import pytest
import schemathesis
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.test import override_settings
from drf_spectacular.generators import SchemaGenerator
from rest_framework.test import APIClient
from schemathesis.specs.openapi.schemas import OpenApiSchema
from standardwebhooks.webhooks import Webhook

from merchant.services import CustomerCredentials
from tests.conftest import LinkClient, link_body

pytestmark = pytest.mark.django_db

CALLBACK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    """The OpenAPI document as the API serves it."""
    response = APIClient().get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    schema: dict[str, Any] = json.loads(response.content)
    return schema


@pytest.fixture
def wsgi_schema() -> Iterator[OpenApiSchema]:
    """schemathesis over the WSGI app in this process and this test's transaction (the
    connection stays open between requests, as Django's test client keeps it)."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield schemathesis.openapi.from_wsgi("/api/schema/?format=json", WSGIHandler())
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


def _validator(document: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft4Validator:
    """A validator for a schema of the document, its `$ref`s resolved against the document."""
    return jsonschema.Draft4Validator({**schema, "components": document["components"]})


def _operation(document: dict[str, Any], path: str, method: str) -> dict[str, Any]:
    operation: dict[str, Any] = document["paths"][path][method]
    return operation


def _header_schema(document: dict[str, Any], path: str, method: str, name: str) -> Any:
    parameters = _operation(document, path, method)["parameters"]
    return next(p["schema"] for p in parameters if p["in"] == "header" and p["name"] == name)


def _body_schema(document: dict[str, Any], path: str, method: str, media: str) -> Any:
    return _operation(document, path, method)["requestBody"]["content"][media]["schema"]


def _problem_type(response: Any) -> str | None:
    if response["Content-Type"] != "application/problem+json":
        return None
    kind: str = response.json()["type"]
    return kind


# --- 1. Idempotency-Key: documented as any string, refused unless 1-255 printable ASCII -------


@pytest.mark.parametrize(
    "key",
    ["k", "x" * 255, "a b", "!~", "", "x" * 256, "é", "a\tb", "a\x7fb", "new\nline"],
)
def test_idempotency_key_schema_says_what_the_service_accepts(
    document: dict[str, Any], api: LinkClient, key: str
) -> None:
    schema = _header_schema(document, "/link", "post", "Idempotency-Key")
    allowed = _validator(document, schema).is_valid(key)
    response = api.post_link(link_body(), key=key)
    refused = _problem_type(response) == "/problems/idempotency-key-invalid"
    assert allowed == (not refused), (key, response.status_code, response.content)


def test_idempotency_key_schema_refuses_space_at_either_end(document: dict[str, Any]) -> None:
    # HTTP strips it from header values: the service would see another key than the client.
    validator = _validator(document, _header_schema(document, "/link", "post", "Idempotency-Key"))
    assert validator.is_valid("a b")
    assert not validator.is_valid(" ab")
    assert not validator.is_valid("ab ")


# --- 2. Answers every operation can give but none documented: 406, 429, their headers -------


def test_not_acceptable_is_documented_everywhere(
    document: dict[str, Any], wsgi_schema: OpenApiSchema, credentials: CustomerCredentials
) -> None:
    for path, item in document["paths"].items():
        for method in item:
            case = wsgi_schema[path][method.upper()].Case(
                path_parameters={name: "x" for name in _path_names(path)},
                headers={"customer-token": credentials.token, "Accept": "text/html"},
            )
            response = case.call()
            assert response.status_code == 406, (method, path)
            case.validate_response(response)  # documented status, content type and body


def test_rate_limited_answer_is_documented(
    wsgi_schema: OpenApiSchema, credentials: CustomerCredentials
) -> None:
    operation = wsgi_schema["/link/status/{workflow_id}"]["GET"]
    case = operation.Case(
        path_parameters={"workflow_id": "4a3c0b7e-4a9e-4df4-9a7e-0d4b7e2f1c11"},
        headers={"customer-token": credentials.token},
    )
    with override_settings(RATE_LIMIT_READ="1/min"):
        assert case.call().status_code == 404
        response = case.call()
    assert response.status_code == 429
    assert response.headers.get("retry-after")
    case.validate_response(response)  # documented, with its Retry-After header


def test_common_answers_are_documented_on_every_operation(document: dict[str, Any]) -> None:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "406" in responses, (method, path)
            if operation.get("security"):
                assert responses["401"]["headers"]["WWW-Authenticate"]["required"], (method, path)
                assert responses["429"]["headers"]["Retry-After"]["required"], (method, path)
                assert "application/problem+json" in responses["429"]["content"]


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


# --- 3. POST /link's body: the schema allowed what the serializer refuses --------------------


def _patient(**changes: Any) -> dict[str, Any]:
    body = link_body()
    body["patient"].update(changes)
    return body


def _contact(**changes: Any) -> dict[str, Any]:
    body = link_body()
    body["patient"]["contact"].update(changes)
    return body


LINK_BODIES = {
    "valid": link_body(),
    "unknown member": {**link_body(), "priority": "high"},
    "unknown patient member": _patient(ssn="123"),
    "insurance null": _patient(insurance=None),
    "insurance a list": _patient(insurance=["Acme"]),
    "name only spaces": _patient(full_name="   "),
    "name with a control character": _patient(full_name="Jane\x00Doe"),
    "name with space around": _patient(full_name="  Jane Doe "),
    # Only space to Python (str.strip), not to JSON Schema's ECMA `\s`: the stateful phase's case.
    "name of Python-only space": _patient(full_name="\x85\t\x0b\r\x0b\t"),
    "name with a next-line inside": _patient(full_name="Jane\x85Doe"),
    "phone too short": _contact(phone="12"),
    "phone with letters": _contact(phone="+1-555-CALL-NOW"),
    "phone with space around": _contact(phone=" +1 555 0100 "),
    "address only spaces": _contact(address=" \t "),
    "webhook not a URL": {**link_body(), "webhook": "a:b"},
    "webhook with credentials": {**link_body(), "webhook": "https://u:p@hooks.acme.example/x"},
    "webhook with a fragment": {**link_body(), "webhook": "https://hooks.acme.example/x#y"},
    "webhook port 0": {**link_body(), "webhook": "https://hooks.acme.example:0/x"},
    "webhook on the registered host": {**link_body(), "webhook": "https://hooks.acme.example/x"},
    "webhook on another host": {**link_body(), "webhook": "https://elsewhere.example/x"},
}


@pytest.mark.parametrize("name", LINK_BODIES)
def test_link_body_schema_says_what_the_service_accepts(
    document: dict[str, Any], api: LinkClient, name: str
) -> None:
    body = copy.deepcopy(LINK_BODIES[name])
    schema = _body_schema(document, "/link", "post", "application/json")
    allowed = _validator(document, schema).is_valid(body)
    response = api.post_link(body, key=f"key-{name}")
    refused = _problem_type(response) == "/problems/validation-error"
    assert allowed == (not refused), (name, response.status_code, response.content)
    # Schema-valid but refused for what no schema states is a 422, never a 400.
    assert response.status_code in ((202, 422) if allowed else (400,)), response.content


# --- 4. The search callback: any object was documented, only a searchset Bundle is accepted --

GRADE = "http://hl7.org/fhir/StructureDefinition/match-grade"


def _bundle(*entries: Any, **changes: Any) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": list(entries), **changes}


def _entry(patient_id: Any = "p-1", **search: Any) -> dict[str, Any]:
    return {"resource": {"resourceType": "Patient", "id": patient_id}, "search": search}


CALLBACK_BODIES = {
    "empty searchset": _bundle(),
    "no entry member": {"resourceType": "Bundle", "type": "searchset"},
    "graded entries": _bundle(
        _entry(score=0.9, extension=[{"url": GRADE, "valueCode": "probable"}]),
        _entry("p.2", score=0, extension=[{"url": "http://other", "valueCode": "anything"}]),
    ),
    "any object": {"x-schemathesis-additional": 1},
    "not a searchset": _bundle(type="collection"),
    "not a Patient": _bundle({"resource": {"resourceType": "Practitioner", "id": "p"}}),
    "patient id with a space": _bundle(_entry("p 1")),
    "patient id too long": _bundle(_entry("p" * 65)),
    "score above 1": _bundle(_entry(score=1.5)),
    "score a boolean": _bundle(_entry(score=True)),
    "unknown grade": _bundle(_entry(extension=[{"url": GRADE, "valueCode": "maybe"}])),
    "grade without a code": _bundle(_entry(extension=[{"url": GRADE}])),
    "entry not a list": _bundle(entry={"resource": {}}),
}


def _signed(body: bytes, message_id: str = "msg-1") -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    return {
        "HTTP_WEBHOOK_ID": message_id,
        "HTTP_WEBHOOK_TIMESTAMP": str(int(now.timestamp())),
        "HTTP_WEBHOOK_SIGNATURE": Webhook(CALLBACK_SECRET).sign(message_id, now, body.decode()),
    }


@override_settings(INTERNAL_CALLBACK_SECRET=CALLBACK_SECRET)
@pytest.mark.parametrize("name", CALLBACK_BODIES)
def test_callback_body_schema_says_what_the_service_accepts(
    document: dict[str, Any], name: str
) -> None:
    body = CALLBACK_BODIES[name]
    path = "/internal/search-results/{search_id}"
    schema = _body_schema(document, path, "post", "application/fhir+json")
    allowed = _validator(document, schema).is_valid(body)
    raw = json.dumps(body).encode()
    response = APIClient().post(
        "/internal/search-results/no-such-search",
        raw,
        content_type="application/fhir+json",
        **_signed(raw),
    )
    # Past the signature: a Bundle the schema allows reaches the (unknown) search, 404.
    assert response.status_code == (404 if allowed else 400), (name, response.content)
    assert _operation(document, path, "post")["requestBody"]["required"]


@override_settings(INTERNAL_CALLBACK_SECRET=CALLBACK_SECRET)
@pytest.mark.parametrize("length", [200, 201])
def test_callback_webhook_id_schema_says_what_the_service_accepts(
    document: dict[str, Any], length: int
) -> None:
    path = "/internal/search-results/{search_id}"
    schema = _header_schema(document, path, "post", "webhook-id")
    allowed = _validator(document, schema).is_valid("m" * length)
    raw = json.dumps(_bundle()).encode()
    response = APIClient().post(
        "/internal/search-results/no-such-search",
        raw,
        content_type="application/fhir+json",
        **_signed(raw, "m" * length),
    )
    assert response.status_code == (404 if allowed else 400), response.content


# --- 5. The document broke itself: the second generation had a dangling $ref ---------------


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_every_generation_of_the_document_is_whole() -> None:
    # The enum postprocessing rewrites the schemas it is given in place: a module-level schema
    # handed over as is came back, the next time, as a $ref to a component nobody registered.
    first, second = (SchemaGenerator().get_schema(request=None, public=True) for _ in range(2))
    assert json.dumps(first, sort_keys=True, default=str) == json.dumps(
        second, sort_keys=True, default=str
    )
    components = second["components"]["schemas"]
    for ref in _refs(second):
        assert ref.removeprefix("#/components/schemas/") in components, ref


def _patterns(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                yield value
            else:
                yield from _patterns(value)
    elif isinstance(node, list):
        for item in node:
            yield from _patterns(item)


def test_no_pattern_depends_on_what_space_means(document: dict[str, Any]) -> None:
    # `\s` is one set to Python (str.strip, the serializers) and another to the ECMA regular
    # expressions of JSON Schema (schemathesis generated "\x85\t..." as a valid name: 400).
    patterns = list(_patterns(document))
    assert patterns
    for pattern in patterns:
        assert "\\s" not in pattern, pattern


def test_the_space_the_patterns_name_is_what_strip_trims() -> None:
    from linking.serializers.fields import _STRIPPED

    space = re.compile(f"[{_STRIPPED}]")
    assert all(
        bool(space.fullmatch(ch)) == ch.isspace() for ch in map(chr, range(sys.maxunicode + 1))
    )


# --- 6. Values PostgreSQL refuses (NUL, over-long ids) were 500s; too-deep JSON was a 500 ----


def test_nul_in_a_patient_id_is_a_client_error(api: LinkClient) -> None:
    response = api.client.get("/patient/%00", HTTP_CUSTOMER_TOKEN=api.token)
    assert response.status_code == 400, response.content
    assert _problem_type(response) == "/problems/bad-request"


@override_settings(INTERNAL_CALLBACK_SECRET=CALLBACK_SECRET)
@pytest.mark.parametrize("search_id", ["x" * 201, "a%00b"])
def test_a_search_id_the_database_refuses_is_a_client_error(search_id: str) -> None:
    raw = json.dumps(_bundle()).encode()
    response = APIClient().post(
        f"/internal/search-results/{search_id}",
        raw,
        content_type="application/fhir+json",
        **_signed(raw),
    )
    assert response.status_code == 400, response.content
    assert _problem_type(response) == "/problems/bad-request"


def test_search_id_schema_says_what_the_service_accepts(document: dict[str, Any]) -> None:
    parameters = _operation(document, "/internal/search-results/{search_id}", "post")["parameters"]
    schema = next(p["schema"] for p in parameters if p["name"] == "search_id")
    validator = _validator(document, schema)
    assert validator.is_valid("x" * 200)
    assert not validator.is_valid("x" * 201)
    assert not validator.is_valid("a\x00b")


@override_settings(INTERNAL_CALLBACK_SECRET=CALLBACK_SECRET)
def test_a_callback_nested_too_deeply_is_a_client_error() -> None:
    raw = b'{"a":' * 5000 + b"1" + b"}" * 5000
    response = APIClient().post(
        "/internal/search-results/no-such-search",
        raw,
        content_type="application/fhir+json",
        **_signed(raw),
    )
    assert response.status_code == 400, response.content
    assert _problem_type(response) == "/problems/bad-request"
