"""Django settings, all read from the environment; every one is documented in docs/settings.md."""

import base64
import binascii
import os
from pathlib import Path

import dj_database_url
import django_stubs_ext
from django.core.exceptions import ImproperlyConfigured

from config import setting_rules
from config.env import env_bool, env_float, env_int, env_int_list, env_list, env_str

# Lets the typed generics used in annotations (ModelAdmin[Model], ...) work at run time.
django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DEBUG", False)

_DEV_SECRET_KEY = "django-insecure-development-only-key-never-use-in-production"  # noqa: S105
SECRET_KEY = env_str("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set SECRET_KEY in the environment "
            "(or DEBUG=true for a local development default)."
        )
    SECRET_KEY = _DEV_SECRET_KEY

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"] if DEBUG else [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    # Swagger UI's and ReDoc's files, pinned, served as our static files: the docs render on a
    # network without the public CDN drf-spectacular would otherwise load `@latest` from.
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "merchant",
    "workflows",
    "linking",
]

MIDDLEWARE = [
    # First: every answer carries X-Request-ID (redirects and other middleware's errors too),
    # and every log line of the request its id.
    "config.request_id.request_id_middleware",
    "django.middleware.security.SecurityMiddleware",
    "config.middleware.no_store",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# Admin messages can carry a secret shown once (a rotated webhook secret): kept in the session
# (the database), not in a signed but readable cookie as the default storage may do.
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"
ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- PostgreSQL: the source of truth -------------------------------------------------------------
DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", "postgres://127.0.0.1:5432/merchant"),
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60),
        # Off by default: the check is a `SELECT 1` round trip at the start of every request
        # (11-13% of the ack and status paths' CPU in `make bench`'s profile). Without it, a
        # connection broken by a PostgreSQL restart costs one request per process a 503
        # problem+json (retryable, nothing written) and is then replaced.
        conn_health_checks=env_bool("DATABASE_CONN_HEALTH_CHECKS", False),
    )
}
# A dead or stalled PostgreSQL must turn into a fast 503, not a hung request.
DATABASES["default"].setdefault("OPTIONS", {})
DATABASES["default"]["OPTIONS"].setdefault(
    "connect_timeout", env_int("DATABASE_CONNECT_TIMEOUT", 2, minimum=1)
)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: cache and broker (never the only copy of anything) -----------------------------------
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1},
    }
}

# --- Celery ------------------------------------------------------------------------------------
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
# Two brokers are supported, and some options mean something to one of them only
# (docs/operations.md "Broker: RabbitMQ"). Anything else is refused rather than run with
# untested semantics.
_BROKER_SCHEME = CELERY_BROKER_URL.partition("://")[0].lower()
BROKER_IS_REDIS = _BROKER_SCHEME in {"redis", "rediss"}
BROKER_IS_AMQP = _BROKER_SCHEME in {"amqp", "amqps", "pyamqp"}
if not (BROKER_IS_REDIS or BROKER_IS_AMQP):
    raise ImproperlyConfigured("CELERY_BROKER_URL must be redis://, rediss://, amqp:// or amqps://")
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# The queue every task goes to (a Redis list, or a RabbitMQ queue with a direct exchange of the
# same name). Durable, and messages persistent: on RabbitMQ both survive a broker restart.
# Another name lets two deployments (or test runs) share one broker without taking each
# other's messages; web, workers and beat must agree on it.
CELERY_TASK_DEFAULT_QUEUE = env_str("CELERY_TASK_DEFAULT_QUEUE", "celery")
CELERY_TASK_DEFAULT_DELIVERY_MODE = "persistent"
# The ack path must answer within a bounded time when the broker is down or stalled: a publish
# that fails is logged and left to the reconciliation sweep (the workflow row is already committed).
CELERY_BROKER_CONNECTION_TIMEOUT = 1
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 60, minimum=5)
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 90, minimum=10)
# Redis hands an unacknowledged task to another worker after this long: it must exceed any
# task's hard time limit by far, or a slow task would run twice at once. (Redis only.)
CELERY_VISIBILITY_TIMEOUT = env_int("CELERY_VISIBILITY_TIMEOUT", 3600, minimum=60)
# RabbitMQ's own clock for the same thing: its `consumer_timeout` (server setting, default
# 30 min) closes the channel of a consumer that holds a message unacknowledged for longer, and
# every message on it is redelivered. With acks_late a message stays unacknowledged while it
# waits in the prefetch and runs: this must say what the server is
# configured with, and it must exceed 4 x the hard time limit. (RabbitMQ only.)
RABBITMQ_CONSUMER_TIMEOUT = env_int("RABBITMQ_CONSUMER_TIMEOUT", 1800, minimum=60)
if BROKER_IS_REDIS:
    CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {
        # redis-py's pool per kombu connection (Celery's producer pool is broker_pool_limit).
        "max_connections": 100,
        "socket_connect_timeout": 1,
        "socket_timeout": 2,
        "visibility_timeout": CELERY_VISIBILITY_TIMEOUT,
    }
