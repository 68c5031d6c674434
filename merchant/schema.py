"""OpenAPI pieces shared by the APIs: the customer-token scheme and problem responses."""

from typing import Any

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


def problem_responses(*statuses: int) -> dict[Any, OpenApiResponse]:
    """OpenAPI responses for these statuses, each listing the problem types it can carry."""
    responses: dict[Any, OpenApiResponse] = {}
    for code in statuses:
        kinds = ", ".join(f"`{p.uri}`" for p in PROBLEMS.values() if p.status == code)
        responses[(code, PROBLEM_CONTENT_TYPE)] = OpenApiResponse(
            response=ProblemSerializer,
            description=f"Problem details ({kinds}).",
        )
    return responses
