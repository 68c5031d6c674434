"""The ops console: the dashboard's figures and lists, and every admin page an operator can open
renders."""

import datetime as dt
import uuid

import pytest
from django.contrib import admin
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import NoReverseMatch, reverse
from django.utils import timezone

from tests.conftest import LinkClient, link_body
from workflows import breaker
from workflows.models import DeliveryStatus, WebhookDelivery, Workflow
from workflows.services import workflow_finish, workflow_transition

pytestmark = pytest.mark.django_db

DASHBOARD = "/admin/workflows/workflow/dashboard/"


@pytest.fixture
def operator(db: None) -> Client:
    user = User.objects.create_superuser("ops", "ops@example.org", "a-long-password-1")
    client = Client()
    client.force_login(user)
    return client


def _post(api: LinkClient) -> Workflow:
    workflow_id = api.post_link(link_body(), key=str(uuid.uuid4())).json()["workflow-id"]
    return Workflow.objects.get(id=workflow_id)


def _age(workflow: Workflow, seconds: int) -> None:
    Workflow.objects.filter(id=workflow.id).update(
        updated_at=timezone.now() - dt.timedelta(seconds=seconds)
    )


def test_dashboard_shows_each_section(operator: Client, api: LinkClient) -> None:
    fresh = _post(api)
    stuck = _post(api)
    _age(stuck, 2 * 3600)  # RECEIVED for two hours: stuck, in the 1-24 h column
    failed = _post(api)
    workflow_finish(workflow=failed, name="fail", actor="test", reason="internal 400: bad dob")
    review = _post(api)
    for name in ("start", "request_review"):
        review = workflow_transition(
            workflow=review, name=name, actor="test", reason="two candidates too close"
        )
    assert (
        WebhookDelivery.objects.filter(workflow=failed).update(
            status=DeliveryStatus.EXHAUSTED, attempts=9, last_error="HTTP 500"
        )
        == 1
    )

    page = operator.get(DASHBOARD)
    assert page.status_code == 200
    html = page.content.decode()
    context = page.context
    pending = {row["status"]: row for row in context["pending"]}
    assert pending["RECEIVED"]["total"] == 2
    assert pending["RECEIVED"]["ages"] == [1, 0, 0, 1, 0]
    assert pending["REVIEW"]["total"] == 1
    assert context["pending_total"] == 3
    assert {row["status"]: row["total"] for row in context["terminal"]} == {
        "COMPLETED": 0,
        "FAILED": 1,
    }
    assert context["stuck_total"] == 1 and [w.id for w in context["stuck"]] == [stuck.id]
    assert [w.id for w in context["failures"]] == [failed.id]
    assert "internal 400: bad dob" in html
    assert [e["exhausted"] for e in context["failing_endpoints"]] == [1]
    assert context["reviews_total"] == 1 and "two candidates too close" in html
    # Every workflow listed links to its page (the timeline and the actions).
    for workflow in (stuck, failed):
        assert reverse("admin:workflows_workflow_change", args=[workflow.pk]) in html
    assert reverse("admin:linking_linkreview_change", args=[review.pk]) in html
    assert str(fresh.pk) not in html  # fresh and pending: counted, not listed
    assert "?stuck=yes" in html and "status__exact=FAILED" in html


def test_dashboard_carries_no_patient_data(operator: Client, api: LinkClient) -> None:
    body = link_body(full_name="Canary Zebediah Quux", dob="1911-11-11")
    workflow_id = api.post_link(body, key="canary").json()["workflow-id"]
    workflow = Workflow.objects.get(id=workflow_id)
    workflow_transition(workflow=workflow, name="fail", actor="test", reason="internal 400")
    html = operator.get(DASHBOARD).content.decode()
    assert workflow_id in html
    assert "Zebediah" not in html and "1911-11-11" not in html
    assert body["patient"]["id"] not in html


def test_admin_home_links_the_dashboard(operator: Client) -> None:
    html = operator.get("/admin/").content.decode()
    assert DASHBOARD in html


def test_dashboard_needs_the_view_permission(db: None) -> None:
    assert Client().get(DASHBOARD).status_code == 302  # to the login page
    user = User.objects.create_user("clerk", password="a-long-password-1", is_staff=True)
    client = Client()
    client.force_login(user)
    assert client.get(DASHBOARD).status_code == 403
    assert DASHBOARD not in client.get("/admin/").content.decode()
    user.user_permissions.add(Permission.objects.get(codename="view_workflow"))
    assert client.get(DASHBOARD).status_code == 200


def test_every_admin_page_renders_for_an_operator(operator: Client, api: LinkClient) -> None:
    # Data behind every page: a workflow that failed (timeline, webhook delivery), one in review.
    failed = _post(api)
    workflow_finish(workflow=failed, name="fail", actor="test", reason="internal 400")
    review = _post(api)
    for name in ("start", "request_review"):
        review = workflow_transition(workflow=review, name=name, actor="test", reason="close")
    changed: set[str] = set()
    for model, model_admin in admin.site._registry.items():
        info = (model._meta.app_label, model._meta.model_name)
        changelist = operator.get(reverse("admin:{}_{}_changelist".format(*info)))
        assert changelist.status_code == 200, info
        first = model_admin.get_queryset(changelist.wsgi_request).first()
        if first is not None:
            change = operator.get(reverse("admin:{}_{}_change".format(*info), args=[first.pk]))
            assert change.status_code == 200, info
            changed.add(model._meta.label)
        if model_admin.has_add_permission(changelist.wsgi_request):
            try:
                add = reverse("admin:{}_{}_add".format(*info))
            except NoReverseMatch:
                continue
            assert operator.get(add).status_code == 200, info
    assert operator.get(DASHBOARD).status_code == 200
    # The ops pages were opened with a row behind them, not just as empty lists.
    assert {
        "workflows.Workflow",
        "workflows.WebhookDelivery",
        "linking.LinkReview",
        "linking.IdempotencyRecord",
        "merchant.Customer",
    } <= changed


def test_dashboard_shows_the_schedule(operator: Client, api: LinkClient) -> None:
    for _ in range(3):
        _post(api)  # due, nothing leads in this test: they wait their turn
    later = _post(api)
    Workflow.objects.filter(id=later.id).update(due_at=timezone.now() + dt.timedelta(minutes=5))
    breaker.breaker_report(successes=0, failures=100)

    page = operator.get(DASHBOARD).content.decode()

    section = page[page.index('id="schedule"') : page.index('id="stuck"')]
    assert "circuit breaker open since" in section
    assert '<td>due now (waiting their turn)</td><td class="dash-num">3</td>' in section
    assert '<td>due later (retries in their backoff)</td><td class="dash-num">1</td>' in section
    assert 'Acme Health</td><td class="dash-num">3</td>' in section
