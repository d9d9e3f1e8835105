"""FX helpers shared by the passes: canonical op names, shapes, parameters, graph views.

The three graph kinds we see (Dynamo, torch.export, torch.fx.symbolic_trace) spell the same op
in different ways: `torch._C._nn.linear`, `F.linear`, `aten.linear.default`, a `call_module` of
`nn.Linear`. Passes compare `op_name(node)` instead, so each pattern is written once.
Parameters also arrive in three ways (Dynamo placeholders with a source, export placeholders named
by the graph signature, `get_attr` nodes); `graph_params` turns all of them into `ParamInfo`.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
from torch import fx, nn

# Spellings that mean the same op to a pass (after `__name__` / overload-packet name lookup).
_NAME_ALIASES = {
    "truediv": "div", "reshape": "view", "_unsafe_view": "view", "__matmul__": "matmul",
    "relu_": "relu", "silu_": "silu", "iadd": "add", "imul": "mul", "__mul__": "mul",
    "__add__": "add", "type_as": "to", "_to_copy": "to", "float": "to", "half": "to",
    "bfloat16": "to", "sym_size": "size", "numpy_T": "t", "split_with_sizes": "split",
}

# `call_module` leaves (torch.fx.symbolic_trace keeps torch.nn modules as leaves).
_MODULE_OPS: dict[type, str] = {
    nn.Linear: "linear", nn.ReLU: "relu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid", nn.Dropout: "dropout", nn.Identity: "identity", nn.ELU: "elu",
    nn.LeakyReLU: "leaky_relu", nn.Softplus: "softplus", nn.Mish: "mish", nn.Hardswish: "hardswish",
    nn.ReLU6: "relu6", nn.SELU: "selu", nn.GLU: "glu", nn.LayerNorm: "layer_norm",
}

_TORCH_MODULE = re.compile(r"^(torch|_operator|operator)(\.|$)")


def submodule(node: fx.Node) -> nn.Module:
    """The module a `call_module` node calls."""
    return node.graph.owning_module.get_submodule(node.target)


def op_name(node: fx.Node) -> str | None:
    """Canonical name of what `node` computes ("linear", "mul", "lte::apply_gates", ...), or None.

    aten ops lose their namespace (`aten.mul.Tensor` -> "mul"); other namespaces keep it, so a
    custom op can never be mistaken for a torch one.
    """
    if node.op == "call_method":
        return _NAME_ALIASES.get(node.target, node.target)
    if node.op == "call_module":
        for cls in type(submodule(node)).__mro__:
            if cls in _MODULE_OPS:
                return _MODULE_OPS[cls]
        return None
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        packet = getattr(target, "overloadpacket", target)
        ns, _, name = packet._qualified_op_name.partition("::")
        return _NAME_ALIASES.get(name, name) if ns == "aten" else f"{ns}::{name}"
    if target is getattr and len(node.args) == 2:  # `w.T` / `x.shape` traced as getattr(w, "T")
        return _NAME_ALIASES.get(node.args[1], node.args[1])
    name = getattr(target, "__name__", None)
    if name is None or not _TORCH_MODULE.match(getattr(target, "__module__", None) or ""):
        return None
    return _NAME_ALIASES.get(name, name)


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument `index` of `node`, given positionally or as keyword `name`."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def meta_value(node: fx.Node) -> Any:
    """The example value a tracer left on `node`: Dynamo `example_value`, export/AOT `val`."""
    for key in ("example_value", "val"):
        if key in node.meta:
            return node.meta[key]
    tm = node.meta.get("tensor_meta")
    return tm if tm is not None and hasattr(tm, "shape") else None


def tensor_shape(node: Any) -> tuple | None:
    """Shape of the tensor `node` computes, if the graph recorded one (symbolic_trace does not)."""
    if not isinstance(node, fx.Node):
        return None
    value = meta_value(node)
    shape = getattr(value, "shape", None)
    return tuple(shape) if shape is not None else None


def as_int(value: Any) -> int | None:
    """`value` as a Python int if it is one, or a SymInt that is known to be constant."""
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import is_concrete_int

        return int(value) if is_concrete_int(value) else None
    return None


# ---------------------------------------------------------------------------------------------
# Parameters


@dataclass
class ParamInfo:
    """A graph node that stands for a parameter or buffer of the traced module.

    `path` is relative to the traced root (`model.layers.0.mlp.up_proj.weight`); `tensor` is the
    real tensor when the graph lets us reach it (Dynamo example inputs, `get_attr`, export state).
    """

    path: str | None
    tensor: torch.Tensor | None
    shape: tuple | None


_SOURCE_ROOT = re.compile(r"^[A-Z]\[[^\]]*\](\[\d+\])*")
_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_]\w*)|\['([^']+)'\]")


def source_path(source_name: str) -> str | None:
    """Parse a Dynamo source name into a dotted module path, dropping the root.

    `L['args'][0]._modules['model']._modules['layers']._modules['0']._parameters['weight']`
    -> `model.layers.0.weight`. The root (`L['self']`, `L['args'][0]`, ...) differs between
    models, so it is recognised by shape rather than spelled out.
    """
    root = _SOURCE_ROOT.match(source_name)
    if root is None:
        return None
    rest, parts, pos = source_name[root.end():], [], 0
    while pos < len(rest):
        m = _SOURCE_PART.match(rest, pos)
        if m is None:
            return None
        parts.append(next(g for g in m.groups() if g is not None))
        pos = m.end()
    return ".".join(parts) or None


def _dynamo_source_name(node: fx.Node) -> str | None:
    source = getattr(node, "_dynamo_source", None)
    if source is None and "grapharg" in node.meta:
        source = node.meta["grapharg"].source
    return getattr(source, "name", None) if source is not None else None


def _fetch_attr(gm: nn.Module, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def graph_params(gm: fx.GraphModule, example_inputs: Sequence[Any] | None = None,
                 signature: Any = None, state: dict[str, torch.Tensor] | None = None) -> dict[fx.Node, ParamInfo]:
    """Map every node standing for a parameter/buffer to its `ParamInfo`.

    - Dynamo: placeholders whose source is a module attribute or whose example input is an
      `nn.Parameter` (`example_inputs[i]` belongs to the i-th placeholder).
    - torch.export: placeholders named in `signature.inputs_to_parameters` / `inputs_to_buffers`;
      tensors come from `state` (`ep.state_dict`).
    - symbolic_trace / unlifted graphs: `get_attr` nodes.
    """
    params: dict[fx.Node, ParamInfo] = {}
    lifted = {}
    if signature is not None:
        lifted = {**signature.inputs_to_buffers, **signature.inputs_to_parameters}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    examples = list(example_inputs) if example_inputs is not None else [None] * len(placeholders)
    for node, example in zip(placeholders, examples):
        info = _placeholder_param(node, example, lifted, state or {})
        if info is not None:
            params[node] = info
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                params[node] = ParamInfo(node.target, value, tuple(value.shape))
    return params


def _placeholder_param(node: fx.Node, example: Any, lifted: dict[str, str],
                       state: dict[str, torch.Tensor]) -> ParamInfo | None:
    if node.name in lifted:
        path = lifted[node.name]
        tensor = state.get(path)
        return ParamInfo(path, tensor, tensor_shape(node) or (tuple(tensor.shape) if tensor is not None else None))
    source = _dynamo_source_name(node)
    is_attr = source is not None and ("._parameters[" in source or "._buffers[" in source)
    if not (is_attr or isinstance(example, nn.Parameter)):
        return None
    tensor = example if isinstance(example, torch.Tensor) else None
    shape = tuple(tensor.shape) if tensor is not None else tensor_shape(node)
    return ParamInfo(source_path(source) if source else None, tensor, shape)


# ---------------------------------------------------------------------------------------------
# Graph structure

_SHAPE_OPS = frozenset({"size", "dim", "numel", "shape"})
_SCALAR_ARITH = frozenset({"getitem", "add", "sub", "mul", "floordiv"})
_SCALAR_TYPES = (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool, tuple, list, torch.Size)


def is_scalar(node: fx.Node) -> bool:
    """True if `node` computes sizes or numbers, not tensors: `x.size()[:-1] + (n,)`, or, under
    `dynamic=True`, a float Dynamo lifted to an input (`math.pi` -> `item()` -> a SymFloat)."""
    value = meta_value(node)
    if value is not None:
        return isinstance(value, _SCALAR_TYPES)
    op = op_name(node)
    if op in _SHAPE_OPS:
        return True
    return op in _SCALAR_ARITH and bool(node.all_input_nodes) and all(map(is_scalar, node.all_input_nodes))


def scalar_value(value: Any) -> float | None:
    """A number given as a literal or as a node computing a symbolic number with a known hint
    (GPT-2's `math.sqrt(2 / math.pi)` is a SymFloat node under `dynamic=True`)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, fx.Node):
        value = meta_value(value)
        if isinstance(value, (torch.SymInt, torch.SymFloat)) and value.node.has_hint():
            return value.node.hint
    return None


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """The data-flow graph of `graph`: an edge u -> v for every use of u by v."""
    g = nx.DiGraph()
    g.add_nodes_from(graph.nodes)
    g.add_edges_from((inp, node) for node in graph.nodes for inp in node.all_input_nodes)
    return g
