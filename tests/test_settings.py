"""Settings that cannot work are refused at start-up, not discovered at the first request."""

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import child_env

GOOD_SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


def load_settings(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from django.conf import settings; settings.INSTALLED_APPS"],
        env=child_env(DJANGO_SETTINGS_MODULE="config.settings", DEBUG="true", **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"INTERNAL_SEARCH_ASYNC": "true"}, "INTERNAL_CALLBACK_SECRET"),
        ({"INTERNAL_SEARCH_ASYNC": "true", "INTERNAL_CALLBACK_SECRET": "whsec_"}, "16 bytes"),
        ({"INTERNAL_CALLBACK_SECRET": "not-a-secret"}, "whsec_"),
        ({"INTERNAL_CALLBACK_SECRET": "whsec_%%%"}, "whsec_"),
        ({"REVIEW_MIN_SCORE": "0.95"}, "REVIEW_MIN_SCORE <= AUTO_LINK_SCORE"),
        ({"AUTO_LINK_MARGIN": "1.5"}, "between 0 and 1"),
    ],
)
def test_unworkable_settings_are_refused(env, message):
    result = load_settings(**env)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and message in result.stderr


def test_a_good_async_configuration_loads():
    result = load_settings(INTERNAL_SEARCH_ASYNC="true", INTERNAL_CALLBACK_SECRET=GOOD_SECRET)
    assert result.returncode == 0, result.stderr


# --- production settings --------------------------------------------------------------------

PRODUCTION = {
    "DEBUG": "false",
    "SECRET_KEY": "a-production-length-secret-key-" + "x" * 40,
    "ALLOWED_HOSTS": "merchant.example.com",
    "REQUEST_DATA_KEYS": "a-production-request-data-key-" + "y" * 20,
}


def test_check_deploy_is_clean_with_production_settings():
    env = child_env(DJANGO_SETTINGS_MODULE="config.settings", **PRODUCTION)
    env.pop("SECURE_SSL_REDIRECT", None)  # the production default, not the suite's override
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_production_refuses_to_start_without_a_secret_key():
    env = child_env(DJANGO_SETTINGS_MODULE="config.settings", **PRODUCTION)
    del env["SECRET_KEY"]
    result = subprocess.run(
        [sys.executable, "-c", "from django.conf import settings; settings.INSTALLED_APPS"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "SECRET_KEY is not set" in result.stderr


@pytest.mark.django_db
def test_api_answers_carry_security_headers(api):
    response = api.client.get("/link/status/unknown", HTTP_CUSTOMER_TOKEN=api.token, secure=True)
    assert response.status_code == 404
    assert response["Cache-Control"] == "no-store"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "no-referrer"
    assert response["Strict-Transport-Security"] == ("max-age=31536000; includeSubDomains; preload")
    assert response["Cross-Origin-Opener-Policy"] == "same-origin"


@pytest.mark.django_db
def test_admin_pages_cannot_be_framed(admin_client):
    assert admin_client.get("/admin/")["X-Frame-Options"] == "DENY"


def test_plain_http_is_redirected_to_https(client, settings):
    settings.SECURE_SSL_REDIRECT = True
    response = client.get("/api/schema/")
    assert response.status_code == 301
    assert response["Location"] == "https://testserver/api/schema/"


def test_the_env_example_names_every_setting_read_from_the_environment() -> None:
    root = Path(__file__).resolve().parent.parent
    read = set(
        re.findall(r'env_[a-z_]+\(\s*"([A-Z0-9_]+)"', (root / "config/settings.py").read_text())
    )
    assert len(read) > 50  # the pattern still finds them
    example = (root / ".env.example").read_text()
    listed = set(re.findall(r"^#? ?([A-Z0-9_]+)=", example, flags=re.MULTILINE))
    assert sorted(read - listed) == []


# Every setting config/settings.py derives, as JSON: the .env.example run and a bare run compare.
_DUMP_SETTINGS = """
import json
from django.conf import settings
names = [k for k in dir(settings) if k.isupper() and not k.startswith("_")]
print(json.dumps({k: getattr(settings, k) for k in names}, default=repr))
"""


def _settings_under(args: list[str], env: dict[str, str], tmp_path: Path) -> dict[str, object]:
    result = subprocess.run(
        [*args, sys.executable, "-c", _DUMP_SETTINGS],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def test_make_run_can_use_the_env_example_as_is(tmp_path: Path) -> None:
    """`cp .env.example .env`: honcho, the way `make run` starts every step, reads it and the
    settings come out as config/settings.py's defaults with DEBUG and private webhook hosts on,
    what `make run` sets without a .env file."""
    root = Path(__file__).resolve().parent.parent
    (tmp_path / ".env").write_text((root / ".env.example").read_text())
    # Only what a shell needs: no setting of this suite's environment may leak in.
    bare = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        "PYTHONPATH": str(root),
        "DJANGO_SETTINGS_MODULE": "config.settings",
    }
    honcho = str(Path(sys.executable).with_name("honcho"))
    from_example = _settings_under([honcho, "run"], bare, tmp_path)
    defaults = _settings_under(
        [], {**bare, "DEBUG": "true", "WEBHOOK_ALLOW_PRIVATE_HOSTS": "true"}, tmp_path
    )
    assert from_example["DEBUG"] is True and from_example["WEBHOOK_ALLOW_PRIVATE_HOSTS"] is True
    assert "127.0.0.1" in from_example["ALLOWED_HOSTS"]  # type: ignore[operator]
    assert from_example["SECURE_SSL_REDIRECT"] is False
    differing = sorted(k for k in defaults if from_example.get(k) != defaults[k])
    assert differing == []
