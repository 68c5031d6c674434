"""The container files (docker/): the compose file as compose itself resolves it, the entrypoint
run for real against the local PostgreSQL and a redis-server of its own (no Docker engine here:
the roles run as plain processes with the virtualenv on PATH), and the Dockerfile's text (it
cannot be built here)."""

import base64
import datetime as dt
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
import yaml
from django.conf import settings
from standardwebhooks.webhooks import Webhook

from tests import processes
from tests.processes import (
    BIN,
    ROOT,
    free_port,
    fresh_database,
    redis_server,
    running,
    wait_for_text,
    wait_http,
)

DOCKER = ROOT / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
LONG_RUNNING = {"postgres", "redis", "web", "worker", "beat", "standin", "receiver", "nginx"}
APP_ROLES = {"web", "worker", "beat"}


# --- docker/compose.yaml, resolved by compose -------------------------------------------------


def compose_command() -> list[str]:
    """Compose v2 (`docker compose`) when the plugin is there, else v1 (`docker-compose`, the
    one Debian packages; `make compose` installs it). Neither needs an engine for `config`."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode:
        docker = None
    if docker:
        return [docker, "compose"]
    if legacy := shutil.which("docker-compose"):
        return [legacy]
    pytest.fail("no compose CLI: `make compose` installs Debian's docker-compose")


@pytest.fixture(scope="module")
def compose_config() -> dict[str, Any]:
    # Only what compose needs: a variable of the developer's shell must not change the result.
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    result = subprocess.run(
        [*compose_command(), "-f", str(DOCKER / "compose.yaml"), "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert isinstance(config, dict)
    return config


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def _option(command: list[str], name: str) -> str | None:
    """The value of `--name value` or `--name=value` in a command line."""
    for index, part in enumerate(command):
        if part == name and index + 1 < len(command):
            return command[index + 1]
        if part.startswith(f"{name}="):
            return part.partition("=")[2]
    return None


def _replicas(service: dict[str, Any]) -> int:
    return int(service.get("deploy", {}).get("replicas") or service.get("scale") or 1)


def test_compose_has_the_services(compose_config):
    services = compose_config["services"]
    assert set(services) == LONG_RUNNING | {"migrate"}
    for name in ("migrate", *APP_ROLES, "standin", "receiver"):
        assert _command(services[name]) == [name], name
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"
    assert _replicas(services["web"]) >= 2
    # Volumes: the database and the broker's queue survive a container's replacement.
    assert "pgdata:/var/lib/postgresql/data" in _volumes(services["postgres"])
    assert "redisdata:/data" in _volumes(services["redis"])


def _volumes(service: dict[str, Any]) -> list[str]:
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):  # compose v2's long form
            out.append(f"{volume.get('source')}:{volume['target']}")
        else:
            out.append(re.sub(r":(rw|ro)$", "", volume))  # v1 spells out the mode
    return out


def test_workers_get_more_than_the_shutdown_grace_to_stop(compose_config, settings):
    # compose's stop_grace_period ("60s", "1m0s"): past it the worker is SIGKILLed, and what it
    # had not handed back waits out a lease.
    period = str(compose_config["services"]["worker"]["stop_grace_period"])
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", period)
    assert parts and period, period
    seconds = int(parts.group(1) or 0) * 60 + float(parts.group(2) or 0)
    assert seconds >= settings.WORKER_SHUTDOWN_GRACE_SECONDS + 30


def test_exactly_one_beat(compose_config):
    services = compose_config["services"]
    beats = [name for name, svc in services.items() if "beat" in _command(svc)]
    assert beats == ["beat"]
    assert _replicas(services["beat"]) == 1
    assert not any("beat" in _command(svc) for name, svc in services.items() if name != "beat")


def test_redis_keeps_the_queue(compose_config):
    command = _command(compose_config["services"]["redis"])
    assert command[0] == "redis-server"
    assert _option(command, "--appendonly") == "yes"
    assert _option(command, "--maxmemory-policy") == "noeviction"


def test_every_long_running_service_has_a_healthcheck(compose_config):
    services = compose_config["services"]
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck")
        assert check and not check.get("disable") and check.get("test"), name
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert services["redis"]["healthcheck"]["test"][1:] == ["redis-cli", "ping"]
    assert "/healthz" in services["web"]["healthcheck"]["test"]
    # The Celery processes answer a ping through the broker under their default node names.
    assert "celery@$$HOSTNAME" in " ".join(services["worker"]["healthcheck"]["test"])
    assert "celerybeat@$$HOSTNAME" in " ".join(services["beat"]["healthcheck"]["test"])


def test_start_order(compose_config):
    services = compose_config["services"]
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in APP_ROLES:
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["redis"]["condition"] == "service_healthy", name
    assert services["nginx"]["depends_on"]["web"]["condition"] == "service_healthy"


def test_app_settings_come_from_the_env_file(compose_config):
    services = compose_config["services"]
    for name in ("migrate", *APP_ROLES):
        env = services[name]["environment"]
        for setting in ("SECRET_KEY", "REQUEST_DATA_KEYS", "ALLOWED_HOSTS", "DATABASE_URL"):
            assert env.get(setting), (name, setting)
        assert (
            env["DATABASE_URL"].startswith("postgres://")
            and "@postgres:5432/" in (env["DATABASE_URL"])
        )
        assert env["REDIS_URL"] == env["CELERY_BROKER_URL"] == "redis://redis:6379/0"
    # The stand-in needs no secret.
    assert "SECRET_KEY" not in (services["standin"].get("environment") or {})


def test_web_does_not_run_as_root(compose_config):
    # compose leaves the image's USER alone unless a service sets `user`.
    for name in ("migrate", *APP_ROLES, "standin", "receiver"):
        user = str(compose_config["services"][name].get("user", dockerfile_user()))
        assert user.split(":")[0] not in ("", "root", "0"), name


def test_the_env_example_passes_djangos_checks():
    """docker/.env.example holds every setting the production settings require (and valid)."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value
    env["DJANGO_SETTINGS_MODULE"] = "config.settings"
    result = subprocess.run(
        [str(BIN / "python"), "manage.py", "check", "--fail-level", "ERROR"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_nginx_conf():
    conf = (DOCKER / "nginx.conf").read_text()
    upstream = re.search(r"upstream merchant_web \{(.*?)\}", conf, re.S)
    assert upstream and "server web:8000" in upstream.group(1)
    assert "proxy_pass http://merchant_web;" in conf
    for header in ("X-Forwarded-For", "X-Forwarded-Proto", "X-Request-ID", "Host"):
        assert re.search(rf"proxy_set_header {header} \$", conf), header
    size = re.search(r"client_max_body_size (\d+)k;", conf)
    assert size and int(size.group(1)) * 1024 == settings.LINK_MAX_BODY_BYTES
    batch = re.search(r"location = /link/batch \{[^}]*client_max_body_size (\d+)k;", conf)
    assert batch and int(batch.group(1)) * 1024 == settings.LINK_BATCH_MAX_BODY_BYTES
    assert "/problems/payload-too-large" in conf
    # The metrics are scraped from the containers, never served to the outside.
    metrics = re.search(r"location = /metrics \{(.*?)\}", conf, re.S)
    assert metrics and "return 404;" in metrics.group(1)


# --- docker/entrypoint.sh, run as plain processes ---------------------------------------------


def _run_entrypoint(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENTRYPOINT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def _celery_ping(node: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The compose healthcheck of the worker and of beat."""
    args = ["celery", "-A", "config", "inspect", "ping", "--destination", node, "--timeout", "10"]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _procfile_options(role: str) -> list[str]:
    """The Procfile line's arguments, less the ones a container sets its own way."""
    line = next(
        ln for ln in (ROOT / "Procfile").read_text().splitlines() if ln.startswith(f"{role}:")
    )
    tokens = line.partition(":")[2].split()[1:]
    options, skip = [], False
    for token in tokens:
        if not skip and token not in ("--bind", "--workers", "--concurrency"):
            options.append(token)
        skip = token in ("--bind", "--workers", "--concurrency")
    return options


def _assert_has_procfile_options(pid: int, role: str) -> None:
    """The process runs with the Procfile's options for the role, in the same order."""
    args = iter(_cmdline(pid).split())
    missing = [option for option in _procfile_options(role) if option not in args]
    assert not missing, (role, missing, _cmdline(pid))


@pytest.fixture
def role_env(tmp_path):
    """The environment of a container, but local: production settings, a fresh database on the
    local PostgreSQL, a redis-server of its own, the virtualenv's commands first on PATH."""
    with (
        redis_server(tmp_path) as redis_url,
        fresh_database(processes.test_database_url(), prefix="docker_entrypoint") as database_url,
    ):
        yield {
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "HOME": os.environ.get("HOME", "/root"),
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "SECRET_KEY": "docker-entrypoint-test-secret-key-0123456789",
            "REQUEST_DATA_KEYS": "docker-entrypoint-test-request-data-key",
            "ALLOWED_HOSTS": "127.0.0.1",
            "SECURE_SSL_REDIRECT": "false",
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "CELERY_BROKER_URL": redis_url,
            "LOG_LEVEL": "INFO",
            "DEPENDENCY_WAIT_SECONDS": "10",
            "PYTHONUNBUFFERED": "1",
        }


def test_entrypoint_passes_other_commands_through(role_env):
    result = _run_entrypoint(
        "python", "-c", "import sys; print(sys.argv[1:])", "a", "b c", env=role_env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['a', 'b c']"


def test_entrypoint_waits_for_dependencies_with_a_timeout(role_env):
    env = {**role_env, "DEPENDENCY_WAIT_SECONDS": "1"}
    env["DATABASE_URL"] = f"postgres://nobody@127.0.0.1:{free_port()}/nothing"
    result = _run_entrypoint("migrate", env=env)
    assert result.returncode != 0
    assert "DATABASE_URL" in result.stderr and "unreachable" in result.stderr
    assert "nobody" not in result.stderr  # no credentials in the message


def test_entrypoint_roles(role_env, tmp_path):
    """migrate, then web answering over HTTP, then a worker and beat answering Celery's ping
    (the compose healthchecks), each the process the script exec'd, stopped by process group."""
    migrate = _run_entrypoint("migrate", env={**role_env, "ENSURE_DATABASE": "true"})
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    assert "exists." in migrate.stdout  # ensure_database ran first
    with psycopg.connect(role_env["DATABASE_URL"]) as conn:
        row = conn.execute("SELECT count(*) FROM django_migrations").fetchone()
        assert row and row[0] > 0
        assert conn.execute("SELECT to_regclass('workflows_workflow')").fetchone() != (None,)

    port = free_port()
    web_env = {**role_env, "PORT": str(port), "WEB_CONCURRENCY": "1"}
    web_log = tmp_path / "web.log"
    with web_log.open("wb") as log, running([str(ENTRYPOINT), "web"], env=web_env, log=log) as web:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/api/schema/", timeout=30)
        assert requests.get(f"{base}/api/schema/", timeout=10).status_code == 200
        # exec: the process started is gunicorn itself, so SIGTERM reaches it.
        assert "gunicorn config.wsgi --config config/gunicorn.py" in _cmdline(web.pid)
        assert f"--bind 0.0.0.0:{port} --workers 1" in _cmdline(web.pid)
        _assert_has_procfile_options(web.pid, "web")
        # The web healthcheck script (the compose check asks for /healthz, absent from a run of
        # the suite on older code; any 200 path shows it works), and its failure.
        check = [str(BIN / "python"), str(DOCKER / "healthcheck.py"), "web"]
        ok = subprocess.run([*check, "/api/schema/"], env=web_env, capture_output=True, text=True)
        assert ok.returncode == 0, ok.stderr
        bad = subprocess.run([*check, "/no-such-path"], env=web_env, capture_output=True, text=True)
        assert bad.returncode == 1 and "HTTP 404" in bad.stderr
    assert web.returncode == 0, web_log.read_text()  # gunicorn's graceful exit on SIGTERM

    host = socket.gethostname()
    worker_log, beat_log = tmp_path / "worker.log", tmp_path / "beat.log"
    celery_env = {**role_env, "WORKER_CONCURRENCY": "2"}
    with (
        worker_log.open("wb") as wlog,
        beat_log.open("wb") as blog,
        running([str(ENTRYPOINT), "worker"], env=celery_env, log=wlog) as worker,
        running([str(ENTRYPOINT), "beat"], env=celery_env, log=blog) as beat,
    ):
        wait_for_text(worker_log, "ready.", timeout=60)
        assert "--concurrency 2" in _cmdline(worker.pid)
        _assert_has_procfile_options(worker.pid, "worker")
        ping = _celery_ping(f"celery@{host}", celery_env)
        assert ping.returncode == 0, ping.stdout + ping.stderr

        wait_for_text(beat_log, "beat pidbox: Connected", timeout=60)
        _assert_has_procfile_options(beat.pid, "beat")
        ping = _celery_ping(f"celerybeat@{host}", celery_env)
        assert ping.returncode == 0, ping.stdout + ping.stderr
    assert worker.returncode == 0, worker_log.read_text()[-2000:]
    assert beat.returncode == 0, beat_log.read_text()[-2000:]


@contextmanager
def _http_role(
    role: str, module: str, env: dict[str, str], port: str, log_path: Path
) -> Iterator[None]:
    """An HTTP role of the entrypoint serving GET /_control/stats on `port`, the process its
    `python -m <module>`, passing the container healthcheck of the same name."""
    with log_path.open("wb") as log, running([str(ENTRYPOINT), role], env=env, log=log) as proc:
        wait_http(f"http://127.0.0.1:{port}/_control/stats")
        assert f"-m {module} --host 0.0.0.0" in _cmdline(proc.pid)
        check = [str(BIN / "python"), str(DOCKER / "healthcheck.py"), role]
        result = subprocess.run(check, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr + log_path.read_text()
        yield


def test_entrypoint_standin(role_env, tmp_path):
    port = str(free_port())
    env = {**role_env, "STANDIN_PORT": port}
    with _http_role("standin", "standin", env, port, tmp_path / "standin.log"):
        pass


def test_entrypoint_receiver(role_env, tmp_path):
    """The demo receiver role: serves on RECEIVER_PORT, passes its healthcheck, and verifies a
    delivery signed with RECEIVER_SECRET (and flags one that is not)."""
    secret = "whsec_" + base64.b64encode(b"r" * 32).decode()
    port = str(free_port())
    env = {**role_env, "RECEIVER_PORT": port, "RECEIVER_SECRET": secret}
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "receiver.log"
    with _http_role("receiver", "standin.receiver", env, port, log_path):
        body, when = '{"type": "link.completed"}', dt.datetime.now(dt.UTC)
        signed = Webhook(secret).sign("msg_1", when, body)
        for msg_id, signature in (("msg_1", signed), ("msg_2", "v1,bm90LWEtc2lnbmF0dXJl")):
            headers = {
                "webhook-id": msg_id,
                "webhook-timestamp": str(int(when.timestamp())),
                "webhook-signature": signature,
            }
            answer = requests.post(f"{base}/hooks", data=body, headers=headers, timeout=5)
            assert answer.status_code == 200
        stats = requests.get(f"{base}/_control/stats", timeout=5).json()
        assert stats == {"deliveries": 2, "aborted": 0}
        wait_for_text(log_path, "msg_2 (BAD SIGNATURE)", timeout=10)
        assert "webhook msg_1 (verified)" in log_path.read_text()


# --- docker/Dockerfile (text: no engine here to build it) -------------------------------------


def _dockerfile() -> str:
    # Continuation lines joined: one instruction per line.
    return re.sub(r"\\\n\s*", " ", (DOCKER / "Dockerfile").read_text())


def dockerfile_user() -> str:
    users = re.findall(r"^USER\s+(\S+)", _dockerfile(), re.M)
    assert users, "the Dockerfile sets no USER"
    return users[-1]


def test_dockerfile_runs_as_a_non_root_user():
    user = dockerfile_user()
    assert user.split(":")[0] not in ("root", "0")
    # The user is created in the final stage, and the USER comes after the last FROM.
    final_stage = _dockerfile().rpartition("\nFROM ")[2]
    assert f"USER {user}" in final_stage
    assert f"--uid {user.split(':')[0]}" in final_stage or user.split(":")[0] in final_stage


def test_dockerfile_installs_the_lock_with_the_pinned_uv():
    text = _dockerfile()
    makefile_uv = re.search(r"^UV_VERSION\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    image_uv = re.search(r"^ARG UV_VERSION=(\S+)", text, re.M)
    assert makefile_uv and image_uv and image_uv.group(1) == makefile_uv.group(1)
    assert 'pip install "uv==${UV_VERSION}"' in text
    syncs = [line for line in text.splitlines() if "uv sync" in line]
    assert syncs and all("--frozen" in line and "--no-dev" in line for line in syncs)
    assert "COPY pyproject.toml uv.lock ./" in text


def test_dockerfile_is_multi_stage_on_python_slim():
    text = _dockerfile()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?", text, re.M)
    assert len(stages) >= 2 and all(image == "${PYTHON_IMAGE}" for image, _ in stages)
    # Only the virtualenv and the app reach the final stage: no uv, no build tools.
    final_stage = text.rpartition("\nFROM ")[2]
    assert "uv " not in final_stage.replace("uv.lock", "")
    assert re.search(r"^COPY --from=build /opt/venv /opt/venv$", final_stage, re.M)
    assert 'ENTRYPOINT ["/app/docker/entrypoint.sh"]' in final_stage


def test_dockerfile_bakes_no_secret_and_collects_static_files():
    text = _dockerfile()
    for instruction in re.findall(r"^(?:ENV|ARG)\s+(.*)$", text, re.M):
        assert not re.search(r"SECRET|PASSWORD|TOKEN|_KEYS?\b", instruction), instruction
    # WhiteNoise serves STATIC_ROOT: collected at build time.
    assert "whitenoise.middleware.WhiteNoiseMiddleware" in settings.MIDDLEWARE
    assert "manage.py collectstatic --noinput" in text
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for pattern in (".env", ".venv", ".git", "docker/.env"):
        assert pattern in ignored, pattern


def test_entrypoint_is_posix_sh():
    text = ENTRYPOINT.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert re.search(r"^set -eu$", text, re.M)
    assert os.access(ENTRYPOINT, os.X_OK)
    shell = shutil.which("dash") or "/bin/sh"
    assert subprocess.run([shell, "-n", str(ENTRYPOINT)]).returncode == 0
    # Every role ends in exec.
    for role in ("web", "worker", "beat", "migrate", "standin"):
        body = re.search(rf"^{role}\)\n(.*?)\n    ;;", text, re.M | re.S)
        assert body and re.search(r"^    exec ", body.group(1), re.M), role
