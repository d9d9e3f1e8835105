"""LTE kernels: the `lte::` custom ops, their plain-torch reference and the fast paths.

Importing this package registers `torch.ops.lte.sparse_ffn` and `torch.ops.lte.apply_gates`.

This folder installs as `lte_compile.kernels` (pyproject `package-dir`). With the repository root
on `sys.path` (pytest, `python -m ...` run from a checkout) it is also reachable as a top-level
`kernels`, and transformers probes exactly that name (`importlib.import_module("kernels")`, for the
Hugging Face hub package) when its model configs are imported. Importing ops.py a second time
would re-define the lte:: ops, and torch then frees the first registration while OpOverloads of it
are still cached: a use-after-free in the dispatcher that surfaced as `std::bad_alloc` or
`vector::reserve` in whichever op call came next (issue 7). Under any other name this module
therefore imports nothing and, like a namespace-package shadow, has no `__file__`, so
transformers reports the hub package as absent.
"""
if __name__ == "lte_compile.kernels":
    from .ops import ACTIVATIONS, MODES, ApplyGatesArgs, apply_gates, sparse_ffn
    from .reference import sparse_ffn_reference

    __all__ = ["ACTIVATIONS", "MODES", "ApplyGatesArgs", "sparse_ffn", "apply_gates", "sparse_ffn_reference"]
else:
    __file__ = None  # noqa: F811  (see above: not a second lte_compile.kernels, not the hub package)
    __all__ = []
