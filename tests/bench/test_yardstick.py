"""The benchmark's yardstick (config/yardstick.py): routed only when BENCH_YARDSTICK is on."""

import importlib
from collections.abc import Iterator

import pytest
from django.test import override_settings
from django.urls import clear_url_caches
from rest_framework.test import APIClient

import config.urls
from config.yardstick import YARDSTICK_PATH
from tests.bench import stack


def _reload_urlconf() -> None:
    importlib.reload(config.urls)
    clear_url_caches()


@pytest.fixture
def yardstick_on() -> Iterator[None]:
    try:
        with override_settings(BENCH_YARDSTICK=True):
            _reload_urlconf()
            yield
    finally:
        # Back to the URLconf the rest of the suite sees, whatever the test did.
        _reload_urlconf()


def test_off_by_default_it_is_not_routed(settings) -> None:
    assert settings.BENCH_YARDSTICK is False
    response = APIClient().get(f"/{YARDSTICK_PATH}")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/problem+json"


@pytest.mark.django_db
def test_on_it_answers_without_any_io(yardstick_on: None, django_assert_num_queries) -> None:
    with django_assert_num_queries(0):
        response = APIClient().get(f"/{YARDSTICK_PATH}")
    assert response.status_code == 200
    assert response.json() == {"ok": True}


@pytest.mark.django_db
def test_on_it_stays_out_of_the_api_schema(yardstick_on: None) -> None:
    schema = APIClient().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    assert not [path for path in schema.json()["paths"] if "_bench" in path]


def test_the_harness_asks_for_the_routed_path() -> None:
    # tests/bench/stack.py keeps its own copy: the harness runs without Django settings.
    assert stack.YARDSTICK_PATH == YARDSTICK_PATH
