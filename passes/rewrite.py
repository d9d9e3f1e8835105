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

Grad-free graphs (`inference=True`) in hard mode go one step further when G is the router's own
`sigmoid(linear(x.detach().to(float32), W_r, b_r))` of the FFN's input: `lte_routed_ffn_region`
takes W_r, b_r and computes G inside the op (one C++ call at batch-1 decode on the CPU), returning
G too, which replaces the router's nodes for their other users (the stored `last_gates`).
"""
from __future__ import annotations

import logging
import operator
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx

from .ffn import FFNMatch, FFNReport, LinearRef, ProjectionSpec
from .fx_utils import arg, op_name

logger = logging.getLogger(__name__)

_DROPOUTS = {torch.nn.functional.dropout, torch.dropout, torch.ops.aten.dropout.default}


def lte_ffn_region(x: Tensor, gates: Tensor, w_up: Tensor, w_gate: Tensor | None, w_down: Tensor,
                   b_up: Tensor | None, b_gate: Tensor | None, b_down: Tensor | None, *,
                   act: str, expert_size: int, mode: str, tau: float, up: tuple,
                   gate: tuple | None, down: tuple, inference: bool = False) -> Tensor:
    """x: [..., d], gates: [..., E] -> y: [..., d_out] through `lte::sparse_ffn` on [T, d] tokens
    (`lte::sparse_ffn_inference`, the same op without autograd support, when `inference`).

    `up`/`gate`/`down` are `ProjectionSpec` layouts `(transposed, rows, down)` (plain tuples: FX writes
    node arguments into generated code as literals): how each stored weight maps to the op's
    [N, d] / [N, d_out] neuron rows (views: no copy when the weights are in kernel layout)."""
    rows = _neuron_rows(w_up, w_gate, w_down, b_up, b_gate, up, gate, down)
    op = torch.ops.lte.sparse_ffn_inference if inference else torch.ops.lte.sparse_ffn
    y = op(x.reshape(-1, x.shape[-1]), gates.reshape(-1, gates.shape[-1]), *rows, b_down,
           act, expert_size, mode, tau)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _neuron_rows(w_up, w_gate, w_down, b_up, b_gate, up: tuple, gate: tuple | None, down: tuple) -> tuple:
    """(w_up, w_gate, w_down, b_up, b_gate) as the op's neuron rows ([N, d], [N, d_out], [N])."""
    up, down = ProjectionSpec("", None, *up), ProjectionSpec("", None, *down)
    gate = None if gate is None else ProjectionSpec("", None, *gate)
    return (up.neuron_rows(w_up), None if w_gate is None else gate.neuron_rows(w_gate), down.neuron_rows(w_down),
            up.bias_rows(b_up), None if gate is None else gate.bias_rows(b_gate))


def lte_routed_ffn_region(x: Tensor, w_r: Tensor, b_r: Tensor | None, w_up: Tensor, w_gate: Tensor | None,
                          w_down: Tensor, b_up: Tensor | None, b_gate: Tensor | None, b_down: Tensor | None,
                          *, act: str, expert_size: int, tau: float, up: tuple, gate: tuple | None,
                          down: tuple) -> tuple[Tensor, Tensor]:
    """x: [..., d] -> (y [..., d_out], G [..., E]) through `lte::routed_sparse_ffn_inference`
    (hard mode, no autograd): the router sigmoid(x W_r^T + b_r) computed inside the op."""
    w_up, w_gate, w_down, b_up, b_gate = _neuron_rows(w_up, w_gate, w_down, b_up, b_gate, up, gate, down)
    y, gates = torch.ops.lte.routed_sparse_ffn_inference(
        x.reshape(-1, x.shape[-1]), w_r, b_r, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, tau)
    return y.reshape(*x.shape[:-1], y.shape[-1]), gates.reshape(*x.shape[:-1], gates.shape[-1])


@dataclass
class RewriteResult:
    """What `rewrite_ffns` did (torch.fx PassResult plus counts and reasons)."""

    graph_module: fx.GraphModule
    modified: bool
    rewritten: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    fused_routers: list[str] = field(default_factory=list)  # FFNs whose router the op computes
    seconds: float = 0.0


def rewrite_ffns(gm: fx.GraphModule, report: FFNReport, *, inference: bool = False) -> RewriteResult:
    """Replace every prepared match (one with an `lte.apply_gates` node) by `lte_ffn_region`.

    `inference`: the graph will never be differentiated (compiled under no_grad / inference_mode),
    so the regions call the ops without custom_op's per-call layers, with the router inside the op
    (`lte_routed_ffn_region`) where `_fusable_router` finds it."""
    start = time.perf_counter()
    result = RewriteResult(gm, False)
    replaced: dict[fx.Node, fx.Node] = {}  # an earlier FFN's output -> its lte_ffn_region node
    fuse_routers = inference and not _has_autocast(gm.graph)  # autocast would change the router's dtype
    for m in report.matches:
        if not m.prepared:
            continue
        reason = _cannot_rewrite(m)
        if reason:
            result.skipped.append(f"{m.module}: {reason}")
            logger.warning("lte rewrite: %s: %s; this FFN runs unfused (masked dense)", m.module, reason)
            continue
        router = _fusable_router(m, replaced) if fuse_routers and m.mode == "hard" else None
        if router is not None:
            replaced[m.output_node] = _rewrite_routed(gm.graph, m, replaced, *router)
            result.fused_routers.append(m.module)
        else:
            replaced[m.output_node] = _rewrite_one(gm.graph, m, replaced, inference)
        _erase_dead_region(gm.graph, m)
        if router is not None:
            _erase_dead_chain(gm.graph, m.gates_node)
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


