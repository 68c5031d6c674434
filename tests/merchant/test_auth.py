"""Customer tokens: every bad token is the same 401 problem, never a 500."""

import base64
import json
import time
import uuid
from typing import Any

import jwt
import pytest
from django.conf import settings
from rest_framework.test import APIClient

from merchant.services import CustomerCredentials, customer_revoke_tokens, token_issue
from tests.conftest import link_body
from workflows.models import Workflow

pytestmark = pytest.mark.django_db


def claims_for(credentials: CustomerCredentials, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": settings.TOKEN_ISSUER,
        "aud": settings.TOKEN_AUDIENCE,
        "sub": str(credentials.customer.id),
        "iat": now,
        "exp": now + 600,
        "ver": credentials.customer.token_version,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def sign(claims: dict[str, Any], key: str | None = None, **kwargs: Any) -> str:
    return jwt.encode(claims, key or settings.TOKEN_SIGNING_KEY, algorithm="HS256", **kwargs)


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def unsigned(claims: dict[str, Any]) -> str:
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


BAD_TOKENS = {
    "malformed": lambda c: "not-a-jwt",
    "bad base64": lambda c: "eyJ!!!.eyJ???.sig",
    "expired": lambda c: sign(
        claims_for(c, iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)
    ),
    "wrong key": lambda c: sign(claims_for(c), key="another-key-that-is-long-enough-for-hs256!"),
    "alg none": lambda c: unsigned(claims_for(c)),
    "wrong audience": lambda c: sign(claims_for(c, aud="someone-else")),
    "wrong issuer": lambda c: sign(claims_for(c, iss="evil-issuer")),
    "issuer prefix": lambda c: sign(claims_for(c, iss=settings.TOKEN_ISSUER + "-evil")),
    "no exp": lambda c: sign(claims_for(c, exp=None)),
    "no sub": lambda c: sign(claims_for(c, sub=None)),
    "sub not a uuid": lambda c: sign(claims_for(c, sub="robert'); drop table")),
    "unknown customer": lambda c: sign(claims_for(c, sub=str(uuid.uuid4()))),
    "no version": lambda c: sign(claims_for(c, ver=None)),
    "version not an int": lambda c: sign(claims_for(c, ver="1")),
    "tampered payload": lambda c: ".".join(
        [
            sign(claims_for(c)).split(".")[0],
            b64(claims_for(c, sub=str(uuid.uuid4()))),
            sign(claims_for(c)).split(".")[2],
        ]
    ),
    "oversized": lambda c: sign(claims_for(c, pad="x" * 5000)),
}


def unauthorized_body(response: Any) -> dict[str, Any]:
    assert response.status_code == 401, response.content
    assert response["Content-Type"] == "application/problem+json"
    assert response["WWW-Authenticate"]
    body: dict[str, Any] = response.json()
    body.pop("instance", None)
    return body


def post_with(headers: dict[str, str]) -> Any:
    return APIClient().post(
        "/link", link_body(), format="json", HTTP_IDEMPOTENCY_KEY="k", headers=headers
    )


@pytest.fixture
def reference_401(db: None) -> dict[str, Any]:
    return unauthorized_body(post_with({}))


def test_missing_token_is_401(reference_401: dict[str, Any]) -> None:
    assert reference_401["type"] == "/problems/unauthorized"
    assert Workflow.objects.count() == 0


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_bad_token_is_the_same_401(
    case: str, credentials: CustomerCredentials, reference_401: dict[str, Any]
) -> None:
    token = BAD_TOKENS[case](credentials)
    assert unauthorized_body(post_with({"customer-token": token})) == reference_401
    assert unauthorized_body(post_with({"Authorization": f"Bearer {token}"})) == reference_401
    assert Workflow.objects.count() == 0


def test_revoked_token_is_401_and_a_new_one_works(
    credentials: CustomerCredentials, reference_401: dict[str, Any]
) -> None:
    customer_revoke_tokens(customer_id=credentials.customer.id)
    assert unauthorized_body(post_with({"customer-token": credentials.token})) == reference_401
    credentials.customer.refresh_from_db()
    fresh = token_issue(customer=credentials.customer)
    assert post_with({"customer-token": fresh}).status_code == 202


def test_inactive_customer_is_401(
    credentials: CustomerCredentials, reference_401: dict[str, Any]
) -> None:
    credentials.customer.is_active = False
    credentials.customer.save()
    assert unauthorized_body(post_with({"customer-token": credentials.token})) == reference_401


def test_two_different_tokens_are_refused(
    credentials: CustomerCredentials,
    other_credentials: CustomerCredentials,
    reference_401: dict[str, Any],
) -> None:
    headers = {
        "customer-token": credentials.token,
        "Authorization": f"Bearer {other_credentials.token}",
    }
    assert unauthorized_body(post_with(headers)) == reference_401


def test_valid_token_in_either_header(credentials: CustomerCredentials) -> None:
    assert post_with({"customer-token": credentials.token}).status_code == 202
    response = APIClient().post(
        "/link",
        link_body(),
        format="json",
        HTTP_IDEMPOTENCY_KEY="k2",
        headers={"Authorization": f"Bearer {credentials.token}"},
    )
    assert response.status_code == 202


def test_status_endpoint_needs_a_token(reference_401: dict[str, Any]) -> None:
    response = APIClient().get(f"/link/status/{uuid.uuid4()}")
    assert unauthorized_body(response) == reference_401


def test_issued_token_carries_the_required_claims(credentials: CustomerCredentials) -> None:
    header = jwt.get_unverified_header(credentials.token)
    claims = jwt.decode(credentials.token, options={"verify_signature": False})
    assert header["alg"] == "HS256"
    assert {"iss", "aud", "sub", "iat", "exp", "ver"} <= set(claims)
    assert claims["sub"] == str(credentials.customer.id)
    assert claims["exp"] - claims["iat"] == settings.TOKEN_TTL_SECONDS
