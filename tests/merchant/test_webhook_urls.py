"""The webhook URL rules where a customer sets a URL: onboarding (service, command, admin) and the
per-request `webhook` of POST /link (a 400 when malformed, a 422 when the destination is refused).
The resolver is stubbed (tests.workflows.test_ssrf.FakeDNS): no lookup leaves the machine."""

import json
import socket
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client

from linking.models import IdempotencyRecord, LinkRequest
from merchant.models import Customer
from merchant.services import customer_onboard
from merchant.webhook_urls import (
    WebhookURLError,
    WebhookURLRefused,
    webhook_url_check,
    webhook_url_parse,
)
from tests.conftest import LinkClient, link_body
from tests.workflows.test_ssrf import FakeDNS
from workflows.models import Workflow

pytestmark = pytest.mark.django_db

REGISTERED = "https://hooks.acme.example/merchant"


@pytest.fixture(autouse=True)
def strict(settings: Any) -> None:
    settings.WEBHOOK_ALLOW_PRIVATE_HOSTS = False


@pytest.fixture(autouse=True)
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    fake = FakeDNS()
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return fake


# --- the rules ----------------------------------------------------------------------------------

REFUSED = [
    ("http://hooks.acme.example/merchant", "https"),
    ("ftp://hooks.acme.example/merchant", "unsupported scheme 'ftp'"),
    ("https://127.0.0.1/x", "loopback"),
    ("https://127.1/x", "loopback"),
    ("https://2130706433/x", "loopback"),
    ("https://0x7f.1/x", "loopback"),
    ("https://10.0.0.8/x", "private"),
    ("https://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("https://100.64.1.1/x", "CGNAT"),
    ("https://[::1]/x", "loopback"),
    ("https://[::ffff:127.0.0.1]/x", "IPv4-mapped"),
    ("https://[64:ff9b::a00:1]/x", "NAT64"),
    ("https://[fd00:ec2::254]/x", "cloud metadata"),
    ("https://[fe80::1%25eth0]/x", "scoped"),
    ("https://localhost/x", "non-public name"),
    ("https://LOCALHOST./x", "non-public name"),
    ("https://api.localhost/x", "non-public name"),
    ("https://printer.local/x", "non-public name"),
    ("https://metadata.google.internal/x", "non-public name"),
    ("https://router.home.arpa/x", "non-public name"),
    ("https://1.0.0.127.in-addr.arpa/x", "non-public name"),
    ("https://metadata/x", "not fully qualified"),
]

MALFORMED = [
    ("not a url", "spaces"),
    ("notaurl", "absolute"),
    ("https://", "absolute"),
    ("//hooks.acme.example/x", "absolute"),
    ("https://user:pw@hooks.acme.example/x", "credentials"),
    ("https://user@hooks.acme.example/x", "credentials"),
    ("https://hooks.acme.example/x#frag", "fragment"),
    ("https://hooks.acme.example:99999/x", "malformed"),
    ("https://hooks.acme.example:0/x", "port"),
    ("https://hooks.acme.example/x\r\nX-Injected: 1", "control"),
    ("https://hooks.acme.example/a b", "spaces"),
    ("https://-bad-.example/x", "valid name"),
    ("https://a..example/x", "valid name"),
    ("https://" + "a" * 64 + ".example/x", "valid name"),
    ("https://hooks.acme.example/" + "x" * 2000, "longer than 2000"),
]


@pytest.mark.parametrize(("url", "reason"), REFUSED)
def test_refused_destinations(url: str, reason: str) -> None:
    with pytest.raises(WebhookURLRefused, match=r"public host|https") as caught:
        webhook_url_check(url=url)
    assert reason in str(caught.value)


@pytest.mark.parametrize(("url", "reason"), MALFORMED)
def test_malformed_urls(url: str, reason: str) -> None:
    with pytest.raises(WebhookURLError) as caught:
        webhook_url_check(url=url)
    assert not isinstance(caught.value, WebhookURLRefused)
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    ("url", "host", "port", "host_header"),
    [
        (
            "https://hooks.acme.example/merchant?x=1",
            "hooks.acme.example",
            443,
            "hooks.acme.example",
        ),
        (
            "https://Hooks.ACME.example.:8443/",
            "hooks.acme.example",
            8443,
            "hooks.acme.example:8443",
        ),
        ("https://bücher.example/hook", "xn--bcher-kva.example", 443, "xn--bcher-kva.example"),
        ("https://8.8.8.8/hook", "8.8.8.8", 443, "8.8.8.8"),
        (
            "https://[2606:4700:4700::1111]:444/",
            "2606:4700:4700::1111",
            444,
            "[2606:4700:4700::1111]:444",
        ),
    ],
)
def test_accepted_urls_are_normalized(url: str, host: str, port: int, host_header: str) -> None:
    assert webhook_url_check(url=url) == url
    parsed = webhook_url_parse(url)
    assert (parsed.host, parsed.port, parsed.host_header) == (host, port, host_header)