else:
    # py-amqp's connection options. Publisher confirms: a publish returns only once RabbitMQ
    # has taken the message (persisted, for a durable queue), else it raises and the sweep
    # covers it, as for a Redis error. The socket timeouts bound a publish (and its confirm)
    # on a stalled broker, as socket_timeout does for Redis.
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "confirm_publish": True,
        "read_timeout": 2,
        "write_timeout": 2,
    }
CELERY_TASK_PUBLISH_RETRY_POLICY = {
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.2,
}
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TIMEZONE = "UTC"
# Beat's DatabaseScheduler copies these into django-celery-beat's tables at start-up; ops can
# then pause or re-time them in the admin.
CELERY_BEAT_SCHEDULE = {
    "purge-idempotency-records": {
        "task": "linking.purge_idempotency_records",
        "schedule": env_int("IDEMPOTENCY_PURGE_INTERVAL_SECONDS", 3600, minimum=10),
    },
}  # the processing entries are added below, next to their settings

# Celery's Django fix-up closes the worker's database connection after every task unless this is
# set (it reads it from the app's configuration, not from the environment): a new PostgreSQL
# connection per task cost ~4x the worker throughput (measured on this stack) and 3/4 of
# PostgreSQL's CPU per workflow in `make bench`. Broken or expired connections are still
# replaced between tasks (config/celery.py).
CELERY_DB_REUSE_MAX = env_int("CELERY_DB_REUSE_MAX", 1000, minimum=0)
# Task events (three broker messages per task) are off for throughput. Flower lists workers,
# queues and stats without them (remote-control inspect); for the live task stream an operator
# turns them on for a while: `celery -A config control enable_events` (docs/operations.md "Flower").
CELERY_WORKER_SEND_TASK_EVENTS = False
CELERY_TASK_SEND_SENT_EVENT = False

# --- Processing: the internal search, the linking policy, attempts, reconciliation ------------
INTERNAL_SEARCH_URL = env_str("INTERNAL_SEARCH_URL", "http://127.0.0.1:8001/fhir").rstrip("/")
INTERNAL_SEARCH_TOKEN = env_str("INTERNAL_SEARCH_TOKEN", "")
INTERNAL_SEARCH_CONNECT_TIMEOUT = env_float("INTERNAL_SEARCH_CONNECT_TIMEOUT", 3.05)
INTERNAL_SEARCH_READ_TIMEOUT = env_float("INTERNAL_SEARCH_READ_TIMEOUT", 10.0)
INTERNAL_SEARCH_COUNT = env_int("INTERNAL_SEARCH_COUNT", 5, minimum=2)
# Matching bands (linking/policy.py), overridable per customer: the top candidate links by
# itself at AUTO_LINK_SCORE with AUTO_LINK_MARGIN over the next; candidates from
# REVIEW_MIN_SCORE up go to an operator; below it is no match.
AUTO_LINK_SCORE = env_float("AUTO_LINK_SCORE", 0.9)
AUTO_LINK_MARGIN = env_float("AUTO_LINK_MARGIN", 0.1)
REVIEW_MIN_SCORE = env_float("REVIEW_MIN_SCORE", 0.5)
for _name in ("AUTO_LINK_SCORE", "AUTO_LINK_MARGIN", "REVIEW_MIN_SCORE"):
    if not 0 <= globals()[_name] <= 1:
        raise ImproperlyConfigured(f"{_name} must be between 0 and 1")
