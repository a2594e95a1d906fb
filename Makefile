# The two commands a newcomer needs: `make run` and `make test`.
# Both create .venv when missing and install chainrule into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test install stubs bench fuzz clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/chainrule serve --host 127.0.0.1 --port 50051

# lint-imports first: a broken import contract ([tool.importlinter] in pyproject.toml) fails the run.
test: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

stubs: install
	$(BIN)/python proto/generate.py

# Speed against hand-written numpy, PyTorch (when installed) and a bare gRPC echo; minutes, not CI.
bench: install
	$(BIN)/python benchmarks/core_bench.py
	$(BIN)/python benchmarks/server_bench.py
	$(BIN)/python benchmarks/stream_bench.py
	$(BIN)/python benchmarks/user_bench.py

# A bounded hostile-input campaign against a server subprocess (two minutes).
fuzz: install
	$(BIN)/python tests/fuzz_campaign.py --seconds 120

clean:
	rm -rf $(VENV) build *.egg-info
