"""DRF authentication by customer token (`customer-token` header or `Authorization: Bearer`)."""

import logging
from typing import Any

from rest_framework.authentication import BaseAuthentication
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.request import Request

from merchant.context import customer_id
from merchant.models import Customer
from merchant.services import InvalidToken, token_verify

logger = logging.getLogger(__name__)


def _bearer(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip()


def request_customer(request: Request) -> Customer:
    """The customer a request was authenticated as (views behind IsAuthenticated only)."""
    customer = request.user
    if not isinstance(customer, Customer):
        raise AuthenticationFailed()
    return customer


class CustomerTokenAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[Customer, Any] | None:
        token = request.headers.get("customer-token")
        bearer = _bearer(request.headers.get("authorization", ""))
        if token is None and bearer is None:
            return None  # no credentials: IsAuthenticated answers 401
        if token is not None and bearer is not None and token != bearer:
            raise AuthenticationFailed()  # two different credentials: refuse rather than choose
        try:
            customer = token_verify(token=(token if token is not None else bearer) or "")
        except InvalidToken as exc:
            # The reason is for operators; the client always gets the same 401 body.
            logger.info("customer token refused: %s", exc)
            raise AuthenticationFailed() from exc
        customer_id.set(customer.pk)  # log lines of this request carry its id
        return customer, None

    def authenticate_header(self, request: Request) -> str:
        # Makes DRF answer 401 (with WWW-Authenticate) instead of 403.
        return 'Bearer realm="merchant-service"'