# Requests whose demographics weigh less than this are refused (linking/quality.py).
MIN_DEMOGRAPHICS_SCORE = env_int("MIN_DEMOGRAPHICS_SCORE", 6)
# Asynchronous internal search (contract section 2): send `Prefer: respond-async`; results come
# back signed to /internal/search-results/<search-id> with INTERNAL_CALLBACK_SECRET.
INTERNAL_SEARCH_ASYNC = env_bool("INTERNAL_SEARCH_ASYNC", False)
INTERNAL_CALLBACK_SECRET = env_str("INTERNAL_CALLBACK_SECRET", "")
if INTERNAL_CALLBACK_SECRET or INTERNAL_SEARCH_ASYNC:
    try:
        _callback_key = base64.b64decode(
            INTERNAL_CALLBACK_SECRET.removeprefix("whsec_"), validate=True
        )
    except binascii.Error:
        _callback_key = b""
    if not INTERNAL_CALLBACK_SECRET.startswith("whsec_") or len(_callback_key) < 16:
        raise ImproperlyConfigured(
            "INTERNAL_CALLBACK_SECRET must be whsec_<base64 of at least 16 bytes>; "
            "INTERNAL_SEARCH_ASYNC needs it"
        )
WORKFLOW_MAX_ATTEMPTS = env_int("WORKFLOW_MAX_ATTEMPTS", 5, minimum=1)
# Workflows per queue message: the dispatcher and the sweep publish this many ids in one
# message, and a worker claims, searches, ends and notifies them together
# (docs/architecture.md "How a request travels"). 1 works too: one message per workflow.
WORKER_BATCH_SIZE = env_int("WORKER_BATCH_SIZE", 50, minimum=1)
# The schedule (workflows/scheduler.py). Work in flight (published, not yet ended or put back) is
# held under WORKFLOW_IN_FLIGHT_MAX: enough to keep the workers busy, little enough that the
# broker's queue stays short and each ordering decision is taken late. The default is what two
# worker processes search at once (each runs up to 4 x WORKER_BATCH_SIZE searches together,
# workflows/concurrent.py): one worker kept busy with as much again queued; add 4 x
# WORKER_BATCH_SIZE per worker process beyond two.
WORKFLOW_IN_FLIGHT_MAX = env_int("WORKFLOW_IN_FLIGHT_MAX", 8 * WORKER_BATCH_SIZE, minimum=1)
# The most searches in flight at once across every worker, as agreed with the internal system's
# team (docs/internal-search-contract.md section 4): the bound on work in flight never exceeds it.
INTERNAL_SEARCH_MAX_CONCURRENCY = env_int("INTERNAL_SEARCH_MAX_CONCURRENCY", 400, minimum=1)
# The internal system's circuit breaker (workflows/breaker.py): this many consecutive transient
# failures open it; while open, its probe (GET metadata) runs once per PROBE_SECONDS.
INTERNAL_SEARCH_BREAKER_FAILURES = env_int("INTERNAL_SEARCH_BREAKER_FAILURES", 5, minimum=1)
INTERNAL_SEARCH_BREAKER_PROBE_SECONDS = env_float("INTERNAL_SEARCH_BREAKER_PROBE_SECONDS", 5.0)
RETRY_BACKOFF_BASE_SECONDS = env_float("RETRY_BACKOFF_BASE_SECONDS", 2.0)
RETRY_BACKOFF_MAX_SECONDS = env_float("RETRY_BACKOFF_MAX_SECONDS", 60.0)
# A consumer's claim on a workflow lives as long as its worker: the worker process renews the
# claims it holds every WORKFLOW_HEARTBEAT_SECONDS (workflows/claims.py), and a claim not
# renewed for WORKFLOW_CLAIM_LEASE_SECONDS is dead (its worker crashed or hung): the scheduler
# makes the workflow due again within a second. So a crash costs about a lease, whatever the
# task's time limit.
WORKFLOW_HEARTBEAT_SECONDS = env_float("WORKFLOW_HEARTBEAT_SECONDS", 10.0)
WORKFLOW_CLAIM_LEASE_SECONDS = env_int("WORKFLOW_CLAIM_LEASE_SECONDS", 30, minimum=1)
# On warm shutdown (SIGTERM) a worker lets the searches in flight finish for this long, ends what
# finished and hands the rest back (docs/guarantees.md "Crashes and deploys"); keep it under the
# process manager's stop timeout (docker/compose.yaml's stop_grace_period for the worker).
WORKER_SHUTDOWN_GRACE_SECONDS = env_float("WORKER_SHUTDOWN_GRACE_SECONDS", 10.0)
# A workflow not ended this long after its 202 (or its operator's re-queue) is FAILED, reason
# "deadline exceeded", and the customer told: the bound docs/api.md promises.
WORKFLOW_DEADLINE_SECONDS = env_int("WORKFLOW_DEADLINE_SECONDS", 86400, minimum=60)
RECONCILE_INTERVAL_SECONDS = env_int("RECONCILE_INTERVAL_SECONDS", 300, minimum=1)
RECONCILE_STALE_AFTER_SECONDS = env_int("RECONCILE_STALE_AFTER_SECONDS", 420, minimum=1)
# A review (operator or customer) not decided this long after it began ends with no match.
REVIEW_TIMEOUT_SECONDS = env_int("REVIEW_TIMEOUT_SECONDS", 7 * 24 * 3600, minimum=10)
RECONCILE_BATCH_SIZE = env_int("RECONCILE_BATCH_SIZE", 500, minimum=1)
STUCK_REPORT_INTERVAL_SECONDS = env_int("STUCK_REPORT_INTERVAL_SECONDS", 3600, minimum=10)

