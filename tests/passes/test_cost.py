"""ffn_cost: FLOPs and weight bytes, dense and LTE-sparse, as sympy expressions in T and s."""
from __future__ import annotations

import pytest
import sympy

from lte_compile.passes import ffn_cost
from lte_compile.passes.cost import T, s

# Llama-like tiny FFN: d 64, d_ff 128, GLU; B = 32 -> E = 4 experts.
D, D_FF, B = 64, 128, 32
WEIGHTS_GLU = 2 * D * D_FF + D_FF * D  # gate + up + down parameters


def test_dense_flops_and_bytes_match_the_formula():
    cost = ffn_cost(D, D_FF, D, glu=True, bytes_per_param=2, expert_size=B)
    values = cost.evaluate(T=3, s=0.5)
    assert values["flops_dense"] == 2 * 3 * WEIGHTS_GLU
    assert values["bytes_dense"] == 2 * WEIGHTS_GLU
    assert cost.bytes_dense.free_symbols == set()  # dense reads every weight once, whatever T


def test_non_glu_has_one_input_projection():
    values = ffn_cost(D, 4 * D, D, glu=False, bytes_per_param=4).evaluate(T=1, s=0.0)
    assert values["flops_dense"] == 2 * (D * 4 * D + 4 * D * D)
    assert values["bytes_dense"] == 4 * 2 * D * 4 * D


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.9, 1.0])
def test_sparse_flops_scale_by_one_minus_s_plus_router(sparsity):
    values = ffn_cost(D, D_FF, D, glu=True, expert_size=B).evaluate(T=5, s=sparsity)
    router = 2 * 5 * D * (D_FF // B)
    assert values["flops_sparse"] == pytest.approx((1 - sparsity) * values["flops_dense"] + router)


def test_batch_one_reads_one_minus_s_of_the_weights():
    cost = ffn_cost(D, D_FF, D, glu=True, bytes_per_param=2, expert_size=B)
    values = cost.evaluate(T=1, s=0.75)
    router_bytes = 2 * D * (D_FF // B)
    assert values["bytes_sparse"] == pytest.approx(0.25 * values["bytes_dense"] + router_bytes)


def test_larger_batches_read_more_blocks():
    """With independent masks a block is read if any of T tokens needs it: 1 - s^T."""
    cost = ffn_cost(D, D_FF, D, glu=True, expert_size=B)
    ratios = [cost.bytes_ratio(T=t, s=0.5) for t in (1, 2, 4, 16)]
    assert ratios == sorted(ratios) and ratios[0] < 0.55 and ratios[-1] > 1.0  # + router: above dense at T=16
    assert sympy.simplify(cost.bytes_sparse.subs(T, 1) - 2 * ((1 - s) * WEIGHTS_GLU + D * D_FF // B)) == 0
