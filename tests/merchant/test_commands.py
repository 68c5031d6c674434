"""The onboarding management commands, as ops run them."""

import json
import uuid
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from merchant.models import Customer
from tests.conftest import LinkClient, link_body

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_onboard_json_prints_exactly_one_object_that_works() -> None:
    output = run(
        "onboard_customer",
        "--name",
        "Acme",
        "--webhook-url",
        "https://hooks.acme.example/merchant",
        "--json",
    )
    values = json.loads(output)
    assert set(values) == {"customer_id", "token", "webhook_secret"}
    customer = Customer.objects.get(id=values["customer_id"])
    assert customer.name == "Acme"
    assert customer.webhook_secret == values["webhook_secret"]
    assert values["webhook_secret"].startswith("whsec_")
    assert LinkClient(values["token"]).post_link(link_body()).status_code == 202


def test_onboard_refuses_a_bad_webhook_url(settings) -> None:
    settings.WEBHOOK_ALLOW_PRIVATE_HOSTS = False
    with pytest.raises(CommandError, match="https"):
        run("onboard_customer", "--name", "Acme", "--webhook-url", "http://127.0.0.1/x")
    with pytest.raises(CommandError, match="public host"):
        run("onboard_customer", "--name", "Acme", "--webhook-url", "https://10.0.0.8/x")
    assert Customer.objects.count() == 0


def test_onboard_sets_the_scheduling_weight_and_refuses_one_out_of_range() -> None:
    url = "https://hooks.acme.example/merchant"
    values = json.loads(run("onboard_customer", "--name", "Acme", "--webhook-url", url, "--json"))
    assert Customer.objects.get(id=values["customer_id"]).weight == 1  # the default
    heavy = json.loads(
        run("onboard_customer", "--name", "Big", "--webhook-url", url, "--weight", "3", "--json")
    )
    assert Customer.objects.get(id=heavy["customer_id"]).weight == 3
    for weight in ("0", "101"):
        with pytest.raises(CommandError, match="weight must be a whole number from 1 to 100"):
            run("onboard_customer", "--name", "Bad", "--webhook-url", url, "--weight", weight)
    assert Customer.objects.count() == 2


def test_issue_and_revoke_tokens() -> None:
    first = json.loads(
        run(
            "onboard_customer",
            "--name",
            "Acme",
            "--webhook-url",
            "https://hooks.acme.example/merchant",
            "--json",
        )
    )
    second = json.loads(run("issue_token", first["customer_id"], "--json"))
    assert second["customer_id"] == first["customer_id"]
    assert second["token"] != first["token"]
    assert LinkClient(second["token"]).post_link(link_body(), key="a").status_code == 202

    assert "Revoked" in run("revoke_tokens", first["customer_id"])
    assert LinkClient(first["token"]).post_link(link_body(), key="b").status_code == 401
    assert LinkClient(second["token"]).post_link(link_body(), key="c").status_code == 401

    third = json.loads(run("issue_token", first["customer_id"], "--json"))
    assert LinkClient(third["token"]).post_link(link_body(), key="d").status_code == 202


def test_unknown_customer_is_a_command_error() -> None:
    with pytest.raises(CommandError, match="No customer"):
        run("issue_token", str(uuid.uuid4()))
    with pytest.raises(CommandError, match="No customer"):
        run("revoke_tokens", str(uuid.uuid4()))


def test_plain_output_names_each_value() -> None:
    output = run(
        "onboard_customer", "--name", "Acme", "--webhook-url", "https://hooks.acme.example/merchant"
    )
    assert "customer_id: " in output and "token: " in output and "webhook_secret: " in output
