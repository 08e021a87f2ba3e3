# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo clean docs coverage-sweep

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[onnx,test,bench,timm]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/curlprune demo

docs: $(STAMP)  ## regenerate the generated tables in docs/
	PYTHONPATH=src $(PY) scripts/coverage_table.py --report
	$(PY) scripts/macs_table.py > docs/macs.md

coverage-sweep: $(STAMP)  ## measure every model with curlprune and Torch-Pruning (resumable; hours on a small CPU), then docs
	PYTHONPATH=src OMP_NUM_THREADS=1 $(PY) scripts/coverage_table.py
	PYTHONPATH=src $(PY) scripts/coverage_table.py --report

clean:
	rm -rf $(VENV) build dist src/*.egg-info
