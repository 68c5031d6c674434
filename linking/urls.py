from django.urls import path

from linking.apis.batch import LinkBatchCreateApi, LinkBatchStatusApi
from linking.apis.links import LinkCreateApi, LinkDecisionApi, LinkDeleteApi, LinkStatusApi
from linking.apis.listing import LinksListApi
from linking.apis.patients import PatientDetailApi
from linking.apis.search import SearchResultCallbackApi

urlpatterns = [
    path("link", LinkCreateApi.as_view(), name="link-create"),
    # Before link/<...>: "batch" is no workflow or patient id.
    path("link/batch", LinkBatchCreateApi.as_view(), name="link-batch-create"),
    path("link/batch/<str:batch_id>", LinkBatchStatusApi.as_view(), name="link-batch-status"),
    # str, not uuid: a malformed id must get the same 404 body as an unknown one.
    path("link/status/<str:workflow_id>", LinkStatusApi.as_view(), name="link-status"),
    path("link/<str:workflow_id>/decision", LinkDecisionApi.as_view(), name="link-decision"),
    path("link/<str:patient_id>", LinkDeleteApi.as_view(), name="link-delete"),
    path("links", LinksListApi.as_view(), name="links-list"),
    path("patient/<str:patient_id>", PatientDetailApi.as_view(), name="patient-detail"),
    path(
        "internal/search-results/<str:search_id>",
        SearchResultCallbackApi.as_view(),
        name="search-result-callback",
    ),
]
