"""The token matrix: every forged, damaged or stale credential, on every customer endpoint.

Each case must get exactly the bytes a request without any token gets at the same URL (401
problem+json, same `WWW-Authenticate`), in both the `customer-token` header and
`Authorization: Bearer`, and must change nothing. The bad tokens aim at real resources of a real
customer (a workflow, a LINKED patient), so a case that slipped through would show up as a 2xx.
tests/merchant/test_auth.py holds the first, smaller set; this one is the adversarial sweep.
"""

import base64
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from django.conf import settings
from rest_framework.test import APIClient

from linking.models import AuditEvent, LinkHistory, MappingStatus, PatientMapping
from merchant.models import Customer
from merchant.services import (
    TOKEN_MAX_LENGTH,
    CustomerCredentials,
    _HMACKeyCheckedOnce,
    customer_revoke_tokens,
    token_issue,
    token_verify,
)
from tests.conftest import link_body, new_customer
from workflows.models import WebhookDelivery, Workflow

pytestmark = pytest.mark.django_db

JANE = "0c8eca2a00d55380a788b6f950b8c635"  # the stand-in's Jane Q Doe
POST_BODY = link_body()

# One attacker RSA key pair for the whole module (generating one per case is slow).
_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PRIVATE_PEM = _RSA_KEY.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8,
    serialization.NoEncryption(),
)
RSA_PUBLIC_PEM = _RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


# --- forging ------------------------------------------------------------------------------------


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def seg(value: Any) -> str:
    """A JSON value as a token segment (a str is taken as raw text)."""
    raw = value.encode() if isinstance(value, str) else json.dumps(value).encode()
    return b64(raw)


def hmac_token(
    header: Any, claims: Any, key: bytes | str | None = None, digest: str = "sha256"
) -> str:
    """A compact JWS with any header and payload, HMAC-signed by hand (PyJWT would refuse to
    build some of these: a PEM as HMAC key, an unknown `crit`)."""
    if key is None:
        key = settings.TOKEN_SIGNING_KEY
    key_bytes = key.encode() if isinstance(key, str) else key
    signing_input = f"{seg(header)}.{seg(claims)}"
    signature = hmac.new(key_bytes, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64(signature)}"


HS256 = {"alg": "HS256", "typ": "JWT"}


@dataclass
class Ctx:
    """The victim customer and its resources, and a second, unrelated customer."""

    credentials: CustomerCredentials
    other: CustomerCredentials
    workflow_id: str
    patient_id: str

    @property
    def customer(self) -> Customer:
        return self.credentials.customer

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """Claims exactly as token_issue writes them, with `overrides` (None drops a claim)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": settings.TOKEN_ISSUER,
            "aud": settings.TOKEN_AUDIENCE,
            "sub": str(self.customer.id),
            "iat": now,
            "exp": now + 600,
            "jti": uuid.uuid4().hex,
            "ver": self.customer.token_version,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def signed(self, **overrides: Any) -> str:
        """Signed with the service's own key: only the claims are wrong."""
        return hmac_token(HS256, self.claims(**overrides))

    def valid(self) -> str:
        return self.signed()


def parts(token: str) -> list[str]:
    return token.split(".")


def swap_header(token: str, header: Any) -> str:
    _, payload, signature = parts(token)
    return f"{seg(header)}.{payload}.{signature}"


def with_raw_claim(claims: dict[str, Any], name: str, raw: str) -> str:
    """The claims as JSON text with one claim's value spelled `raw` (JSON that json.dumps would
    never write, such as 1e999, which Python reads as infinity)."""
    claims = {k: v for k, v in claims.items() if k != name}
    return json.dumps(claims)[:-1] + f', "{name}": {raw}}}'


def deleted_customer(ctx: Ctx) -> str:
    """A token the service really issued, to a customer whose row is gone."""
    gone = new_customer("Gone Ltd")
    token = gone.token
    Customer.objects.filter(id=gone.customer.id).delete()
    return token


def revoked(ctx: Ctx) -> str:
    token = ctx.credentials.token
    customer_revoke_tokens(customer_id=ctx.customer.id)
    return token


def inactive(ctx: Ctx) -> str:
    Customer.objects.filter(id=ctx.customer.id).update(is_active=False)
    return ctx.credentials.token


def nested_header(depth: int) -> str:
    return seg("[" * depth + "]" * depth)


# A case gives a token (sent in each of the two headers) or the request headers themselves.
Case = Callable[[Ctx], "str | dict[str, str]"]

