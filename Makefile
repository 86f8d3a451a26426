# hescape-study — set-up and everyday commands. `make demo` and `make test` do all set-up.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export RAY_DEDUP_LOGS := 0

.PHONY: venv demo test test-fast lint bench bench-smoke mlflow-ui clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python study/run.py experiments/demo.yaml

test: $(STAMP)
	$(BIN)/ruff check hescape study tests benchmarks
	$(BIN)/python -m pytest -q -ra --durations=25

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check hescape study tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

bench-smoke: $(STAMP)
	$(BIN)/python benchmarks/run.py --smoke

# The MLflow UI over a study store: one uvicorn worker, no job runner / huey consumers (MLflow's
# GenAI jobs), artifacts read from where each experiment keeps them. Ctrl-C stops all of it.
MLFLOW_STORAGE ?= runs
MLFLOW_PORT    ?= 5000
mlflow-ui: $(STAMP)
	@mkdir -p $(MLFLOW_STORAGE)
	@echo "MLflow UI: http://127.0.0.1:$(MLFLOW_PORT)  (sidebar switch: Model training; Ctrl-C stops it)"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false exec $(BIN)/mlflow server --workers 1 \
	  --host 127.0.0.1 --port $(MLFLOW_PORT) \
	  --backend-store-uri sqlite:///$(abspath $(MLFLOW_STORAGE))/mlflow.db \
	  --no-serve-artifacts --default-artifact-root $(abspath $(MLFLOW_STORAGE))/mlartifacts/_ui

# runs/ holds every study, its MLflow store and artifacts; ./mlruns, ./mlartifacts: older layouts
clean:
	rm -rf runs mlruns mlartifacts .pytest_cache
