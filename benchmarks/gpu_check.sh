#!/usr/bin/env bash
# The GPU check (`make gpu-check`): everything a lent CUDA machine should run, in one go, in
# ~6 minutes, logs under $OUT (default /tmp/gpu_check). Installs this checkout on the machine's own
# torch/triton (no registry there), then:
#   1. the GPU-marked tests: every Triton kernel against the float64 reference (fp32/fp16/bf16,
#      decode and grouped paths, empty/full/ragged masks, the real bf16 tl.dot, every autotune
#      config, CUDA-graph capture);
#   2. the kernel benchmark on Llama-2-7B FFN shapes, bf16, vs cuBLAS dense (CUDA-graph timing);
#   3. end-to-end batch-1 greedy decode of a Llama with 7B layers, `lte` vs `inductor`, both with
#      CUDA graphs (mode="reduce-overhead"): tokens/s, recompiles, tokens against eager.
# Each step has its own time limit, so a hang in one still leaves the others' logs.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRITON_INTERPRET=0
start=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - start )) s)" | tee -a "$OUT/env.txt"; }

step install
$PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || echo "install failed: see install.log" | tee -a "$OUT/env.txt"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  $PY -c "import torch, triton, transformers, platform; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'python', platform.python_version()); print(torch.cuda.get_device_properties(0))"
  nproc; git log --oneline -1
} >>"$OUT/env.txt" 2>&1

step tests
# One worker per test (pytest-xdist): the GPU tests are bound by Triton compiles on the host.
timeout "${TESTS_S:-150}" $PY -m pytest -q -p no:cacheprovider -m gpu -rs -n "${TEST_WORKERS:-8}" tests/kernels/test_sparse_ffn_triton.py \
  >"$OUT/tests.log" 2>&1; echo "tests exit $?" | tee -a "$OUT/env.txt"

step bench_kernels
timeout "${KERNELS_S:-150}" $PY benchmarks/bench_kernels.py --shapes llama2-7b --dtypes bfloat16 \
  --tokens 1 4 16 128 2048 --out "$OUT/bench_kernels.md" >"$OUT/bench_kernels.log" 2>&1
echo "bench_kernels exit $?" | tee -a "$OUT/env.txt"

step bench_decode
[ "${DECODE_S:-200}" = 0 ] && { step done; exit 0; }
timeout "${DECODE_S:-200}" $PY benchmarks/bench_decode.py --device cuda --mode reduce-overhead --shape llama2-7b \
  --layers 8 --dtypes bfloat16 --batches ${DECODE_BATCHES:-1} --prefill ${DECODE_PREFILL:-0} --new-tokens 64 \
  --reps 5 --no-phi --check-eager --out "$OUT/bench_decode.md" >"$OUT/bench_decode.log" 2>&1
echo "bench_decode exit $?" | tee -a "$OUT/env.txt"
step done
