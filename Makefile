# edgepack — two commands on a fresh machine: `make demo` and `make test`.
# Each sets up its own virtual environment (.venv) and the system packages it needs.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgepack-installed

.PHONY: demo test lint bench reliability sysdeps clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all]'
	touch $(STAMP)

sysdeps:
	.ci/install-system-deps.sh
	.ci/install-postgres.sh

demo: $(STAMP)
	$(PY) examples/demo.py

# Two pytest workers (the tests wait on brokers, agents and browsers as much as they compute);
# tests of one file stay in one worker.
test: $(STAMP) sysdeps
	$(PY) -m ruff check host agent tests bench examples
	$(PY) -m pytest -q -n 2 --dist loadfile

reliability: $(STAMP) sysdeps
	$(PY) tests/reliability/report.py --run

lint: $(STAMP)
	$(PY) -m ruff check host agent tests bench examples

bench: $(STAMP) sysdeps
	$(PY) bench/build.py
	$(PY) bench/tflite.py
	$(PY) bench/agent.py
	$(PY) bench/collector.py
	$(PY) bench/measurement.py

clean:
	rm -rf $(VENV) dist build .demo *.egg-info