# --- Webhooks (Standard Webhooks 1.0) ---------------------------------------------------------
WEBHOOK_TIMEOUT_SECONDS = env_float("WEBHOOK_TIMEOUT_SECONDS", 15.0)
# Seconds to wait before each retry after the first attempt; then the delivery is exhausted.
WEBHOOK_RETRY_SCHEDULE = env_int_list(
    "WEBHOOK_RETRY_SCHEDULE", [5, 300, 1800, 7200, 18000, 36000, 36000]
)
WEBHOOK_DISPATCH_INTERVAL_SECONDS = env_int("WEBHOOK_DISPATCH_INTERVAL_SECONDS", 5, minimum=1)

# Beat runs these; each only enqueues work, so a second beat started by mistake is harmless.
CELERY_BEAT_SCHEDULE.update(
    {
        "reconcile-workflows": {
            "task": "workflows.reconcile",
            "schedule": RECONCILE_INTERVAL_SECONDS,
        },
        "stuck-report": {
            "task": "workflows.stuck_report",
            "schedule": STUCK_REPORT_INTERVAL_SECONDS,
        },
        "dispatch-due-webhooks": {
            "task": "workflows.dispatch_due_webhooks",
            "schedule": WEBHOOK_DISPATCH_INTERVAL_SECONDS,
        },
    }
)

# --- Customer tokens (JWT) ---------------------------------------------------------------------
TOKEN_SIGNING_KEY = env_str("TOKEN_SIGNING_KEY", SECRET_KEY)
TOKEN_ISSUER = env_str("TOKEN_ISSUER", "merchant-service")
TOKEN_AUDIENCE = env_str("TOKEN_AUDIENCE", "merchant-service-api")
TOKEN_TTL_SECONDS = env_int("TOKEN_TTL_SECONDS", 30 * 24 * 3600, minimum=60)

# --- Link requests -----------------------------------------------------------------------------
IDEMPOTENCY_TTL_SECONDS = env_int("IDEMPOTENCY_TTL_SECONDS", 86400, minimum=86400)
# Local development and tests only: lets webhook URLs use http and private or loopback hosts.
WEBHOOK_ALLOW_PRIVATE_HOSTS = env_bool("WEBHOOK_ALLOW_PRIVATE_HOSTS", False)
# The body limit is enforced by our parser (413); Django's own limit is a backstop above it.
LINK_MAX_BODY_BYTES = 64 * 1024
# POST /link/batch: at most this many items; its body may be 2 KiB per item on average (a
# typical item is under 500 bytes) and hold 64 object members + array items per item.
LINK_BATCH_MAX_ITEMS = env_int("LINK_BATCH_MAX_ITEMS", 1000, minimum=1)
LINK_BATCH_MAX_BODY_BYTES = max(LINK_BATCH_MAX_ITEMS * 2048, LINK_MAX_BODY_BYTES)
LINK_BATCH_MAX_JSON_ITEMS = LINK_BATCH_MAX_ITEMS * 64
DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * LINK_BATCH_MAX_BODY_BYTES
# GET /link/batch/<id> answers this long after the batch; beat's idempotency purge then deletes
# the batch record (its items' workflows stay, each readable by its own id).
LINK_BATCH_RETENTION_DAYS = env_int("LINK_BATCH_RETENTION_DAYS", 30, minimum=1)

