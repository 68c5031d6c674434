"""The SSRF guard of webhook delivery: the address policy, one lookup per attempt, a connection to
the checked address only (DNS rebinding), TLS still verified for the name, no redirects, no body
read.

Nothing leaves 127.0.0.1: `FakeDNS` replaces socket.getaddrinfo (scripted answers for names, the
real function with AI_NUMERICHOST for address literals, which never queries anyone), and `Edge`
replaces urllib3's create_connection: it routes the public addresses a test names to local
stand-in servers, lets loopback through (so that a guard that failed would reach the local
"victim"), and refuses everything else.
"""

import datetime as dt
import ipaddress
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import urllib3.util.connection
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from django.db import transaction

from merchant.models import Customer
from merchant.netguard import address_refusal, literal_address
from merchant.services import CustomerCredentials
from standin.receiver import ReceiverServer, Step, make_receiver
from tests.processes import serving
from workflows import webhook_client
from workflows.models import DeliveryStatus, WebhookAttempt, WebhookDelivery, Workflow
from workflows.services import webhook_delivery_attempt, webhook_event_create

pytestmark = pytest.mark.django_db

HOST = "hooks.customer.example"
PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:2800:220:1:248:1893:25c8:1946"

_real_getaddrinfo = socket.getaddrinfo
_real_create_connection = urllib3.util.connection.create_connection


# --- the network edge ---------------------------------------------------------------------------


class FakeDNS:
    """socket.getaddrinfo with scripted answers; each call to a name takes the next answer."""

    def __init__(self) -> None:
        self.answers: dict[str, list[list[str] | Exception]] = {}
        self.queries: list[str] = []
        self.lock = threading.Lock()

    def answer(self, name: str, *rounds: list[str] | Exception) -> None:
        """Answers in order, the last one repeating."""
        self.answers[name] = list(rounds)

    def __call__(
        self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> list[Any]:
        host = host.decode() if isinstance(host, bytes) else str(host)
        try:
            ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            pass
        else:
            return _real_getaddrinfo(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
        with self.lock:
            self.queries.append(host)
            rounds = self.answers.get(host.rstrip(".").lower())
            if not rounds:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            answer = rounds.pop(0) if len(rounds) > 1 else rounds[0]
        if isinstance(answer, Exception):
            raise answer
        infos: list[Any] = []
        for address in answer:
            if ":" in address:
                infos.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0)))
            else:
                infos.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)))
        return infos


@dataclass
class Edge:
    """urllib3's create_connection: where each connection went, and where it may go."""

    routes: dict[tuple[str, int], int] = field(default_factory=dict)
    connects: list[tuple[str, int]] = field(default_factory=list)

    def route(self, address: str, port: int, *, to_port: int) -> None:
        self.routes[(str(ipaddress.ip_address(address)), port)] = to_port

    def __call__(self, address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        host, port = address
        # Resolved as the real function would: a client that passed a name here would look
        # it up a second time.
        for *_, sockaddr in socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM):
            ip = str(ipaddress.ip_address(sockaddr[0]))
            self.connects.append((ip, port))
            if (ip, port) in self.routes:
                return _real_create_connection(
                    ("127.0.0.1", self.routes[(ip, port)]), *args, **kwargs
                )
            if ipaddress.ip_address(ip).is_loopback:
                return _real_create_connection((ip, port), *args, **kwargs)
            raise ConnectionRefusedError(f"test edge: {ip} is outside 127.0.0.1")
        raise OSError("no address")


@pytest.fixture(autouse=True)
def strict(settings: Any) -> None:
    settings.WEBHOOK_ALLOW_PRIVATE_HOSTS = False
    settings.WEBHOOK_TIMEOUT_SECONDS = 2.0
    settings.WEBHOOK_RETRY_SCHEDULE = [5, 60]


@pytest.fixture(autouse=True)
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    fake = FakeDNS()
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return fake


@pytest.fixture(autouse=True)
def edge(monkeypatch: pytest.MonkeyPatch) -> Edge:
    fake = Edge()
    monkeypatch.setattr(urllib3.util.connection, "create_connection", fake)
    return fake


