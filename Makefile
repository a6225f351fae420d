# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
PY ?= python3
UV := $(PY) -m uv
STATE ?= $(CURDIR)/.sensormine

.PHONY: bootstrap demo test unit lint bench services-up services-down

bootstrap:  ## install uv (from PyPI) when missing, then the locked environment
	@$(UV) --version >/dev/null 2>&1 || { echo "installing uv from PyPI ..."; $(PY) -m pip install --quiet uv; }
	@$(UV) sync --frozen --quiet

demo: bootstrap  ## run the platform on its embedded defaults with simulated devices
	$(UV) run sensormine demo

lint: bootstrap
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run mypy
	$(UV) run lint-imports

services-up: bootstrap  ## start PostgreSQL, Mosquitto, Redis, Kafka, moto S3, the SMTP sink and stripe-mock on loopback
	$(UV) run sensormine services up --state-dir $(STATE) >/dev/null

services-down:
	$(UV) run sensormine services down --state-dir $(STATE)

test: lint services-up  ## the whole suite: lint, types, unit, integration and end-to-end tests on real services
	. $(STATE)/services.env && $(UV) run pytest

unit: bootstrap  ## the fast unit tests alone
	$(UV) run pytest tests/unit

bench: services-up  ## benchmarks (figures are recorded in docs/benchmarks.md)
	. $(STATE)/services.env && $(UV) run python -m bench.ingest && $(UV) run python -m bench.latency \
	&& $(UV) run python -m bench.compaction && $(UV) run python -m bench.query \
	&& $(UV) run python -m bench.mqtt && $(UV) run python -m bench.opcua && $(UV) run python -m bench.modbus \
	&& $(UV) run python -m bench.snapshot && $(UV) run python -m bench.api_latest && $(UV) run python -m bench.api_aggregate \
	&& $(UV) run python -m bench.streamproc && $(UV) run python -m bench.alert_latency \
	&& $(UV) run python -m bench.anomaly
