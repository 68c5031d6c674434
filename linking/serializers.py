"""Input and output serializers of the link API (one pair per operation)."""

import copy
import datetime as dt
import re
from typing import Any, ClassVar

from django.conf import settings
from django.utils import timezone
from drf_spectacular.extensions import OpenApiSerializerExtension, OpenApiSerializerFieldExtension
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from linking.internal_search import FHIR_ID, MATCH_GRADE_URL, MATCH_GRADES
from linking.models import MappingStatus
from linking.selectors import (
    LINKS_LIMIT_DEFAULT,
    LINKS_LIMIT_MAX,
    LinksCursorInvalid,
    LinksFilter,
    LinksPosition,
    links_cursor_read,
)
from merchant.models import Customer
from merchant.problems import Problem
from merchant.schema import ProblemSerializer
from merchant.webhook_urls import WebhookURLError, WebhookURLRefused, webhook_url_check
from workflows.models import Result, Status

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# E.164 or a common national format: digits with optional +, spaces, dots, dashes, parentheses.
_PHONE = re.compile(r"^\+?[0-9][0-9 ().\-]{5,23}[0-9]$")
# The schema's patterns say what TextField accepts: after trimming, not blank and no control
# characters. Space around is allowed (trimmed); inside, any space but no control character.
# What str.strip() trims, spelled out: `\s` differs between Python and the ECMA regular
# expressions of JSON Schema (U+0085 and U+001C-U+001F are space only to Python).
_STRIPPED = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_VISIBLE = rf"[^{_STRIPPED}\x00-\x1f\x7f]"
_TEXT_SCHEMA_PATTERN = rf"^[{_STRIPPED}]*{_VISIBLE}([^\x00-\x1f\x7f]*{_VISIBLE})?[{_STRIPPED}]*$"
_PHONE_SCHEMA_PATTERN = rf"^[{_STRIPPED}]*{_PHONE.pattern[1:-1]}[{_STRIPPED}]*$"
# An absolute http(s) URL webhook_url_parse can read: a host of up to three labels, a port
# 1-65535, no credentials, fragment, space or control character. It must also be on the host
# registered at onboarding (422 otherwise), which no schema can say.
_WEBHOOK_URL_SCHEMA_PATTERN = (
    r"^https?://[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?){0,2}"
    r"(:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?"
    r"([/?][^\x00-\x20\x7f#]*)?$"
)
MAX_AGE_YEARS = 150


def _shallow_copy(field: serializers.Field) -> serializers.Field:
    # What copy.copy does for a plain object, without its generic protocol (4x its cost here).
    clone: serializers.Field = object.__new__(type(field))
    clone.__dict__.update(field.__dict__)
    return clone


class StrictSerializer(serializers.Serializer):
    """Refuses unknown fields (as Stripe does) instead of dropping what the customer sent."""

    def get_fields(self) -> dict[str, serializers.Field]:
        """The declared fields, each a shallow copy instead of DRF's deep copy.

        DRF re-instantiates every declared field for every serializer instance: a tenth of the
        web CPU of a POST /link in `make bench`'s profile. A shallow copy suffices here: binding
        sets the copy's own name and parent (so `context` is this request's), and validating
        never changes what copies share (arguments, validators, error messages). Nested
        serializers are still deep-copied: they are the fields that keep state of their own
        (their bound fields), which this method then builds in turn.
        """
        return {
            name: (
                copy.deepcopy(declared)
                if isinstance(declared, serializers.BaseSerializer)
                else _shallow_copy(declared)
            )
            for name, declared in self._declared_fields.items()
        }

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


