# `make run`: set up .venv on first use, then run process.py on every case under test/input/.
# `make test`: same setup, then the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench clean-venv

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
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
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b; done

clean-venv:
	rm -rf $(VENV)
