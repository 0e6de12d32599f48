# make demo: set up .venv if needed, then run the demo study (report in runs/demo/report.html)
# make test: set up .venv if needed, then run the test suite (notebooks included)
# make test-fast: the same without the notebooks and the tests marked @pytest.mark.slow
# make lint: ruff check (configuration in pyproject.toml; fixes nothing)
# make bench: set up .venv if needed, then run bench/*.py; the peer libraries that
#   bench/similarity_peers.py times come from requirements-bench.txt, installed by hand with
#   $(PY) -m pip install --no-deps -r requirements-bench.txt (peers not installed are skipped)
# make gpu-check: the GPU check (bench/gpu_check.py) on a CUDA machine, under 8 minutes on one H200: the
#   suite with CUDA visible, the demo study, fit-transnet in fp32/tf32/bf16 on planted features, the GPU
#   benchmarks at real sizes; one line per step in runs/gpu-check/summary.txt (and $OUT/gpu-check.tar.gz
#   when $OUT is set). GPU_CHECK_TINY=1 make gpu-check: a dry run of every step at tiny sizes on the CPU.
#   It uses .venv when there is one, else python3 (no venv is made: the device machine has no network).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
REQ_HASH := $(shell cat requirements.txt Makefile | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint venv bench gpu-check clean
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_CHECK_ARGS ?= $(if $(filter-out 0,$(GPU_CHECK_TINY)),--tiny --skip_tests,)

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

gpu-check:
	$(GPU_PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
