# The README's two commands: `make run` and `make test`. Everything else is a helper.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
TF_EXTRA ?= cpu
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-$(TF_EXTRA)
export PATH := $(BIN):$(PATH)
export GX_ANALYTICS_ENABLED := False
# The temporary Prefect server of `make run` would try to send telemetry and log an ERROR when offline.
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: run serve repro deploy drift-check drift-demo loop-demo tune test install lint typecheck clean \
	mlflow-server prefect-server prefect-worker dvc-remote

run: $(STAMP) ## create the venv if missing, install, run the training flow on params.yaml
	python -m flows.training

serve: $(STAMP) ## serve the registry's champion on 127.0.0.1:8501 (params.yaml serve:): TF Serving REST API, page at /
	python -m serving

repro: $(STAMP) ## the same stages without Prefect
	dvc repro

deploy: $(STAMP) ## register the training, drift-check and tuning deployments with the Prefect server
	python -m flows.deployments

drift-check: $(STAMP) ## check the landing area for drift once, now (what the drift-check deployment runs)
	python -m flows.retraining

tune: $(STAMP) ## search the train recipe with Optuna (params.yaml tune:); best params -> reports/tune.patch, never applied
	python -m pipeline tune

drift-demo: $(STAMP) ## land a brightened batch of digits and run the drift-check flow once
	python -m flows.training
	python -m flows.drift_demo

loop-demo: $(STAMP) ## serve the champion, send shifted traffic and feedback, let the drift check retrain, watch the swap
	python -m flows.training
	python -m flows.loop_demo

# Two pytest-xdist workers, each taking whole test files (module-scoped servers start once per file).
TEST_WORKERS ?= 2

test: $(STAMP) ## run the test suite (installs PostgreSQL and Chromium from Debian packages first when missing)
	infra/scripts/install-postgres.sh
	python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

# The team setup (mlflow/README.md, infra/README.md): settings from the environment,
# or from the git-ignored env files next to the scripts when they exist.
mlflow-server: $(STAMP) ## the shared MLflow server on PostgreSQL with S3 artifacts (mlflow/server.env)
	@if [ -f mlflow/server.env ]; then set -a; . ./mlflow/server.env; set +a; fi; mlflow/start-server.sh

prefect-server: $(STAMP) ## a Prefect server on PostgreSQL (infra/prefect/prefect.env)
	@if [ -f infra/prefect/prefect.env ]; then set -a; . ./infra/prefect/prefect.env; set +a; fi; infra/prefect/start-server.sh

prefect-worker: $(STAMP) ## register the deployments and run a process worker (infra/prefect/prefect.env)
	@if [ -f infra/prefect/prefect.env ]; then set -a; . ./infra/prefect/prefect.env; set +a; fi; infra/prefect/start-worker.sh

dvc-remote: $(STAMP) ## make the S3 remote (storage.dvc_remote or PIPELINE_DVC_REMOTE_URL) DVC's default
	python -m pipeline dvc-remote

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[$(TF_EXTRA),dev]'
	@# tfmot requires tf-keras, which requires `tensorflow`: tensorflow-cpu is that module (pyproject.toml)
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt tf-keras tensorflow-model-optimization
	@rm -f $(VENV)/.installed-*
	@touch $@

lint: $(STAMP)
	ruff check pipeline flows serving tests bench
	ruff format --check pipeline flows serving tests bench

typecheck: $(STAMP)
	mypy

clean: ## remove pipeline outputs (not the accepted batches in data/batches, not the venv)
	rm -rf data/raw data/manifest.csv data/quarantine.csv data/splits reports models
