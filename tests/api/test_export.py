"""lte.export / lte.package: a prepared model in hard mode as a torch.export program and an
AOTInductor package, each loaded in a fresh process (lte_compile/deploy.py).

The model is the tiniest that exercises the path: two ReLU MLPs with biases (d 16, d_ff 64, 2
experts of 32 each) in sequence, so the second FFN reads the first one's rewritten output.
The AOTInductor tests run g++ (the package about a minute on 2 cores; the C++ registration
library and a Python-free runner two more): they are marked slow and share one package.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lte_compile as lte
from lte_compile.deploy import build_cpp_library, count_ops, libtorch_flags
from tests import models

FFNS = 2
REPO = Path(__file__).resolve().parents[2]


def _prepared_stack(mode: str = "hard") -> nn.Sequential:
    torch.manual_seed(0)
    stack = nn.Sequential(models.MLP(), models.MLP()).eval()
    lte.prepare(stack, lte.Config(expert_size=32), example_inputs=(models.tokens(),))
    return lte.set_mode(stack, mode)


@pytest.fixture(scope="module")
def stack() -> nn.Sequential:
    return _prepared_stack()


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    # x: the export example (T = 10); other: another batch and length (dynamic dims); decode: T = 1
    return {"x": models.tokens(), "other": models.tokens(batch=3, seq=7, seed=1),
            "decode": models.tokens(batch=1, seq=1, seed=2)}


def _eager(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {k: model(v) for k, v in inputs.items()}


def _run_fresh_process(script: str, tmp_path: Path, inputs: dict[str, torch.Tensor]) -> dict:
    """Run `script` in a new interpreter with `inputs` in tmp/inputs.safetensors; it writes its
    outputs to tmp/outputs.safetensors and a JSON dict to stdout's last line."""
    save_file({k: v.contiguous() for k, v in inputs.items()}, tmp_path / "inputs.safetensors")
    # LTE_AUTOTUNE=0: dispatch's constant rule (the C++ kernel below 32 tokens), no timing, no cache file
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "LTE_AUTOTUNE": "0"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the fresh process failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _dynamic_batch_and_seq():
    from torch.export import Dim
    return ({0: Dim("batch", max=64), 1: Dim("seq", max=512)},)


# --------------------------------------------------------------------------------------- export


_LOAD_EXPORTED = """
    import json, logging, torch
    from safetensors.torch import load_file, save_file
    logging.disable(logging.WARNING)  # torch.export.load logs the failure below at length
    try:  # before the import, lte::sparse_ffn is unknown
        torch.export.load("model.pt2")
        error = None
    except RuntimeError as e:
        error = repr(e.__cause__ or e)
    import lte_compile  # registers the lte:: ops the program calls
    program = torch.export.load("model.pt2")
    calls = sum(1 for n in program.graph.nodes if n.target is torch.ops.lte.sparse_ffn.default)
    with torch.no_grad():
        out = {k: program.module()(v) for k, v in load_file("inputs.safetensors").items()}
    save_file(out, "outputs.safetensors")
    print(json.dumps({"sparse_ffn_calls": calls, "error_without_import": error}))
"""


def test_export_save_load_in_a_fresh_process(stack, inputs, tmp_path):
    """Every FFN is one lte::sparse_ffn call (no masked dense FFN left); the saved program loads
    in a new process (once lte_compile is imported: not before) and gives the same outputs, at
    the exported and at another batch/length."""
    before = models.snapshot(stack)
    ep = lte.export(stack, (inputs["x"],), dynamic_shapes=_dynamic_batch_and_seq())
    models.assert_state_unchanged(stack, before)
    assert count_ops(ep.graph, "lte::sparse_ffn") == FFNS
    assert count_ops(ep.graph, "lte::apply_gates") == 0
    with torch.no_grad():
        in_process = {k: ep.module()(v) for k, v in inputs.items()}
    for name, y in _eager(stack, inputs).items():
        # the gathered kernel sums in another order than the masked dense eager forward
        torch.testing.assert_close(in_process[name], y, rtol=1e-5, atol=1e-6, msg=f"{name}: export vs eager")
    torch.export.save(ep, tmp_path / "model.pt2")
    report = _run_fresh_process(_LOAD_EXPORTED, tmp_path, inputs)
    assert report["error_without_import"] is not None, "loaded without the lte:: ops registered?"
    assert report["sparse_ffn_calls"] == FFNS
    loaded = load_file(tmp_path / "outputs.safetensors")
    for name, y in in_process.items():
        assert torch.equal(loaded[name], y), f"{name}: the loaded program differs from the exported one"


