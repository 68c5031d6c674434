"""The input serializers' fields are shallow copies of the declared ones (StrictSerializer.
get_fields): each serializer must still get fields of its own, bound to it, so that one request's
context (its customer) and state never reach another's."""

from typing import Any

import pytest
from rest_framework import serializers

from linking.serializers.links import LinkCreateInputSerializer, PatientSerializer
from merchant.models import Customer
from merchant.problems import Problem
from tests.conftest import link_body


def _customer(host: str) -> Customer:
    return Customer(name=host, webhook_url=f"https://{host}/hooks")


def _bound(serializer: serializers.Serializer) -> list[tuple[str, serializers.Field]]:
    """Every field under `serializer`, nested ones included, with its dotted name."""
    found = []
    for name, field in serializer.fields.items():
        found.append((name, field))
        if isinstance(field, serializers.Serializer):
            found += [(f"{name}.{inner}", f) for inner, f in _bound(field)]
    return found


def _validated(customer: Customer, body: dict[str, Any]) -> LinkCreateInputSerializer:
    serializer = LinkCreateInputSerializer(data=body, context={"customer": customer})
    serializer.is_valid()
    return serializer


def test_each_serializer_has_fields_of_its_own_bound_to_it() -> None:
    body = link_body()
    body["patient"]["contact"] = {"phone": "+1-555-0100", "email": "jane@example.org"}
    first = _validated(_customer("one.example"), body)
    second = _validated(_customer("two.example"), link_body())
    first_fields, second_fields = dict(_bound(first)), dict(_bound(second))
    assert set(first_fields) == set(second_fields)
    assert "patient.contact.phone" in first_fields
    for name, field in first_fields.items():
        assert field is not second_fields[name], name
        assert field.root is first, name
        assert second_fields[name].root is second, name
        assert field.context["customer"].name == "one.example", name
        assert second_fields[name].context["customer"].name == "two.example", name


def test_the_declared_fields_are_never_bound() -> None:
    _validated(_customer("one.example"), link_body())
    _validated(_customer("two.example"), {"patient": {"id": "not-a-uuid"}})
    for declared in (
        *LinkCreateInputSerializer._declared_fields.values(),
        *PatientSerializer._declared_fields.values(),
    ):
        assert getattr(declared, "field_name", None) is None
        assert getattr(declared, "parent", None) is None


def test_a_request_webhook_is_checked_against_its_own_customer() -> None:
    body = link_body()
    body["webhook"] = "https://one.example/other-path"
    accepted = _validated(_customer("one.example"), body)
    refused = LinkCreateInputSerializer(data=body, context={"customer": _customer("two.example")})
    assert accepted.errors == {}
    assert accepted.webhook_refusal is None
    with pytest.raises(Problem) as problem:  # 422: not the host registered for two.example
        refused.is_valid()
    assert problem.value.problem.slug == "webhook-url-refused"
    assert refused.webhook_refusal
    # And the refusal stayed with the serializer that made it.
    assert _validated(_customer("one.example"), body).webhook_refusal is None


def test_errors_stay_with_the_serializer_that_found_them() -> None:
    bad = _validated(_customer("one.example"), {"patient": {"id": "x", "full_name": "1"}})
    good = _validated(_customer("one.example"), link_body())
    assert set(bad.errors["patient"]) >= {"id", "full_name", "dob"}
    assert good.errors == {}
    assert good.validated_data["patient"]["full_name"] == link_body()["patient"]["full_name"]