def test_private_hosts_allowed_for_local_development(settings: Any) -> None:
    settings.WEBHOOK_ALLOW_PRIVATE_HOSTS = True
    for url in ("http://127.0.0.1:9000/hooks", "http://localhost:9000/x", "https://10.0.0.8/x"):
        assert webhook_url_check(url=url, resolve=True) == url
    with pytest.raises(WebhookURLRefused, match="unsupported scheme"):
        webhook_url_check(url="ftp://127.0.0.1/x")


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example/steal",
        "https://hooks.acme.example:8443/merchant",
        "http://hooks.acme.example/merchant",
        "https://sub.hooks.acme.example/merchant",
    ],
)
def test_a_request_url_must_be_on_the_registered_host(url: str, settings: Any) -> None:
    settings.WEBHOOK_ALLOW_PRIVATE_HOSTS = True  # so that only the host rule can refuse
    with pytest.raises(WebhookURLRefused, match="host registered"):
        webhook_url_check(url=url, registered_url=REGISTERED)
    other_path = "https://HOOKS.acme.example:443/elsewhere?a=1"
    assert webhook_url_check(url=other_path, registered_url=REGISTERED) == other_path


# --- registration resolves the name (and a failed lookup is no refusal) -------------------------


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (["10.0.0.5"], "resolves to 10.0.0.5, a non-public address (private)"),
        (["93.184.216.34", "169.254.169.254"], "cloud metadata"),
        (["::ffff:127.0.0.1"], "IPv4-mapped"),
    ],
)
def test_onboarding_refuses_a_name_resolving_to_a_refused_address(
    dns: FakeDNS, answer: list[str], reason: str
) -> None:
    dns.answer("hooks.acme.example", answer)
    with pytest.raises(WebhookURLRefused) as caught:
        customer_onboard(name="Acme", webhook_url=REGISTERED)
    assert reason in str(caught.value)
    with pytest.raises(CommandError, match="public host"):
        call_command("onboard_customer", "--name", "Acme", "--webhook-url", REGISTERED)
    assert dns.queries == ["hooks.acme.example."] * 2
    assert Customer.objects.count() == 0


