# Two commands for a fresh machine: `make demo` (the main job) and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install test test-all demo app quality style bench study clean

install: $(VENV)/.installed

# .[dev] = the core plus every extra (lora, train, eval, demo) and the test/lint tools; users pick extras.
$(VENV)/.installed: setup.cfg setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: install
	$(PY) -m pytest -q -n 2 --timeout 900 tests

demo: install
	$(PY) training/demo.py

# The web page (app.py) on http://127.0.0.1:7860 for demo/pipeline (after make demo); another pipeline, a recipe or
# other flags: make app APP_ARGS="tiny-cpu --port 7861" (a Hub id: make app HF_HUB_OFFLINE=0 APP_ARGS=user/repo).
APP_ARGS ?=
app: install
	$(PY) app.py $(APP_ARGS)

quality: install
	$(VENV)/bin/ruff check src training conversion benchmarks tests
	$(VENV)/bin/ruff format --check src training conversion benchmarks tests

style: install
	$(VENV)/bin/ruff check --fix src training conversion benchmarks tests
	$(VENV)/bin/ruff format src training conversion benchmarks tests

bench: install
	$(PY) benchmarks/run_all.py

# the mechanism study: six arms from one VAE, 3 seeds, into study/ (docs/study.md; to redo: $(PY) benchmarks/ablation.py --overwrite)
study: install
	$(PY) benchmarks/ablation.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo
