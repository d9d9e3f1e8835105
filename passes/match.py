"""`find_ffns`: find the FFN regions of a graph, and say why near misses were rejected.

An FFN is `y = down(act(up(x)))` or, gated (GLU), `y = down(act(gate(x)) * up(x))`. The matcher
anchors on every projection (candidate `down`) and walks back through its input:

    down <- [dropout, views, casts] <- [lte.apply_gates(h, G, B, mode, tau)] <- [dropout, ...]
         <- act(up)                 (relu | gelu | gelu_tanh | silu | relu2 | quick_gelu, also decomposed)
         <- act(gate) * up          (either operand order; gate/up may be slices of one fused
                                     projection, Phi-3 `gate_up_proj(x).chunk(2, -1)`)

The forms each piece takes are normalised in `forms.py`. A candidate becomes a match only if its
region (the nodes between x and y) has exactly one input, x (plus the router gates when the model
was prepared), and one output, y: proved on the networkx data-flow graph. That is what lets
`rewrite_ffns` replace the whole region by one `lte.sparse_ffn` call.

Before / after (Dynamo graph of a Llama MLP; the pass only reads the graph):

    linear = linear(h, gate_w); silu = silu(linear); linear_1 = linear(h, up_w)
    mul = mul(silu, linear_1); down_proj = linear(mul, down_w)
    -> FFNMatch(module="model.layers.0.mlp", input_node=h, output_node=down_proj,
                activation="silu", glu=True, d_model=64, d_ff=128, form="linear", ...)
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import networkx as nx
import torch
from torch import fx, nn

from ..kernels.ops import ApplyGatesArgs
from .ffn import ACTIVATIONS, FFNMatch, FFNReport, LinearRef, NearMiss
from .activations import Activation, match_activation
from .forms import Projection, find_projections, is_passthrough, is_row_view, match_slice, strip_back
from .fx_utils import ParamInfo, graph_params, is_scalar, op_name, to_networkx

logger = logging.getLogger(__name__)

_APPLY_GATES = "lte::apply_gates"
# Element-wise ops an unsupported activation may be built from (only used to explain near misses).
_ELEMENTWISE = frozenset({
    "tanh", "sigmoid", "softplus", "elu", "selu", "celu", "leaky_relu", "hardtanh", "relu6",
    "hardswish", "hardsigmoid", "mish", "gelu", "logsigmoid", "softsign", "exp", "log", "abs",
    "pow", "neg", "mul", "add", "sub", "div", "erf", "sin", "cos", "clamp", "square", "sqrt",
    "rsqrt", "relu", "silu",
})
_PROBE_LIMIT = 24  # nodes an unknown-activation probe may visit before giving up


@dataclass
class _Branch:
    """A projection feeding the hidden activation, possibly a row slice of a fused projection."""

    proj: Projection
    rows: tuple[int, int] | None
    nodes: list[fx.Node]

    @property
    def width(self) -> int:
        return self.rows[1] - self.rows[0] if self.rows else self.proj.out_features

    def ref(self) -> LinearRef:
        return replace(self.proj.ref, rows=self.rows)


@dataclass
class _Hidden:
    """What sits between the projections: the activation, the GLU product, apply_gates."""

    act: Activation
    up: _Branch
    gate: _Branch | None
    apply_gates: fx.Node | None
    nodes: list[fx.Node]


class _Context:
    """Per-graph state shared by the candidates: projections, params, the networkx graph."""

    def __init__(self, gm: fx.GraphModule, params: dict[fx.Node, ParamInfo]):
        self.gm, self.params = gm, params
        self.projections = find_projections(gm, params)
        self.nx = to_networkx(gm.graph)
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self._constant: dict[fx.Node, bool] = {}

    def is_constant(self, node: fx.Node) -> bool:
        """True if `node` depends on no data input: parameters, sizes, literals (memoised)."""
        if node not in self._constant:
            if node in self.params or node.op == "get_attr" or is_scalar(node):
                self._constant[node] = True
            elif node.op == "placeholder":
                self._constant[node] = False
            else:
                self._constant[node] = all(self.is_constant(n) for n in node.all_input_nodes)
        return self._constant[node]

    def branch(self, node: fx.Node) -> _Branch | None:
        """The projection (or fused-projection slice) `node` is, behind pass-throughs."""
        source, passed = strip_back(node)
        if source in self.projections:
            proj = self.projections[source]
            return _Branch(proj, None, [*proj.nodes, *passed])
        piece = match_slice(source)
        if piece is None:
            return None
        fused, more = strip_back(piece.source)
        proj = self.projections.get(fused)
        rows = piece.rows_of(proj.out_features) if proj is not None else None
        if rows is None:
            return None
        return _Branch(proj, rows, [*proj.nodes, *more, *piece.nodes, *passed])


# ---------------------------------------------------------------------------------------------
# Public entry points


def find_ffns(gm: fx.GraphModule | torch.export.ExportedProgram, example_inputs: Sequence[Any] | None = None,
              *, model: nn.Module | None = None) -> FFNReport:
    """Find the FFNs of a Dynamo, torch.export or symbolic_trace graph.

    gm: a GraphModule (Dynamo: pass the backend's `example_inputs`, whose i-th entry is the real
        tensor of the i-th placeholder) or an `ExportedProgram` (its signature names the params).
    model: when given, weight paths are resolved by tensor identity against
        `model.named_parameters()`, so `model.get_parameter(match.up.weight_path)` works even
        for graphs Dynamo traced from a submodule after a graph break.
    The graph is only read, never changed.
    """
    start = time.perf_counter()
    graph_module, params = _graph_and_params(gm, example_inputs)
    if model is not None:
        _paths_from_model(params, model)
    ctx = _Context(graph_module, params)
    report, claimed = FFNReport(), set()
    for down in ctx.projections.values():
        result = _match_at(down, ctx)
        if isinstance(result, FFNMatch) and claimed & set(result.nodes):
            result = NearMiss(down.node, "shares nodes with an FFN matched earlier (stacked projections); "
                              "only the first is made sparse", result.module)
        if isinstance(result, FFNMatch):
            claimed.update(result.nodes)
            report.matches.append(result)
        elif result is not None:
            report.near_misses.append(result)
    logger.debug("find_ffns: %d FFNs, %d near misses in %.1f ms", len(report.matches),
                 len(report.near_misses), 1e3 * (time.perf_counter() - start))
    return report


def find_ffns_in_model(model: nn.Module, *args: Any, **kwargs: Any) -> FFNReport:
    """Run `model(*args, **kwargs)` once under Dynamo and find the FFNs of every graph.

    Weight paths are the user's (`model.get_parameter(m.up.weight_path)` works). An FFN is
    reported once per set of weights, even if it runs in several graphs (recompiles, graph
    breaks) or several times in one (weights shared across layers, ALBERT).
    """
    from .trace import capture_graphs

    report, seen = FFNReport(), set()
    for gm, example_inputs in capture_graphs(model, *args, **kwargs):
        found = find_ffns(gm, example_inputs, model=model)
        for match in found.matches:
            key = tuple(match.weight_paths().values())
            if key not in seen:
                seen.add(key)
                report.matches.append(match)
        for miss in found.near_misses:
            if (miss.module, miss.reason) not in seen:
                seen.add((miss.module, miss.reason))
                report.near_misses.append(miss)
    return report


def _graph_and_params(gm: Any, example_inputs: Sequence[Any] | None) -> tuple[fx.GraphModule, dict]:
    if isinstance(gm, torch.export.ExportedProgram):
        return gm.graph_module, graph_params(gm.graph_module, signature=gm.graph_signature,
                                             state={**gm.state_dict, **gm.constants})
    return gm, graph_params(gm, example_inputs)


def _paths_from_model(params: dict[fx.Node, ParamInfo], model: nn.Module) -> None:
    names: dict[int, str] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(tensor), name)
    for info in params.values():
        if info.tensor is not None and id(info.tensor) in names:
            info.path = names[id(info.tensor)]


# ---------------------------------------------------------------------------------------------
# One candidate


def _match_at(down: Projection, ctx: _Context) -> FFNMatch | NearMiss | None:
    """Try `down` as the down projection of an FFN."""
    hidden = _hidden(down, ctx)
    if not isinstance(hidden, _Hidden):
        return hidden
    up, gate = hidden.up, hidden.gate
    module = _owner([up.proj.ref.weight_path, down.ref.weight_path])
    problem = _shape_problem(up, gate, down)
    if problem:
        return NearMiss(down.node, problem, module)
    x, x_views = _input_of(up.proj)
    if gate is not None and gate.proj is not up.proj:
        gate_x, gate_views = _input_of(gate.proj)
        if gate_x is not x:
            return NearMiss(down.node, f"gate and up projections read different inputs (`{gate_x.name}` and "
                            f"`{x.name}`); an FFN reads one x", module)
        x_views += gate_views
    out, out_views = _output_of(down)
    region = {*hidden.nodes, *up.nodes, *(gate.nodes if gate else []), *down.nodes, *x_views, *out_views}
    gates_node = ApplyGatesArgs.from_node(hidden.apply_gates).gates if hidden.apply_gates is not None else None
    problem = _region_problem(region, x, out, gates_node, ctx)
    if problem:
        return NearMiss(down.node, problem, module)
    return _build_match(module, x, out, hidden, down, gates_node, sorted(region, key=ctx.order.__getitem__))


def _hidden(down: Projection, ctx: _Context) -> _Hidden | NearMiss | None:
    """Walk back from the down projection's input to the activation and the up/gate projections."""
    h, passed = strip_back(down.x)
    apply_gates = None
    if op_name(h) == _APPLY_GATES:
        apply_gates = h
        h, more = strip_back(ApplyGatesArgs.from_node(apply_gates).h)
        passed += [apply_gates, *more]
    act = match_activation(h)
    up = ctx.branch(act.input) if act is not None else None
    if up is not None:
        return _Hidden(act, up, None, apply_gates, [*passed, *act.nodes])
    glu = _glu(h, ctx) if op_name(h) == "mul" else None
    if glu is not None:
        act, gate, up, act_passed = glu
        return _Hidden(act, up, gate, apply_gates, [*passed, h, *act_passed, *act.nodes])
    return _unknown_activation(h, down, ctx)


def _glu(h: fx.Node, ctx: _Context) -> tuple[Activation, _Branch, _Branch, list[fx.Node]] | None:
    """`act(gate) * up` in either operand order."""
    operands = [a for a in h.args if isinstance(a, fx.Node)]
    if len(operands) != 2:
        return None
    for a, b in (operands, operands[::-1]):
        source, passed = strip_back(a)
        act = match_activation(source)
        gate = ctx.branch(act.input) if act is not None else None
        up = ctx.branch(b) if gate is not None else None
        if up is not None:
            return act, gate, up, passed
    return None


def _unknown_activation(h: fx.Node, down: Projection, ctx: _Context) -> NearMiss | None:
    """A near miss if `h` is an element-wise function of one or two projections: an activation
    we do not support (tanh, mish, relu(x)**3, x * sigmoid(1.5 x), ...). Anything else is simply not an FFN."""
    sources, ops, stack, seen = set(), [], [h], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if len(seen) > _PROBE_LIMIT:
            return None
        branch = ctx.branch(node)
        if branch is not None:
            sources.add(branch.proj.node)
            continue
        if ctx.is_constant(node):
            continue
        op = op_name(node)
        if op not in _ELEMENTWISE and not is_passthrough(node):
            return None
        if op in _ELEMENTWISE:
            ops.append(op)
        stack.extend(node.all_input_nodes)
    if not ops or not 1 <= len(sources) <= 2:
        return None
    names = ", ".join(sorted(set(ops)))
    projs = [ctx.projections[s] for s in sorted(sources, key=ctx.order.__getitem__)]
    module = _owner([down.ref.weight_path] + [p.ref.weight_path for p in projs])
    reads = " and ".join(f"`{p.ref.weight_path or p.node.name}`" for p in projs)
    return NearMiss(down.node, f"unknown activation: the down projection `{down.ref.weight_path or down.node.name}` "
                    f"reads [{names}] of {reads}, which is not one of {'|'.join(ACTIVATIONS)} "
                    f"(alone or in a GLU product); the FFN stays dense", module)


