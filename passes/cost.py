"""FLOPs and weight bytes of one FFN, dense and LTE-sparse, as sympy expressions in T and s.

Used by `lte inspect` (a cost column per matched FFN) and the benchmarks (the ideal time a kernel
is compared with). Symbols: T tokens in the batch, s sparsity (fraction of experts off per token).

- FLOPs: dense `2 T (n_in d d_ff + d_ff d_out)` (n_in = 2 for GLU: gate and up); sparse
  `(1 - s)` of that plus the router `2 T d E` (E = d_ff / B experts).
- Bytes: dense reads every weight once per batch. Sparse reads an expert block if any token needs
  it: with independent masks a block is read with probability `1 - s^T` (the fraction of blocks some token of T needs),
  plus the router weight. At T = 1 that is `(1 - s)`: decode is where LTE saves time.
Biases are left out: O(d_ff) next to O(d d_ff) weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

T, s = sympy.symbols("T s", positive=True)
_TOKENS, _SPARSITY = T, s  # the symbols, under names `evaluate`'s arguments do not shadow


@dataclass(frozen=True)
class FFNCost:
    """Cost expressions of one FFN; `evaluate(T=1, s=0.5)` gives numbers."""

    flops_dense: sympy.Expr
    flops_sparse: sympy.Expr
    bytes_dense: sympy.Expr
    bytes_sparse: sympy.Expr

    def evaluate(self, T: int = 1, s: float = 0.5) -> dict[str, float]:
        """Each expression at T tokens and sparsity s, e.g. `{"flops_dense": 49152.0, ...}`."""
        subs = {_TOKENS: T, _SPARSITY: s}
        return {name: float(getattr(self, name).subs(subs))
                for name in ("flops_dense", "flops_sparse", "bytes_dense", "bytes_sparse")}

    def bytes_ratio(self, T: int = 1, s: float = 0.5) -> float:
        """Sparse/dense weight bytes: the ideal time ratio of a memory-bound FFN."""
        values = self.evaluate(T, s)
        return values["bytes_sparse"] / values["bytes_dense"]


def ffn_cost(d_model: int, d_ff: int, d_out: int, glu: bool, bytes_per_param: int = 2,
             expert_size: int = 32) -> FFNCost:
    """Cost of an FFN with these dims (bf16 weights by default; B = `expert_size` neurons per expert)."""
    n_in = 2 if glu else 1
    experts = sympy.Rational(d_ff, expert_size)
    weights = n_in * d_model * d_ff + d_ff * d_out
    router = d_model * experts
    flops_dense = 2 * T * weights
    return FFNCost(
        flops_dense=flops_dense,
        flops_sparse=(1 - s) * flops_dense + 2 * T * router,
        bytes_dense=sympy.Integer(bytes_per_param * weights),
        bytes_sparse=bytes_per_param * ((1 - s**T) * weights + router),
    )
