"""Input and output serializers of the link API (one pair per operation)."""

import datetime as dt
import re
from typing import Any

from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from merchant.models import Customer
from merchant.problems import Problem
from merchant.webhook_urls import WebhookURLError, WebhookURLRefused, webhook_url_check
from workflows.models import Result, Status

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# E.164 or a common national format: digits with optional +, spaces, dots, dashes, parentheses.
_PHONE = re.compile(r"^\+?[0-9][0-9 ().\-]{5,23}[0-9]$")
MAX_AGE_YEARS = 150


class StrictSerializer(serializers.Serializer):
    """Refuses unknown fields (as Stripe does) instead of dropping what the customer sent."""

    def to_internal_value(self, data: Any) -> Any:
        unknown = sorted(set(data) - set(self.fields)) if isinstance(data, dict) else []
        unknown_errors = {name: ["Unknown field."] for name in unknown}
        try:
            value = super().to_internal_value(data)
        except serializers.ValidationError as exc:
            # Report unknown fields together with every other error, not one round trip each.
            if isinstance(exc.detail, dict):
                raise serializers.ValidationError({**exc.detail, **unknown_errors}) from exc
            raise
        if unknown_errors:
            raise serializers.ValidationError(unknown_errors)
        return value


class TextField(serializers.CharField):
    """A trimmed, non-blank string without control characters."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            raise serializers.ValidationError("Must be a string.")
        value = super().to_internal_value(data)
        if _CONTROL_CHARS.search(value):
            raise serializers.ValidationError("Must not contain control characters.")
        return value


class UUIDStringField(serializers.UUIDField):
    """A UUID given as a string (DRF would also take an integer and read it as a UUID)."""

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, str):
            raise serializers.ValidationError("Must be a UUID string.")
        return super().to_internal_value(data)


@extend_schema_field({"type": "string", "format": "date", "example": "1980-04-02"})
class BirthDateField(serializers.Field):
    """An ISO 8601 date; a datetime is accepted and only its date kept."""

    def to_internal_value(self, data: Any) -> dt.date:
        if not isinstance(data, str) or len(data) > 40:
            raise serializers.ValidationError("Must be an ISO 8601 date (YYYY-MM-DD).")
        try:
            value = dt.date.fromisoformat(data)
        except ValueError:
            try:
                value = dt.datetime.fromisoformat(data.replace("Z", "+00:00")).date()
            except ValueError as exc:
                raise serializers.ValidationError("Must be an ISO 8601 date (YYYY-MM-DD).") from exc
        today = timezone.now().date()
        if value > today:
            raise serializers.ValidationError("Must not be in the future.")
        if value.year < today.year - MAX_AGE_YEARS:
            raise serializers.ValidationError(f"Must be within the last {MAX_AGE_YEARS} years.")
        return value

    def to_representation(self, value: dt.date) -> str:
        return value.isoformat()


class ContactSerializer(StrictSerializer):
    address = TextField(max_length=500, required=False)
    phone = TextField(max_length=32, required=False)
    email = serializers.EmailField(max_length=254, required=False)

    def validate_phone(self, value: str) -> str:
        if not _PHONE.match(value):
            raise serializers.ValidationError("Must be a phone number such as +1-555-0100.")
        return value


class PatientSerializer(StrictSerializer):
    id = UUIDStringField(help_text="The customer's own patient id.")
    full_name = TextField(max_length=200)
    dob = BirthDateField(help_text="Date of birth, ISO 8601 (a datetime's date is kept).")
    contact = ContactSerializer(required=False)
    insurance = serializers.JSONField(
        required=False, help_text="Free-form insurance details (a JSON object)."
    )

    def validate_full_name(self, value: str) -> str:
        if not any(ch.isalpha() for ch in value):
            raise serializers.ValidationError("Must contain letters.")
        return value

    def validate_insurance(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise serializers.ValidationError("Must be a JSON object.")
        return value


class LinkCreateInputSerializer(StrictSerializer):
    patient = PatientSerializer()
    webhook = serializers.CharField(
        max_length=2000,
        required=False,
        help_text="Optional receiver for this request's webhook; must be on the host registered "
        "at onboarding.",
    )
    webhook_refusal: str | None = None

    def validate_webhook(self, value: str) -> str:
        customer: Customer = self.context["customer"]
        try:
            return webhook_url_check(url=value, registered_url=customer.webhook_url)
        except WebhookURLRefused as exc:
            # Well formed but never called: a 422 from validate(), once the rest is valid.
            self.webhook_refusal = str(exc)
            return value
        except WebhookURLError as exc:
            raise serializers.ValidationError(str(exc)) from exc

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        refusal = self.webhook_refusal
        if refusal:
            raise Problem(
                "webhook-url-refused",
                refusal,
                extra={"errors": [{"field": "webhook", "detail": refusal}]},
            )
        return attrs

    def canonical(self) -> dict[str, Any]:
        """The validated request as JSON-ready data (what is stored as the request data)."""
        data = dict(self.validated_data)
        patient = dict(data["patient"])
        patient["id"] = str(patient["id"])
        patient["dob"] = patient["dob"].isoformat()
        data["patient"] = patient
        return data


class LinkAcceptedSerializer(serializers.Serializer):
    locals().update(
        {
            "workflow-id": serializers.UUIDField(),
            "status": serializers.ChoiceField(choices=[Status.RECEIVED]),
        }
    )


class LinkStatusOutputSerializer(serializers.Serializer):
    locals().update(
        {
            "workflow-id": serializers.UUIDField(source="id"),
            "status": serializers.ChoiceField(
                choices=Status.choices,
                help_text="REVIEW: the search found candidates too close to call; an operator "
                "decides, then the workflow completes and the webhook is sent.",
            ),
            "result": serializers.ChoiceField(choices=Result.choices, allow_null=True),
            "reason": serializers.CharField(
                allow_null=True, help_text="Why the workflow failed (FAILED only)."
            ),
            "created-at": serializers.DateTimeField(source="created_at"),
            "updated-at": serializers.DateTimeField(source="updated_at"),
        }
    )

    def to_representation(self, instance: Any) -> dict[str, Any]:
        data: dict[str, Any] = super().to_representation(instance)
        if instance.status != Status.FAILED:
            data["reason"] = None
        return data


class PatientNameSerializer(serializers.Serializer):
    text = serializers.CharField(allow_null=True)
    family = serializers.CharField(allow_null=True)
    given = serializers.ListField(child=serializers.CharField())


class PatientTelecomSerializer(serializers.Serializer):
    system = serializers.CharField(allow_null=True, help_text="phone, email, ...")
    value = serializers.CharField(allow_null=True)
    use = serializers.CharField(allow_null=True)


class PatientAddressSerializer(serializers.Serializer):
    text = serializers.CharField(allow_null=True)
    line = serializers.ListField(child=serializers.CharField())
    city = serializers.CharField(allow_null=True)
    locals()["postal-code"] = serializers.CharField(allow_null=True)
    country = serializers.CharField(allow_null=True)
    use = serializers.CharField(allow_null=True)


class PatientIdentifierSerializer(serializers.Serializer):
    system = serializers.CharField(allow_null=True)
    value = serializers.CharField(allow_null=True)


class PatientOutputSerializer(serializers.Serializer):
    """The linked internal patient's details (from the internal system's FHIR Patient)."""

    locals().update(
        {
            "patient-id": serializers.UUIDField(help_text="The customer's own patient id."),
            "name": PatientNameSerializer(),
            "birth-date": serializers.DateField(allow_null=True),
            "gender": serializers.CharField(allow_null=True),
            "telecom": PatientTelecomSerializer(many=True),
            "address": PatientAddressSerializer(many=True),
            "identifiers": PatientIdentifierSerializer(many=True),
        }
    )


class DelinkOutputSerializer(serializers.Serializer):
    locals().update(
        {
            "patient-id": serializers.UUIDField(help_text="The customer's own patient id."),
            "status": serializers.ChoiceField(choices=["DE-LINKED"]),
            "workflow-id": serializers.UUIDField(help_text="The workflow that had linked it."),
            "delinked-at": serializers.DateTimeField(),
        }
    )


class SearchResultReceiptSerializer(serializers.Serializer):
    locals().update(
        {
            "workflow-id": serializers.UUIDField(source="workflow_id"),
            "applied": serializers.BooleanField(
                help_text="False when the workflow had already moved on: nothing changed."
            ),
            "status": serializers.ChoiceField(choices=Status.choices),
        }
    )