# ---------------------------------------------------------------------------------------------
# Checks


def _shape_problem(up: _Branch, gate: _Branch | None, down: Projection) -> str | None:
    widths = {"up": up.width, "down input": down.in_features}
    if gate is not None:
        widths["gate"] = gate.width
    if len(set(widths.values())) > 1:
        return "shapes inconsistent: " + ", ".join(f"{k} {v}" for k, v in widths.items()) + \
               " features; every FFN neuron needs one row of up (and gate) and one column of down"
    if gate is not None and gate.proj.in_features != up.proj.in_features:
        return f"shapes inconsistent: gate reads {gate.proj.in_features} features, up {up.proj.in_features}"
    return None


def _region_problem(region: set[fx.Node], x: fx.Node, out: fx.Node, gates: fx.Node | None,
                    ctx: _Context) -> str | None:
    """Prove on the data-flow graph that the region has one input (x, + gates) and one output."""
    graph = ctx.nx
    interior = region - {out}
    leaks = sorted(((u, v) for u, v in nx.edge_boundary(graph, interior) if v not in region),
                   key=lambda e: (ctx.order[e[0]], ctx.order[e[1]]))
    if leaks:
        u, v = leaks[0]
        return (f"intermediate used elsewhere: `{u.name}` inside the FFN is also used by `{v.name}` "
                f"outside it, so the FFN cannot be replaced by one op")
    inputs = {u for _, u in nx.edge_boundary(graph.reverse(copy=False), region)} - {x, gates}
    extra = sorted((u for u in inputs if not ctx.is_constant(u)), key=ctx.order.__getitem__)
    if extra:
        return f"multiple inputs: the FFN reads `{extra[0].name}` besides its input `{x.name}`"
    if gates is not None and nx.ancestors(graph, gates) & region:
        return "the router gates are computed from the FFN's own intermediate values"
    return None


