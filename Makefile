# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so pip takes the local build instead of resolving a newer one
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# axe-core, the accessibility checker the browser test injects into the page (from the npm
# registry; pinned). Without npm the check skips, saying so; CI requires it.
AXE := .cache/axe/node_modules/axe-core/axe.min.js
$(AXE):
	npm install --no-save --no-audit --no-fund --prefix .cache/axe axe-core@4.10.3 || \
		echo "npm failed or is missing: the browser test's accessibility check will skip"

test: $(VENV)/.installed $(AXE)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

demo: $(VENV)/.installed
	$(VENV)/bin/medsim demo $(ARGS)

.PHONY: install test demo
