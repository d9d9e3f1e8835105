"""Thin wrapper: `python benchmarks/bench_sparse_ffn.py [--quick]` = `python -m lte_compile.kernels.bench`."""
import sys

from lte_compile.kernels.bench import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
