"""rewrite stage: replace each prepared FFN region of a graph by one `lte::sparse_ffn` call.

Why: the eager forward of a prepared model computes every expert and then masks (reference
semantics, `lte::apply_gates`); the lowered graph must read only the active experts' weights,
which only the fused op can do. Before (Llama MLP, prepared, hard mode):

    gate = linear(x, W_g); a = silu(gate); up = linear(x, W_u); h = mul(a, up)
    G = sigmoid(linear(x, W_r, b_r)); hs = lte.apply_gates(h, G, 32, 'hard', 0.5); y = linear(hs, W_d)
After:
    G = sigmoid(linear(x, W_r, b_r)); y = lte_ffn_region(x, G, W_u, W_g, W_d, ...)

`lte_ffn_region` flattens tokens, takes the fused/transposed weight views, and calls the op, so
the graph gains one node per FFN and no new parameters (Dynamo cannot add any). The pass is
idempotent: a rewritten graph has no `apply_gates` node left, so a second run changes nothing.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx

from .ffn import FFNMatch, FFNReport, LinearRef, ProjectionSpec

logger = logging.getLogger(__name__)

_DROPOUTS = {torch.nn.functional.dropout, torch.dropout, torch.ops.aten.dropout.default}


def lte_ffn_region(x: Tensor, gates: Tensor, w_up: Tensor, w_gate: Tensor | None, w_down: Tensor,
                   b_up: Tensor | None, b_gate: Tensor | None, b_down: Tensor | None, *,
                   act: str, expert_size: int, mode: str, tau: float, up: tuple,
                   gate: tuple | None, down: tuple) -> Tensor:
    """x: [..., d], gates: [..., E] -> y: [..., d_out] through `lte::sparse_ffn` on [T, d] tokens.

    `up`/`gate`/`down` are `ProjectionSpec` layouts `(transposed, rows, down)` (plain tuples: FX writes
    node arguments into generated code as literals): how each stored weight maps to the op's
    [N, d] / [N, d_out] neuron rows (views: no copy when the weights are in kernel layout)."""
    up, down = ProjectionSpec("", None, *up), ProjectionSpec("", None, *down)
    gate = None if gate is None else ProjectionSpec("", None, *gate)
    w_down_rows = down.neuron_rows(w_down)  # [N, d_out]
    y = torch.ops.lte.sparse_ffn(
        x.reshape(-1, x.shape[-1]), gates.reshape(-1, gates.shape[-1]), up.neuron_rows(w_up),
        None if w_gate is None else gate.neuron_rows(w_gate), w_down_rows,
        up.bias_rows(b_up), None if gate is None else gate.bias_rows(b_gate), b_down,
        act, expert_size, mode, tau)
    return y.reshape(*x.shape[:-1], w_down_rows.shape[1])


@dataclass
class RewriteResult:
    """What `rewrite_ffns` did (torch.fx PassResult plus counts and reasons)."""

    graph_module: fx.GraphModule
    modified: bool
    rewritten: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def rewrite_ffns(gm: fx.GraphModule, report: FFNReport) -> RewriteResult:
    """Replace every prepared match (one with an `lte.apply_gates` node) by `lte_ffn_region`."""
    start = time.perf_counter()
    result = RewriteResult(gm, False)
    replaced: dict[fx.Node, fx.Node] = {}  # an earlier FFN's output -> its lte_ffn_region node
    for m in report.matches:
        if not m.prepared:
            continue
        reason = _cannot_rewrite(m)
        if reason:
            result.skipped.append(f"{m.module}: {reason}")
            logger.warning("lte rewrite: %s: %s; this FFN runs unfused (masked dense)", m.module, reason)
            continue
        replaced[m.output_node] = _rewrite_one(gm.graph, m, replaced)
        _erase_dead_region(gm.graph, m)
        result.rewritten.append(m.module)
    if result.rewritten:
        gm.graph.lint()
        gm.recompile()
        result.modified = True
    result.seconds = time.perf_counter() - start
    logger.debug("lte rewrite: %d rewritten, %d skipped in %.3f s", len(result.rewritten), len(result.skipped), result.seconds)
    return result


def _erase_dead_region(graph: fx.Graph, m: FFNMatch) -> None:
    """Erase the replaced region's nodes that nothing uses any more.

    Not `graph.eliminate_dead_code()`: it also drops user-less in-place ops elsewhere in the graph
    (a StaticCache's `index_copy_` into its key/value buffers), which broke compiled decoding.
    """
    region = [n for n in graph.nodes if n in set(m.nodes) | {m.output_node, m.apply_gates_node}
              and n.op != "placeholder"]
    for node in reversed(region):  # users come after their inputs: erase from the end
        if not node.users:
            graph.erase_node(node)


def _cannot_rewrite(m: FFNMatch) -> str | None:
    """Why the fused op would not compute what the graph computes (None if it would)."""
    for node in m.nodes:
        if node.op == "call_function" and node.target in _DROPOUTS and _dropout_active(node):
            return "dropout with p > 0 is active inside the FFN (training mode); the fused op has no dropout"
    x_val, y_val = _meta(m.input_node), _meta(m.output_node)
    if x_val is not None and y_val is not None and tuple(x_val.shape[:-1]) != tuple(y_val.shape[:-1]):
        return f"input {tuple(x_val.shape)} and output {tuple(y_val.shape)} differ in token dims"
    return None


def _dropout_active(node: fx.Node) -> bool:
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    train = node.kwargs.get("training", node.kwargs.get("train", node.args[2] if len(node.args) > 2 else True))
    return bool(train) and float(p) > 0


def _meta(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def _weight(ref: LinearRef | None) -> tuple[fx.Node | None, fx.Node | None]:
    return (None, None) if ref is None else (ref.weight_node, ref.bias_node)


def _layout(ref: LinearRef, down: bool = False) -> tuple:
    """The projection's neuron layout as `ProjectionSpec` fields (the graph passes the tensors)."""
    return (ref.transposed, ref.rows, down)


def _rewrite_one(graph: fx.Graph, m: FFNMatch, replaced: dict[fx.Node, fx.Node]) -> fx.Node:
    """Insert `lte_ffn_region` for `m`; x may be the output of an FFN rewritten before (stacked
    FFNs, `nn.Sequential(ffn, ffn)`): `replaced` maps that erased node to its replacement."""
    w_up, b_up = _weight(m.up)
    w_gate, b_gate = _weight(m.gate)
    w_down, b_down = _weight(m.down)
    kwargs = dict(act=m.activation, expert_size=m.expert_size, mode=m.mode, tau=m.tau,
                  up=_layout(m.up), gate=_layout(m.gate) if m.gate is not None else None,
                  down=_layout(m.down, down=True))
    with graph.inserting_before(m.output_node):
        x, gates = (replaced.get(n, n) for n in (m.input_node, m.gates_node))
        new = graph.call_function(lte_ffn_region, (x, gates, w_up, w_gate, w_down,
                                                   b_up, b_gate, b_down), kwargs)
    new.meta.update({k: v for k, v in m.output_node.meta.items() if k in ("example_value", "val", "stack_trace", "nn_module_stack")})
    m.output_node.replace_all_uses_with(new)
    return new
