"""The ops surfaces of the foundation: admin pages render, the beat schedule is wired."""

import pytest
from django.contrib.auth.models import User
from django.test import Client

from config.celery import app
from tests.conftest import LinkClient, link_body
from workflows.models import Workflow
from workflows.services import workflow_transition

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(db: None) -> Client:
    user = User.objects.create_superuser("ops", "ops@example.org", "a-long-password-1")
    client = Client()
    client.force_login(user)
    return client


def test_workflow_admin_lists_filters_searches_and_shows_timeline(
    operator: Client, api: LinkClient
) -> None:
    workflow_id = api.post_link(link_body()).json()["workflow-id"]
    workflow = Workflow.objects.get(id=workflow_id)
    workflow_transition(workflow=workflow, name="start", actor="worker", reason="picked up")

    listing = operator.get("/admin/workflows/workflow/", {"status__exact": "IN_PROGRESS"})
    assert listing.status_code == 200
    assert workflow_id in listing.content.decode()
    assert (
        workflow_id
        not in operator.get(
            "/admin/workflows/workflow/", {"status__exact": "RECEIVED"}
        ).content.decode()
    )
    for term in (workflow_id, str(workflow.request_id), str(workflow.patient_id)):
        found = operator.get("/admin/workflows/workflow/", {"q": term})
        assert workflow_id in found.content.decode(), term

    page = operator.get(f"/admin/workflows/workflow/{workflow_id}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "picked up" in html and "IN_PROGRESS" in html
    # Read-only status: no editable status input on the page.
    assert 'name="status"' not in html


def test_customer_and_idempotency_admin_pages_render(operator: Client, api: LinkClient) -> None:
    api.post_link(link_body())
    for url in ("/admin/merchant/customer/", "/admin/linking/idempotencyrecord/"):
        assert operator.get(url).status_code == 200


def test_admin_requires_login(api: LinkClient) -> None:
    response = Client().get("/admin/workflows/workflow/")
    assert response.status_code == 302


def test_purge_task_is_scheduled_and_registered() -> None:
    app.loader.import_default_modules()  # what a worker and beat do at start-up
    entry = app.conf.beat_schedule["purge-idempotency-records"]
    assert entry["task"] in app.tasks