def _erase_dead_chain(graph: fx.Graph, node: fx.Node) -> None:
    """Erase `node` and then its inputs, as long as nothing else uses them (a fused router)."""
    todo = [node]
    while todo:
        n = todo.pop()
        if n.users or n.op in ("placeholder", "get_attr", "output"):
            continue
        inputs = list(n.all_input_nodes)
        graph.erase_node(n)
        todo.extend(inputs)


_ROUTER_INPUT_OPS = frozenset({"detach", "to", "contiguous", "alias", "clone"})


def _has_autocast(graph: fx.Graph) -> bool:
    return any(n.op == "call_function" and "autocast" in str(n.target) for n in graph.nodes)


def _fusable_router(m: FFNMatch, replaced: dict[fx.Node, fx.Node]) -> tuple[fx.Node, fx.Node | None] | None:
    """(W_r, b_r) when the gates are LTERouter's `sigmoid(linear(x.detach().to(float32), W_r, b_r))`
    on this FFN's own input x with fp32 weights (what the routed op computes), else None."""
    g = m.gates_node
    lin = g.args[0] if op_name(g) == "sigmoid" and g.args else None
    if not isinstance(lin, fx.Node) or op_name(lin) != "linear" or len(lin.users) != 1:
        return None
    src = arg(lin, 0, "input")
    inputs = {m.input_node, replaced.get(m.input_node, m.input_node)}
    while isinstance(src, fx.Node) and src not in inputs and op_name(src) in _ROUTER_INPUT_OPS:
        src = src.args[0]
    w, b = arg(lin, 1, "weight"), arg(lin, 2, "bias")
    w_val, g_val = _meta(w) if isinstance(w, fx.Node) else None, _meta(g)
    if src not in inputs or w_val is None or g_val is None:
        return None
    if w_val.dtype != torch.float32 or w_val.dim() != 2 or g_val.dtype != torch.float32:
        return None
    return w, b


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


def _region_args(m: FFNMatch) -> tuple:
    """The match's weight / bias nodes (up, gate, down weights; up, gate, down biases) and the
    region's common keyword arguments (activation, expert layout, tau, projection layouts)."""
    (w_up, b_up), (w_gate, b_gate), (w_down, b_down) = _weight(m.up), _weight(m.gate), _weight(m.down)
    kwargs = dict(act=m.activation, expert_size=m.expert_size, tau=m.tau, up=_layout(m.up),
                  gate=_layout(m.gate) if m.gate is not None else None, down=_layout(m.down, down=True))
    return w_up, w_gate, w_down, b_up, b_gate, b_down, kwargs


def _rewrite_one(graph: fx.Graph, m: FFNMatch, replaced: dict[fx.Node, fx.Node], inference: bool) -> fx.Node:
    """Insert `lte_ffn_region` for `m`; x may be the output of an FFN rewritten before (stacked
    FFNs, `nn.Sequential(ffn, ffn)`): `replaced` maps that erased node to its replacement."""
    w_up, w_gate, w_down, b_up, b_gate, b_down, kwargs = _region_args(m)
    with graph.inserting_before(m.output_node):
        x, gates = (replaced.get(n, n) for n in (m.input_node, m.gates_node))
        new = graph.call_function(lte_ffn_region, (x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down),
                                  dict(kwargs, mode=m.mode, inference=inference))
    _copy_meta(m.output_node, new)
    m.output_node.replace_all_uses_with(new)
    return new


def _copy_meta(src: fx.Node, dst: fx.Node) -> None:
    dst.meta.update({k: v for k, v in src.meta.items() if k in ("example_value", "val", "stack_trace", "nn_module_stack")})


def _rewrite_routed(graph: fx.Graph, m: FFNMatch, replaced: dict[fx.Node, fx.Node],
                    w_r: fx.Node, b_r: fx.Node | None) -> fx.Node:
    """Insert `lte_routed_ffn_region` for `m` (router fused); its y replaces the FFN's output and
    its G the router's sigmoid for every other user. Returns the y node."""
    w_up, w_gate, w_down, b_up, b_gate, b_down, kwargs = _region_args(m)
    with graph.inserting_before(m.output_node):
        x = replaced.get(m.input_node, m.input_node)
        new = graph.call_function(lte_routed_ffn_region, (x, w_r, b_r, w_up, w_gate, w_down,
                                                          b_up, b_gate, b_down), kwargs)
        y = graph.call_function(operator.getitem, (new, 0))
        gates = graph.call_function(operator.getitem, (new, 1))
    _copy_meta(m.output_node, y)
    _copy_meta(m.gates_node, gates)
    m.output_node.replace_all_uses_with(y)
    m.gates_node.replace_all_uses_with(gates, delete_user_cb=lambda user: user is not m.apply_gates_node)
    return y
