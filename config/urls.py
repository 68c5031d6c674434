from django.conf import settings
from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from config import health
from config.metrics import metrics_view
from config.yardstick import YARDSTICK_PATH, YardstickApi
from merchant.problems import problem_type_view
from merchant.schema import docs_page

urlpatterns = [
    path("", include("linking.urls")),
    path("problems/<slug:slug>", problem_type_view, name="problem-type"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path(
        "api/docs/", docs_page(SpectacularSwaggerView.as_view(url_name="schema")), name="swagger-ui"
    ),
    path(
        "api/redoc/",
        # Our page: drf-spectacular's loads Google Fonts (merchant/templates/merchant/redoc.html).
        docs_page(
            SpectacularRedocView.as_view(url_name="schema", template_name="merchant/redoc.html")
        ),
        name="redoc",
    ),
    path("admin/", admin.site.urls),
]

if settings.BENCH_YARDSTICK:
    # Benchmark-only (`make bench`): absent from the URLconf, not just refused, when off.
    urlpatterns.append(path(YARDSTICK_PATH, YardstickApi.as_view(), name="bench-yardstick"))

# Load-balancer probes (config/health.py): no authentication, throttle or schema entry.
urlpatterns += [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics_view, name="metrics"),  # config/metrics.py: token or private address
]

handler400 = "merchant.problems.handler400"
handler403 = "merchant.problems.handler403"
handler404 = "merchant.problems.handler404"
handler500 = "merchant.problems.handler500"