def test_export_of_a_transformers_llama_with_dummy_inputs():
    """No example inputs: the dummy batch gets use_cache=False (a cache is not exportable) and
    return_dict=False (a tuple, loadable without transformers' pytree registrations)."""
    model = models.hf_model("llama")
    lte.prepare(model, lte.Config(expert_size=32))
    lte.set_mode(model, "hard")
    ep = lte.export(model)
    assert count_ops(ep.graph, "lte::sparse_ffn") == models.LAYERS
    ids = models.hf_inputs("llama")
    with torch.no_grad():
        (logits,) = ep.module()(**ids, return_dict=False)
        torch.testing.assert_close(logits, model(**ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["soft", "dense"])
def test_export_refuses_other_modes(mode, inputs):
    model = _prepared_stack(mode)
    before = models.snapshot(model)
    with pytest.raises(lte.ConfigError, match=r"set_mode\(model, 'hard'\)"):
        lte.export(model, (inputs["x"],))
    models.assert_state_unchanged(model, before)
    assert lte.get_mode(model) == mode


def test_export_refuses_an_unprepared_model(inputs):
    with pytest.raises(lte.NotPreparedError, match=r"lte\.prepare"):
        lte.export(models.MLP().eval(), (inputs["x"],))


class _SkippableStack(nn.Sequential):
    """Two MLPs; `skip_second` leaves the second (prepared) FFN out of the forward."""

    skip_second = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[0](x) if self.skip_second else self[1](self[0](x))


def test_export_refuses_a_program_with_a_prepared_ffn_missing(inputs):
    """Every router's FFN must be an lte::sparse_ffn call of the program, or the export fails."""
    torch.manual_seed(0)
    model = _SkippableStack(models.MLP(), models.MLP()).eval()
    lte.prepare(model, lte.Config(expert_size=32), example_inputs=(inputs["x"],))
    lte.set_mode(model, "hard")
    model.skip_second = True
    with pytest.raises(lte.UnsupportedFFNError, match="1 of 2 prepared FFN"):
        lte.export(model, (inputs["x"],))


def test_package_checks_the_path_before_compiling(stack, inputs, tmp_path):
    with pytest.raises(lte.ConfigError, match=r"\.pt2"):
        lte.package(stack, tmp_path / "model.zip", (inputs["x"],))
    with pytest.raises(lte.ConfigError, match="existing directory"):
        lte.package(stack, tmp_path / "missing" / "model.pt2", (inputs["x"],))
    assert not any(tmp_path.iterdir())


def test_package_refuses_a_program_with_dense_ffns(inputs, tmp_path):
    """A plain torch.export of the prepared model still has the masked dense FFNs."""
    with torch.no_grad(), pytest.warns(UserWarning, match="last_gates"):  # export saw the router's cache
        plain = torch.export.export(_prepared_stack(), (inputs["x"],))
    with pytest.raises(lte.UnsupportedFFNError, match="lte.apply_gates"):
        lte.package(plain, tmp_path / "model.pt2")
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------- AOTInductor


_LOAD_PACKAGE = """
    import json, torch
    from safetensors.torch import load_file, save_file
    try:  # before the import, the package's lte::sparse_ffn calls have no schema
        torch._inductor.aoti_load_package("model.pt2")
        error = None
    except RuntimeError as e:
        error = str(e)
    import lte_compile
    from lte_compile.kernels import cpu, dispatch

    calls = {}
    def counted(name):
        kernel = dispatch.get_kernel(name)
        def run(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return kernel(*args, **kwargs)
        return run
    for name in dispatch.kernel_names():
        if name != "triton":  # GPU only; importing it here would only cost time
            dispatch.register_kernel(name, counted(name))

    runner = torch._inductor.aoti_load_package("model.pt2")
    out, calls_by_input = {}, {}
    with torch.no_grad():
        for name, x in load_file("inputs.safetensors").items():
            calls.clear()
            out[name] = runner(x)
            calls_by_input[name] = dict(calls)
    save_file(out, "outputs.safetensors")
    print(json.dumps({"calls": calls_by_input, "cpp_kernel": cpu.extension_available(),
                      "error_without_import": error}))
"""


def _package_extern_ops(path: Path) -> list[str]:
    """The ops the package calls outside its generated code (AOTInductor's proxy executor reads
    them from the `*.wrapper.json` beside the compiled model)."""
    with zipfile.ZipFile(path) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".wrapper.json")]
        return [node["node"]["target"] for node in json.loads(z.read(name))["nodes"]]


