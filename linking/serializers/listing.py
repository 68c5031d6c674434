"""GET /links: its query and its page of links."""

import datetime as dt
import re
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from linking.models import MappingStatus
from linking.selectors import (
    LINKS_LIMIT_DEFAULT,
    LINKS_LIMIT_MAX,
    LinksCursorInvalid,
    LinksFilter,
    LinksPosition,
    links_cursor_read,
)
from linking.serializers.fields import (
    StrictSerializer,
)

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
