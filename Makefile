# Two commands matter: `make demo` (the gateway end to end, offline) and `make test` (everything CI runs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test lint unit bench system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gateway demo

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
