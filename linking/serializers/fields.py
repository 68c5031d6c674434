"""The fields every link serializer is built from: strict objects (unknown members refused),
text without control characters, phone numbers, birth dates, UUID strings, RFC 3339 times."""

import copy
import datetime as dt
import re
from typing import Any

from django.utils import timezone
from drf_spectacular.extensions import OpenApiSerializerExtension, OpenApiSerializerFieldExtension
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

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
