"""OpenAPI pieces shared by the APIs: the customer-token scheme and problem responses; the
docs pages' policy."""

import functools
from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers

from merchant.problems import PROBLEM_CONTENT_TYPE, PROBLEMS


class CustomerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "merchant.auth.CustomerTokenAuthentication"
    name = "customerToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": "customer-token",
            "description": "The JWT given at onboarding (`Authorization: Bearer <token>` is "
            "accepted as well).",
        }


class FieldErrorSerializer(serializers.Serializer):
    field = serializers.CharField(help_text="Dotted path of the failing field, e.g. patient.dob")
    detail = serializers.CharField()


class ProblemSerializer(serializers.Serializer):
    """RFC 9457 problem details."""

    type = serializers.CharField(help_text="Stable URI of the problem kind, e.g. /problems/...")
    title = serializers.CharField()
    status = serializers.IntegerField()
    detail = serializers.CharField()
    instance = serializers.CharField(required=False)
    # "errors" would shadow Serializer.errors as an attribute: declared by name instead.
    locals()["errors"] = FieldErrorSerializer(
        many=True, required=False, help_text="validation-error only: each failing field."
    )
    locals()["workflow-id"] = serializers.UUIDField(
        required=False, help_text="patient-already-linked and link-in-progress only."
    )


def _problem_description(code: int) -> str:
    kinds = ", ".join(f"`{p.uri}`" for p in PROBLEMS.values() if p.status == code)
    return f"Problem details ({kinds})."


def problem_responses(*statuses: int) -> dict[Any, OpenApiResponse]:
    """OpenAPI responses for these statuses, each listing the problem types it can carry."""
    return {
        (code, PROBLEM_CONTENT_TYPE): OpenApiResponse(
            response=ProblemSerializer, description=_problem_description(code)
        )
        for code in statuses
    }


_HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
_HEADERS = {
    "Retry-After": {
        "schema": {"type": "integer"},
        "required": True,
        "description": "Seconds to wait before retrying.",
    },
    "WWW-Authenticate": {
        "schema": {"type": "string"},
        "required": True,
        "description": 'The scheme to authenticate with: `Bearer realm="merchant-service"`.',
    },
}


def _common_problem(code: int, *headers: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _problem_description(code),
        "content": {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    if headers:
        response["headers"] = {name: _HEADERS[name] for name in headers}
    return response


def postprocess_common_responses(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Add the answers every operation can give whatever its view does, so that no operation
    (including one added later) can answer something its description leaves out: 400 (a value
    the database refuses, such as a NUL character in an id: merchant.problems), 406 (DRF's
    content negotiation, before the view: responses are JSON only), and on token-protected
    operations 401 (with WWW-Authenticate) and 429 (the per-customer rate limit, with
    Retry-After). Responses a view documents itself are kept."""
    for item in result.get("paths", {}).values():
        for method, operation in item.items():
            if method not in _HTTP_METHODS:
                continue
            responses = operation.setdefault("responses", {})
            common = {"400": _common_problem(400), "406": _common_problem(406)}
            if operation.get("security"):
                common["401"] = _common_problem(401, "WWW-Authenticate")
                common["429"] = _common_problem(429, "Retry-After")
            for code, response in common.items():
                documented = responses.setdefault(code, response)
                for name, header in response.get("headers", {}).items():
                    documented.setdefault("headers", {}).setdefault(name, header)
    return result


def postprocess_required_choices(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """A request body whose schema is a choice (`oneOf`, e.g. StrictSerializer's
    `schema_one_of`) is required: drf-spectacular makes a body required only when some property
    is, and no property of a choice is required on its own, yet an absent body matches no branch
    (the view answers 400)."""
    schemas = result.get("components", {}).get("schemas", {})
    for item in result.get("paths", {}).values():
        for method, operation in item.items():
            if method not in _HTTP_METHODS or "requestBody" not in operation:
                continue
            body = operation["requestBody"]
            for media in body.get("content", {}).values():
                ref = media.get("schema", {}).get("$ref", "")
                if "oneOf" in schemas.get(ref.rsplit("/", 1)[-1], {}):
                    body["required"] = True
    return result


# The docs pages run only what we serve (drf-spectacular-sidecar's files, the page's own inline
# script, ReDoc's worker from a blob:). Their one outside request, the attribution logo ReDoc's
# bundle asks cdn.redoc.ly for (it hides it when it cannot load), is refused by the browser
# before it is sent.
DOCS_CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "worker-src 'self' blob:",
        "connect-src 'self'",
    )
)


def docs_page(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """A docs view whose answer carries DOCS_CONTENT_SECURITY_POLICY."""

    @functools.wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        response = view(request, *args, **kwargs)
        response["Content-Security-Policy"] = DOCS_CONTENT_SECURITY_POLICY
        return response

    return wrapped
