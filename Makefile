# The front door. `make pipeline` and `make test` do all the set-up they need.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup pipeline test smoke exps bench serve plots ui clean help

help:
	@echo "make pipeline   set up .venv, then dvc repro (download, preprocess, train, evaluate, report)"
	@echo "make test       set up .venv, then run the test suite"
	@echo "make smoke      the whole pipeline on the smoke profile (3,000 images, 1 epoch), a few minutes"
	@echo "make bench      every performance goal, measured in one run (45 to 55 minutes on 2 cores with bf16, two hours or more in fp32; results: docs/benchmarks.md)"
	@echo "make serve      the champion model over HTTP on http://127.0.0.1:5001 (mlflow models serve)"
	@echo "make exps       dvc exp show, only the columns that matter"
	@echo "make ui         the MLflow UI on http://127.0.0.1:5000"

setup: $(STAMP)

# pip in a venv: it takes torch and torchvision from this machine's disk where they lie there.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

pipeline: $(STAMP)
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest

# The smoke profile as an experiment in a temp copy: a 3,000-image subset, 1 epoch, every model.
smoke: $(STAMP)
	$(BIN)/dvc exp run --temp $$($(BIN)/python .ci/repro_check.py smoke --print)

EXP_COLUMNS := Experiment|Created|State|seed|loss|recipe|train\.lr|train\.epochs|.*:epochs|.*:test_accuracy|.*:test_nll|.*:test_ece|.*:train_time_s
exps: $(STAMP)
	$(BIN)/dvc exp show --drop '.*' --keep '$(EXP_COLUMNS)'

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

serve: $(STAMP)
	MLFLOW_TRACKING_URI=sqlite:///$(CURDIR)/mlflow.db $(BIN)/mlflow models serve \
	    -m "models:/fashion-mnist@champion" --env-manager local -p 5001

plots: $(STAMP)
	$(BIN)/dvc plots show

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf dvc_plots .pytest_cache