# --- a CA, certificates and TLS receivers -------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    directory: Path
    ca_path: Path
    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey

    def leaf(self, name: str) -> tuple[Path, Path]:
        """A server certificate for `name` signed by the CA: (cert path, key path)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        cert_path = self.directory / f"{name}.pem"
        key_path = self.directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("pki")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "merchant ssrf test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return PKI(directory=directory, ca_path=ca_path, ca_cert=cert, ca_key=key)


@pytest.fixture
def trust_test_ca(pki: PKI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhook_client, "CA_BUNDLE", str(pki.ca_path))


class TLSReceiver:
    """A webhook receiver behind TLS with a certificate for `name`, recording the SNI it saw."""

    def __init__(self, pki: PKI, name: str, secret: str) -> None:
        self.server: ReceiverServer = make_receiver("127.0.0.1", 0, secret=secret)
        self.sni: list[str | None] = []
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*pki.leaf(name))
        context.sni_callback = lambda _sock, server_name, _ctx: self.sni.append(server_name)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])


@pytest.fixture
def tls_receiver(pki: PKI, customer: Customer) -> Callable[..., Any]:
    @contextmanager
    def start(name: str = HOST) -> Iterator[TLSReceiver]:
        receiver = TLSReceiver(pki, name, customer.webhook_secret)
        with serving(receiver.server):
            yield receiver

    return start


# --- deliveries ---------------------------------------------------------------------------------


@pytest.fixture
def customer(credentials: CustomerCredentials, dns: FakeDNS) -> Customer:
    dns.queries.clear()  # onboarding's own lookup of the registered host
    return credentials.customer


def delivery_to(customer: Customer, url: str) -> WebhookDelivery:
    workflow = Workflow.objects.create(customer=customer, patient_id=uuid.uuid4(), webhook_url=url)
    with transaction.atomic():
        return webhook_event_create(
            workflow=workflow, event_type="link.completed", data={"workflow-id": str(workflow.id)}
        )


def attempt(delivery: WebhookDelivery) -> WebhookDelivery:
    webhook_delivery_attempt(delivery_id=delivery.id)
    delivery.refresh_from_db()
    return delivery


def assert_refused(delivery: WebhookDelivery, *words: str) -> None:
    """A permanent failure: EXHAUSTED at the first attempt, never retried, saying why."""
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.EXHAUSTED, 1)
    assert delivery.next_attempt_at is None
    assert delivery.last_status_code is None
    assert delivery.last_error.startswith("refused: ")
    for word in words:
        assert word in delivery.last_error
    assert WebhookAttempt.objects.filter(delivery=delivery).count() == 1


# --- the address policy -------------------------------------------------------------------------

REFUSED_ADDRESSES = [
    ("127.0.0.1", "loopback"),
    ("127.8.9.10", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("169.254.1.1", "link-local"),
    ("169.254.169.254", "cloud metadata"),
    ("169.254.170.2", "cloud metadata"),
    ("168.63.129.16", "cloud metadata"),  # public range, still the Azure wire server
    ("100.100.100.200", "cloud metadata"),
    ("100.64.0.1", "CGNAT"),
    ("100.127.255.254", "CGNAT"),
    ("0.0.0.0", "unspecified"),  # noqa: S104 -- an address under test, not a bind
    ("0.1.2.3", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("198.18.0.1", "benchmarking"),
    ("192.0.2.10", "documentation"),
    ("203.0.113.9", "documentation"),
    ("192.0.0.8", "IETF"),
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "scoped"),
    ("fc00::1", "unique-local"),
    ("fd12:3456::1", "unique-local"),
    ("fd00:ec2::254", "cloud metadata"),
    ("fec0::1", "site-local"),
    ("ff02::1", "multicast"),
    ("2001:db8::1", "documentation"),
    ("::ffff:127.0.0.1", "loopback (IPv4-mapped)"),
    ("::ffff:10.0.0.1", "private (IPv4-mapped)"),
    ("::ffff:169.254.169.254", "cloud metadata (IPv4-mapped)"),
    ("::ffff:100.64.0.1", "CGNAT (IPv4-mapped)"),
    ("::127.0.0.1", "IPv4-compatible"),
    ("::8.8.8.8", "IPv4-compatible"),
    ("::ffff:0:7f00:1", "IPv4-translated"),
    ("64:ff9b::7f00:1", "NAT64"),
    ("64:ff9b::808:808", "NAT64"),  # even with a public IPv4 inside: the gateway is ours
    ("64:ff9b:1::a00:1", "NAT64"),
    ("2002:7f00:1::1", "loopback (6to4)"),
    ("2002:a9fe:a9fe::1", "cloud metadata (6to4)"),
    ("2002:a00:1::1", "private (6to4)"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
    ("100::1", "discard-only"),
]


@pytest.mark.parametrize(("address", "label"), REFUSED_ADDRESSES)
def test_refused_addresses(address: str, label: str) -> None:
    reason = address_refusal(ipaddress.ip_address(address))
    assert reason is not None
    assert label in reason


@pytest.mark.parametrize(
    "address",
    [
        PUBLIC_V4,
        "8.8.8.8",
        "1.1.1.1",
        "100.63.255.255",  # just below CGNAT
        "100.128.0.1",  # just above it
        "172.32.0.1",  # just above 172.16/12
        "169.255.0.1",
        PUBLIC_V6,
        "2606:4700:4700::1111",
        "::ffff:8.8.8.8",  # an IPv4-mapped public address is that public address
        "2002:808:808::1",  # 6to4 around a public address
    ],
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0xa9.254.169.254", "169.254.169.254"),
        ("[::1]", "::1"),
        ("example.com", None),
        ("deadbeef", None),
        ("1.2.3.4.example", None),
    ],
)
def test_literal_addresses_include_the_resolver_shorthands(host: str, address: str | None) -> None:
    found = literal_address(host)
    assert (str(found) if found else None) == address


# --- refusals at delivery -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (["10.0.0.7"], ["resolves to 10.0.0.7", "private"]),
        (["127.0.0.1"], ["loopback"]),
        (["169.254.169.254"], ["cloud metadata"]),
        (["100.64.3.4"], ["CGNAT"]),
        (["64:ff9b::a9fe:a9fe"], ["NAT64"]),
        (["::ffff:127.0.0.1"], ["IPv4-mapped"]),
        (["fd00:ec2::254"], ["cloud metadata"]),
        # One bad address is enough, wherever it comes in the answer.
        ([PUBLIC_V4, "127.0.0.1"], ["resolves to 127.0.0.1"]),
        ([PUBLIC_V6, "::1"], ["resolves to ::1"]),
    ],
)
def test_a_name_resolving_to_a_refused_address_is_a_permanent_failure(
    customer: Customer, dns: FakeDNS, edge: Edge, answer: list[str], words: list[str]
) -> None:
    dns.answer(HOST, answer)
    delivery = attempt(delivery_to(customer, f"https://{HOST}/hooks"))
    assert_refused(delivery, HOST, *words)
    assert dns.queries == [f"{HOST}."]  # one lookup, of the absolute name
    assert edge.connects == []


@pytest.mark.parametrize(
    ("url", "words"),
    [
        (f"http://{HOST}/hooks", ["https"]),
        ("https://127.0.0.1/hooks", ["non-public address", "loopback"]),
        ("https://2130706433/hooks", ["loopback"]),
        ("https://[::ffff:169.254.169.254]/latest/meta-data", ["cloud metadata"]),
        ("https://169.254.169.254/latest/meta-data", ["cloud metadata"]),
        ("https://localhost/hooks", ["non-public name"]),
        ("https://metadata.google.internal/computeMetadata/v1/", ["non-public name"]),
        ("https://printer.local/hooks", ["non-public name"]),
        ("https://metadata/hooks", ["not fully qualified"]),
    ],
)
def test_urls_refused_without_a_lookup(
    customer: Customer, dns: FakeDNS, edge: Edge, url: str, words: list[str]
) -> None:
    delivery = attempt(delivery_to(customer, url))
    assert_refused(delivery, *words)
    assert dns.queries == []
    assert edge.connects == []


def test_a_failed_lookup_is_retried(customer: Customer, dns: FakeDNS, edge: Edge) -> None:
    dns.answer(HOST, socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"))
    delivery = attempt(delivery_to(customer, f"https://{HOST}/hooks"))
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.PENDING, 1)
    assert delivery.next_attempt_at is not None
    assert "cannot resolve host" in delivery.last_error
    assert edge.connects == []


# --- the pinned connection ----------------------------------------------------------------------


@pytest.mark.parametrize("public", [PUBLIC_V4, PUBLIC_V6])
def test_tls_goes_to_the_checked_address_with_the_name_for_sni_host_and_certificate(
    customer: Customer,
    dns: FakeDNS,
    edge: Edge,
    tls_receiver: Callable[..., Any],
    trust_test_ca: None,
    monkeypatch: pytest.MonkeyPatch,
    public: str,
) -> None:
    # A proxy from the environment would resolve the name itself: it must be ignored.
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with tls_receiver() as receiver:
        port = 8443  # the URL's port; the edge routes it to the receiver's
        dns.answer(HOST, [public])
        edge.route(public, port, to_port=receiver.port)
        url = f"https://{HOST}:{port}/hooks/7?tag=x"
        delivery = attempt(delivery_to(customer, url))
        [sent] = receiver.server.deliveries()
    assert (delivery.status, delivery.last_status_code) == (DeliveryStatus.DELIVERED, 200)
    assert edge.connects == [(str(ipaddress.ip_address(public)), port)]
    assert dns.queries == [f"{HOST}."]
    assert receiver.sni == [HOST]
    assert sent.headers["host"] == f"{HOST}:{port}"
    assert sent.path == "/hooks/7?tag=x"
    assert sent.verified is True


@pytest.mark.parametrize(
    ("certificate_name", "trusted"),
    [("other.customer.example", True), (HOST, False)],
    ids=["certificate-for-another-name", "untrusted-ca"],
)
def test_tls_verification_still_applies_to_the_name(
    customer: Customer,
    dns: FakeDNS,
    edge: Edge,
    tls_receiver: Callable[..., Any],
    pki: PKI,
    monkeypatch: pytest.MonkeyPatch,
    certificate_name: str,
    trusted: bool,
) -> None:
    if trusted:
        monkeypatch.setattr(webhook_client, "CA_BUNDLE", str(pki.ca_path))
    with tls_receiver(certificate_name) as receiver:
        dns.answer(HOST, [PUBLIC_V4])
        edge.route(PUBLIC_V4, 443, to_port=receiver.port)
        delivery = attempt(delivery_to(customer, f"https://{HOST}/hooks"))
        assert receiver.server.deliveries() == []
    # A certificate problem may be fixed by the customer: retried like any failed connection.
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.PENDING, 1)
    assert delivery.last_error == "connection failed (SSLError)"
    assert edge.connects == [(PUBLIC_V4, 443)]


def test_dns_rebinding_reaches_only_the_checked_address(
    customer: Customer,
    dns: FakeDNS,
    edge: Edge,
    tls_receiver: Callable[..., Any],
    trust_test_ca: None,
) -> None:
    """The name answers a public address first and 127.0.0.1 afterwards. A client that looked
    it up again to connect would reach the victim on 127.0.0.1 (it has a valid certificate for
    the name, so nothing else would stop it); the delivery must reach the public one only."""
    with tls_receiver() as victim, tls_receiver() as public_receiver:
        dns.answer(HOST, [PUBLIC_V4], ["127.0.0.1"])
        edge.route(PUBLIC_V4, victim.port, to_port=public_receiver.port)
        delivery = attempt(delivery_to(customer, f"https://{HOST}:{victim.port}/hooks"))
        assert victim.server.deliveries() == []
        assert victim.sni == []
        assert len(public_receiver.server.deliveries()) == 1
    assert delivery.status == DeliveryStatus.DELIVERED
    assert dns.queries == [f"{HOST}."]
    assert edge.connects == [(PUBLIC_V4, victim.port)]

    # The next delivery looks the name up again, gets 127.0.0.1 and is refused before connecting.
    second = attempt(delivery_to(customer, f"https://{HOST}:{victim.port}/hooks"))
    assert_refused(second, "resolves to 127.0.0.1")
    assert edge.connects == [(PUBLIC_V4, victim.port)]


def test_an_unreachable_address_falls_back_to_the_next_checked_one(
    customer: Customer,
    dns: FakeDNS,
    edge: Edge,
    tls_receiver: Callable[..., Any],
    trust_test_ca: None,
) -> None:
    with tls_receiver() as receiver:
        dns.answer(HOST, [PUBLIC_V6, PUBLIC_V4])  # the edge refuses the IPv6 one
        edge.route(PUBLIC_V4, 443, to_port=receiver.port)
        delivery = attempt(delivery_to(customer, f"https://{HOST}/hooks"))
        assert len(receiver.server.deliveries()) == 1
    assert delivery.status == DeliveryStatus.DELIVERED
    assert edge.connects == [(PUBLIC_V6, 443), (PUBLIC_V4, 443)]
    assert dns.queries == [f"{HOST}."]


def test_a_refused_connection_is_retried(customer: Customer, dns: FakeDNS, edge: Edge) -> None:
    dns.answer(HOST, [PUBLIC_V4])
    delivery = attempt(delivery_to(customer, f"https://{HOST}/hooks"))
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.PENDING, 1)
    assert delivery.last_error == "connection failed (NewConnectionError)"
    assert edge.connects == [(PUBLIC_V4, 443)]


def test_the_pool_connects_to_the_address_and_verifies_the_name() -> None:
    """What the TLS tests above prove end to end, at the level of urllib3's pool keywords."""
    destination = webhook_client.Destination(
        url=webhook_client.webhook_url_parse(f"https://{HOST}:8443/x"),
        addresses=(ipaddress.ip_address(PUBLIC_V4),),
        target="/x",
    )
    pool = webhook_client.webhook_pool(destination, destination.addresses[0])
    assert isinstance(pool, urllib3.HTTPSConnectionPool)
    assert (pool.host, pool.port) == (PUBLIC_V4, 8443)
    assert pool.conn_kw["server_hostname"] == HOST
    assert pool.cert_reqs == "CERT_REQUIRED"
    assert pool.assert_hostname is None  # None keeps the stdlib's own hostname check on
    # Kept for the next attempt to the same address and name; another name at the same
    # address gets a pool (and connections) of its own.
    assert webhook_client.webhook_pool(destination, destination.addresses[0]) is pool
    other = webhook_client.Destination(
        url=webhook_client.webhook_url_parse("https://other.customer.example:8443/x"),
        addresses=destination.addresses,
        target="/x",
    )
    other_pool = webhook_client.webhook_pool(other, other.addresses[0])
    assert other_pool is not pool
    assert other_pool.conn_kw["server_hostname"] == "other.customer.example"


