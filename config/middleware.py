"""Response headers every answer of a patient-data service carries."""

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse


def no_store(
    get_response: Callable[[HttpRequest], HttpResponse],
) -> Callable[[HttpRequest], HttpResponse]:
    """`Cache-Control: no-store` unless a view chose otherwise: answers may carry patient data
    (GET /patient) or tokens (admin), and no proxy or browser cache should keep them. Static
    files (WhiteNoise, before this in the chain for its own paths) keep their long caching."""

    def middleware(request: HttpRequest) -> HttpResponse:
        response = get_response(request)
        if not response.has_header("Cache-Control"):
            response["Cache-Control"] = "no-store"
        return response

    return middleware