TOKEN_CASES: dict[str, Case] = {
    # --- algorithm confusion
    "alg none": lambda c: f"{seg({'alg': 'none', 'typ': 'JWT'})}.{seg(c.claims())}.",
    "alg None (capitalised)": lambda c: f"{seg({'alg': 'None'})}.{seg(c.claims())}.",
    "alg NONE keeping a real signature": lambda c: swap_header(c.valid(), {"alg": "NONE"}),
    "alg missing (our key)": lambda c: hmac_token({"typ": "JWT"}, c.claims()),
    "alg empty (our key)": lambda c: hmac_token({"alg": ""}, c.claims()),
    "alg not a string": lambda c: hmac_token({"alg": ["HS256"]}, c.claims()),
    "alg HS512 with our key": lambda c: hmac_token(
        {"alg": "HS512", "typ": "JWT"}, c.claims(), digest="sha512"
    ),
    "RS256 with an attacker key pair": lambda c: jwt.encode(
        c.claims(), RSA_PRIVATE_PEM, algorithm="RS256"
    ),
    "RS256 with the key embedded as jwk": lambda c: jwt.encode(
        c.claims(),
        RSA_PRIVATE_PEM,
        algorithm="RS256",
        headers={"jwk": json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(_RSA_KEY.public_key()))},
    ),
    "RS256 with a jku": lambda c: jwt.encode(
        c.claims(),
        RSA_PRIVATE_PEM,
        algorithm="RS256",
        headers={"jku": "https://attacker.example/jwks.json"},
    ),
    "HS256 keyed with a public key PEM": lambda c: hmac_token(HS256, c.claims(), RSA_PUBLIC_PEM),
    # --- keys and signatures
    "wrong key": lambda c: hmac_token(HS256, c.claims(), "another-key-that-is-long-enough!!"),
    "empty key": lambda c: hmac_token(HS256, c.claims(), b""),
    "signature stripped": lambda c: c.valid().rsplit(".", 1)[0] + ".",
    "signature truncated": lambda c: c.valid()[:-4],
    "signature of other claims": lambda c: ".".join(
        [*parts(c.signed(sub=str(c.other.customer.id)))[:2], parts(c.valid())[2]]
    ),
    "payload swapped to another customer": lambda c: ".".join(
        [parts(c.valid())[0], seg(c.claims(sub=str(c.other.customer.id))), parts(c.valid())[2]]
    ),
    # --- header parameters we never issue
    "unknown crit": lambda c: hmac_token(
        {**HS256, "crit": ["x-policy"], "x-policy": 1}, c.claims()
    ),
    "crit b64 (understood by PyJWT, never issued)": lambda c: hmac_token(
        {**HS256, "crit": ["b64"], "b64": True}, c.claims()
    ),
    "crit not a list": lambda c: hmac_token({**HS256, "crit": "exp"}, c.claims()),
    "kid path traversal, empty key": lambda c: hmac_token(
        {**HS256, "kid": "../../../../../../dev/null"}, c.claims(), b""
    ),
    "kid SQL injection, attacker key": lambda c: hmac_token(
        {**HS256, "kid": "x' UNION SELECT 'attacker-key' --"}, c.claims(), "attacker-key"
    ),
    "kid path traversal, our key": lambda c: hmac_token(
        {**HS256, "kid": "../../../../etc/passwd"}, c.claims()
    ),
    "kid not a string": lambda c: hmac_token({**HS256, "kid": {"$ne": None}}, c.claims()),
    "typ not JWT": lambda c: hmac_token({"alg": "HS256", "typ": "JOSE+JSON"}, c.claims()),
    # --- time
    "expired": lambda c: c.signed(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600),
    "expired a second ago": lambda c: c.signed(iat=int(time.time()) - 60, exp=int(time.time()) - 1),
    "nbf in the future": lambda c: c.signed(nbf=int(time.time()) + 3600),
    "nbf not a number": lambda c: c.signed(nbf="now"),
    "no exp": lambda c: c.signed(exp=None),
    "exp not a number": lambda c: c.signed(exp="tomorrow"),
    "exp infinite": lambda c: hmac_token(HS256, with_raw_claim(c.claims(), "exp", "1e999")),
    "no iat": lambda c: c.signed(iat=None),
    "iat far in the future": lambda c: c.signed(
        iat=int(time.time()) + 10 * 365 * 86400, exp=int(time.time()) + 11 * 365 * 86400
    ),
    "iat not a number": lambda c: c.signed(iat="yesterday"),
    # --- audience and issuer
    "wrong aud": lambda c: c.signed(aud="someone-else"),
    "no aud": lambda c: c.signed(aud=None),
    "aud a list holding ours": lambda c: c.signed(aud=[settings.TOKEN_AUDIENCE, "other"]),
    "wrong iss": lambda c: c.signed(iss="evil-issuer"),
    "no iss": lambda c: c.signed(iss=None),
    "iss a prefix of ours": lambda c: c.signed(iss=settings.TOKEN_ISSUER[:-1]),
    "iss with ours as prefix": lambda c: c.signed(iss=settings.TOKEN_ISSUER + ".evil.example"),
    "iss with trailing space": lambda c: c.signed(iss=settings.TOKEN_ISSUER + " "),
    "iss a list holding ours": lambda c: c.signed(iss=[settings.TOKEN_ISSUER]),
    # --- subject
    "no sub": lambda c: c.signed(sub=None),
    "sub not a uuid": lambda c: c.signed(sub="1' OR '1'='1"),
    "sub an integer": lambda c: c.signed(sub=1),
    "sub a uuid in urn form": lambda c: c.signed(sub=f"urn:uuid:{c.customer.id}"),
    "sub a uuid in upper case": lambda c: c.signed(sub=str(c.customer.id).upper()),
    "sub of an unknown customer": lambda c: c.signed(sub=str(uuid.uuid4())),
    "sub of a deleted customer": deleted_customer,
    # --- version, revocation, customer state
    "revoked version": revoked,
    "version ahead of the customer's": lambda c: c.signed(ver=c.customer.token_version + 1),
    "no ver": lambda c: c.signed(ver=None),
    "ver a string": lambda c: c.signed(ver=str(c.customer.token_version)),
    "ver a bool": lambda c: c.signed(ver=True),
    "ver a float": lambda c: c.signed(ver=float(c.customer.token_version)),
    "inactive customer": inactive,
    # --- encoding and shape
    "bad base64 in the header": lambda c: "!!!." + ".".join(parts(c.valid())[1:]),
    "bad base64 in the payload": lambda c: ".".join(
        [parts(c.valid())[0], "e30*", parts(c.valid())[2]]
    ),
    "bad base64 in the signature": lambda c: c.valid().rsplit(".", 1)[0] + ".%%%%",
    "header not JSON": lambda c: swap_header(c.valid(), "alg=HS256"),
    "header a JSON array": lambda c: swap_header(c.valid(), ["HS256"]),
    "header nested 1500 deep": lambda c: nested_header(1500) + "." + ".".join(parts(c.valid())[1:]),
    "payload not JSON (our key)": lambda c: hmac_token(HS256, "sub=me"),
    "payload a JSON array (our key)": lambda c: hmac_token(HS256, [c.claims()]),
    "payload nested 1500 deep (our key)": lambda c: hmac_token(
        HS256, '{"a":' + "[" * 1500 + "]" * 1500 + "}"
    ),
    "oversized, otherwise valid": lambda c: c.signed(pad="x" * TOKEN_MAX_LENGTH),
    "a megabyte": lambda c: "a" * 1_000_000,
    "two segments": lambda c: c.valid().rsplit(".", 1)[0],
    "four segments": lambda c: c.valid() + ".AAAA",
    "JWE-looking, five segments": lambda c: ".".join(
        [seg({"alg": "RSA-OAEP", "enc": "A256GCM"}), "AAAA", "AAAA", seg(c.claims()), "AAAA"]
    ),
    "a space inside": lambda c: c.valid()[:20] + " " + c.valid()[20:],
    "a NUL byte": lambda c: c.valid() + "\x00",
    "not a JWT at all": lambda c: "not-a-jwt",
    "empty": lambda c: "",
}

