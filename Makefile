# The two set-up commands of the README. Both install everything first (idempotent).
#   make run    the whole system on the embedded backend (Ctrl-C stops it)
#   make test   lint (ruff, import contracts) + the whole test suite (what CI runs)

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

FIREBASE_TOOLS = .tools/node_modules/.bin/firebase

.PHONY: run test install system-deps firebase-tools lint clean

run: install
	$(VENV)/bin/dermaloop run $(ARGS)

test: install system-deps firebase-tools
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	FIREBASE_TOOLS_BIN=$(if $(wildcard $(FIREBASE_TOOLS)),$(CURDIR)/$(FIREBASE_TOOLS),) $(PY) -m pytest

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

# Debian's chromium for the browser tests (Playwright drives it; it never downloads a browser).
system-deps:
	@if [ ! -x /usr/bin/chromium ]; then \
		echo "installing Debian's chromium for the browser tests"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium fonts-dejavu-core >/dev/null; \
	fi

# firebase-tools from npm, so the Auth tests also run against Google's official Auth emulator
# (pure Node, works offline). Without Node those tests skip and say why.
firebase-tools:
	@if [ ! -x $(FIREBASE_TOOLS) ] && command -v npm >/dev/null; then \
		echo "installing firebase-tools (npm) for the compatibility tests"; \
		npm install --prefix .tools firebase-tools@15 --no-audit --no-fund --loglevel=error \
			|| echo "firebase-tools did not install: the official-emulator tests will skip"; \
	fi

lint: install
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .tools .pytest_cache .ruff_cache
