# The README's two commands are `make run` and `make test`; everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# The tests use these services (override them, or set them empty to have testcontainers start
# them in Docker).
SMTP_WORKER_TEST_AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/
SMTP_WORKER_TEST_POSTGRES_URL ?= postgresql+asyncpg://postgres@127.0.0.1:5432/postgres
export SMTP_WORKER_TEST_AMQP_URL SMTP_WORKER_TEST_POSTGRES_URL
# Test processes (pytest-xdist): the fault scenarios all run in one of them, one at a time.
TEST_PROCESSES ?= 2
XDIST := -n $(TEST_PROCESSES) --dist loadgroup

.PHONY: install run demo test test-fast cov lint contract bench soak clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

## Start one worker on the embedded SQLite store (var/smtp-worker.db), consuming every queue.
run: install
	$(BIN)/smtp-worker run

## A ticket and two threaded hits, end to end, through a worker started for the demo.
demo: install
	$(BIN)/smtp-worker demo --with-worker

## Lint, type-check, and run every test (faults included) against real services.
test: install lint
	$(BIN)/pytest $(XDIST)

## The same tests with branch coverage (slower).
cov: install
	$(BIN)/pytest --cov --cov-report=term:skip-covered

## The tests without the fault-injection suite.
test-fast: install
	$(BIN)/pytest $(XDIST) -m "not faults"

lint: install
	$(BIN)/ruff check worker schemas tests benchmarks
	$(BIN)/ruff format --check worker schemas tests benchmarks
	$(BIN)/mypy

## Regenerate the machine-readable contract from the models: schemas/asyncapi.yaml, schemas/json/.
contract: install
	$(BIN)/smtp-worker asyncapi --write

## Speed as users run it, each party its own process, as ratios to a bare aio-pika RPC echo and a
## raw aiosmtplib send (~10 min; BENCH_QUICK=1 for one short round, BENCH_ARGS for the options).
bench: install
	$(BIN)/python -m benchmarks.throughput $(BENCH_ARGS)

## 50,000 mixed commands through two workers (not in CI).
soak: install
	$(BIN)/python -m benchmarks.soak

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .coverage
