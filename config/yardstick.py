"""The benchmark's yardstick (`make bench`, docs/performance.md): the cheapest answer this stack
can give, served by the same gunicorn as the API, so every figure is a ratio to it measured in
the same run on the same (shared, noisy) machine.

A bare DRF APIView: no authentication, permission or throttle (each of those touches Redis or
PostgreSQL or at least decodes a token), no body, no I/O. What remains is what every endpoint
pays anyway: WSGI, the middleware chain, DRF's request wrapping and JSON rendering.

Routed only when BENCH_YARDSTICK is on (config/urls.py), off by default: it is not part of the
API and is left out of the OpenAPI document.
"""

from drf_spectacular.utils import extend_schema
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

YARDSTICK_PATH = "_bench/yardstick"


class YardstickApi(APIView):
    authentication_classes = []
    permission_classes = [AllowAny]
    throttle_classes = []

    @extend_schema(exclude=True)
    def get(self, request: Request) -> Response:
        return Response({"ok": True})
