"""The request data (the demographics) at rest: encrypted in PostgreSQL, the key rotated without
downtime, the encryption migration on existing rows, and the purge after retention."""

import datetime as dt
import json
import subprocess
import sys
import threading
import uuid
from io import StringIO
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.contrib import admin
from django.core.management import CommandError, call_command
from django.db import connection, connections, transaction
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from config.celery import app as celery_app
from linking.fields import FERNET_PREFIX, RequestDataUnreadable
from linking.models import LinkRequest
from linking.services import (
    link_process,
    request_data_purge_expired,
    request_data_rotate_key,
)
from linking.tasks import purge_request_data
from merchant.models import Customer
from merchant.services import CustomerCredentials
from tests.conftest import LinkClient, link_body
from tests.processes import child_env
from workflows.models import Status, WebhookDelivery, Workflow
from workflows.services import workflow_mark_failed, workflow_requeue, workflow_transition

KEY_A = "request-data-key-a-0123456789"
KEY_B = "request-data-key-b-0123456789"
KEY_C = "request-data-key-c-0123456789"

DEMOGRAPHICS = {
    "full_name": "Ottoline Vasquez-Brightwater",
    "dob": "1961-02-03",
    "contact": {
        "address": "77 Quillfeather Lane, Mossbury",
        "phone": "+1-555-7788-991",
        "email": "ottoline.vb@example.org",
    },
    "insurance": {"payer": "Heronsgate Mutual", "member_id": "HM-55501234"},
}
SECRETS = [
    "Ottoline",
    "Brightwater",
    "1961-02-03",
    "Quillfeather",
    "Mossbury",
    "7788",
    "ottoline.vb",
    "Heronsgate",
    "HM-55501234",
]


