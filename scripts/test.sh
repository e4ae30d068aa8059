#!/usr/bin/env bash
# Install everything (one pip resolver run, CPU torch pinned), make sure
# PostgreSQL is up, lint, type-check the domain, run the whole test suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh tests/unit -q`.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 -e '.[dev]'

# PostgreSQL runs on these machines at 127.0.0.1:5432; start it if it is down.
if [ -z "${KBSTREAM_TEST_PG_URL:-}" ] && ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  fi
  for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null && break; sleep 1; done
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# The tests run in KBSTREAM_TEST_WORKERS parallel processes (default 2, CI's
# cores: most tests wait on brokers, child processes and the database), cut
# into work units by tests/parallel.py; 0 runs them serially in this process,
# as does `-n 0` among the arguments.
WORKERS=${KBSTREAM_TEST_WORKERS:-2}
PARALLEL=()
[ "$WORKERS" = 0 ] || PARALLEL=(-n "$WORKERS" --dist loadgroup)
exec .venv/bin/pytest ${PARALLEL[@]+"${PARALLEL[@]}"} "$@"
