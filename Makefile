# Two commands for a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-long install bench gpu-check clean

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

# One pytest worker per core (pytest-xdist), each with one torch thread: the suite is mostly
# Dynamo/Inductor compiles and tiny matmuls, which do not use a second thread, and two OpenMP
# threads per worker on a 2-core host stall each other.
test: $(STAMP)
	OMP_NUM_THREADS=1 TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 $(VPY) -m pytest -q -n auto -m "not slow" -p no:cacheprovider $(PYTEST_ARGS)

# The long property profile (10x the hypothesis examples); outside CI.
test-long: $(STAMP)
	LTE_HYPOTHESIS_PROFILE=long TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 $(VPY) -m pytest -q -p no:cacheprovider tests/kernels tests/api/test_cluster.py

bench: $(STAMP)
	$(VPY) benchmarks/bench_kernels.py

# On a machine with a CUDA GPU (no registry needed): installs this checkout on its own torch/triton,
# runs the GPU tests, the kernel benchmark and a CUDA-graph decode; logs under $OUT.
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info
