"""GET /link/status/<workflow-id>: own workflow 200, anything else the same 404."""

import uuid

import pytest

from linking.serializers.links import LinkStatusOutputSerializer
from tests.conftest import LinkClient, link_body, not_found_body
from workflows.models import TransitionName, Workflow
from workflows.services import workflow_transition

pytestmark = pytest.mark.django_db


def test_own_workflow(api: LinkClient) -> None:
    workflow_id = api.post_link(link_body()).json()["workflow-id"]
    response = api.status(workflow_id)
    assert response.status_code == 200
    data = response.json()
    assert set(data) == {"workflow-id", "status", "result", "reason", "created-at", "updated-at"}
    assert data["workflow-id"] == workflow_id
    assert data["status"] == "RECEIVED"
    assert data["result"] is None
    assert data["reason"] is None
    workflow = Workflow.objects.get(id=workflow_id)
    assert data["created-at"] == workflow.created_at.isoformat().replace("+00:00", "Z")


def test_status_follows_the_workflow(api: LinkClient) -> None:
    workflow_id = api.post_link(link_body()).json()["workflow-id"]
    workflow = Workflow.objects.get(id=workflow_id)
    for name in ("start", "mark_linked", "complete"):
        workflow = workflow_transition(workflow=workflow, name=name, actor="test")
    data = api.status(workflow_id).json()
    assert (data["status"], data["result"], data["reason"]) == ("COMPLETED", "LINKED", None)


def test_failed_workflow_shows_reason(api: LinkClient) -> None:
    workflow_id = api.post_link(link_body()).json()["workflow-id"]
    workflow = Workflow.objects.get(id=workflow_id)
    workflow_transition(workflow=workflow, name="fail", actor="test", reason="internal 400")
    data = api.status(workflow_id).json()
    assert (data["status"], data["result"], data["reason"]) == ("FAILED", None, "internal 400")


def test_foreign_unknown_and_malformed_ids_are_the_same_404(
    api: LinkClient, other_api: LinkClient
) -> None:
    foreign = other_api.post_link(link_body()).json()["workflow-id"]
    bodies = [
        not_found_body(api.status(foreign)),
        not_found_body(api.status(str(uuid.uuid4()))),
        not_found_body(api.status("not-a-uuid")),
        not_found_body(api.status("1' OR '1'='1")),
    ]
    assert all(body == bodies[0] for body in bodies)
    assert bodies[0]["type"] == "/problems/not-found"
    assert other_api.status(foreign).status_code == 200


def test_the_answer_is_what_the_schema_serializer_would_give(api: LinkClient) -> None:
    # The view builds the document by hand (linking/selectors.py) for speed; the serializer that
    # describes it in the OpenAPI document must stay its exact shape, in every state.
    paths: dict[str, tuple[TransitionName, ...]] = {
        "received": (),
        "completed": ("start", "mark_linked", "complete"),
        "no_results": ("start", "mark_no_results", "complete"),
        "failed": ("fail",),
        "searching": ("start",),
        # An operator's review: no candidates shown (tests/e2e/test_customer_review.py has a
        # customer's).
        "review": ("start", "request_review"),
    }
    for state, steps in paths.items():
        workflow_id = api.post_link(link_body(), key=state).json()["workflow-id"]
        workflow = Workflow.objects.get(id=workflow_id)
        for name in steps:
            workflow = workflow_transition(
                workflow=workflow, name=name, actor="test", reason="why it failed"
            )
        workflow.refresh_from_db()
        expected = dict(LinkStatusOutputSerializer(workflow).data)
        assert api.status(workflow_id).json() == expected
