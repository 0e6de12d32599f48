# make demo: set up .venv if needed, then run the demo study (report in runs/demo/report.html)
# make test: set up .venv if needed, then run the test suite (notebooks included)
# make test-fast: the same without the notebooks and the tests marked @pytest.mark.slow
# make lint: ruff check (configuration in pyproject.toml; fixes nothing)
# make bench: set up .venv if needed, then run bench/*.py; the peer libraries that
#   bench/similarity_peers.py times come from requirements-bench.txt, installed by hand with
#   $(PY) -m pip install --no-deps -r requirements-bench.txt (peers not installed are skipped)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
REQ_HASH := $(shell cat requirements.txt Makefile | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint venv bench clean

venv: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps animal-mnist==0.4
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) cli.py study studies/demo.yaml --out_dir runs/demo --resume

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q --nbmake tests notebooks $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q -m "not slow" tests $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/train_throughput.py
	$(PY) bench/extract.py
	$(PY) bench/transnet.py
	$(PY) bench/similarity.py
	@echo "similarity peers (ckatorch, pytorch-cka, torch-cka) come from requirements-bench.txt:" \
		"$(PY) -m pip install --no-deps -r requirements-bench.txt; those not installed are skipped"
	$(PY) bench/similarity_peers.py

clean:
	rm -rf $(VENV) .pytest_cache