class StrictSerializerSchema(OpenApiSerializerExtension):
    """The schema says what StrictSerializer does: no properties beyond the declared ones; and a
    serializer whose `validate` enforces a choice between fields says it with `schema_one_of`."""

    target_class = StrictSerializer
    match_subclasses = True

    def map_serializer(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        schema: dict[str, Any] = auto_schema._map_serializer(
            self.target, direction, bypass_extensions=True
        )
        schema["additionalProperties"] = False
        one_of = getattr(self.target, "schema_one_of", None)
        if one_of:
            # A copy: drf-spectacular's enum hook rewrites the schema in place, and the class's
            # own list must stay as written for the next generation of the document.
            schema["oneOf"] = copy.deepcopy(one_of)
        return schema


class TextField(serializers.CharField):
    """A trimmed, non-blank string without control characters."""

    schema_pattern = _TEXT_SCHEMA_PATTERN

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            raise serializers.ValidationError("Must be a string.")
        value = super().to_internal_value(data)
        if _CONTROL_CHARS.search(value):
            raise serializers.ValidationError("Must not contain control characters.")
        return value


class PhoneField(TextField):
    schema_pattern = _PHONE_SCHEMA_PATTERN


class TextFieldSchema(OpenApiSerializerFieldExtension):
    target_class = TextField
    match_subclasses = True

    def map_serializer_field(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        schema: dict[str, Any] = auto_schema._map_serializer_field(
            self.target, direction, bypass_extensions=True
        )
        schema["pattern"] = self.target.schema_pattern
        return schema


@extend_schema_field({"type": "object", "additionalProperties": True})
class JSONObjectField(serializers.JSONField):
    """A JSON object (DRF's JSONField takes any JSON value; validate_insurance refuses others)."""


@extend_schema_field(
    {"type": "string", "format": "uri", "maxLength": 2000, "pattern": _WEBHOOK_URL_SCHEMA_PATTERN}
)
class WebhookURLField(serializers.CharField):
    """Only the schema differs: validate_webhook applies webhook_url_check."""


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


class LinkBatchInputSerializer(StrictSerializer):
    """The envelope only: each item is validated on its own, exactly as a POST /link body, so
    that a refused item never refuses the others (its problem is in the answer)."""

    requests = serializers.ListField(
        child=serializers.DictField(),
        min_length=1,
        max_length=settings.LINK_BATCH_MAX_ITEMS,
        help_text="Each item a POST /link body (`patient`, `webhook`) plus its own "
        "`idempotency-key` (the Idempotency-Key POST /link would take). Validated and accepted "
        "one by one: a refused item is answered with its problem and never refuses the others.",
    )


class LinkBatchItemSerializer(serializers.Serializer):
    """Schema only: one item of a batch's answer."""

    index = serializers.IntegerField(help_text="The item's position in `requests`, from 0.")
    locals().update(
        {
            "workflow-id": serializers.UUIDField(
                required=False, help_text="Accepted (or replayed): the item's workflow."
            ),
            "problem": ProblemSerializer(
                required=False, help_text="Refused: what POST /link would have answered."
            ),
        }
    )


class LinkBatchItemStatusSerializer(LinkBatchItemSerializer):
    status = serializers.ChoiceField(choices=Status.choices, required=False)
    result = serializers.ChoiceField(choices=Result.choices, required=False, allow_null=True)


class LinkBatchAcceptedSerializer(serializers.Serializer):
    locals().update(
        {
            "batch-id": serializers.UUIDField(),
            "accepted": serializers.IntegerField(),
            "refused": serializers.IntegerField(),
            "items": LinkBatchItemSerializer(many=True),
        }
    )


class LinkBatchStatusSerializer(serializers.Serializer):
    locals().update(
        {
            "batch-id": serializers.UUIDField(),
            "total": serializers.IntegerField(help_text="Items in the batch, refused ones too."),
            "by-status": serializers.DictField(
                child=serializers.IntegerField(),
                help_text="The accepted items' workflows by current status.",
            ),
            "items": LinkBatchItemStatusSerializer(many=True),
        }
    )


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


# What parse_bundle accepts, as a schema: a searchset Bundle whose entries are Patients with a FHIR
# id, an optional score in 0..1 and an optional match-grade extension with a known grade. Other
# members (Bundle.total, Patient.name, other extensions...) are allowed and ignored, as FHIR wants.
_MATCH_GRADE_EXTENSION = {
    "type": "object",
    "properties": {
        "url": {"type": "string", "enum": [MATCH_GRADE_URL]},
        "valueCode": {"type": "string", "enum": sorted(MATCH_GRADES)},
    },
    "required": ["url", "valueCode"],
}
_OTHER_EXTENSION = {"type": "object", "properties": {"url": {"not": {"enum": [MATCH_GRADE_URL]}}}}
SEARCHSET_BUNDLE_SCHEMA = {
    "type": "object",
    "properties": {
        "resourceType": {"type": "string", "enum": ["Bundle"]},
        "type": {"type": "string", "enum": ["searchset"]},
        "entry": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "resource": {
                        "type": "object",
                        "properties": {
                            "resourceType": {"type": "string", "enum": ["Patient"]},
                            "id": {"type": "string", "pattern": f"^{FHIR_ID.pattern}$"},
                        },
                        "required": ["resourceType", "id"],
                    },
                    "search": {
                        "type": "object",
                        "properties": {
                            "score": {"type": "number", "minimum": 0, "maximum": 1},
                            "extension": {
                                "type": "array",
                                "items": {"anyOf": [_MATCH_GRADE_EXTENSION, _OTHER_EXTENSION]},
                            },
                        },
                    },
                },
                "required": ["resource"],
            },
        },
    },
    "required": ["resourceType", "type"],
}


