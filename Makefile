# MedVLThinker reference: set-up, tests, the toy demo and the paper's recipes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install test
install: $(VENV)/.installed

# Re-installs only when requirements.txt changes (the stamp is newer otherwise).
$(VENV)/.installed: requirements.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: install
	$(PY) -m pytest -q tests
