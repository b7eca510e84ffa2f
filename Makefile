# Warden. Quick start: `make up`, `make test`. Needs only Python 3.11 and make: uv is
# bootstrapped from PyPI when it is missing.
SHELL := /bin/bash
PY ?= python3
UV = $(shell command -v uv 2>/dev/null || echo "$(PY) -m uv")
PYTEST_ARGS ?=
# The suite in 4 processes, a test file per process at a time (module fixtures stay
# together). It is CPU-bound on 2 cores; 4 lets one process's waits (a lease to lapse, a
# worker to start) overlap another's work.
PYTEST_PARALLEL ?= -n 4 --dist loadfile

.PHONY: up test test-external test-faults lint typecheck check bench sync bytecode uv clean

uv:
	@command -v uv >/dev/null 2>&1 || $(PY) -m uv --version >/dev/null 2>&1 || \
		$(PY) -m pip install --quiet uv || $(PY) -m pip install --quiet --user uv

sync: uv
	@$(UV) sync --frozen --python 3.11 --quiet

# Bytecode for the environment and the project, compiled once (a rerun only compares
# timestamps). Why: where PYTHONDONTWRITEBYTECODE is set (it is on these machines), no
# process caches what it compiles, and every worker, API and CLI process the suite or
# `warden up` starts compiled SQLAlchemy, Celery, pydantic... from source again: a worker
# took 7.2 CPU-s to get ready, 2.7 s with bytecode; `warden jobs` 3.3 s, 1.9 s.
bytecode: sync
	@$(UV) run --frozen python -c "import compileall, sysconfig, sys; \
		ok = [compileall.compile_dir(d, quiet=2, workers=0) for d in \
		      (sysconfig.get_paths()['purelib'], 'workers', 'tasks', 'domain', 'api_stub', \
		       'cli', 'schedules', 'tests', 'bench')]"

up: bytecode
	$(UV) run --frozen warden up

test: bytecode lint typecheck
	$(UV) run --frozen pytest $(PYTEST_PARALLEL) $(PYTEST_ARGS)

# The same suite on the machine's PostgreSQL and Redis (CI: PostgreSQL 15, Redis 7): every
# promise is tested on the oldest and the newest supported server. A fresh database is
# created on that server (and dropped); the Redis DB is flushed.
WARDEN_TEST_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/postgres
WARDEN_TEST_REDIS_URL ?= redis://127.0.0.1:6379/15
test-external: bytecode
	WARDEN_TEST_DATABASE_URL=$(WARDEN_TEST_DATABASE_URL) WARDEN_TEST_REDIS_URL=$(WARDEN_TEST_REDIS_URL) \
		$(UV) run --frozen pytest $(PYTEST_PARALLEL) $(PYTEST_ARGS)

# The fault tests alone (real processes killed, paused, cut off) with a bigger soak.
test-faults: bytecode
	WARDEN_SOAK_JOBS=$${WARDEN_SOAK_JOBS:-6000} $(UV) run --frozen pytest tests/reliability -m slow $(PYTEST_ARGS)

lint: sync
	$(UV) run --frozen ruff check .

typecheck: sync
	$(UV) run --frozen mypy

bench: bytecode
	$(UV) run --frozen python -m bench

clean:
	rm -rf .warden .pytest_cache .mypy_cache .ruff_cache
