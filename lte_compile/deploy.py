"""A deployable artifact: `torch.export` and AOTInductor packages of a prepared model in hard mode.

`lte.export` and `lte.package` (this module is not named export.py: a submodule `lte_compile.export`
would replace the function `lte.export` on the package once imported).

    ep = lte.export(model, example_inputs=(ids,))       # ExportedProgram; FFNs are lte::sparse_ffn
    torch.export.save(ep, "model.pt2")                 # load: import lte_compile; torch.export.load
    lte.package(ep, "model_aoti.pt2")                  # AOTInductor .pt2 (runs g++); or the model
    runner = torch._inductor.aoti_load_package("model_aoti.pt2")  # after `import lte_compile`

How: `torch.export.export` traces the eager forward (every FFN computed densely, then masked by
the `lte::apply_gates` marker); the backend's rewrite (`passes.rewrite.rewrite_ffns`) then
replaces each marked region of `ep.graph_module` by a call of the Python function
`lte_ffn_region`, and `ep.run_decompositions({})` retraces the graph so that function becomes
ATen views around one `torch.ops.lte.sparse_ffn.default` node per FFN. The empty decomposition
table keeps every other op as export left it (`aten.linear` stays; pass the result through
`run_decompositions()` yourself for core ATen): the retrace is only there because an
`ExportedProgram`'s graph must hold operators, not Python callables (`torch.export.save` and
AOTInductor serialize it).

Loading either artifact needs the `lte::` ops registered, i.e. `import lte_compile` in the loading
process: they are Python `torch.library.custom_op`s. AOTInductor calls them through its proxy
executor, which goes through the dispatcher into the Python op and so into the C++ CPU kernel
(`kernels/cpu.py`). Without the import, `torch.export.load` fails on the unknown operator and
`aoti_load_package` raises "Could not find schema for lte::sparse_ffn". So in Python the op's
Python wrapper stays on the per-call path (measured on a busy 2-core AVX2 machine, 16 tokens,
d 64, N 256: one op call from Python 0.48 ms, the C++ kernel alone 0.07 ms).

Without Python (a C++ program using torch::inductor::AOTIModelPackageLoader), the op must be
registered in C++: `build_cpp_library(path)` compiles kernels/csrc/sparse_ffn_library.cpp
(`TORCH_LIBRARY(lte)`: the same schema, the gathered CPU kernel, the NaN-row policy) into a shared
library that links libtorch only; load it into that program (link or dlopen) before the package.
Never load it into a Python process that imported lte_compile: both would define the schema.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, NotPreparedError, UnsupportedFFNError
from .passes import find_ffns
from .passes.fx_utils import op_name
from .passes.rewrite import rewrite_ffns
from .plan import get_mode, is_prepared, routers
from .plan.prepare import example_args

logger = logging.getLogger(__name__)

_SPARSE_FFN = "lte::sparse_ffn"
_APPLY_GATES = "lte::apply_gates"


def export(model: nn.Module, example_inputs: Any = None, *, dynamic_shapes: Any = None,
           strict: bool = False) -> torch.export.ExportedProgram:
    """`torch.export` a prepared model in hard mode; every prepared FFN becomes one `lte::sparse_ffn`.

    example_inputs: a tuple of positional args, a dict of keyword args or one tensor (as for
        `lte.prepare`); None for a transformers model gives an 8-token batch with
        `use_cache=False` (a KV cache object is not an exportable output) and `return_dict=False`
        (outputs a tuple: loading a program that returns a `ModelOutput` needs
        `import transformers.modeling_outputs` first, for its pytree registration).
    dynamic_shapes: passed to `torch.export.export`, e.g. `({1: Dim("seq")},)` for `(ids,)`.
    The model is traced in eval mode (restored afterwards) and is not otherwise changed. Raises
    `NotPreparedError` (not prepared), `ConfigError` (not in hard mode) or `UnsupportedFFNError`
    (an FFN that would stay dense in the exported program).
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: export what it wraps
    _check_exportable(model)
    args, kwargs = _export_args(model, example_inputs)
    with _eval_mode(model), _router_state_kept(model), torch.no_grad(), warnings.catch_warnings():
        # The routers keep their latest gates as a plain attribute (for `lte.gates`); export warns
        # that it saw the assignment, which is harmless here (restored by _router_state_kept).
        warnings.filterwarnings("ignore", message=r".*lte_router\.last_gates.*assigned during export")
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    return _sparsify(ep, expected=len(routers(model)))


def _sparsify(ep: torch.export.ExportedProgram, expected: int) -> torch.export.ExportedProgram:
    """The rewrite as an export pass: a new program whose prepared FFNs are `lte::sparse_ffn` calls.

    `ep` is the fresh export of a prepared model in hard mode; its graph module is edited in place
    (private: `lte.export` owns it). `expected`: the model's router count; fewer FFNs rewritten
    raises `UnsupportedFFNError` naming the ones left dense.
    """
    report = find_ffns(ep)
    result = rewrite_ffns(ep.graph_module, report)
    left = count_ops(ep.graph_module.graph, _APPLY_GATES)
    if left or len(result.rewritten) != expected:
        raise UnsupportedFFNError(
            f"lte.export: {len(result.rewritten)} of {expected} prepared FFN(s) became lte::sparse_ffn "
            f"({left} lte.apply_gates marker(s) left; skipped: {result.skipped or 'none'}; near misses: "
            f"{[str(n) for n in report.near_misses] or 'none'}); the exported program would run the "
            "others dense or not at all. Every router's FFN must run in the exported forward, "
            "with no dropout active inside it.")
    sparse = ep.run_decompositions({})  # turns the Python region function into ATen + lte ops
    calls = count_ops(sparse.graph_module.graph, _SPARSE_FFN)
    if calls != expected:  # the retrace must keep the opaque custom op; guard against a change
        raise UnsupportedFFNError(f"lte.export: expected {expected} lte::sparse_ffn call(s) after "
                                  f"run_decompositions, found {calls}")
    logger.info("lte.export: %d FFN(s) exported as lte::sparse_ffn", calls)
    return sparse