# --- Request data (the demographics): encrypted at rest, purged after the workflow ended -------
# Keys of linking.LinkRequest.data (django-fernet-encrypted-fields derives each Fernet key from
# SECRET_KEY and one of these): the first encrypts, all decrypt. Rotation: put a new key first,
# deploy, run `manage.py rotate_request_data_key`, then drop the old key.
_DEV_REQUEST_DATA_KEY = "development-only-request-data-key"
REQUEST_DATA_KEYS = env_list("REQUEST_DATA_KEYS", [])
if not REQUEST_DATA_KEYS:
    if not DEBUG:
        raise ImproperlyConfigured(
            "REQUEST_DATA_KEYS is not set: comma-separated keys for the request data at rest "
            "(or DEBUG=true for a local development default)."
        )
    REQUEST_DATA_KEYS = [_DEV_REQUEST_DATA_KEY]
if any(len(key) < 16 for key in REQUEST_DATA_KEYS):
    raise ImproperlyConfigured("each of REQUEST_DATA_KEYS must be at least 16 characters")
SALT_KEY = REQUEST_DATA_KEYS  # the library's name for them
# The derived keys depend on SECRET_KEY too: after changing it, the old one stays here until
# rotate_request_data_key has run (Django's sessions and signatures accept it meanwhile too).
SECRET_KEY_FALLBACKS = env_list("SECRET_KEY_FALLBACKS", [])
REQUEST_DATA_RETENTION_DAYS = env_int("REQUEST_DATA_RETENTION_DAYS", 30, minimum=0)
REQUEST_DATA_PURGE_INTERVAL_SECONDS = env_int(
    "REQUEST_DATA_PURGE_INTERVAL_SECONDS", 3600, minimum=10
)
CELERY_BEAT_SCHEDULE["purge-request-data"] = {
    "task": "linking.purge_request_data",
    "schedule": REQUEST_DATA_PURGE_INTERVAL_SECONDS,
}

# --- Customer tokens: how long a process trusts what it last read of a customer -------------
# (active, token version). Changes made through this process apply at once; other processes see
# a revocation or deactivation within this many seconds. 0 reads the customer on every request.
CUSTOMER_CACHE_SECONDS = env_int("CUSTOMER_CACHE_SECONDS", 5, minimum=0)

# --- Abuse limits (merchant/throttling.py, merchant/parsers.py) -------------------------------
# Requests per customer (keyed by the token, not the address) in DRF's rate syntax, counted in
# Redis; over it: 429 rate-limited with Retry-After. POST /link has its own budget; the reads
# (status, patient) and de-link share the other; POST /link/batch counts batches in a budget of
# its own (each up to LINK_BATCH_MAX_ITEMS). Empty turns a limit off.
RATE_LIMIT_LINK_CREATE = env_str("RATE_LIMIT_LINK_CREATE", "600/min")
RATE_LIMIT_LINK_BATCH = env_str("RATE_LIMIT_LINK_BATCH", "10/min")
RATE_LIMIT_READ = env_str("RATE_LIMIT_READ", "1200/min")
_RATE_PERIODS = {"s", "sec", "second", "m", "min", "minute", "h", "hour", "d", "day"}
for _name in ("RATE_LIMIT_LINK_CREATE", "RATE_LIMIT_LINK_BATCH", "RATE_LIMIT_READ"):
    _count, _, _period = globals()[_name].partition("/")
    if globals()[_name] and not (_count.isdigit() and int(_count) > 0 and _period in _RATE_PERIODS):
        raise ImproperlyConfigured(f"{_name} must be <count>/<s|min|hour|day>, e.g. 600/min")
# JSON bodies deeper or with more object members + array items in total are refused (400).
JSON_MAX_DEPTH = 20
JSON_MAX_ITEMS = 1000

# --- Benchmark (`make bench`, docs/performance.md) -----------------------------------------
# Serves the yardstick (config/yardstick.py), a no-I/O endpoint every benchmark figure is a
# ratio to. Off by default: it is not part of the API.
BENCH_YARDSTICK = env_bool("BENCH_YARDSTICK", False)

# --- Metrics (Prometheus: config/metrics.py, docs/operations.md "Metrics") -------------------
# Where every process writes its samples so that a scrape adds up all of gunicorn's workers
# (prometheus_client reads the variable itself, at import). Empty: each process serves its own.
# Emptied at each start (config/gunicorn.py for web); web and workers each need their own.
PROMETHEUS_MULTIPROC_DIR = env_str("PROMETHEUS_MULTIPROC_DIR", "")
# prometheus_client picks its storage when first imported, from the variable's mere presence:
# an empty one (`PROMETHEUS_MULTIPROC_DIR=` from an env file) would put the files in the working
# directory. Empty means off; settled here, before any app module (each defines its metrics)
# imports the client. The directory is made if missing (a missing one fails on the first sample).
if PROMETHEUS_MULTIPROC_DIR:
    os.makedirs(PROMETHEUS_MULTIPROC_DIR, exist_ok=True)
