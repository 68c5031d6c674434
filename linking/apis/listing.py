"""GET /links: the customer's links, a page at a time."""

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from linking.selectors import (
    LINKS_LIMIT_DEFAULT,
    LINKS_LIMIT_MAX,
    links_page,
)
from linking.serializers.listing import (
    LINKS_CURSOR_MAX_LENGTH,
    LINKS_CURSOR_PATTERN,
    LinksListOutputSerializer,
    LinksListQuerySerializer,
)
from merchant.auth import request_customer
from merchant.schema import problem_responses


class LinksListApi(APIView):
    throttle_scope = "read"  # merchant/throttling.py

    @extend_schema(
        operation_id="links_list",
        summary="List the customer's links, newest change first",
        description="The customer's patient links (LINKED and DE-LINKED mappings), newest "
        "`updated-at` first, a page at a time. Pages are keyset-paginated: pass `next-cursor` "
        "as `cursor`, with the same `status` and `updated-since`, for the next page; links "
        "made or changed meanwhile sort before the cursor, so later pages neither repeat nor "
        "skip one (they are seen by listing again, e.g. with `updated-since`). A cursor does "
        "not expire. Unknown or repeated query parameters, a cursor that was not given to this "
        "customer or was given with other filters, and a time without a time zone are a 400 "
        "`validation-error` naming the parameter.",
        parameters=[
            OpenApiParameter(
                "status",
                str,
                OpenApiParameter.QUERY,
                enum=["LINKED", "DE-LINKED"],
                description="Only links in this status (both when absent).",
            ),
            OpenApiParameter(
                "updated-since",
                OpenApiTypes.DATETIME,
                OpenApiParameter.QUERY,
                description="Only links whose `updated-at` is at or after this time (RFC 3339, "
                "with `Z` or an offset).",
            ),
            OpenApiParameter(
                "limit",
                {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": LINKS_LIMIT_MAX,
                    "default": LINKS_LIMIT_DEFAULT,
                },
                OpenApiParameter.QUERY,
                description=f"Links per page, 1-{LINKS_LIMIT_MAX} ({LINKS_LIMIT_DEFAULT} by "
                "default).",
            ),
            OpenApiParameter(
                "cursor",
                {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": LINKS_CURSOR_MAX_LENGTH,
                    "pattern": LINKS_CURSOR_PATTERN,
                },
                OpenApiParameter.QUERY,
                description="The `next-cursor` of the previous page (opaque).",
            ),
        ],
        responses={
            (200, "application/json"): LinksListOutputSerializer,
            **problem_responses(400, 401, 503),
        },
    )
    def get(self, request: Request) -> Response:
        customer = request_customer(request)
        query = LinksListQuerySerializer(data=request.query_params, context={"customer": customer})
        query.is_valid(raise_exception=True)
        return Response(links_page(customer=customer, **query.validated_data))
