# make demo / make test work on a fresh machine: a venv, torch 2.13.0 (CPU) first, then the exact
# versions of requirements.lock, then this project without touching its dependencies.
#
# The lock holds every dependency except torch, which is installed first with pip on purpose: a
# resolver that sees torch would reach for a newer CUDA build. `make lock` regenerates it from the
# newest releases pyproject's ranges allow; `make test-latest` tries those releases without
# writing the lock, so drift is seen here before it reaches anyone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock
PIP    := pip==26.3
TORCH  := torch==2.13.0
LATEST := .venv-latest
LATEST_TESTS := tests/workers tests/pipelines/test_serving_*.py tests/integration/test_serving_servers.py

.PHONY: install test demo lint lock test-latest clean

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/prefixfleet demo

lint: install
	$(BIN)/ruff check .

# A fresh venv with the newest allowed releases ($(1)); torch stays the pinned CPU build.
define newest_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q $(PIP)
	$(1)/bin/python -m pip install -q $(TORCH)
	$(1)/bin/python -m pip install -q -e '.[dev]'
endef

lock:
	$(call newest_venv,.venv-lock)
	{ echo "# Exact versions for make install (Linux x86_64, CPython 3.11): the dev extra, which is"; \
	  echo "# train + serve + the test tools. torch is left out on purpose: the Makefile installs"; \
	  echo "# $(TORCH) (CPU) first. Regenerate with make lock."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable --exclude pip --exclude torch \
	    --exclude prefixfleet; } > $(LOCK)
	rm -rf .venv-lock
	@echo "wrote $(LOCK); run make test before committing it"

test-latest:
	$(call newest_venv,$(LATEST))
	$(LATEST)/bin/python -m pip freeze | grep -iE '^(transformers|peft|ray|mlflow|fastapi|safetensors|numpy)=='
	$(LATEST)/bin/python -m pytest -q $(LATEST_TESTS)

clean:
	rm -rf $(VENV) $(LATEST) .venv-lock .pytest_cache build *.egg-info