HEADER_CASES: dict[str, Case] = {
    "both headers, two customers' valid tokens": lambda c: {
        "customer-token": c.valid(),
        "Authorization": f"Bearer {c.other.token}",
    },
    "both headers, valid customer-token and bad Bearer": lambda c: {
        "customer-token": c.valid(),
        "Authorization": "Bearer garbage",
    },
    "both headers, bad customer-token and valid Bearer": lambda c: {
        "customer-token": "garbage",
        "Authorization": f"Bearer {c.valid()}",
    },
    "both headers, empty customer-token and valid Bearer": lambda c: {
        "customer-token": "",
        "Authorization": f"Bearer {c.valid()}",
    },
    "Bearer without a token": lambda c: {"Authorization": "Bearer"},
    "Bearer and spaces only": lambda c: {"Authorization": "Bearer    "},
    "bearer (lower case) with a bad token": lambda c: {"Authorization": "bearer garbage"},
    "Bearer, extra spaces, bad token": lambda c: {"Authorization": "Bearer    garbage  "},
    "Bearer twice": lambda c: {"Authorization": f"Bearer Bearer {c.valid()}"},
    "Bearer then a tab": lambda c: {"Authorization": f"Bearer\t{c.valid()}"},
    "valid token without a scheme": lambda c: {"Authorization": c.valid()},
    "valid token, Token scheme": lambda c: {"Authorization": f"Token {c.valid()}"},
    "Basic credentials": lambda c: {"Authorization": "Basic dXNlcjpwYXNzd29yZA=="},
    "non-ASCII customer-token": lambda c: {"customer-token": "t\u00f6k\u00e9n.\u00fc.\u00df"},
    "non-ASCII Bearer": lambda c: {"Authorization": "Bearer \u0165\u00f8\u0137\u00ea\u00f1"},
}


