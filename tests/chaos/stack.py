"""The whole service as processes on 127.0.0.1, for fault injection.

Its own redis-server (own port, no persistence) and, when asked, its own PostgreSQL cluster
(initdb, own port); otherwise a fresh database on the machine's PostgreSQL. With
`broker="rabbitmq"`, a RabbitMQ node of its own (own ports, data in the stack's folder) is the
Celery broker, so that stopping or killing it touches nothing else on the machine; Redis is then
only the cache. gunicorn, Celery workers and beat are processes; the FHIR stand-in and the
webhook receiver are threads of the harness. Every process is started by the stack and stopped
by it, by pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis
import requests
from kombu import Connection

from standin.receiver import ReceiverServer, make_receiver
from standin.server import make_server
from tests.processes import (
    BIN,
    ROOT,
    Process,
    celery_worker_args,
    free_port,
    spawn,
    wait_http,
)

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
PG_BIN = Path(next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin")))))
MACHINE_PG = "postgres://127.0.0.1:5432"
SECRET_KEY = "chaos-only-secret-key-0123456789abcdef0123456789"

# Seconds, not minutes: every recovery path runs within a scenario's deadline.
FAST_SETTINGS = {
    "RECONCILE_INTERVAL_SECONDS": "2",
    "RECONCILE_STALE_AFTER_SECONDS": "6",
    # config/setting_rules.py: heartbeat x 3 <= lease, connect + read timeout < lease.
    "WORKFLOW_HEARTBEAT_SECONDS": "2",
    "WORKFLOW_CLAIM_LEASE_SECONDS": "6",
    "WORKER_SHUTDOWN_GRACE_SECONDS": "4",
    "WORKFLOW_MAX_ATTEMPTS": "10",
    "WEBHOOK_RETRY_SCHEDULE": "1,1,2,2,3,3",
    "WEBHOOK_DISPATCH_INTERVAL_SECONDS": "1",
    "WEBHOOK_TIMEOUT_SECONDS": "2",
    "INTERNAL_SEARCH_READ_TIMEOUT": "3",
    "INTERNAL_SEARCH_CONNECT_TIMEOUT": "1",
    "RETRY_BACKOFF_BASE_SECONDS": "0.2",
    "RETRY_BACKOFF_MAX_SECONDS": "2",
    "CELERY_TASK_SOFT_TIME_LIMIT": "8",
    "CELERY_TASK_TIME_LIMIT": "12",
    "CELERY_VISIBILITY_TIMEOUT": "60",
    "STUCK_REPORT_INTERVAL_SECONDS": "30",
}


@dataclass(frozen=True)
class Customer:
    """A customer of the stack besides its first: its token, and where its webhooks go."""

    name: str
    token: str
    customer_id: str
    webhook_path: str


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs)


@dataclass
class Stack:
    """Start with `start()`, stop with `stop()` (also on failure: use it as a context manager)."""

    name: str
    web_workers: int = 2
    celery_workers: int = 2
    worker_concurrency: int = 8
    worker_pool: str = "threads"
    own_postgres: bool = False
    settings: dict[str, str] = field(default_factory=dict)
    standin_latency_ms: int = 0
    broker: str = "redis"  # or "rabbitmq"
    # Each worker serves its own /metrics (METRICS_WORKER_PORT of its own): worker_counter().
    worker_metrics: bool = False
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="chaos-")))

    def __post_init__(self) -> None:
        self.procs: dict[str, Process] = {}
        self.restarts: dict[str, int] = {}
        self._supervising = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.redis_port = free_port()
        self.redis_proc: Process | None = None
        self.amqp_port = free_port()
        self.rabbitmq_node = f"chaos-{self.name}-{os.getpid()}@localhost"
        self.rabbitmq_proc: Process | None = None
        self.pg_port = free_port() if self.own_postgres else 5432
        self.pg_dir = self.workdir / "pg"
        self.db_name = f"chaos_{self.name}_{os.getpid()}"
        self.web_port = free_port()
        self.standin = make_server("127.0.0.1", 0, latency_ms=self.standin_latency_ms)
        self.receiver: ReceiverServer = make_receiver()
        self.token = ""
        self.customer_id = ""
        # Environment of one process on top of env(): a worker's own metrics port.
        self.proc_env: dict[str, dict[str, str]] = {}
        self.metrics_ports: dict[str, int] = {}

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def database_url(self) -> str:
        return f"postgres://root@127.0.0.1:{self.pg_port}/{self.db_name}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def broker_url(self) -> str:
        if self.broker == "rabbitmq":
            return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}//"
        return self.redis_url

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "config.settings",
                "DEBUG": "false",
                "SECURE_SSL_REDIRECT": "false",  # plain http on 127.0.0.1
                "REQUEST_DATA_KEYS": "chaos-only-request-data-key-0123456789",
                "SECRET_KEY": SECRET_KEY,
                "ALLOWED_HOSTS": "127.0.0.1,localhost",
                "DATABASE_URL": self.database_url,
                "REDIS_URL": self.redis_url,
                "CELERY_BROKER_URL": self.broker_url,
                "WEBHOOK_ALLOW_PRIVATE_HOSTS": "true",
                "INTERNAL_SEARCH_URL": self.standin.base_url,
                "LOG_LEVEL": "INFO",
                "PYTHONUNBUFFERED": "1",
                **FAST_SETTINGS,
                **self.settings,
            }
        )
        return env

    def start(self) -> None:
        for server in (self.standin, self.receiver):
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        self.start_redis()
        if self.broker == "rabbitmq":
            self.start_rabbitmq()
        if self.own_postgres:
            self.init_postgres()
            self.start_postgres()
        self.create_database()
        self.onboard()
        self.start_web()
        for index in range(self.celery_workers):
            self.start_worker(index)
        self.start_beat()
        self._supervising.set()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True)
        self._supervisor.start()

    def _supervise(self) -> None:
        """Restart a worker or beat that exits, as the deployment's process manager does
        (compose `restart: unless-stopped`, systemd `Restart=always`, Kubernetes)."""
        while self._supervising.is_set():
            for name, proc in list(self.procs.items()):
                if name == "web" or proc.expected_down or proc.alive():
                    continue
                if not self._supervising.is_set():
                    return
                self.restarts[name] = self.restarts.get(name, 0) + 1
                self.spawn(name, proc.args)
            time.sleep(0.5)

    def stop(self) -> None:
        self._supervising.clear()
        if self._supervisor is not None:
            self._supervisor.join(5)
        for proc in list(self.procs.values()):
            proc.stop()
        self.stop_redis()
        self.stop_rabbitmq()
        if self.own_postgres and self.pg_dir.exists():
            self.pg_ctl("stop", "-m", "immediate", check=False)
        else:
            self.drop_database()
        for server in (self.standin, self.receiver):
            server.shutdown()
            server.server_close()
        keep = os.environ.get("CHAOS_KEEP_LOGS")
        if keep:  # for a post-mortem: the processes' logs, one folder per scenario
            target = Path(keep) / self.name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(self.workdir, target, ignore=shutil.ignore_patterns("pg"))
        shutil.rmtree(self.workdir, ignore_errors=True)

    # --- processes ---------------------------------------------------------------------------

    def spawn(self, name: str, args: list[str]) -> Process:
        env = {**self.env(), **self.proc_env.get(name, {})}
        proc = spawn(name, args, env=env, log=self.workdir / f"{name}.log")
        self.procs[name] = proc
        return proc

    def start_web(self) -> None:
        self.spawn(
            "web",
            [
                str(BIN / "gunicorn"),
                "config.wsgi",
                "--bind",
                f"127.0.0.1:{self.web_port}",
                "--workers",
                str(self.web_workers),
                "--timeout",
                "30",
                "--graceful-timeout",
                "5",
            ],
        )
        wait_http(f"{self.base_url}/problems/not-found", timeout=30)

    def start_worker(self, index: int, *, node: str = "") -> Process:
        """Worker `index`; `node` names its Celery node when it must differ from the worker it
        replaces while that one still shuts down (a deploy: two nodes of one name would share
        one remote-control queue, which RabbitMQ keeps for one consumer)."""
        name = f"worker{index}"
        if self.worker_metrics:
            port = self.metrics_ports.setdefault(name, free_port())
            self.proc_env[name] = {"METRICS_WORKER_PORT": str(port)}
        proc = self.spawn(
            name,
            celery_worker_args(
                concurrency=self.worker_concurrency,
                name=node or f"chaos{index}",
                pool=self.worker_pool,
            ),
        )
        proc.wait_for("ready.", timeout=30)
        return proc

    def start_beat(self, name: str = "beat") -> Process:
        proc = self.spawn(
            name,
            [str(BIN / "celery"), "-A", "config", "beat", "--loglevel", "INFO", "--pidfile", ""],
        )
        proc.wait_for("beat: Starting", timeout=30)
        return proc

    def worker_counter(self, metric: str, *labels: str) -> dict[str, float]:
        """A sample's value on each worker's own /metrics (worker_metrics=True), summed over
        its series that carry every one of `labels` (`'to="open"'`), by worker; a worker that
        does not answer is left out. A counter lives as long as its process."""
        values: dict[str, float] = {}
        for name, port in self.metrics_ports.items():
            try:
                text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            except requests.RequestException:
                continue
            values[name] = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith((f"{metric} ", f"{metric}{{"))
                and all(label in line for label in labels)
            )
        return values

    def kill(self, name: str, sig: int = signal.SIGKILL, *, group: bool = True) -> None:
        proc = self.procs[name]
        proc.expected_down = True
        if not proc.alive():
            return
        if group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            proc.popen.wait(10)

    # --- Redis -------------------------------------------------------------------------------

    def start_redis(self) -> None:
        self.redis_proc = spawn(
            "redis",
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.redis_port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--maxmemory-policy",
                "noeviction",
            ],
            env=dict(os.environ),
            log=self.workdir / "redis.log",
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                _run(["redis-cli", "-p", str(self.redis_port), "ping"])
                return
            except subprocess.CalledProcessError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def stop_redis(self, sig: int = signal.SIGKILL) -> None:
        if self.redis_proc is not None and self.redis_proc.alive():
            self.redis_proc.popen.send_signal(sig)
            self.redis_proc.popen.wait(10)

    def pause_redis(self) -> None:
        assert self.redis_proc is not None
        self.redis_proc.popen.send_signal(signal.SIGSTOP)

    def resume_redis(self) -> None:
        assert self.redis_proc is not None
        self.redis_proc.popen.send_signal(signal.SIGCONT)

    # --- the queue, whichever the broker ---------------------------------------------------------

    # CELERY_TASK_DEFAULT_QUEUE's default; on RabbitMQ kombu's SimpleQueue declares it as Celery
    # does (durable, with a durable direct exchange of the same name).
    QUEUE = "celery"

    def queued(self) -> int:
        """Messages waiting in the queue (not those a consumer holds)."""
        if self.broker == "rabbitmq":
            with self.amqp() as conn:
                return int(conn.SimpleQueue(self.QUEUE).qsize())
        return int(redis.Redis(port=self.redis_port).llen(self.QUEUE))

    def duplicate_queued(self, copies: Callable[[], int]) -> tuple[int, int]:
        """Put `copies()` more copies of every waiting message in the queue, byte for byte, as
        a broker that redelivers or a publisher that retries would; (before, after)."""
        if self.broker == "rabbitmq":
            return self._duplicate_amqp(copies)
        client = redis.Redis(port=self.redis_port)
        messages = client.lrange(self.QUEUE, 0, -1)
        for message in messages:
            for _ in range(copies()):
                client.lpush(self.QUEUE, message)
        return len(messages), int(client.llen(self.QUEUE))

    def _duplicate_amqp(self, copies: Callable[[], int]) -> tuple[int, int]:
        with self.amqp() as conn:
            queue = conn.SimpleQueue(self.QUEUE)
            taken = []
            while True:
                try:
                    taken.append(queue.get(block=False))
                except queue.Empty:
                    break
            producer = conn.Producer()
            after = 0
            for message in taken:
                for _ in range(1 + copies()):
                    after += 1
                    producer.publish(
                        message.body,
                        exchange="",
                        routing_key=self.QUEUE,
                        headers=message.headers,
                        content_type=message.content_type,
                        content_encoding=message.content_encoding,
                        delivery_mode=2,
                        correlation_id=message.properties.get("correlation_id"),
                        reply_to=message.properties.get("reply_to"),
                    )
                message.ack()
            queue.close()
        return len(taken), after

    # --- RabbitMQ ----------------------------------------------------------------------------

    def amqp(self) -> Connection:
        return Connection(self.broker_url, connect_timeout=3)

    def _rabbitmq_env(self) -> dict[str, str]:
        base = self.workdir / "rabbitmq"
        return {
            **os.environ,
            # Its own Erlang cookie, written there by the node and read there by rabbitmqctl.
            "HOME": str(base),
            "RABBITMQ_NODENAME": self.rabbitmq_node,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.rabbitmq_dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(base / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
        }

    def rabbitmqctl(self, *args: str) -> None:
        _run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.rabbitmq_node, *args],
            env=self._rabbitmq_env(),
        )

    def start_rabbitmq(self) -> None:
        base = self.workdir / "rabbitmq"
        if self.rabbitmq_proc is None:  # first start: the node's files
            self.rabbitmq_dist_port = free_port()
            base.mkdir(parents=True, exist_ok=True)
            (base / "enabled_plugins").write_text("[].\n")
            (base / "rabbitmq.conf").write_text(
                f"listeners.tcp.local = 127.0.0.1:{self.amqp_port}\n"
                # The suite's own clock for held messages: settings.RABBITMQ_CONSUMER_TIMEOUT.
                "consumer_timeout = 1800000\n"
            )
        self.rabbitmq_proc = spawn(
            "rabbitmq",
            [str(RABBITMQ_BIN / "rabbitmq-server")],
            env=self._rabbitmq_env(),
            log=base / "server.log",
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                self.rabbitmqctl("await_startup", "--timeout", "60")
                return
            except subprocess.CalledProcessError:
                # Before the node has registered with epmd, await_startup fails at once.
                if time.monotonic() > deadline or not self.rabbitmq_proc.alive():
                    raise TimeoutError("rabbitmq-server did not start") from None
                time.sleep(0.5)

    def stop_rabbitmq(self) -> None:
        proc = self.rabbitmq_proc
        if proc is not None and proc.alive():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.popen.wait(10)

    def restart_rabbitmq_app(self, down_seconds: float) -> None:
        """The broker stops serving (every connection closed) and comes back: `rabbitmqctl
        stop_app` / `start_app`, as an operator's restart or a node's upgrade does."""
        self.rabbitmqctl("stop_app")
        time.sleep(down_seconds)
        self.rabbitmqctl("start_app")

    # --- PostgreSQL --------------------------------------------------------------------------

    def pg_ctl(self, *args: str, check: bool = True) -> None:
        command = [
            "runuser",
            "-u",
            "postgres",
            "--",
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.pg_dir),
            "-w",
            "-t",
            "30",
            *args,
        ]
        if check:
            _run(command)
        else:
            subprocess.run(command, capture_output=True, check=False)

    def init_postgres(self) -> None:
        self.pg_dir.mkdir(parents=True)
        shutil.chown(self.workdir, "postgres")
        shutil.chown(self.pg_dir, "postgres")
        _run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(PG_BIN / "initdb"),
                "-D",
                str(self.pg_dir),
                "-A",
                "trust",
                "-U",
                "root",
                "--no-sync",
            ]
        )
        with (self.pg_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {self.pg_port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.pg_dir}'\nfsync = on\nmax_connections = 100\n"
            )

    def start_postgres(self) -> None:
        self.pg_ctl("-l", str(self.workdir / "postgres.log"), "start")

    def restart_postgres_immediate(self) -> None:
        self.pg_ctl("-l", str(self.workdir / "postgres.log"), "-m", "immediate", "restart")

    def admin_url(self) -> str:
        return f"postgres://root@127.0.0.1:{self.pg_port}/postgres"

    def create_database(self) -> None:
        with psycopg.connect(self.admin_url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}"')
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        _run(
            [str(BIN / "python"), "manage.py", "migrate", "--noinput", "-v0"],
            cwd=ROOT,
            env=self.env(),
        )

    def drop_database(self) -> None:
        try:
            with psycopg.connect(self.admin_url(), autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        except psycopg.Error:
            pass

    def db(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.database_url, autocommit=True, connect_timeout=5)

    # --- the customer --------------------------------------------------------------------------

    def onboard(self) -> None:
        output = _run(
            [
                str(BIN / "python"),
                "manage.py",
                "onboard_customer",
                "--name",
                "Chaos Health",
                "--webhook-url",
                f"{self.receiver.url}/hooks",
                "--json",
            ],
            cwd=ROOT,
            env=self.env(),
        ).stdout
        credentials = json.loads(output)
        self.token = credentials["token"]
        self.customer_id = credentials["customer_id"]
        self.receiver.state.secret = credentials["webhook_secret"]

    def add_customer(self, name: str, *, weight: int = 1) -> Customer:
        """Onboard another customer, its webhooks to its own path of the same receiver (which
        verifies them with its secret)."""
        path = f"/hooks/{len(self.receiver.state.secrets) + 1}"
        output = _run(
            [
                str(BIN / "python"),
                "manage.py",
                "onboard_customer",
                "--name",
                name,
                "--webhook-url",
                f"{self.receiver.url}{path}",
                "--weight",
                str(weight),
                "--json",
            ],
            cwd=ROOT,
            env=self.env(),
        ).stdout
        credentials = json.loads(output)
        self.receiver.add_secret(path, credentials["webhook_secret"])
        return Customer(name, credentials["token"], credentials["customer_id"], path)

    # --- the internal system (the stand-in) ------------------------------------------------------

    def stop_standin(self) -> None:
        """The internal system goes down: connections to its port are refused (and the open
        ones dropped) until start_standin()."""
        self.standin.shutdown()
        self.standin.server_close()

    def start_standin(self, **options: Any) -> None:
        """A new stand-in on the same port (fresh counters), `options` as make_server's."""
        port = self.standin.server_address[1]
        self.standin = make_server("127.0.0.1", port, latency_ms=self.standin_latency_ms, **options)
        threading.Thread(target=self.standin.serve_forever, args=(0.05,), daemon=True).start()

    def standin_stats(self) -> dict[str, Any]:
        root = self.standin.base_url.removesuffix("/fhir")
        stats: dict[str, Any] = requests.get(f"{root}/_control/stats", timeout=5).json()
        return stats

    def control_standin(self, path: str, body: dict[str, Any]) -> None:
        root = self.standin.base_url.removesuffix("/fhir")
        requests.post(f"{root}/_control/{path}", json=body, timeout=5).raise_for_status()
