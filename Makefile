# Two commands matter: `make demo` (the gateway end to end, offline) and `make test` (everything CI runs).
# Another interpreter: `make PYTHON=python3.12 demo`; another demo port: `make demo PORT=18080`.
PYTHON ?= python3
PORT ?= 8080
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test lint unit bench system-deps clean

# The stamp is written last: after any failure (wrong Python, no python3-venv, no network) the
# next run starts again from a fresh .venv (--clear), with no `make clean` needed.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "make: $(PYTHON) is missing or older than Python 3.11; name another with PYTHON=, e.g. make PYTHON=python3.12" >&2; \
	  exit 1; }
	@if [ -L $(VENV) ]; then \
	  echo "make: $(VENV) is a symlink (a venv shared with another checkout?): not clearing what it points to; rebuild it in its own checkout, or remove the link" >&2; \
	  exit 1; fi
	$(PYTHON) -m venv --clear $(VENV) || { \
	  echo "make: $(PYTHON) cannot create a virtualenv; on Debian/Ubuntu: apt-get install python3-venv" >&2; \
	  exit 1; }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gateway demo --port $(PORT)

# The tests start their own redis-server (standalone and a three-master cluster) on free ports,
# check the Prometheus config and alert rules with promtool (Debian's prometheus package), and drive
# the usage page in a headless Chromium (Debian's chromium; without one those tests skip and say so).
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v redis-cli >/dev/null || missing="$$missing redis-tools"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	browser=""; \
	[ -n "$$GATEWAY_TEST_CHROMIUM" ] || command -v chromium >/dev/null || command -v chromium-browser >/dev/null \
	  || command -v google-chrome >/dev/null || browser="chromium"; \
	if [ -n "$$missing$$browser" ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing:$$missing $$browser"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing $$browser >/dev/null; \
	elif [ -n "$$missing" ]; then \
	  echo "The tests need:$$missing (Debian: apt-get install$$missing)." >&2; exit 1; \
	elif [ -n "$$browser" ]; then \
	  echo "No Chromium: the usage page's browser tests will skip (Debian: apt-get install chromium)." >&2; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP) system-deps lint
	$(BIN)/pytest -q

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

bench: $(STAMP)
	$(BIN)/python bench/gateway_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