@pytest.fixture(scope="module")
def aoti_package(stack, inputs, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("aoti") / "model.pt2"
    assert lte.package(stack, path, (inputs["x"],), dynamic_shapes=_dynamic_batch_and_seq()) == str(path)
    return path


@pytest.mark.slow
def test_aoti_package_runs_the_sparse_kernel_in_a_fresh_process(stack, inputs, aoti_package, tmp_path):
    """The .pt2 calls lte::sparse_ffn once per FFN; loaded in a new process that imported
    lte_compile, each call reaches the C++ gathered kernel, and the outputs match eager hard mode.
    Before the import the package does not load (the op is registered from Python)."""
    assert _package_extern_ops(aoti_package) == ["lte::sparse_ffn"] * FFNS
    shutil.copy(aoti_package, tmp_path / "model.pt2")
    report = _run_fresh_process(_LOAD_PACKAGE, tmp_path, inputs)
    assert "lte::sparse_ffn" in (report["error_without_import"] or ""), report
    assert report["cpp_kernel"], "the C++ extension did not build in the fresh process"
    assert report["calls"] == {name: {"cpu": FFNS} for name in inputs}, report["calls"]
    loaded = load_file(tmp_path / "outputs.safetensors")
    for name, y in _eager(stack, inputs).items():
        torch.testing.assert_close(loaded[name], y, rtol=1e-5, atol=1e-6, msg=f"{name}: AOTI vs eager")


_CPP_RUNNER = r"""
// runner PACKAGE IN.f32 OUT.f32 DIM...: runs an AOTInductor package on one float32 input, no Python
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <ATen/ATen.h>
#include <cstdio>
#include <fstream>
#include <vector>

int main(int argc, char** argv) {
  std::vector<int64_t> shape;
  for (int i = 4; i < argc; ++i) shape.push_back(std::stoll(argv[i]));
  at::Tensor x = at::empty(shape, at::kFloat);
  std::ifstream(argv[2], std::ios::binary).read(reinterpret_cast<char*>(x.data_ptr<float>()), x.nbytes());
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  at::Tensor y = loader.run({x}).at(0).contiguous();
  std::ofstream(argv[3], std::ios::binary).write(reinterpret_cast<const char*>(y.data_ptr<float>()), y.nbytes());
  return 0;
}
"""


@pytest.mark.slow
def test_aoti_package_runs_without_python(stack, inputs, aoti_package, tmp_path):
    """A C++ program that links no Python loads the package with the C++ registration of
    lte::sparse_ffn (build_cpp_library, kernels/csrc/sparse_ffn_library.cpp) and matches eager
    hard mode; without that library it cannot load the package."""
    lib = build_cpp_library(tmp_path / "liblte_ops.so")
    (tmp_path / "runner.cpp").write_text(_CPP_RUNNER)
    runner = tmp_path / "runner"
    subprocess.run([os.environ.get("CXX", "c++"), "-std=c++20", "-O1", str(tmp_path / "runner.cpp"),
                    *libtorch_flags(), "-o", str(runner)], check=True, capture_output=True)
    for binary in (runner, lib):
        linked = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
        assert "libpython" not in linked and "libtorch_python" not in linked, f"{binary.name}:\n{linked}"
    env = {"LD_PRELOAD": str(lib), "OMP_NUM_THREADS": "1"}  # the registration runs when it loads
    eager = _eager(stack, inputs)
    for name, x in inputs.items():
        x.numpy().tofile(tmp_path / "x.f32")
        subprocess.run([str(runner), str(aoti_package), str(tmp_path / "x.f32"), str(tmp_path / "y.f32"),
                        *map(str, x.shape)], check=True, env=env, timeout=120)
        y = torch.from_numpy(np.fromfile(tmp_path / "y.f32", dtype=np.float32)).reshape(eager[name].shape)
        torch.testing.assert_close(y, eager[name], rtol=1e-5, atol=1e-6, msg=f"{name}: C++ runner vs eager")
    alone = subprocess.run([str(runner), str(aoti_package), str(tmp_path / "x.f32"), str(tmp_path / "y.f32"),
                            *map(str, inputs["decode"].shape)], capture_output=True, text=True, timeout=120)
    assert alone.returncode != 0 and "Could not find schema for lte::sparse_ffn" in alone.stderr
