"""POST /link/batch and GET /link/batch/<batch-id>."""

from typing import Any

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from linking import services
from linking.apis.common import (
    IDEMPOTENCY_KEY_HEADER,
    idempotency_key_checked,
    path_id,
    refusal_problem,
)
from linking.selectors import (
    link_batch_status,
)
from linking.serializers.batch import (
    LinkBatchAcceptedSerializer,
    LinkBatchInputSerializer,
    LinkBatchStatusSerializer,
)
from linking.serializers.links import (
    LinkCreateInputSerializer,
)
from merchant.auth import request_customer
from merchant.parsers import BatchJSONParser
from merchant.problems import Problem, problem_of
from merchant.schema import problem_responses


class LinkBatchCreateApi(APIView):
    throttle_scope = "link-batch"  # merchant/throttling.py: batches, in a budget of their own
    parser_classes = [BatchJSONParser]

    @extend_schema(
        operation_id="link_batch_create",
        summary="Ask for many customer patients to be linked at once",
        description="Each item of `requests` is exactly a POST /link: the same validation, "
        "the same refusals, its own `idempotency-key` (a replay answers its first workflow), "
        "the same workflow and webhooks. A refused item is answered with its problem and never "
        "refuses the others; every accepted item is durable before the 202 (one transaction). "
        "At most LINK_BATCH_MAX_ITEMS (1000) items. The batch's own Idempotency-Key replays "
        "the whole answer. GET /link/batch/{batch_id} reports the items' progress.",
        parameters=[IDEMPOTENCY_KEY_HEADER],
        request=LinkBatchInputSerializer,
        responses={
            (202, "application/json"): OpenApiResponse(
                LinkBatchAcceptedSerializer,
                description="Accepted: every item's workflow-id or problem. Headers: "
                "`Location` (the batch's status URL), `Idempotent-Replayed: true` on a replay.",
            ),
            **problem_responses(400, 401, 409, 413, 415, 422, 503),
        },
    )
    def post(self, request: Request) -> Response:
        key = idempotency_key_checked(request.headers.get("idempotency-key"))
        envelope = LinkBatchInputSerializer(data=request.data)
        envelope.is_valid(raise_exception=True)
        validator = LinkCreateInputSerializer(context={"customer": request_customer(request)})
        items = [_batch_item(raw, validator) for raw in envelope.validated_data["requests"]]
        try:
            accepted = services.link_accept_batch(
                customer=request_customer(request),
                idempotency_key=key,
                fingerprint=services.request_fingerprint(request.data),
                items=items,
                refusal_problem=lambda exc: problem_of(refusal_problem(exc)),
            )
        except services.LinkRefused as exc:  # the batch's own key: reused, or in flight
            raise refusal_problem(exc) from exc
        return Response(accepted.body, status=accepted.status, headers=accepted.headers)


def _batch_item(
    raw: dict[str, Any], validator: LinkCreateInputSerializer
) -> services.LinkItem | services.BatchRefusal:
    """Validate one batch item as POST /link validates its header and body."""
    body = {name: value for name, value in raw.items() if name != "idempotency-key"}
    try:
        key = idempotency_key_checked(raw.get("idempotency-key"))
        request_data = validator.validate_another(body)
    except (Problem, ValidationError) as exc:
        return services.BatchRefusal(problem=problem_of(exc))
    return services.LinkItem(idempotency_key=key, body=body, request_data=request_data)


class LinkBatchStatusApi(APIView):
    throttle_scope = "read"  # merchant/throttling.py

    @extend_schema(
        operation_id="link_batch_status",
        summary="Read a batch's progress",
        parameters=[path_id("batch_id", "The `batch-id` returned by POST /link/batch.")],
        responses={
            (200, "application/json"): LinkBatchStatusSerializer,
            **problem_responses(401, 404, 503),
        },
    )
    def get(self, request: Request, batch_id: str) -> Response:
        data = link_batch_status(customer=request_customer(request), batch_id=batch_id)
        if data is None:
            raise Problem("not-found")
        return Response(data)