class SearchsetBundleSerializer(serializers.Serializer):
    """Schema only: the callback verifies the signature over the raw body, then parse_bundle
    reads it."""


class SearchsetBundleSchema(OpenApiSerializerExtension):
    target_class = SearchsetBundleSerializer

    def map_serializer(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        # A copy: the enum postprocessing hook rewrites the schema it is given in place.
        return copy.deepcopy(SEARCHSET_BUNDLE_SCHEMA)


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


# --- GET /links ---------------------------------------------------------------------------------

# RFC 3339's date-time (ISO 8601's profile the OpenAPI `date-time` format names), the offset
# optional here only so that a time without one is told what it lacks.
_DATE_TIME = re.compile(
    r"^(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})[Tt](?P<time>[0-9]{2}:[0-9]{2}):(?P<second>[0-9]{2})"
    r"(?P<fraction>\.[0-9]{1,9})?(?P<offset>[Zz]|[+-][0-9]{2}:[0-9]{2})?$"
)
_QUERY_INTEGER = re.compile(r"^-?[0-9]{1,9}$")
# What django.core.signing makes: URL-safe base64 and colons.
LINKS_CURSOR_PATTERN = r"^[A-Za-z0-9_:-]+$"
LINKS_CURSOR_MAX_LENGTH = 512


@extend_schema_field({"type": "string", "format": "date-time"})
class AwareDateTimeField(serializers.Field):
    """An RFC 3339 date and time with its offset (`Z` or `±hh:mm`); a time without one is
    refused rather than read in some time zone."""

    def to_internal_value(self, data: Any) -> dt.datetime:
        match = _DATE_TIME.match(data) if isinstance(data, str) else None
        if match is None:
            raise serializers.ValidationError(
                "Must be an ISO 8601 date and time with a time zone, e.g. 2024-05-01T12:00:00Z."
            )
        if match["offset"] is None:
            raise serializers.ValidationError(
                "Must have a time zone (Z or ±hh:mm): a time without one is ambiguous."
            )
        offset = "+00:00" if match["offset"] in "Zz" else match["offset"]
        leap = match["second"] == "60"  # RFC 3339 allows it; it ends where the next second starts
        second, fraction = ("59", "") if leap else (match["second"], match["fraction"] or "")
        try:
            value = dt.datetime.fromisoformat(
                f"{match['date']}T{match['time']}:{second}{fraction[:7]}{offset}"
            )
            if leap:
                value += dt.timedelta(seconds=1)
        except (ValueError, OverflowError) as exc:
            raise serializers.ValidationError("Not a valid date and time.") from exc
        # In UTC: PostgreSQL refuses offsets beyond ±15:59, which RFC 3339 allows (up to
        # ±23:59). Beyond Python's years 1-9999 in UTC, the nearest end: no row is further out.
        try:
            return value.astimezone(dt.UTC)
        except OverflowError:
            ahead = (value.utcoffset() or dt.timedelta(0)) > dt.timedelta(0)
            return (dt.datetime.min if ahead else dt.datetime.max).replace(tzinfo=dt.UTC)

    def to_representation(self, value: dt.datetime) -> str:
        return value.isoformat()


class QueryIntegerField(serializers.IntegerField):
    """An integer in a query string: digits only (DRF's also reads `1.0`, ` 7 ` and non-ASCII
    digits)."""

    def to_internal_value(self, data: Any) -> int:
        if not isinstance(data, str) or not _QUERY_INTEGER.match(data):
            self.fail("invalid")
        value: int = super().to_internal_value(data)
        return value


class LinksListQuerySerializer(StrictSerializer):
    """GET /links's query string: unknown and repeated parameters are refused, and a cursor
    must be this customer's, made with the same filters."""

    locals().update(
        {
            "status": serializers.ChoiceField(choices=MappingStatus.choices, required=False),
            "updated-since": AwareDateTimeField(required=False),
            "limit": QueryIntegerField(
                required=False, min_value=1, max_value=LINKS_LIMIT_MAX, default=LINKS_LIMIT_DEFAULT
            ),
            "cursor": serializers.CharField(
                required=False, max_length=LINKS_CURSOR_MAX_LENGTH, trim_whitespace=False
            ),
        }
    )

    def to_internal_value(self, data: Any) -> Any:
        if hasattr(data, "lists"):  # a QueryDict: `?limit=1&limit=2` is one value too many
            repeated = {name: ["Given more than once."] for name, v in data.lists() if len(v) > 1}
            if repeated:
                raise serializers.ValidationError(repeated)
            data = {name: values[0] for name, values in data.lists()}
        return super().to_internal_value(data)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        filters = LinksFilter(status=attrs.get("status"), updated_since=attrs.get("updated-since"))
        after: LinksPosition | None = None
        if "cursor" in attrs:
            try:
                after = links_cursor_read(
                    customer=self.context["customer"], filters=filters, cursor=attrs["cursor"]
                )
            except LinksCursorInvalid as exc:
                raise serializers.ValidationError({"cursor": [str(exc)]}) from exc
        return {"filters": filters, "limit": attrs["limit"], "after": after}


# Schema only: linking.selectors.links_page builds the answer (tests hold the two equal).
class LinksListItemSerializer(serializers.Serializer):
    """One link of the customer: a customer patient id and the workflow that linked it."""

    locals().update(
        {
            "customer-patient-id": serializers.UUIDField(
                help_text="The customer's own patient id (`patient.id` of POST /link)."
            ),
            "status": serializers.ChoiceField(
                choices=MappingStatus.choices,
                help_text="DE-LINKED once DELETE /link/{patient_id} (or an operator) ended it.",
            ),
            "workflow-id": serializers.UUIDField(help_text="The workflow that made the link."),
            "linked-at": serializers.DateTimeField(),
            "updated-at": serializers.DateTimeField(
                help_text="Its last change (the de-link); the list's order."
            ),
        }
    )


class LinksListOutputSerializer(serializers.Serializer):
    """A page of the customer's links."""

    locals().update(
        {
            "data": LinksListItemSerializer(
                many=True, help_text="Newest `updated-at` first (ties: newest link first)."
            ),
            "has-more": serializers.BooleanField(help_text="Whether another page follows."),
            "next-cursor": serializers.CharField(
                allow_null=True,
                help_text="The `cursor` of the next page; null on the last one.",
            ),
        }
    )
