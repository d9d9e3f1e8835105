# Two commands for a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-long install bench clean

$(STAMP): pyproject.toml requirements.txt
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip setuptools wheel
	# torch==2.13.0 resolves to the local CPU wheel; keep the pin exact (a range pulls CUDA wheels).
	$(VPY) -m pip install -r requirements.txt
	$(VPY) -m pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VPY) -m lte_compile.small_lm.demo

test: $(STAMP)
	TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 $(VPY) -m pytest -q -m "not slow" -p no:cacheprovider $(PYTEST_ARGS)

# The long property profile (10x the hypothesis examples); outside CI.
test-long: $(STAMP)
	LTE_HYPOTHESIS_PROFILE=long TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 $(VPY) -m pytest -q -p no:cacheprovider tests/kernels tests/api/test_cluster.py

bench: $(STAMP)
	$(VPY) benchmarks/bench_kernels.py

clean:
	rm -rf $(VENV) build *.egg-info
