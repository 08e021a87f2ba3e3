# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo clean docs

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[onnx,test,bench]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/curlprune demo

docs: $(STAMP)  ## regenerate the generated tables in docs/
	$(PY) scripts/coverage_table.py > docs/coverage.md
	$(PY) scripts/macs_table.py > docs/macs.md

clean:
	rm -rf $(VENV) build dist src/*.egg-info