def package(model: nn.Module | torch.export.ExportedProgram, path: str | os.PathLike, example_inputs: Any = None,
            *, dynamic_shapes: Any = None, inductor_configs: dict[str, Any] | None = None) -> str:
    """Compile a prepared model (through `lte.export`), or the program `lte.export` returned, with
    AOTInductor into the `.pt2` package `path`; returns the path.

    Load it with `torch._inductor.aoti_load_package(path)` in a process that imported lte_compile
    (the `lte::` ops are Python custom ops, which AOTInductor calls through its proxy executor).
    Compiling runs g++ (about a minute for a small model).
    """
    path = Path(path)
    if path.suffix != ".pt2":
        raise ConfigError("path", str(path), "a file name ending in .pt2 (AOTInductor's package format)")
    if not path.parent.is_dir():
        raise ConfigError("path", str(path), "a file in an existing directory",
                          f"create {str(path.parent)!r} first")
    if isinstance(model, torch.export.ExportedProgram):
        ep = model
        _check_sparse_program(ep)
    else:
        ep = export(model, example_inputs, dynamic_shapes=dynamic_shapes)
    from torch._inductor import aoti_compile_and_package

    return aoti_compile_and_package(ep, package_path=str(path), inductor_configs=inductor_configs)


def _check_sparse_program(ep: torch.export.ExportedProgram) -> None:
    """A program to package must be `lte.export`'s: sparse FFN calls, no masked dense FFN left."""
    markers, calls = count_ops(ep.graph, _APPLY_GATES), count_ops(ep.graph, _SPARSE_FFN)
    if markers or not calls:
        raise UnsupportedFFNError(
            f"lte.package: the program has {calls} lte::sparse_ffn call(s) and {markers} lte.apply_gates "
            "marker(s) (FFNs that would run masked dense); pass the prepared model in hard mode or the "
            "program lte.export returned, not a plain torch.export.export of the model")


def build_cpp_library(path: str | os.PathLike) -> Path:
    """Compile the C++ registration of `lte::sparse_ffn` (kernels/csrc/sparse_ffn_library.cpp)
    into the shared library `path`, for running `lte.package` artifacts without Python.

    Flags as for the Python extension (this CPU's ISA level from `kernels.cpu.isa()`, -fopenmp
    bound to torch's own libgomp); links libtorch, not libtorch_python. Takes a minute or more.
    """
    from .kernels import cpu

    csrc = Path(cpu.__file__).resolve().parent / "csrc"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise ConfigError("CXX", cxx, "a C++ compiler on PATH", "install g++ (AOTInductor needs it too)")
    path = Path(path)
    cmd = [cxx, "-std=c++20", "-O3", *cpu.isa()[1], "-fopenmp", "-fPIC", "-shared",
           f"-I{csrc / 'no_python'}",  # first: its torch/extension.h replaces the Python one
           str(csrc / "sparse_ffn_library.cpp"), *libtorch_flags(), "-o", str(path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return path


def libtorch_flags() -> list[str]:
    """g++ flags to compile and link C++ against this torch: headers, ABI, libtorch, rpath."""
    from torch.utils.cpp_extension import include_paths, library_paths

    (lib,) = library_paths()
    gomp = [str(p) for p in Path(lib).glob("libgomp*.so*")][:1]  # torch's own OpenMP runtime
    return [*(f"-I{p}" for p in include_paths()),
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-L{lib}", "-ltorch", "-ltorch_cpu", "-lc10", *gomp, f"-Wl,-rpath,{lib}"]


def count_ops(graph: torch.fx.Graph, name: str) -> int:
    """How many nodes of `graph` call the op `name` (e.g. 'lte::sparse_ffn', any overload)."""
    return sum(1 for n in graph.nodes if n.op == "call_function" and op_name(n) == name)


def _check_exportable(model: nn.Module) -> None:
    if not is_prepared(model):
        raise NotPreparedError(f"{type(model).__name__} has no LTE routers: call lte.prepare(model, lte.Config()) "
                               "and lte.set_mode(model, 'hard') (after training or lte.fit_routers) before lte.export")
    mode = get_mode(model)
    if mode != "hard":
        raise ConfigError("mode", mode, "'hard' for lte.export",
                          "the exported FFNs run only the experts whose gate is above tau; call "
                          "lte.set_mode(model, 'hard') first (soft and dense modes compute every expert)")


def _export_args(model: nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
    args, kwargs = example_args(model, example_inputs)
    if example_inputs is None:  # the dummy batch of a transformers model: plain tensors out
        params = inspect.signature(model.forward).parameters
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        # transformers v5 forwards take return_dict through **kwargs (`can_return_tuple`)
        kwargs.update({k: False for k in ("use_cache", "return_dict") if k in params or takes_kwargs})
    return args, kwargs


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _router_state_kept(model: nn.Module) -> Iterator[None]:
    """Keep each router's `last_gates` as it was: tracing assigns fake tensors to it."""
    saved = {name: r.last_gates for name, r in routers(model).items()}
    try:
        yield
    finally:
        for name, r in routers(model).items():
            r.last_gates = saved[name]
