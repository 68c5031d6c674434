"""The internal system's asynchronous search callback (signed as Standard Webhooks)."""

from collections.abc import Mapping

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView
from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook, WebhookVerificationError

from linking import services
from linking.apis.common import (
    CALLBACK_JSON_MAX_DEPTH,
    NO_NUL_PATTERN,
)
from linking.internal_search import parse_bundle
from linking.serializers.search import SearchResultReceiptSerializer, SearchsetBundleSerializer
from merchant.parsers import json_loads_limited
from merchant.problems import Problem
from merchant.schema import problem_responses


class SearchResultCallbackApi(APIView):
    """The internal system's result callback (contract section 2). Not a customer endpoint: it
    is authenticated by its Standard Webhooks signature, not by a customer token."""

    authentication_classes: list[type] = []
    permission_classes: list[type] = []
    throttle_classes: list[type] = []

    @extend_schema(
        operation_id="internal_search_result",
        summary="Receive an asynchronous search result (internal system only)",
        description="The FHIR searchset Bundle of the search job `search_id`, signed with the "
        "Standard Webhooks scheme and `INTERNAL_CALLBACK_SECRET` (headers `webhook-id`, "
        "`webhook-timestamp`, `webhook-signature`). A bad or missing signature gets 401 and "
        "changes nothing. A result for a workflow that has moved on (the sweep polled the job "
        "first) is acknowledged and ignored; an unknown search id gets 404, so the internal "
        "system retries it.",
        tags=["internal"],
        auth=[],
        request={"application/fhir+json": SearchsetBundleSerializer},
        parameters=[
            OpenApiParameter(
                "search_id",
                # The column's length; PostgreSQL stores no NUL.
                {"type": "string", "minLength": 1, "maxLength": 200, "pattern": NO_NUL_PATTERN},
                OpenApiParameter.PATH,
                description="The search job's id, as the internal system named it.",
            ),
            OpenApiParameter(
                "webhook-id",
                {"type": "string", "minLength": 1, "maxLength": 200},
                OpenApiParameter.HEADER,
                required=True,
            ),
            *(
                OpenApiParameter(name, str, OpenApiParameter.HEADER, required=True)
                for name in ("webhook-timestamp", "webhook-signature")
            ),
        ],
        responses={
            (200, "application/json"): SearchResultReceiptSerializer,
            **problem_responses(400, 401, 404, 413),
        },
    )
    def post(self, request: Request, search_id: str) -> Response:
        try:
            # At most DATA_UPLOAD_MAX_MEMORY_SIZE (128 KiB): five Patients fit many times over.
            body = request.body
        except RequestDataTooBig as exc:
            raise Problem("payload-too-large") from exc
        _verify_callback_signature(body, request.headers)
        webhook_id = request.headers["webhook-id"]
        if len(webhook_id) > 200:
            raise Problem("bad-request", "webhook-id is longer than 200 characters.")
        try:
            # Limits of their own: a searchset of full Patient resources nests deeper and has
            # more members than a link request, but not without bound (no RecursionError).
            document = json_loads_limited(
                body.decode("utf-8"), max_depth=CALLBACK_JSON_MAX_DEPTH, max_items=20_000
            )
            candidates = parse_bundle(document)
        except ValueError as exc:  # also JSONDecodeError, UnicodeDecodeError, JSONTooComplex
            raise Problem("bad-request", f"not a searchset Bundle: {exc}") from exc
        try:
            receipt = services.link_search_result(
                search_id=search_id,
                candidates=candidates,
                webhook_id=webhook_id,
            )
        except services.CallbackReplayed as exc:
            raise Problem("unauthorized", "This webhook-id was used for another search.") from exc
        except services.SearchUnknown as exc:
            raise Problem("not-found", "No workflow waits for this search id.") from exc
        return Response(SearchResultReceiptSerializer(receipt).data)


def _verify_callback_signature(body: bytes, headers: Mapping[str, str]) -> None:
    secret = settings.INTERNAL_CALLBACK_SECRET
    try:
        Webhook(secret).verify(body, dict(headers), json_parse=False)
    except EmptyWebhookSecretError as exc:
        raise Problem("unauthorized", "Search callbacks are not enabled.") from exc
    except (WebhookVerificationError, ValueError) as exc:
        # ValueError: a body that is not UTF-8, a signature that is not `v1,<base64>`.
        raise Problem("unauthorized", "Bad or missing webhook signature.") from exc
