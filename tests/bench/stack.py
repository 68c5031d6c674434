"""The stack `make bench` measures, as in production but on 127.0.0.1: gunicorn (sync workers,
2 x cores + 1), Celery workers and beat as the Procfile starts them, a redis-server of its own, a
fresh database on the machine's PostgreSQL, the FHIR stand-in answering after a set latency and a
customer's webhook receiver, each its own process. Everything is started here and stopped here,
by process group, and the database dropped, whatever happens."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis
import requests

from tests.processes import (
    BIN,
    ROOT,
    Process,
    ProcessFailed,
    free_port,
    fresh_database,
    redis_server,
    spawn,
)

CORES = os.cpu_count() or 1
# config/yardstick.py's route (not imported: the harness runs without Django settings).
YARDSTICK_PATH = "_bench/yardstick"
MACHINE_DATABASE_URL = "postgres://127.0.0.1:5432/merchant"

# What the processes inherit from the caller's environment: nothing that is a setting. The
# figures must not depend on what happens to be exported in the shell that runs the benchmark
# (`--set NAME=VALUE` is the way to try a setting).
_INHERITED = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")

# Production settings (config/settings.py's defaults for everything else), except what a
# benchmark on one machine needs.
PRODUCTION_LIKE = {
    "DJANGO_SETTINGS_MODULE": "config.settings",
    "DEBUG": "false",
    "SECRET_KEY": "bench-only-secret-key-0123456789abcdef0123456789abcdef",
    "REQUEST_DATA_KEYS": "bench-only-request-data-key-0123456789",
    "ALLOWED_HOSTS": "127.0.0.1",
    # Plain http on 127.0.0.1: in production TLS ends at the proxy in front.
    "SECURE_SSL_REDIRECT": "false",
    # Persistent connections: each gunicorn worker keeps its own through the whole run.
    "DATABASE_CONN_MAX_AGE": "600",
    # One customer sends everything: its per-customer limits would measure the 429 path
    # (an empty rate turns a limit off, config/settings.py).
    "RATE_LIMIT_LINK_CREATE": "",
    "RATE_LIMIT_LINK_BATCH": "",
    "RATE_LIMIT_READ": "",
    # The webhook receiver is on 127.0.0.1, over http.
    "WEBHOOK_ALLOW_PRIVATE_HOSTS": "true",
    "BENCH_YARDSTICK": "true",
    "PYTHONUNBUFFERED": "1",
}


class StackFailed(ProcessFailed):
    pass


def procfile_command(name: str) -> list[str]:
    """A process's command line as the Procfile has it, with .venv's binaries."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        key, sep, command = line.partition(":")
        if sep and key.strip() == name:
            args = shlex.split(command)
            if args[0].startswith(".venv/bin/"):
                args[0] = str(BIN / Path(args[0]).name)
            return args
    raise StackFailed(f"no {name!r} process in the Procfile")


