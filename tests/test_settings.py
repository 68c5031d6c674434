"""Settings that cannot work are refused at start-up, not discovered at the first request."""

import base64
import subprocess
import sys

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
        ({"REVIEW_MIN_SCORE": "0.95"}, "must not exceed AUTO_LINK_SCORE"),
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