else:
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
# GET /metrics needs `Authorization: Bearer <METRICS_TOKEN>`; empty: only loopback and private
# client addresses are served (a proxy in front must then refuse /metrics itself).
METRICS_TOKEN = env_str("METRICS_TOKEN", "")
# Each Celery worker serves its own metrics here (0: none); no token, so bind it privately.
METRICS_WORKER_PORT = env_int("METRICS_WORKER_PORT", 0, minimum=0)
METRICS_WORKER_ADDR = env_str("METRICS_WORKER_ADDR", "127.0.0.1")

# --- REST API ----------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["merchant.auth.CustomerTokenAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": ["merchant.parsers.LimitedJSONParser"],
    "DEFAULT_THROTTLE_CLASSES": ["merchant.throttling.CustomerRateThrottle"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "EXCEPTION_HANDLER": "merchant.problems.problem_exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Merchant Service API",
    "DESCRIPTION": (
        "Links a customer's patient to the patient in the internal patient index. "
        "POST /link answers 202 at once; the result arrives by a signed webhook and "
        "GET /link/status/{workflow_id}. Errors are RFC 9457 problem+json."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # Several responses carry a workflow's status: one named enum for all of them.
    "ENUM_NAME_OVERRIDES": {
        "WorkflowStatusEnum": "workflows.models.Status",
        # The FHIR Bundle of the search callback: fixed values, named after what they belong to.
        "BundleResourceTypeEnum": ["Bundle"],
        "BundleTypeEnum": ["searchset"],
    },
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "merchant.schema.postprocess_common_responses",
        "merchant.schema.postprocess_required_choices",
    ],
}

# --- Transport security (`manage.py check --deploy` is clean with DEBUG off) -----------------
# Everything is https in production; a TLS-terminating proxy in front says so with
# X-Forwarded-Proto, trusted only when TRUST_X_FORWARDED_PROTO is set (else anyone could claim it).
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", not DEBUG)
# Load-balancer probes (config/health.py) and Prometheus' scrapes of /metrics often speak plain
# http to the instance itself: a 301 would hide a failing /readyz (many probes count a redirect
# as healthy).
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
if env_bool("TRUST_X_FORWARDED_PROTO", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 31_536_000, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
# The header only allows preloading; nothing is preloaded until the domain's owner submits it.
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", True)
SESSION_COOKIE_SECURE = not DEBUG
CSRF_COOKIE_SECURE = not DEBUG
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
SECURE_REFERRER_POLICY = "no-referrer"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"

# --- Django plumbing ---------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

LOG_LEVEL = env_str("LOG_LEVEL", "INFO")
# `json`: one JSON object per line (time, level, logger, message, and the request, workflow and
# customer ids when known), for a log pipeline; `text`: a plain line, for local runs.
LOG_FORMAT = env_str("LOG_FORMAT", "text" if DEBUG else "json")
if LOG_FORMAT not in {"json", "text"}:
    raise ImproperlyConfigured(f"LOG_FORMAT must be json or text, got {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # config/log_context.py: the ids come from context variables (request, customer, task).
    "filters": {
        "context": {"()": "config.log_context.ContextFilter"},
        "beat_sends": {"()": "config.log_context.BeatSendsFilter"},
    },
    "formatters": {
        "json": {"()": "config.log_context.json_formatter"},
        "text": {"()": "config.log_context.text_formatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["context"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # Django logs the request line and, on errors, request details: keep it at WARNING so
        # that nothing but ids reaches the logs.
        "django.request": {"level": "ERROR"},
        # Celery's line per task sent by beat, received and succeeded: every few seconds for
        # the periodic housekeeping while nothing happens, once per message under load. What a
        # task does worth telling, it logs itself; a task that fails is still logged (ERROR).
        # Shown with LOG_LEVEL=DEBUG. Beat's other lines (starting, connected) stay.
        **(
            {}
            if LOG_LEVEL == "DEBUG"
            else {
                "celery.beat": {"filters": ["beat_sends"]},
                "celery.worker.strategy": {"level": "WARNING"},
                "celery.app.trace": {"level": "WARNING"},
            }
        ),
    },
}

# --- Relations between the settings above (config/setting_rules.py, docs/guarantees.md) ------
setting_rules.check(globals())