def test_onboarding_accepts_a_public_name_or_one_that_does_not_resolve_yet(dns: FakeDNS) -> None:
    dns.answer("hooks.acme.example", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"])
    customer_onboard(name="Acme", webhook_url=REGISTERED)
    # DNS set up after onboarding (or failing right now) is for delivery to judge.
    dns.answer("hooks.globex.example", socket.gaierror(socket.EAI_AGAIN, "try again"))
    customer_onboard(name="Globex", webhook_url="https://hooks.globex.example/x")
    customer_onboard(name="Initech", webhook_url="https://hooks.initech.example/x")
    assert Customer.objects.count() == 3


@pytest.fixture
def operator(db: None) -> Client:
    user = User.objects.create_superuser("ops", "ops@example.org", "a-long-password-1")
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://hooks.acme.example/merchant", "resolves to 10.0.0.5"),
        ("https://169.254.169.254/latest", "cloud metadata"),
        ("https://metadata.google.internal/x", "non-public name"),
    ],
)
def test_the_admin_form_refuses_what_onboarding_refuses(
    operator: Client, credentials: Any, dns: FakeDNS, url: str, reason: str
) -> None:
    customer = credentials.customer
    dns.answer("hooks.acme.example", ["10.0.0.5"])
    response = operator.post(
        f"/admin/merchant/customer/{customer.id}/change/",
        {
            "name": customer.name,
            "is_active": "on",
            "review_by": "operator",
            "webhook_url": url,
        },
    )
    assert response.status_code == 200  # the form again, with its error
    assert reason in response.content.decode()
    customer.refresh_from_db()
    assert customer.webhook_url == REGISTERED


def test_the_admin_form_saves_a_public_url(
    operator: Client, credentials: Any, dns: FakeDNS
) -> None:
    customer = credentials.customer
    dns.answer("hooks2.acme.example", ["93.184.216.34"])
    response = operator.post(
        f"/admin/merchant/customer/{customer.id}/change/",
        {
            "name": customer.name,
            "is_active": "on",
            "review_by": "operator",
            "weight": "1",
            "webhook_url": "https://hooks2.acme.example/",
        },
    )
    assert response.status_code == 302
    customer.refresh_from_db()
    assert customer.webhook_url == "https://hooks2.acme.example/"


# --- POST /link ---------------------------------------------------------------------------------


def assert_nothing_persisted() -> None:
    assert Workflow.objects.count() == 0
    assert LinkRequest.objects.count() == 0
    assert IdempotencyRecord.objects.count() == 0


@pytest.mark.parametrize(
    ("webhook", "reason"),
    [
        ("https://evil.example/steal", "host registered"),
        ("https://hooks.acme.example:8443/merchant", "host registered"),
        ("ftp://hooks.acme.example/merchant", "https"),
        ("http://hooks.acme.example/merchant", "https"),
        ("https://127.0.0.1/merchant", "loopback"),
        ("https://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("https://localhost/merchant", "non-public name"),
    ],
)
def test_a_refused_request_webhook_is_422(
    api: LinkClient, dns: FakeDNS, webhook: str, reason: str
) -> None:
    dns.queries.clear()
    response = api.post_link({**link_body(), "webhook": webhook})
    assert response.status_code == 422, response.content
    assert response["Content-Type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "/problems/webhook-url-refused"
    assert problem["status"] == 422
    assert reason in problem["detail"]
    assert problem["errors"] == [{"field": "webhook", "detail": problem["detail"]}]
    assert dns.queries == []
    assert_nothing_persisted()


def test_a_body_with_other_errors_is_400_first(api: LinkClient) -> None:
    body = {**link_body(dob="not a date"), "webhook": "https://127.0.0.1/x"}
    response = api.post_link(body)
    assert response.status_code == 400
    assert {e["field"] for e in response.json()["errors"]} == {"patient.dob"}
    assert_nothing_persisted()


def test_a_malformed_request_webhook_is_400(api: LinkClient) -> None:
    response = api.post_link({**link_body(), "webhook": "https://hooks.acme.example/x#top"})
    assert response.status_code == 400
    assert "fragment" in json.dumps(response.json())
    assert_nothing_persisted()


def test_post_link_never_looks_the_host_up(api: LinkClient, dns: FakeDNS) -> None:
    """The acknowledgement path does no DNS: not even a registered host resolving badly now is
    refused there (delivery checks it), and a lookup failure cannot turn into a 500."""
    dns.queries.clear()
    dns.answer("hooks.acme.example", ["10.0.0.5"])
    body = {**link_body(), "webhook": "https://hooks.acme.example/merchant/p?x=1"}
    assert api.post_link(body).status_code == 202
    assert dns.queries == []
