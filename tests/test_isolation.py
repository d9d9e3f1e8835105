"""Regression guard for issue 7: the op checks must pass after everything collection imports.

`make test` once failed `opcheck(lte::apply_gates)` with std::bad_alloc only when the whole suite
was collected (never with one folder). Here a fresh interpreter imports every test module, as
pytest's collection does (which also builds/loads the C++ extension), and then runs `opcheck` on
both lte ops in both modes; `conftest.no_global_state_leak` guards the per-test side.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent
SCRIPT = r"""
import importlib, sys, pathlib
import tests.conftest  # the same environment as pytest (TRITON_INTERPRET, profiles)
root = pathlib.Path(sys.argv[1])
for path in sorted(root.rglob("test_*.py")):
    if path.name != "test_isolation.py":
        importlib.import_module(".".join(path.relative_to(root.parent).with_suffix("").parts))
import torch
from tests.kernels import test_ops
for mode in ("soft", "hard"):
    test_ops.test_opcheck_apply_gates(mode)
    test_ops.test_opcheck_sparse_ffn(mode, True, True)
print("opcheck ok")
"""


def test_opcheck_after_importing_every_test_module():
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(TESTS)], capture_output=True, text=True,
                          env=env, cwd=TESTS.parent, timeout=600)
    assert proc.returncode == 0 and "opcheck ok" in proc.stdout, proc.stderr[-4000:]
