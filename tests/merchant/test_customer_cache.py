"""token_verify's per-process customer cache (CUSTOMER_CACHE_SECONDS): one read per customer and
window, changes made in this process applied at once, other processes' within the window."""

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from merchant import services
from merchant.models import Customer
from merchant.services import (
    CustomerCredentials,
    InvalidToken,
    customer_issue_token,
    customer_revoke_tokens,
    token_verify,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def clock(settings: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """The cache on (5 s), with a clock the test moves."""
    settings.CUSTOMER_CACHE_SECONDS = 5
    now = [1000.0]
    monkeypatch.setattr(services.time, "monotonic", lambda: now[0])
    services._customers.clear()
    yield now
    services._customers.clear()


def _reads(token: str) -> int:
    with CaptureQueriesContext(connection) as queries, contextlib.suppress(InvalidToken):
        token_verify(token=token)
    return sum("merchant_customer" in q["sql"] for q in queries.captured_queries)


def test_one_read_per_window(clock: list[float], credentials: CustomerCredentials) -> None:
    assert _reads(credentials.token) == 1
    assert _reads(credentials.token) == 0
    clock[0] += 4.9
    assert _reads(credentials.token) == 0
    clock[0] += 0.2
    assert _reads(credentials.token) == 1


def test_a_revocation_in_this_process_applies_at_once(
    clock: list[float], credentials: CustomerCredentials
) -> None:
    token_verify(token=credentials.token)
    customer_revoke_tokens(customer_id=credentials.customer.id)
    with pytest.raises(InvalidToken, match="revoked"):
        token_verify(token=credentials.token)
    fresh = customer_issue_token(customer_id=credentials.customer.id)
    assert token_verify(token=fresh.token).id == credentials.customer.id


def test_deactivation_and_deletion_in_this_process_apply_at_once(
    clock: list[float], credentials: CustomerCredentials
) -> None:
    token_verify(token=credentials.token)
    customer = Customer.objects.get(id=credentials.customer.id)
    customer.is_active = False
    customer.save()
    with pytest.raises(InvalidToken, match="inactive"):
        token_verify(token=credentials.token)
    customer.delete()
    with pytest.raises(InvalidToken, match="unknown"):
        token_verify(token=credentials.token)


def test_another_process_change_is_seen_within_the_window(
    clock: list[float], credentials: CustomerCredentials
) -> None:
    token_verify(token=credentials.token)
    # As another process would: no signal reaches this one.
    Customer.objects.filter(id=credentials.customer.id).update(is_active=False)
    token_verify(token=credentials.token)  # still trusted, for at most the window
    clock[0] += 5
    with pytest.raises(InvalidToken, match="inactive"):
        token_verify(token=credentials.token)


def test_zero_reads_every_time(settings: Any, credentials: CustomerCredentials) -> None:
    settings.CUSTOMER_CACHE_SECONDS = 0
    services._customers.clear()
    assert _reads(credentials.token) == 1
    assert _reads(credentials.token) == 1
    assert not services._customers