def raw_rows() -> dict[str, str]:
    """request_id -> the column as PostgreSQL stores it, past the ORM."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT request_id::text, data FROM linking_linkrequest")
        return dict(cursor.fetchall())


def stored(customer: Customer, data: Any = None) -> LinkRequest:
    return LinkRequest.objects.create(
        request_id=uuid.uuid4(),
        customer=customer,
        data=data if data is not None else {"patient": {"id": str(uuid.uuid4()), **DEMOGRAPHICS}},
    )


def run(*args: str) -> dict[str, Any]:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    result: dict[str, Any] = json.loads(out.getvalue())
    return result


# --- at rest ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_column_holds_a_token_and_no_demographics(api: LinkClient) -> None:
    body = link_body(**DEMOGRAPHICS)
    workflow_id = api.post_link(body).json()["workflow-id"]
    workflow = Workflow.objects.get(id=workflow_id)

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT data_type FROM information_schema.columns "
            "WHERE table_name = 'linking_linkrequest' AND column_name = 'data'"
        )
        assert cursor.fetchone() == ("text",)
    raw = raw_rows()[str(workflow.request_id)]
    assert raw.startswith(FERNET_PREFIX)
    for secret in [*SECRETS, body["patient"]["id"], "full_name", "insurance", "member_id"]:
        assert secret.lower() not in raw.lower()
    # ... and the application reads exactly what was accepted.
    request = LinkRequest.objects.get(request_id=workflow.request_id)
    assert request.data == {"patient": body["patient"]}


@pytest.mark.django_db
def test_any_json_comes_back_as_it_went_in(credentials: CustomerCredentials) -> None:
    # The library's own EncryptedJSONField would give back "20", "True" and "None" here.
    data = {
        "patient": {"id": str(uuid.uuid4()), "full_name": "Zoë Ångström"},
        "insurance": {"copay": 20, "ratio": 0.25, "active": True, "gap": None, "plans": [1, "b"]},
    }
    request = stored(credentials.customer, data)
    assert LinkRequest.objects.get(pk=request.pk).data == data
    # Long enough that random base64 ciphertext cannot contain it by chance.
    assert "Ångström" not in raw_rows()[str(request.pk)]
    assert "copay" not in raw_rows()[str(request.pk)]


@pytest.mark.django_db
def test_a_row_no_key_opens_is_an_error_not_garbage(
    credentials: CustomerCredentials, settings: Any
) -> None:
    request = stored(credentials.customer)
    settings.SALT_KEY = [KEY_C]
    with pytest.raises(RequestDataUnreadable, match="rotate_request_data_key"):
        LinkRequest.objects.get(pk=request.pk)


def test_admin_has_no_request_data_page() -> None:
    # The only admin view of request data is the review page, which writes an AuditEvent
    # (tests/linking/test_review.py); a LinkRequest admin would need the same.
    assert LinkRequest not in admin.site._registry


# --- key rotation -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_rotation_without_downtime(credentials: CustomerCredentials, settings: Any) -> None:
    settings.SALT_KEY = [KEY_A]
    old = [stored(credentials.customer) for _ in range(5)]
    expected = {r.pk: r.data for r in old}

    # 1. The new key goes first: old rows still read, new rows are written with the new key.
    settings.SALT_KEY = [KEY_B, KEY_A]
    assert {r.pk: r.data for r in LinkRequest.objects.all()} == expected
    new = stored(credentials.customer)
    expected[new.pk] = new.data

    # Without the old key, the old rows are lost: what the command is for.
    settings.SALT_KEY = [KEY_B]
    with pytest.raises(RequestDataUnreadable):
        list(LinkRequest.objects.all())

    # 2. The command re-encrypts the old rows under the new key, in batches.
    settings.SALT_KEY = [KEY_B, KEY_A]
    before = raw_rows()
    assert run("rotate_request_data_key", "--batch-size", "2") == {
        "rotated": 5,
        "current": 1,
        "unreadable": [],
    }
    after = raw_rows()
    assert after[str(new.pk)] == before[str(new.pk)]  # the current one is left alone
    assert all(after[str(r.pk)] != before[str(r.pk)] for r in old)

    # 3. The old key is dropped: everything reads with the new key alone.
    settings.SALT_KEY = [KEY_B]
    assert {r.pk: r.data for r in LinkRequest.objects.all()} == expected

    # Idempotent: a second run changes nothing.
    assert run("rotate_request_data_key") == {"rotated": 0, "current": 6, "unreadable": []}
    assert raw_rows() == after


@pytest.mark.django_db
def test_rotation_reports_rows_no_key_opens_and_leaves_them(
    credentials: CustomerCredentials, settings: Any
) -> None:
    settings.SALT_KEY = [KEY_A]
    lost = stored(credentials.customer)
    settings.SALT_KEY = [KEY_B]
    kept = stored(credentials.customer)
    before = raw_rows()

    out = StringIO()
    with pytest.raises(CommandError, match="1 request"):
        call_command("rotate_request_data_key", stdout=out)
    assert json.loads(out.getvalue()) == {
        "rotated": 0,
        "current": 1,
        "unreadable": [str(lost.pk)],
    }
    assert raw_rows() == before
    assert LinkRequest.objects.get(pk=kept.pk).data == kept.data


@pytest.mark.django_db
def test_rotation_encrypts_rows_written_in_clear(credentials: CustomerCredentials) -> None:
    # What an instance still running the code before the migration writes during the deploy.
    request_id = uuid.uuid4()
    data = {"patient": {"id": str(uuid.uuid4()), **DEMOGRAPHICS}}
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO linking_linkrequest (request_id, customer_id, data, created_at) "
            "VALUES (%s, %s, %s, now())",
            [request_id, credentials.customer.pk, json.dumps(data)],
        )
    assert LinkRequest.objects.get(pk=request_id).data == data  # readable meanwhile

    report = request_data_rotate_key()
    assert (report.rotated, report.current, report.unreadable) == (1, 0, [])
    raw = raw_rows()[str(request_id)]
    assert raw.startswith(FERNET_PREFIX) and "Ottoline" not in raw
    assert LinkRequest.objects.get(pk=request_id).data == data


@pytest.mark.django_db
def test_a_new_secret_key_is_rotated_in_the_same_way(
    credentials: CustomerCredentials, settings: Any
) -> None:
    # The library derives the keys from SECRET_KEY too: its fallbacks keep old rows readable.
    request = stored(credentials.customer)
    old_secret = settings.SECRET_KEY
    settings.SECRET_KEY = "a-brand-new-secret-key-" + "z" * 40
    settings.SECRET_KEY_FALLBACKS = [old_secret]
    assert LinkRequest.objects.get(pk=request.pk).data == request.data
    assert request_data_rotate_key().rotated == 1
    settings.SECRET_KEY_FALLBACKS = []
    assert LinkRequest.objects.get(pk=request.pk).data == request.data


# --- the migration, on a database holding rows in clear ---------------------------------------

BEFORE = [("linking", "0004_search_callbacks")]
ENCRYPTED = [("linking", "0005_request_data_encrypted")]


def migrate(targets: list[tuple[str, str]]) -> Any:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


@pytest.mark.django_db(transaction=True)
def test_the_migration_encrypts_existing_rows_and_reverses(
    credentials: CustomerCredentials,
) -> None:
    leaves = MigrationExecutor(connection).loader.graph.leaf_nodes()
    old_apps = migrate(BEFORE)
    OldLinkRequest = old_apps.get_model("linking", "LinkRequest")
    data = {
        str(uuid.uuid4()): {"patient": {"id": str(uuid.uuid4()), **DEMOGRAPHICS}, "n": i}
        for i in range(3)
    }
    for request_id, document in data.items():
        OldLinkRequest.objects.create(
            request_id=request_id, customer_id=credentials.customer.pk, data=document
        )
    assert "Ottoline" in "".join(raw_rows().values())  # in clear before

    try:
        migrate(ENCRYPTED)
        raw = raw_rows()
        assert set(raw) == set(data)
        assert all(token.startswith(FERNET_PREFIX) for token in raw.values())
        assert not any(secret in "".join(raw.values()) for secret in SECRETS)
        assert {str(r.pk): r.data for r in LinkRequest.objects.all()} == data

        # Backwards: jsonb again, in clear, the same documents.
        migrate(BEFORE)
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT request_id::text, data, pg_typeof(data)::text FROM linking_linkrequest"
            )
            rows = cursor.fetchall()
        assert {request_id: json.loads(document) for request_id, document, _ in rows} == data
        assert {column_type for _, _, column_type in rows} == {"jsonb"}
    finally:
        migrate(leaves)
    assert {str(r.pk): r.data for r in LinkRequest.objects.all()} == data


# --- purge after retention ----------------------------------------------------------------------


def accepted(api: LinkClient, key: str) -> Workflow:
    workflow_id = api.post_link(link_body(**DEMOGRAPHICS), key=key).json()["workflow-id"]
    return Workflow.objects.get(id=workflow_id)


def ended(workflow: Workflow, status: str, *, days_ago: float) -> Workflow:
    """Take `workflow` to `status` and date its last change `days_ago`."""
    workflow = workflow_transition(workflow=workflow, name="start", actor="test")
    if status == Status.COMPLETED:
        workflow = workflow_transition(workflow=workflow, name="mark_no_results", actor="test")
        workflow = workflow_transition(workflow=workflow, name="complete", actor="test")
    elif status == Status.FAILED:
        workflow = workflow_mark_failed(workflow_id=workflow.id, actor="test", reason="test")
    elif status == Status.REVIEW:
        workflow = workflow_transition(workflow=workflow, name="request_review", actor="test")
    Workflow.objects.filter(id=workflow.id).update(
        updated_at=timezone.now() - dt.timedelta(days=days_ago)
    )
    return workflow


def has_data(workflow: Workflow) -> bool:
    return LinkRequest.objects.filter(request_id=workflow.request_id).exists()


@pytest.mark.django_db
def test_purge_takes_only_ended_workflows_past_retention(api: LinkClient, settings: Any) -> None:
    settings.REQUEST_DATA_RETENTION_DAYS = 30
    old_completed = ended(accepted(api, "1"), Status.COMPLETED, days_ago=31)
    old_failed = ended(accepted(api, "2"), Status.FAILED, days_ago=31)
    recent_completed = ended(accepted(api, "3"), Status.COMPLETED, days_ago=29)
    old_review = ended(accepted(api, "4"), Status.REVIEW, days_ago=365)
    old_in_progress = ended(accepted(api, "5"), Status.IN_PROGRESS, days_ago=365)

    assert request_data_purge_expired(batch_size=1) == 2
    assert not has_data(old_completed) and not has_data(old_failed)
    assert has_data(recent_completed) and has_data(old_review) and has_data(old_in_progress)
    # The workflows themselves, and what the customer reads, stay.
    assert Workflow.objects.get(id=old_completed.id).status == Status.COMPLETED
    assert request_data_purge_expired() == 0

    # The beat task and the command run the same service; --days overrides the setting.
    assert purge_request_data() == 0
    assert run("purge_request_data", "--days", "28") == {"purged": 1}
    assert not has_data(recent_completed) and has_data(old_review)


def test_beat_runs_the_purge() -> None:
    entry = django_settings.CELERY_BEAT_SCHEDULE["purge-request-data"]
    assert entry["task"] == "linking.purge_request_data" == purge_request_data.name
    assert entry["task"] in celery_app.tasks
    assert entry["schedule"] == django_settings.REQUEST_DATA_PURGE_INTERVAL_SECONDS


@pytest.mark.django_db
def test_a_requeue_after_the_purge_fails_and_tells_the_customer(api: LinkClient) -> None:
    workflow = ended(accepted(api, "k"), Status.FAILED, days_ago=31)
    assert request_data_purge_expired() == 1

    workflow = workflow_requeue(workflow_id=workflow.id, actor="operator:ops")
    assert workflow.status == Status.RECEIVED
    link_process(workflow_id=workflow.id)  # no internal search is made: nothing to search with

    workflow.refresh_from_db()
    assert (workflow.status, workflow.reason) == (Status.FAILED, "request data missing")
    latest = WebhookDelivery.objects.filter(workflow=workflow).order_by("-created_at").first()
    assert latest is not None
    payload = json.loads(latest.payload)
    assert payload["type"] == "link.failed"
    assert payload["data"]["reason"] == "request data missing"


@pytest.mark.django_db(transaction=True)
def test_purge_skips_a_workflow_an_operator_holds(api: LinkClient) -> None:
    workflow = ended(accepted(api, "k"), Status.FAILED, days_ago=31)
    locked, release = threading.Event(), threading.Event()

    def operator() -> None:
        # Like workflow_requeue: the workflow row locked in a transaction.
        try:
            with transaction.atomic():
                Workflow.objects.select_for_update().get(id=workflow.id)
                locked.set()
                release.wait(10)
        finally:
            connections.close_all()

    thread = threading.Thread(target=operator)
    thread.start()
    try:
        assert locked.wait(10)
        assert request_data_purge_expired() == 0
        assert has_data(workflow)
    finally:
        release.set()
        thread.join(10)
    assert request_data_purge_expired() == 1


# --- settings -----------------------------------------------------------------------------------


def load_settings(**env: str) -> subprocess.CompletedProcess[str]:
    """Production settings in a fresh process; prints the setting named PRINT (SALT_KEY)."""
    child = child_env(DJANGO_SETTINGS_MODULE="config.settings")
    child.pop("REQUEST_DATA_KEYS", None)
    child.update(env)
    name = env.get("PRINT", "SALT_KEY")
    return subprocess.run(
        [sys.executable, "-c", f"from django.conf import settings; print(settings.{name})"],
        env=child,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "outcome"),
    [
        ({"DEBUG": "false"}, "REQUEST_DATA_KEYS is not set"),
        ({"DEBUG": "false", "REQUEST_DATA_KEYS": "short"}, "at least 16 characters"),
        ({"DEBUG": "false", "REQUEST_DATA_KEYS": f"{KEY_B}, {KEY_A}"}, str([KEY_B, KEY_A])),
        ({"DEBUG": "true"}, "['development-only-request-data-key']"),
    ],
)
def test_request_data_keys_setting(env: dict[str, str], outcome: str) -> None:
    result = load_settings(SECRET_KEY="a-production-length-secret-key-" + "x" * 40, **env)
    assert outcome in result.stdout + result.stderr
    assert (result.returncode == 0) == outcome.startswith("[")


def test_secret_key_fallbacks_come_from_the_environment() -> None:
    result = load_settings(
        DEBUG="true",
        SECRET_KEY_FALLBACKS="old-secret-key-one,old-secret-key-two",
        PRINT="SECRET_KEY_FALLBACKS",
    )
    assert result.stdout.strip() == str(["old-secret-key-one", "old-secret-key-two"])
