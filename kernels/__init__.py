"""LTE kernels: the `lte::` custom ops, their plain-torch reference and the fast paths.

Importing this package registers `torch.ops.lte.sparse_ffn` and `torch.ops.lte.apply_gates`.
"""
from .ops import ACTIVATIONS, MODES, ApplyGatesArgs, apply_gates, sparse_ffn
from .reference import sparse_ffn_reference

__all__ = ["ACTIVATIONS", "MODES", "ApplyGatesArgs", "sparse_ffn", "apply_gates", "sparse_ffn_reference"]