# --- the victim, its resources, and the reference answers ---------------------------------------


@pytest.fixture
def ctx(credentials: CustomerCredentials, other_credentials: CustomerCredentials) -> Ctx:
    """A workflow and a LINKED patient of the victim, made through the API with its token."""
    response = APIClient().post(
        "/link",
        link_body(),
        format="json",
        HTTP_IDEMPOTENCY_KEY="setup",
        HTTP_CUSTOMER_TOKEN=credentials.token,
    )
    assert response.status_code == 202, response.content
    workflow = Workflow.objects.get(id=response.json()["workflow-id"])
    PatientMapping.objects.create(
        customer=credentials.customer,
        customer_patient_id=workflow.patient_id,
        internal_patient_id=JANE,
        status=MappingStatus.LINKED,
        workflow=workflow,
    )
    return Ctx(credentials, other_credentials, str(workflow.id), str(workflow.patient_id))


def endpoints(c: Ctx) -> list[tuple[str, str]]:
    return [
        ("post", "/link"),
        ("get", f"/link/status/{c.workflow_id}"),
        ("get", f"/patient/{c.patient_id}"),
        ("delete", f"/link/{c.patient_id}"),
        ("post", "/link/batch"),
        # No batch has this id: a 404, never the 401, should a case slip through.
        ("get", f"/link/batch/{c.workflow_id}"),
        ("post", f"/link/{c.workflow_id}/decision"),
        ("get", "/links"),
    ]


def call(method: str, url: str, headers: dict[str, str]) -> Any:
    client = APIClient()
    if method == "post":
        return client.post(
            url,
            json.dumps(POST_BODY),
            content_type="application/json",
            HTTP_IDEMPOTENCY_KEY="matrix",
            headers=headers,
        )
    return getattr(client, method)(url, headers=headers)


def answer(response: Any) -> tuple[int, bytes, str | None, str | None]:
    """What a client sees: status, body bytes, and the two headers that could differ."""
    return (
        response.status_code,
        response.content,
        response.get("Content-Type"),
        response.get("WWW-Authenticate"),
    )


@pytest.fixture
def references(ctx: Ctx) -> dict[str, tuple[int, bytes, str | None, str | None]]:
    """Each endpoint's answer to a request with no credentials at all."""
    refs = {url: answer(call(method, url, {})) for method, url in endpoints(ctx)}
    for status, body, content_type, challenge in refs.values():
        assert status == 401
        assert content_type == "application/problem+json"
        assert challenge == 'Bearer realm="merchant-service"'
        assert json.loads(body)["type"] == "/problems/unauthorized"
    return refs


def snapshot(ctx: Ctx) -> dict[str, Any]:
    return {
        "workflows": sorted(Workflow.objects.values_list("id", "status")),
        "mapping": PatientMapping.objects.get(customer_patient_id=ctx.patient_id).status,
        "audit": AuditEvent.objects.count(),
        "history": LinkHistory.objects.count(),
        "webhooks": WebhookDelivery.objects.count(),
    }


def header_forms(token: str) -> list[dict[str, str]]:
    return [{"customer-token": token}, {"Authorization": f"Bearer {token}"}]


def assert_refused_everywhere(
    ctx: Ctx,
    references: dict[str, tuple[int, bytes, str | None, str | None]],
    forms: list[dict[str, str]],
) -> None:
    before = snapshot(ctx)
    for method, url in endpoints(ctx):
        for headers in forms:
            got = answer(call(method, url, headers))
            assert got == references[url], (method, url, got[:2])
    assert snapshot(ctx) == before


# --- the matrix ---------------------------------------------------------------------------------


