"""LTE kernels: the `lte::` custom ops, their plain-torch reference and the fast paths.

Importing this package registers `torch.ops.lte.sparse_ffn` and `torch.ops.lte.apply_gates`.
"""
from .ops import apply_gates, sparse_ffn
from .reference import sparse_ffn_reference

__all__ = ["sparse_ffn", "apply_gates", "sparse_ffn_reference"]
