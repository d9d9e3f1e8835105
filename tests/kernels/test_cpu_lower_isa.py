"""The C++ kernel built for the ISA below this CPU's (`LTE_CPU_ISA`, kernels/cpu.py isa()): the
CPU kernel tests (tests/kernels/test_cpu.py, hypothesis cases against the float64 reference, fp32
/ bf16 / fp16, empty, full and ragged masks) run again in a subprocess on that build. So an AVX-512
machine also checks the AVX2 path, what an AVX2-only CPU runs (and an AVX2 machine the generic
x86-64 one): CI machines differ from run to run, and the paths must not rot on the ones that lack
them. Costs one extension build (~40-50 s, cached in torch's extensions dir afterwards)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from lte_compile.kernels import cpu

# The ISA each one's tests re-run on: AVX2, unless the CPU has nothing above it.
_BELOW = {"avx512bf16": "avx2", "avx512": "avx2", "avx2": "x86-64"}
_TESTS = Path(__file__).with_name("test_cpu.py")


def _lower_isa() -> str | None:
    if platform.machine() not in ("x86_64", "AMD64") or not cpu.extension_available():
        return None
    return _BELOW.get(cpu.isa()[0])


@pytest.mark.skipif(_lower_isa() is None, reason="not an x86-64 CPU with a C++ compiler and an ISA above x86-64")
def test_cpu_kernel_tests_pass_on_the_lower_isa_build():
    tag = _lower_isa()
    # The child checks that it really built and loaded the lower ISA before running the tests.
    code = ("import sys, pytest; from lte_compile.kernels import cpu; "
            f"assert cpu.isa()[0] == {tag!r}, cpu.isa(); ext = cpu.load_extension(); "
            f"assert ext is not None and ext.__name__.endswith({tag.replace('-', '_')!r}), ext; "
            f"print('kernel ISA', cpu.isa()[0], ext.__name__); "
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-k', 'not isa', {str(_TESTS)!r}]))")
    env = {**os.environ, cpu.ENV_ISA: tag, "OMP_NUM_THREADS": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    log = out.stdout[-4000:] + out.stderr[-4000:]
    assert out.returncode == 0, f"the CPU kernel tests fail on the {tag} build:\n{log}"
    assert f"kernel ISA {tag}" in out.stdout and " passed" in out.stdout, log