def test_a_redirect_is_not_followed(
    customer: Customer,
    dns: FakeDNS,
    edge: Edge,
    tls_receiver: Callable[..., Any],
    trust_test_ca: None,
) -> None:
    with tls_receiver() as victim, tls_receiver() as receiver:
        receiver.server.respond_with(
            Step(status=307, location=f"https://127.0.0.1:{victim.port}/internal")
        )
        dns.answer(HOST, [PUBLIC_V4])
        edge.route(PUBLIC_V4, 443, to_port=receiver.port)
        delivery = attempt(delivery_to(customer, f"https://{HOST}/hooks"))
        assert victim.server.deliveries() == []
    assert (delivery.status, delivery.last_status_code) == (DeliveryStatus.PENDING, 307)
    assert delivery.last_error == "redirect not followed"
    assert edge.connects == [(PUBLIC_V4, 443)]


def test_the_answer_body_is_never_read(customer: Customer, settings: Any) -> None:
    """A receiver that answers 200 with an endless body: the status line is all we read."""
    settings.WEBHOOK_ALLOW_PRIVATE_HOSTS = True  # a plain local server; the same client path
    listener = socket.create_server(("127.0.0.1", 0))
    sent = {"bytes": 0}

    def flood() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n")
            chunk = b"x" * 65536
            try:
                while sent["bytes"] < 1 << 30:
                    conn.sendall(chunk)
                    sent["bytes"] += len(chunk)
            except OSError:
                pass  # we closed the connection: the point of the test

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    started = time.monotonic()
    delivery = attempt(delivery_to(customer, f"http://127.0.0.1:{port}/hooks"))
    elapsed = time.monotonic() - started
    thread.join(timeout=5)
    listener.close()
    assert (delivery.status, delivery.last_status_code) == (DeliveryStatus.DELIVERED, 200)
    assert not thread.is_alive()
    assert elapsed < 2
    assert sent["bytes"] < 64 << 20  # what socket buffers absorbed, not the gigabyte on offer


def test_a_stalled_receiver_times_out(
    customer: Customer,
    dns: FakeDNS,
    edge: Edge,
    tls_receiver: Callable[..., Any],
    trust_test_ca: None,
    settings: Any,
) -> None:
    settings.WEBHOOK_TIMEOUT_SECONDS = 0.3
    with tls_receiver() as receiver:
        receiver.server.respond_with(Step(delay_ms=1500))
        dns.answer(HOST, [PUBLIC_V4])
        edge.route(PUBLIC_V4, 443, to_port=receiver.port)
        started = time.monotonic()
        delivery = attempt(delivery_to(customer, f"https://{HOST}/hooks"))
        elapsed = time.monotonic() - started
    assert (delivery.status, delivery.last_error) == (DeliveryStatus.PENDING, "timed out")
    assert elapsed < 1.2
