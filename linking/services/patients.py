"""Patient details after a link: read from the internal system, mapped, audited."""

import uuid
from typing import Any

from linking.internal_search import InternalSearchError, internal_patient_read
from linking.models import AuditEvent, MappingStatus, PatientMapping
from merchant.models import Customer


class PatientNotFound(Exception):
    """No LINKED mapping for this customer and patient id (or the internal record is gone)."""


def patient_read(*, customer: Customer, patient_id: str) -> dict[str, Any]:
    """The internal patient linked to the customer's `patient_id`, in the documented shape.

    Every call is written to the audit log with its outcome, found or not. Raises
    PatientNotFound (unknown, not linked, another customer's: all the same) or
    InternalSearchError when the internal system cannot answer.
    """
    outcome = "not-found"
    try:
        mapping = _linked_mapping(customer=customer, patient_id=patient_id)
        try:
            resource = internal_patient_read(mapping.internal_patient_id)
        except InternalSearchError:
            outcome = "unavailable"
            raise
        if resource is None:
            outcome = "internal-not-found"
            raise PatientNotFound()
        outcome = "ok"
        return patient_details(patient_id=str(mapping.customer_patient_id), resource=resource)
    finally:
        AuditEvent.objects.create(
            actor=f"customer:{customer.id}",
            action="patient.read",
            customer=customer,
            subject=patient_id[:200],
            outcome=outcome,
        )


def _linked_mapping(*, customer: Customer, patient_id: str) -> PatientMapping:
    try:
        parsed = uuid.UUID(patient_id)
    except ValueError as exc:
        raise PatientNotFound() from exc
    mapping = PatientMapping.objects.filter(
        customer=customer, customer_patient_id=parsed, status=MappingStatus.LINKED
    ).first()
    if mapping is None:
        raise PatientNotFound()
    return mapping


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def patient_details(*, patient_id: str, resource: dict[str, Any]) -> dict[str, Any]:
    """FHIR Patient -> the API's patient shape (docs/api.md "GET /patient")."""
    names = _dicts(resource.get("name"))
    name = next((n for n in names if n.get("use") == "official"), names[0] if names else {})
    return {
        "patient-id": patient_id,
        "name": {
            "text": name.get("text"),
            "family": name.get("family"),
            "given": [g for g in name.get("given") or [] if isinstance(g, str)],
        },
        "birth-date": resource.get("birthDate"),
        "gender": resource.get("gender"),
        "telecom": [
            {"system": t.get("system"), "value": t.get("value"), "use": t.get("use")}
            for t in _dicts(resource.get("telecom"))
        ],
        "address": [
            {
                "text": a.get("text"),
                "line": [line for line in a.get("line") or [] if isinstance(line, str)],
                "city": a.get("city"),
                "postal-code": a.get("postalCode"),
                "country": a.get("country"),
                "use": a.get("use"),
            }
            for a in _dicts(resource.get("address"))
        ],
        "identifiers": [
            {"system": i.get("system"), "value": i.get("value")}
            for i in _dicts(resource.get("identifier"))
        ],
    }