def with_option(args: list[str], option: str, value: str) -> list[str]:
    """`args` with `option value` set: replaced where present (`--opt v` or `--opt=v`), else
    appended."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == option:
            skip = True
            continue
        if arg.startswith(option + "="):
            continue
        out.append(arg)
    return [*out, option, value]


@dataclass(frozen=True)
class Customer:
    """A customer of the stack: what its requests carry, and where its webhooks go."""

    name: str
    customer_id: str
    token: str
    receiver_url: str


@dataclass
class BenchStack:
    """`with BenchStack(...) as stack:` starts redis, the database, the stand-in, the receiver
    and gunicorn; `start_consumers()` / `stop_consumers()` the Celery workers and beat,
    `start_dispatcher()` / `stop_dispatcher()` a dispatcher on its own."""

    web_workers: int = 2 * CORES + 1
    celery_workers: int = CORES
    standin_latency_ms: int = 50
    settings: dict[str, str] = field(default_factory=dict)
    keep_logs: Path | None = None

    def __post_init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-"))
        self.processes: dict[str, Process] = {}
        self.worker_metrics_ports: list[int] = []
        self.database_url = ""
        self.redis_url = ""
        self.standin_url = ""
        self.receiver_url = ""
        self.base_url = ""
        self.token = ""
        self.customer_id = ""
        self._stack = ExitStack()
        self._web = ExitStack()
        self._consumers = ExitStack()
        self._dispatcher = ExitStack()

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> BenchStack:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process (consumers, web, then the rest), drop the database, stop Redis,
        remove the working directory: each step runs even if an earlier one failed."""
        with ExitStack() as everything:  # last in, first out
            everything.callback(shutil.rmtree, self.workdir, ignore_errors=True)
            if self.keep_logs is not None:
                everything.callback(
                    shutil.copytree, self.workdir, self.keep_logs, dirs_exist_ok=True
                )
            everything.push(self._stack)
            everything.push(self._web)
            everything.push(self._dispatcher)
            everything.push(self._consumers)

    def _start(self) -> None:
        self.redis_url = self._stack.enter_context(redis_server(self.workdir))
        admin_url = os.environ.get("DATABASE_URL", MACHINE_DATABASE_URL)
        self.database_url = self._stack.enter_context(
            fresh_database(admin_url, prefix="merchant_bench")
        )
        self.manage("migrate", "--noinput", "-v0")
        self._start_standin()
        customer = self.onboard("Bench Health", receiver="receiver")
        self.receiver_url = customer.receiver_url
        self.token = customer.token
        self.customer_id = customer.customer_id
        self.start_web()

    def onboard(self, name: str, *, receiver: str, weight: int = 1) -> Customer:
        """A customer onboarded as an operator does it (`manage.py onboard_customer`), its
        webhooks going to a receiver of its own (the process named `receiver`, started here and
        stopped with the stack) that verifies their signatures with its secret."""
        port = free_port()
        receiver_url = f"http://127.0.0.1:{port}"
        credentials = json.loads(
            self.manage(
                "onboard_customer",
                "--name",
                name,
                "--webhook-url",
                f"{receiver_url}/hooks",
                "--weight",
                str(weight),
                "--json",
            )
        )
        self._start_receiver(receiver, port, credentials["webhook_secret"])
        return Customer(
            name=name,
            customer_id=credentials["customer_id"],
            token=credentials["token"],
            receiver_url=receiver_url,
        )

    # --- environment and commands --------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k in _INHERITED}
        env.update(PRODUCTION_LIKE)
        env.update(
            {
                "DATABASE_URL": self.database_url,
                "REDIS_URL": self.redis_url,
                "CELERY_BROKER_URL": self.redis_url,
                "INTERNAL_SEARCH_URL": self.standin_url,
            }
        )
        env.update(self.settings)
        return env

    def manage(self, *args: str) -> str:
        done = subprocess.run(
            self.manage_args(*args),
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise StackFailed(f"manage.py {args[0]} failed:\n{done.stderr[-3000:]}")
        return done.stdout

    def python(self, code: str, *, timeout: float = 600) -> str:
        """Run a Python snippet in a process with the stack's settings; its stdout."""
        done = subprocess.run(
            [str(BIN / "python"), "-c", code],
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise StackFailed(f"snippet failed:\n{done.stderr[-3000:]}")
        return done.stdout

    def db(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.database_url, autocommit=True, connect_timeout=5)

    def redis_pid(self) -> int:
        info: dict[str, Any] = redis.Redis.from_url(self.redis_url).info("server")
        return int(info["process_id"])

    def _spawn(
        self, stack: ExitStack, name: str, args: list[str], settings: dict[str, str] | None = None
    ) -> Process:
        env = {**self.env(), **(settings or {})}
        log = self.workdir / f"{name}.log"
        if log.exists():
            # Started again (the consumers of each end-to-end run): its earlier run's log is
            # kept aside, so that waiting for "ready." reads this run's, not the last one's.
            earlier = 1
            while (self.workdir / f"{name}.{earlier}.log").exists():
                earlier += 1
            log.rename(self.workdir / f"{name}.{earlier}.log")
        process = spawn(name, args, env=env, log=log)
        stack.callback(process.stop)
        self.processes[name] = process
        return process

    # --- the processes -------------------------------------------------------------------------

    def _start_standin(self) -> None:
        port = free_port()
        self.standin_url = f"http://127.0.0.1:{port}/fhir"
        args = [str(BIN / "python"), "-m", "standin", "--host", "127.0.0.1", "--port", str(port)]
        args += ["--latency-ms", str(self.standin_latency_ms)]
        self._spawn(self._stack, "standin", args).wait_for("standin listening")

    def _start_receiver(self, name: str, port: int, secret: str) -> None:
        args = [str(BIN / "python"), "-m", "standin.receiver", "--host", "127.0.0.1"]
        args += ["--port", str(port), "--secret", secret]
        self._spawn(self._stack, name, args).wait_for("receiver listening")

    def start_web(self) -> None:
        port = free_port()
        args = procfile_command("web")
        args = with_option(args, "--bind", f"127.0.0.1:{port}")
        args = with_option(args, "--workers", str(self.web_workers))
        args = with_option(args, "--worker-class", "sync")
        web = self._spawn(self._web, "web", args)
        self.base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        # Every worker booted and the yardstick routed (BENCH_YARDSTICK took effect).
        while True:
            booted = web.log.read_text(errors="replace").count("Booting worker")
            try:
                answer = requests.get(f"{self.base_url}/{YARDSTICK_PATH}", timeout=5)
                if booted >= self.web_workers and answer.status_code == 200:
                    return
            except requests.RequestException:
                pass
            if not web.alive() or time.monotonic() > deadline:
                raise StackFailed(f"gunicorn did not start:\n{web.tail()}")
            time.sleep(0.1)

    def stop_web(self) -> None:
        self._web.close()

    def start_consumers(
        self, *, celery_workers: int | None = None, settings: dict[str, str] | None = None
    ) -> list[Process]:
        """The Celery workers and beat, each as the Procfile starts it (`celery_workers` of
        them, with these settings on top of the stack's: the scaling runs)."""
        # Each worker serves its metrics on a port of its own: the stage reads the heartbeats'
        # cost from them (tests/bench/stages.py, heartbeat_cost).
        count = celery_workers or self.celery_workers
        self.worker_metrics_ports = [free_port() for _ in range(count)]
        workers = [
            self._spawn(
                self._consumers,
                f"worker{index}",
                [*procfile_command("worker"), "-n", f"bench{index}@%h"],
                {**(settings or {}), "METRICS_WORKER_PORT": str(port)},
            )
            for index, port in enumerate(self.worker_metrics_ports)
        ]
        # No pid file: it would land in the repository and clash with a `make run` beat.
        beat = self._spawn(
            self._consumers,
            "beat",
            with_option(procfile_command("beat"), "--pidfile", ""),
            settings,
        )
        for worker in workers:
            worker.wait_for("ready.")
        beat.wait_for("beat: Starting")
        return workers

    def stop_consumers(self) -> None:
        self._consumers.close()

    def start_dispatcher(self) -> Process:
        """The dispatcher on its own (`manage.py dispatch`), for the stages without Celery
        workers (each worker runs one): the ack path's messages are published by it."""
        dispatcher = self._spawn(self._dispatcher, "dispatcher", self.manage_args("dispatch"))
        dispatcher.wait_for("dispatcher leading", timeout=30)
        return dispatcher

    def stop_dispatcher(self) -> None:
        self._dispatcher.close()
        self.processes.pop("dispatcher", None)

    def manage_args(self, *args: str) -> list[str]:
        return [str(BIN / "python"), "manage.py", *args]

    def web_group(self) -> int:
        return self.processes["web"].pid

    def web_worker_pids(self) -> list[int]:
        from tests.bench.procstat import group_pids

        master = self.web_group()
        return [pid for pid in group_pids(master) if pid != master]
