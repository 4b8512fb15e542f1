# Each target sets itself up from a fresh clone: a virtualenv in .venv (and, for the end-to-end
# tests, Label Studio in its own virtualenv in .venv-ls, since it pins its own Django stack).
PYTHON ?= python3.11
VENV := .venv
LS_VENV := .venv-ls
LS_VERSION ?= 1.23.2

.PHONY: serve test lint bench clean chromium

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

$(LS_VENV)/.installed:
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q 'label-studio==$(LS_VERSION)'
	touch $@

serve: $(VENV)/.installed
	$(VENV)/bin/dinolabel serve

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The duplicate report's test opens it in a real headless browser (Debian's Chromium).
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

test: $(VENV)/.installed $(LS_VENV)/.installed chromium lint
	HF_HUB_OFFLINE=1 DINOLABEL_LABEL_STUDIO_BIN=$(CURDIR)/$(LS_VENV)/bin/label-studio $(VENV)/bin/pytest -m "not gpu"

clean:
	rm -rf $(VENV) $(LS_VENV)
