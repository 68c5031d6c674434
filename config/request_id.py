"""X-Request-ID: every request gets an id, echoed in the answer and carried by its log lines.

Hand-written, not django-guid: it either passes the caller's header through unchecked (into log
lines and the response) or accepts only UUIDs, logs an INFO line on every request, never clears
the id after the response, and carries only the request id (the customer and workflow ids of
config/log_context.py would stay ours).
"""

import re
import uuid
from collections.abc import Callable
from typing import Any

from django.core.signals import request_finished
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse

from config.log_context import customer_id, request_id

HEADER = "X-Request-ID"
# A caller's id is kept only when it is a plain token: it ends up in log lines and a header,
# so nothing that could forge a line or smuggle data (spaces, quotes, newlines, 4 KiB).
_SANE = re.compile(r"[A-Za-z0-9._-]{1,128}")


def request_id_middleware(
    get_response: Callable[[HttpRequest], HttpResponse],
) -> Callable[[HttpRequest], HttpResponse]:
    """Takes the incoming X-Request-ID when sane, else makes one (uuid4 hex); sets it for the
    log lines of this request and echoes it in the response. First in MIDDLEWARE, so that every
    answer carries it, redirects and errors of the other middleware included."""

    def middleware(request: HttpRequest) -> HttpResponse:
        incoming = request.META.get("HTTP_X_REQUEST_ID")
        rid = incoming if incoming and _SANE.fullmatch(incoming) else uuid.uuid4().hex
        request_id.set(rid)
        customer_id.set(None)  # authentication sets it further in
        response = get_response(request)
        response[HEADER] = rid
        return response

    return middleware


@receiver(request_finished, dispatch_uid="config.request_id.clear")
def _clear(**_: Any) -> None:
    """The ids stay set until the server has closed the response, not just until the middleware
    returns: Django logs a failed request (django.request) after the whole middleware chain,
    and that line must carry them too. Then the thread forgets them."""
    request_id.set(None)
    customer_id.set(None)
