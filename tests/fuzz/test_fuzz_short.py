"""The short fuzz run of `make test`: schemathesis with every check against a real gunicorn on the
test database, authenticated as a real customer. `make fuzz` is the long run."""

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from merchant.services import customer_onboard
from tests.fuzz.driver import (
    REGISTERED_WEBHOOK_URL,
    callback_secret,
    run_schemathesis,
    server_settings,
)
from tests.processes import child_env, gunicorn, serving

# Per operation and phase: about 30 s for the whole API. A fixed seed: the suite is repeatable;
# `make fuzz` draws a new one each run.
SHORT_MAX_EXAMPLES = 25
SHORT_SEED = 20240601


@pytest.mark.django_db(transaction=True)
def test_every_operation_survives_every_check(tmp_path: Any) -> None:
    credentials = customer_onboard(name="Fuzz Health", webhook_url=REGISTERED_WEBHOOK_URL)
    secret = callback_secret()
    log = tmp_path / "gunicorn.log"
    with log.open("wb") as out, gunicorn(child_env(**server_settings(secret)), out) as base_url:
        summary = run_schemathesis(
            base_url=base_url,
            token=credentials.token,
            secret=secret,
            max_examples=SHORT_MAX_EXAMPLES,
            seed=SHORT_SEED,
            echo=False,
        )
    report = (
        f"{summary.render()}\n\n{summary.output[-20000:]}\n\ngunicorn:\n{log.read_text()[-5000:]}"
    )
    assert summary.ok, report
    assert summary.operations_selected >= 5, report
    assert summary.operations_tested == summary.operations_selected, report
    assert summary.test_cases > 100, report


# --- the harness itself: a lying API must fail the run -----------------------------------------

_LYING_SCHEMA = {
    "openapi": "3.0.3",
    "info": {"title": "lies", "version": "1"},
    "paths": {
        "/boom": {
            "get": {
                "parameters": [
                    {"name": "q", "in": "query", "required": True, "schema": {"type": "integer"}}
                ],
                "responses": {"200": {"description": "ok"}},
            }
        }
    },
}


class _LyingHandler(BaseHTTPRequestHandler):
    """Serves the schema above, and a 500 for any value of `q`."""

    def do_GET(self) -> None:
        if self.path == "/api/schema/":
            self._send(200, json.dumps(_LYING_SCHEMA).encode())
        else:
            self._send(500, b"<html>boom</html>")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if status == 200 else "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def lying_api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LyingHandler)
    with serving(server):
        yield f"http://127.0.0.1:{server.server_address[1]}"


def test_a_server_error_fails_the_run(lying_api: str) -> None:
    summary = run_schemathesis(
        base_url=lying_api, token="t", secret=callback_secret(), max_examples=5, echo=False
    )
    assert not summary.ok
    assert summary.exit_code != 0
    codes = {failure.code for failure in summary.failures}
    assert "ST101" in codes, summary.render()  # Server error
    assert "FAIL" in summary.render()