def test_the_matrix_is_big_enough() -> None:
    assert len(TOKEN_CASES) + len(HEADER_CASES) >= 20


@pytest.mark.parametrize("case", list(TOKEN_CASES))
def test_bad_token_gets_the_no_token_answer(
    case: str, ctx: Ctx, references: Any, caplog: pytest.LogCaptureFixture
) -> None:
    token = TOKEN_CASES[case](ctx)
    assert isinstance(token, str)
    caplog.set_level(logging.DEBUG)
    assert_refused_everywhere(ctx, references, header_forms(token))
    # The refusal is logged with a reason, never with the credential itself.
    if len(token) > 16:
        assert all(token not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_bad_credential_headers_get_the_no_token_answer(
    case: str, ctx: Ctx, references: Any
) -> None:
    headers = HEADER_CASES[case](ctx)
    assert isinstance(headers, dict)
    assert_refused_everywhere(ctx, references, [headers])


# --- the controls: what the matrix varies from is accepted ---------------------------------------


def test_controls_a_good_token_reaches_every_endpoint(ctx: Ctx, standin: Any) -> None:
    """Without this the matrix could pass against an API that refuses everything."""
    for token in (ctx.credentials.token, ctx.valid(), token_issue(customer=ctx.customer)):
        for headers in header_forms(token):
            assert call("get", f"/link/status/{ctx.workflow_id}", headers).status_code == 200
            assert call("get", f"/patient/{ctx.patient_id}", headers).status_code == 200
    post = call("post", "/link", {"customer-token": ctx.valid()})
    assert post.status_code == 202, post.content
    delete = call("delete", f"/link/{ctx.patient_id}", {"Authorization": f"Bearer {ctx.valid()}"})
    assert delete.status_code == 200, delete.content


@pytest.mark.parametrize(
    "authorization",
    ["bearer {}", "BEARER {}", "Bearer   {}", "Bearer {}  "],
    ids=["lower-case scheme", "upper-case scheme", "extra spaces", "trailing spaces"],
)
def test_controls_bearer_syntax_that_rfcs_allow(ctx: Ctx, authorization: str) -> None:
    """The auth scheme is case-insensitive (RFC 9110 11.1) and RFC 6750 allows 1*SP before the
    token; HTTP strips trailing whitespace from field values. Refusing these would be wrong."""
    headers = {"Authorization": authorization.format(ctx.credentials.token)}
    assert call("get", f"/link/status/{ctx.workflow_id}", headers).status_code == 200


def test_controls_both_headers_with_the_same_token(ctx: Ctx) -> None:
    headers = {
        "customer-token": ctx.credentials.token,
        "Authorization": f"Bearer {ctx.credentials.token}",
    }
    assert call("get", f"/link/status/{ctx.workflow_id}", headers).status_code == 200


def test_controls_the_refused_time_claims_are_only_just_refused(ctx: Ctx) -> None:
    """`exp` a minute ahead and `nbf`/`iat` now are fine: the time cases fail for their value."""
    now = int(time.time())
    token = ctx.signed(nbf=now, iat=now, exp=now + 60)
    assert (
        call("get", f"/link/status/{ctx.workflow_id}", {"customer-token": token}).status_code == 200
    )


def test_controls_the_other_customer_token_works_on_its_own(ctx: Ctx) -> None:
    """The `both headers` case is refused for disagreeing, not because the other token is bad."""
    response = call("get", f"/link/status/{uuid.uuid4()}", {"customer-token": ctx.other.token})
    assert response.status_code == 404


# --- the HMAC key is checked once per key (merchant/services.py) ----------------------------------


def test_hs256_is_the_key_caching_algorithm_and_tokens_still_verify() -> None:
    assert isinstance(jwt.get_algorithm_by_name("HS256"), _HMACKeyCheckedOnce)
    customer = new_customer().customer
    assert token_verify(token=token_issue(customer=customer)).id == customer.id
    # Another key's signature is still refused: the cache holds keys, not verdicts.
    other = jwt.encode(
        {"sub": str(customer.id)}, "another-key-of-enough-length-32b", algorithm="HS256"
    )
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(other, settings.TOKEN_SIGNING_KEY, algorithms=["HS256"])


@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_a_key_pyjwt_refuses_is_refused_every_time(attempt: int) -> None:
    # lru_cache keeps results only: the public key PEM is refused at every call.
    with pytest.raises(jwt.InvalidKeyError):
        jwt.encode({"sub": "x"}, RSA_PUBLIC_PEM, algorithm="HS256")
