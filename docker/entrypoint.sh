#!/bin/sh
# One image, every role: `entrypoint.sh <role> [extra arguments for that role]`.
#
#   web      gunicorn on 0.0.0.0:$PORT (8000), $WEB_CONCURRENCY workers (2 x cores + 1)
#   worker   a Celery worker (threads pool, $WORKER_CONCURRENCY threads, 16); run any number
#   beat     Celery beat (django-celery-beat's database scheduler): exactly ONE per deployment
#   migrate  `manage.py migrate --noinput` (first `ensure_database` when ENSURE_DATABASE=true)
#   standin  the local FHIR stand-in of the internal system on 0.0.0.0:$STANDIN_PORT (8001)
#   receiver a demo customer webhook receiver on 0.0.0.0:$RECEIVER_PORT (9000): prints each
#            delivery, verified against $RECEIVER_SECRET (the customer's whsec_) when set
#   other    run as given (`entrypoint.sh python manage.py shell`, `entrypoint.sh sh`)
#
# The options are the Procfile's; each role ends in `exec`, so the server is the container's
# main process and receives `docker stop`'s SIGTERM itself. The commands come from PATH (the
# image puts its virtualenv first).
set -eu

# Waits until PostgreSQL (DATABASE_URL) and Redis (REDIS_URL, CELERY_BROKER_URL) accept TCP
# connections, at most DEPENDENCY_WAIT_SECONDS (60; 0 skips it). Compose orders start-up with
# healthchecks already; this covers platforms that start everything at once. Only hosts and
# ports are read: the URLs' credentials are never printed.
wait_for_dependencies() {
    [ "${DEPENDENCY_WAIT_SECONDS:-60}" = "0" ] && return 0
    python - <<'EOF'
import os
import socket
import sys
import time
from urllib.parse import urlsplit

DEFAULT_PORTS = {"postgres": 5432, "postgresql": 5432, "redis": 6379, "rediss": 6379}
deadline = time.monotonic() + float(os.environ.get("DEPENDENCY_WAIT_SECONDS", "60"))
targets = set()
for name in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL"):
    url = urlsplit(os.environ.get(name, ""))
    if url.hostname and url.scheme in DEFAULT_PORTS:
        targets.add((name, url.hostname, url.port or DEFAULT_PORTS[url.scheme]))
for name, host, port in sorted(targets):
    while True:
        try:
            socket.create_connection((host, port), timeout=2).close()
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                sys.exit(f"entrypoint: {name} ({host}:{port}) unreachable: {exc}")
            time.sleep(1)
EOF
}

role="${1:-web}"
[ "$#" -gt 0 ] && shift

case "$role" in
web)
    wait_for_dependencies
    # gunicorn's usual default: 2 x cores + 1 sync workers (cores as this container sees them).
    workers="${WEB_CONCURRENCY:-$((2 * $(nproc) + 1))}"
    exec gunicorn config.wsgi --config config/gunicorn.py --bind "0.0.0.0:${PORT:-8000}" \
        --workers "$workers" --access-logfile - "$@"
    ;;
worker)
    wait_for_dependencies
    exec celery -A config worker --pool threads --concurrency "${WORKER_CONCURRENCY:-16}" \
        --loglevel INFO --without-gossip --without-mingle "$@"
    ;;
beat)
    wait_for_dependencies
    # No pid file: the app directory is read-only for the app's user, and a stale pid file
    # left by a killed container would stop the next beat from starting. Remote control: beat
    # answers `celery inspect ping -d celerybeat@<host>` while its scheduler ticks (healthcheck).
    exec celery -A config beat --loglevel INFO --pidfile "" --enable-remote-control "$@"
    ;;
migrate)
    wait_for_dependencies
    # Off by default: the compose stack's PostgreSQL creates the database itself, and a
    # production database role should not be allowed to create databases.
    case "${ENSURE_DATABASE:-false}" in
    1 | true | yes | on) python manage.py ensure_database ;;
    esac
    exec python manage.py migrate --noinput "$@"
    ;;
standin)
    exec python -m standin --host 0.0.0.0 --port "${STANDIN_PORT:-8001}" "$@"
    ;;
receiver)
    exec python -m standin.receiver --host 0.0.0.0 --port "${RECEIVER_PORT:-9000}" "$@"
    ;;
*)
    exec "$role" "$@"
    ;;
esac
