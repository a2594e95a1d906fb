# The two commands a newcomer needs: `make run` and `make test`.
# Both create .venv when missing and install chainrule into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test install stubs buf bench fuzz scenarios clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The jax extra (chainrule[jax]) for tests/test_from_jax.py: its own stamp, so `make run` does not install JAX.
JAX_STAMP := $(VENV)/.installed-jax

$(JAX_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,jax]'
	touch $(JAX_STAMP)

# `make run PORT=50052`; without PORT, CHAINRULE_PORT, else 50051. The host is 127.0.0.1 unless
# CHAINRULE_HOST says otherwise: `chainrule serve` reads every CHAINRULE_* setting itself.
PORT ?= $(or $(CHAINRULE_PORT),50051)

run: install
	$(BIN)/chainrule serve --port $(PORT)

# buf (npm @bufbuild/buf, pinned in tools/buf/package.json; needs node and npm) checks the
# contract (proto/buf.yaml): `buf lint`, and `buf breaking` against the newest release's proto
# kept in proto/releases/, so an incompatible change fails the run.
BUF       := tools/buf/node_modules/.bin/buf
BUF_STAMP := tools/buf/node_modules/.installed
RELEASE   := $(shell ls -d proto/releases/v*/ | sort -V | tail -n 1)

$(BUF_STAMP): tools/buf/package.json tools/buf/package-lock.json
	@command -v npm >/dev/null || { echo "make buf: needs node and npm (Debian: apt-get install nodejs npm)" >&2; exit 1; }
	cd tools/buf && npm ci --ignore-scripts --no-audit --no-fund
	touch $@

buf: $(BUF_STAMP)
	$(BUF) lint proto
	$(BUF) breaking proto --against $(RELEASE)

# buf, then lint-imports: a broken contract or import contract ([tool.importlinter] in pyproject.toml) fails the run.
test: install buf $(JAX_STAMP)
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
	$(BIN)/python benchmarks/hvp_bench.py

# A bounded hostile-input campaign against a server subprocess (two minutes).
fuzz: install
	$(BIN)/python tests/fuzz_campaign.py --seconds 120

# Issue 14's attacks on real `chainrule serve` processes at a 1 GiB budget, one row per scenario
# (codes, wrong answers, peak RSS, CPU after deadlines, lost calls); 5-6 minutes (at most 10), not CI.
scenarios: install
	$(BIN)/python benchmarks/scenarios.py

clean:
	rm -rf $(VENV) build *.egg-info
