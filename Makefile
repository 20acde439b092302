# `make run`: set up .venv on first use, then run process.py on every case under test/input/.
# `make test`: same setup, then the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch 2.14.1 for Linux x86_64 is a CUDA build: the venv takes about 7 GB.
VENV_FREE_GB ?= 8

.PHONY: run test bench clean-venv

$(STAMP): requirements.txt requirements-dev.txt
	@free_gb=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ -x $(PY) ] || [ "$$free_gb" -ge $(VENV_FREE_GB) ]; then :; else \
		echo "make: setting up $(VENV) needs about $(VENV_FREE_GB) GB of free disk, $$free_gb GB free here" >&2; exit 1; fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir --upgrade pip
	$(PY) -m pip install -q --no-cache-dir -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

run: $(STAMP)
	@set -e; for case in test/input/*/; do \
		name=$$(basename $$case); out=test/output/$$name/actual; \
		rm -rf $$out; mkdir -p $$out; \
		echo "== $$name"; \
		YOLO_OFFLINE=1 $(PY) process.py --input $$case --output $$out; \
		$(PY) -m midog.compare $$out test/output/$$name; \
	done

test: $(STAMP)
	YOLO_OFFLINE=1 $(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pip install -q --no-cache-dir -r benchmarks/requirements.txt
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b; done

clean-venv:
	rm -rf $(VENV)
