"""The ops dashboard in a real browser (headless Chromium, Debian's `chromium` and
`chromium-driver`, installed by `make test`): it loads with its styles, without a console error,
and a screenshot is kept (SCREENSHOT_DIR, default the test's temporary directory)."""

import os
import uuid
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.test import Client
from selenium import webdriver
from selenium.webdriver.common.by import By

from tests.conftest import LinkClient, link_body
from workflows.models import Workflow
from workflows.services import workflow_finish, workflow_transition

pytestmark = pytest.mark.django_db(transaction=True)


def test_dashboard_loads_in_chromium_without_errors(
    live_server: object, browser: webdriver.Chrome, api: LinkClient, tmp_path: Path
) -> None:
    for reason in ("internal 400: bad dob", "attempt limit reached (5 attempts)"):
        workflow_id = api.post_link(link_body(), key=str(uuid.uuid4())).json()["workflow-id"]
        workflow = Workflow.objects.get(id=workflow_id)
        workflow_finish(workflow=workflow, name="fail", actor="test", reason=reason)
    review = Workflow.objects.get(id=api.post_link(link_body(), key="review").json()["workflow-id"])
    for name in ("start", "request_review"):
        review = workflow_transition(workflow=review, name=name, actor="test", reason="close call")

    user = User.objects.create_superuser("ops", "ops@example.org", "a-long-password-1")
    client = Client()
    client.force_login(user)
    base = str(live_server)
    browser.get(f"{base}/admin/login/")  # a page of the site, so that its cookie can be set
    browser.add_cookie({"name": "sessionid", "value": client.cookies["sessionid"].value})
    browser.get(f"{base}/admin/workflows/workflow/dashboard/")

    assert browser.title.startswith("Operations dashboard")
    for section in ("pending", "stuck", "failures", "webhooks", "reviews"):
        assert browser.find_element(By.ID, section).is_displayed(), section
    assert "internal 400: bad dob" in browser.find_element(By.ID, "failures").text
    # The admin's stylesheet applied (a missing static file would leave the default font).
    header = browser.find_element(By.ID, "header")
    assert header.value_of_css_property("background-color") not in ("rgba(0, 0, 0, 0)", "")
    # The browser asks for /favicon.ico on its own; the service has none (an API, not a site).
    errors = [
        entry
        for entry in browser.get_log("browser")
        if entry["level"] == "SEVERE" and "/favicon.ico " not in entry["message"]
    ]
    assert errors == []

    directory = Path(os.environ.get("SCREENSHOT_DIR") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    shot = directory / "ops-dashboard.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
