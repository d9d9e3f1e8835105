"""Regression guards for issue 7: `make test` failed `opcheck(lte::apply_gates)` with
std::bad_alloc (and, later, lte::sparse_ffn calls with `vector::reserve`) only in the whole suite.

Cause: with the repository root on sys.path, transformers' probe for the hub package
(`importlib.import_module("kernels")`, run when a model config module is first imported) imported
this repo's `kernels/` folder a second time as a top-level package; re-running ops.py re-defined
the lte:: ops, torch destroyed the first registration, and the OpOverloads cached from it read
freed memory. kernels/__init__.py now imports nothing under any name but `lte_compile.kernels`.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent
PROBE = r"""
import importlib, sys
sys.path.insert(0, sys.argv[1])  # the repository root, as pytest and `python -m` from a checkout put it
import torch
import torch._library.custom_ops as custom_ops
import lte_compile.kernels
libs = {name: custom_ops.OPDEF_TO_LIB[name] for name in ("lte::sparse_ffn", "lte::apply_gates")}
import tests.conftest  # the same environment as pytest (TRITON_INTERPRET, profiles)
import transformers.models.llama.configuration_llama  # transformers probes `import kernels` here
from transformers.utils import import_utils
importlib.import_module("kernels")
assert "kernels" in sys.modules, "the probe did not run: this test no longer tests the shadowing"
assert all(custom_ops.OPDEF_TO_LIB[n] is lib for n, lib in libs.items()), "lte:: ops were defined twice"
assert not import_utils.is_kernels_available(), "transformers mistook kernels/ for the hub package"
from tests.kernels import test_ops
for mode in ("soft", "hard"):
    test_ops.test_opcheck_apply_gates(mode)
    test_ops.test_opcheck_sparse_ffn(mode, True, True)
# and after everything collection imports (every test module, the C++ extension, triton):
import pathlib
tests = pathlib.Path(sys.argv[1]) / "tests"
for path in sorted(tests.rglob("test_*.py")):
    if path.name != "test_isolation.py":
        importlib.import_module(".".join(path.relative_to(tests.parent).with_suffix("").parts))
assert all(custom_ops.OPDEF_TO_LIB[n] is lib for n, lib in libs.items()), "a test module re-defined the lte:: ops"
for mode in ("soft", "hard"):
    test_ops.test_opcheck_apply_gates(mode)
    test_ops.test_opcheck_sparse_ffn(mode, True, True)
print("probe ok")
"""


def test_transformers_kernels_probe_does_not_redefine_the_ops():
    """In a fresh interpreter with the repo root on sys.path: the probe leaves the registrations
    alone, and the op checks pass after it and after importing every test module."""
    root = str(TESTS.parent)
    env = {**os.environ, "PYTHONPATH": root}
    proc = subprocess.run([sys.executable, "-c", PROBE, root], capture_output=True, text=True, env=env,
                          cwd=root, timeout=600)
    assert proc.returncode == 0 and "probe ok" in proc.stdout, proc.stderr[-4000:]
