from django.urls import path

from linking.apis import LinkCreateApi, LinkStatusApi

urlpatterns = [
    path("link", LinkCreateApi.as_view(), name="link-create"),
    # str, not uuid: a malformed id must get the same 404 body as an unknown one.
    path("link/status/<str:workflow_id>", LinkStatusApi.as_view(), name="link-status"),
]
