"""POST /link, GET /link/status, the customer's decision and DELETE /link: their serializers."""

from typing import Any, ClassVar

from rest_framework import serializers

from linking.serializers.fields import (
    _PHONE,
    MAX_AGE_YEARS,
    BirthDateField,
    JSONObjectField,
    PhoneField,
    StrictSerializer,
    TextField,
    UUIDStringField,
    WebhookURLField,
)
from merchant.models import Customer
from merchant.problems import Problem
from merchant.webhook_urls import WebhookURLError, WebhookURLRefused, webhook_url_check
from workflows.models import Result, Status


class ContactSerializer(StrictSerializer):
    address = TextField(max_length=500, required=False)
    phone = PhoneField(max_length=32, required=False)
    email = serializers.EmailField(max_length=254, required=False)

    def validate_phone(self, value: str) -> str:
        if not _PHONE.match(value):
            raise serializers.ValidationError("Must be a phone number such as +1-555-0100.")
        return value


class PatientSerializer(StrictSerializer):
    id = UUIDStringField(help_text="The customer's own patient id.")
    full_name = TextField(max_length=200, help_text="With at least one letter.")
    dob = BirthDateField(
        help_text="Date of birth, ISO 8601 (a datetime's date is kept); not in the future, at "
        f"most {MAX_AGE_YEARS} years ago."
    )
    contact = ContactSerializer(required=False)
    insurance = JSONObjectField(
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
    webhook = WebhookURLField(
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

    def validate_another(self, data: Any) -> dict[str, Any]:
        """Validate one more body with this same instance, as DRF's ListSerializer validates
        each item with its one child: its fields are built once, not per body (that was a third
        of a 1,000-item POST /link/batch's time). The canonical request data, or the
        ValidationError / Problem that is_valid() would raise."""
        self.webhook_refusal = None
        return self.canonical(self.run_validation(data))

    def canonical(self, validated: dict[str, Any] | None = None) -> dict[str, Any]:
        """The validated request as JSON-ready data (what is stored as the request data)."""
        data = dict(self.validated_data if validated is None else validated)
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


class ReviewCandidateSerializer(serializers.Serializer):
    locals().update(
        {
            "candidate-id": serializers.CharField(
                help_text="Opaque; name it in POST /link/{workflow_id}/decision. Never the "
                "internal patient id."
            ),
            "score": serializers.FloatField(help_text="The internal search's score, 0..1."),
            "grade": serializers.ChoiceField(
                choices=["certain", "probable", "possible"], help_text="FHIR match grade."
            ),
            "agreement": serializers.DictField(
                child=serializers.BooleanField(),
                help_text="For each field the customer sent (family, given, birth-date, phone, "
                "email, address): whether the candidate's record agrees. Nothing of the record "
                "itself is shown.",
            ),
        }
    )


class LinkStatusOutputSerializer(serializers.Serializer):
    locals().update(
        {
            "workflow-id": serializers.UUIDField(source="id"),
            "status": serializers.ChoiceField(
                choices=Status.choices,
                help_text="REVIEW: the search found candidates too close to call; the reviewer "
                "(our operators, or the customer when it decides its own reviews) decides, then "
                "the workflow completes and the webhook is sent. A review not decided within "
                "REVIEW_TIMEOUT_SECONDS completes with no match.",
            ),
            "result": serializers.ChoiceField(choices=Result.choices, allow_null=True),
            "reason": serializers.CharField(
                allow_null=True, help_text="Why the workflow failed (FAILED only)."
            ),
            "created-at": serializers.DateTimeField(source="created_at"),
            "updated-at": serializers.DateTimeField(source="updated_at"),
            "candidates": ReviewCandidateSerializer(
                many=True,
                required=False,
                # Not an attribute of a Workflow (its `candidates` are the stored rows): this
                # field describes the document, the selector fills it in.
                source="candidates_for_the_customer",
                help_text="In REVIEW, for a customer that decides its own reviews only: the "
                "candidates to choose from, best first.",
            ),
        }
    )

    def to_representation(self, instance: Any) -> dict[str, Any]:
        data: dict[str, Any] = super().to_representation(instance)
        if instance.status != Status.FAILED:
            data["reason"] = None
        return data


class LinkDecisionInputSerializer(StrictSerializer):
    """Exactly one of: the candidate to link, or a rejection of every candidate."""

    # What `validate` enforces, said in the schema (a client generator, and the fuzzer, then know
    # that a body with both, or with `reject: false` alone, is not a valid request).
    schema_one_of: ClassVar[list[dict[str, Any]]] = [
        {"required": ["candidate-id"]},
        {"required": ["reject"], "properties": {"reject": {"enum": [True]}}},
    ]

    locals().update(
        {
            # Printable ASCII, untrimmed: what the schema says is what is checked (a
            # CharField would strip a control character to blank after the schema let it by).
            "candidate-id": serializers.RegexField(
                r"^[!-~]{1,64}$",
                required=False,
                max_length=64,
                trim_whitespace=False,
                help_text="A `candidate-id` of the status.",
            ),
            "reject": serializers.BooleanField(
                required=False, help_text="true: none of the candidates is the patient."
            ),
            "reason": TextField(
                required=False,
                max_length=500,
                help_text="Why (kept in the timeline and the link history).",
            ),
        }
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        candidate, reject = attrs.get("candidate-id"), attrs.get("reject", False)
        if bool(candidate) == bool(reject):
            raise serializers.ValidationError(
                {"candidate-id": ["Send either a candidate-id or reject: true."]}
            )
        return attrs


class DelinkOutputSerializer(serializers.Serializer):
    locals().update(
        {
            "patient-id": serializers.UUIDField(help_text="The customer's own patient id."),
            "status": serializers.ChoiceField(choices=["DE-LINKED"]),
            "workflow-id": serializers.UUIDField(help_text="The workflow that had linked it."),
            "delinked-at": serializers.DateTimeField(),
        }
    )
