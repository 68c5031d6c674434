"""The internal system's asynchronous search callback: the searchset Bundle it posts, and the
receipt it gets."""

import copy
from typing import Any

from drf_spectacular.extensions import OpenApiSerializerExtension
from rest_framework import serializers

from linking.internal_search import FHIR_ID, MATCH_GRADE_URL, MATCH_GRADES
from workflows.models import Status

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