# ---------------------------------------------------------------------------------------------
# Assembly


def _input_of(proj: Projection) -> tuple[fx.Node, list[fx.Node]]:
    """x behind flattening views the projection alone uses (GPT-2 `x.view(-1, d)`)."""
    x, views = proj.x, []
    while is_row_view(x) and len(x.users) == 1 and isinstance(x.args[0], fx.Node):
        views.append(x)
        x = x.args[0]
    return x, views


def _output_of(down: Projection) -> tuple[fx.Node, list[fx.Node]]:
    """y after views that only restore the leading dims (GPT-2 `addmm(...).view(1, 8, d)`)."""
    out, views = down.node, []
    while len(out.users) == 1 and is_row_view(next(iter(out.users))):
        out = next(iter(out.users))
        views.append(out)
    return out, views


def _owner(paths: list[str | None]) -> str:
    """Longest common module prefix of weight paths (`model.layers.0.mlp`), "" for the root."""
    parts = [p.split(".")[:-1] for p in paths if p]
    return ".".join(os.path.commonprefix(parts)) if parts else ""


def _form_of(up: _Branch, gate: _Branch | None) -> str:
    fused = gate is not None and gate.proj is up.proj and up.rows is not None
    return "fused_gate_up" if fused else up.proj.form


def _build_match(module: str, x: fx.Node, out: fx.Node, hidden: _Hidden, down: Projection,
                 gates_node: fx.Node | None, nodes: list[fx.Node]) -> FFNMatch:
    ag = ApplyGatesArgs.from_node(hidden.apply_gates) if hidden.apply_gates is not None else None
    return FFNMatch(
        module=module, input_node=x, output_node=out,
        up=hidden.up.ref(), down=replace(down.ref, node=down.node),
        gate=hidden.gate.ref() if hidden.gate else None,
        activation=hidden.act.name, glu=hidden.gate is not None,
        d_model=hidden.up.proj.in_features, d_ff=hidden.up.width, d_out=down.out_features,
        form=_form_of(hidden.up, hidden.gate), gates_node=gates_node, apply_gates_node=hidden.apply_gates,
        expert_size=ag.expert_size if ag else None, mode=ag.mode if ag else None, tau=ag.tau if ag else None,
        nodes=nodes,
    )
