"""The forms an FFN's projections take in a graph, normalised for `find_ffns` (match.py);
activations are in activations.py.

- projections: `y = x W^T + b` written as `nn.Linear`/`F.linear`/`aten.linear`, `addmm` with a
  transposed weight, GPT-2 `Conv1D` (`addmm(b, x.view(-1, d), W)` with W stored [in, out]),
  `mm`/`matmul`/`@` (+ a bias `add`) and two-operand `einsum` (`'...d,fd->...f'`);
- pass-throughs that do not change a row's values in eval (dropout, clone, casts, views that keep
  the last dim) and slices of a fused projection (Phi-3 `gate_up_proj(x).chunk(2, -1)`).

Each form is a handler registered by op name (`_PROJECTION_FORMS`), not an if/elif chain: a new
spelling is one more table entry.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import fx

from .ffn import LinearRef
from .fx_utils import ParamInfo, arg, as_int, is_scalar, op_name, submodule, tensor_shape

# Ops that leave every row (token) of their input unchanged in eval, so an FFN may contain them.
# Casts are assumed to be to the compute dtype; dropout is the identity in eval and is kept
# outside the rewritten op's semantics by design (LTE fine-tunes with it, inference has none).
PASSTHROUGH_OPS = frozenset({"dropout", "identity", "clone", "contiguous", "alias", "to",
                             "feature_alpha_dropout", "alpha_dropout"})
ROW_VIEW_OPS = frozenset({"view", "flatten", "unflatten", "squeeze", "unsqueeze"})
_TRANSPOSE_OPS = frozenset({"t", "T", "permute", "transpose"})
_WEIGHT_PASSTHROUGH = frozenset({"contiguous", "to", "clone", "alias"})


@dataclass
class Projection:
    """One matched projection: `node` computes `x @ W^T (+ b)` over the last dim of `x`."""

    node: fx.Node  # output, bias included
    x: fx.Node  # the tensor the op reads (maybe a flattening view of the FFN input)
    ref: LinearRef
    form: str
    in_features: int
    out_features: int
    nodes: list[fx.Node] = field(default_factory=list)  # activation-path nodes of this projection


# ---------------------------------------------------------------------------------------------
# Pass-throughs and views


def is_row_view(node: fx.Node) -> bool:
    """A view/reshape that keeps the last dim, so a row-wise FFN commutes with it.

    Without shape metadata (symbolic_trace) a `view(..., n)` whose last size is an int or a
    size expression is accepted; the weight shapes are checked by the matcher anyway.
    """
    if op_name(node) not in ROW_VIEW_OPS or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    before, after = tensor_shape(node.args[0]), tensor_shape(node)
    if before is not None and after is not None:
        return len(before) > 0 and len(after) > 0 and _same_dim(before[-1], after[-1])
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    last = sizes[-1] if sizes else None
    return op_name(node) == "view" and (isinstance(last, int) and last != -1
                                        or isinstance(last, fx.Node) and is_scalar(last))


def _same_dim(a: Any, b: Any) -> bool:
    ia, ib = as_int(a), as_int(b)
    return ia == ib if ia is not None and ib is not None else a is b


def is_passthrough(node: Any) -> bool:
    return isinstance(node, fx.Node) and (op_name(node) in PASSTHROUGH_OPS or is_row_view(node))


def strip_back(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Walk from `node` back through pass-throughs; return the source and the nodes passed."""
    passed = []
    while is_passthrough(node) and isinstance(node.args[0], fx.Node):
        passed.append(node)
        node = node.args[0]
    return node, passed


# ---------------------------------------------------------------------------------------------
# Weights


@dataclass
class _Weight:
    node: fx.Node
    info: ParamInfo
    flips: int  # number of transposes between the parameter and its use


def _resolve_weight(node: Any, params: dict[fx.Node, ParamInfo]) -> _Weight | None:
    """A 2-D parameter, possibly behind `t`/`permute([1, 0])`/`transpose(0, 1)`/`.T`."""
    flips = 0
    while isinstance(node, fx.Node) and node not in params:
        op = op_name(node)
        if op in _TRANSPOSE_OPS and _is_2d_transpose(node):
            flips += 1
        elif op not in _WEIGHT_PASSTHROUGH:
            return None
        node = node.args[0]
    if not isinstance(node, fx.Node) or params[node].shape is None or len(params[node].shape) != 2:
        return None
    return _Weight(node, params[node], flips)


def _is_2d_transpose(node: fx.Node) -> bool:
    op, rest = op_name(node), list(node.args[1:])
    if op == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        return list(dims) == [1, 0]
    if op == "transpose":
        return sorted(d % 2 for d in rest) == [0, 1]
    return True  # t, .T


def _bias(node: Any, params: dict[fx.Node, ParamInfo], width: int) -> tuple[fx.Node | None, ParamInfo | None] | None:
    """(node, info) of a 1-D bias parameter of `width`, (None, None) for no bias, None if not a bias."""
    if node is None:
        return None, None
    if isinstance(node, fx.Node) and node in params and params[node].shape == (width,):
        return node, params[node]
    return None


def _ref(weight: _Weight, transposed: bool, bias: tuple, out: fx.Node) -> LinearRef:
    bias_node, bias_info = bias
    return LinearRef(weight_node=weight.node, weight_path=weight.info.path, weight=weight.info.tensor,
                     bias_node=bias_node, bias_path=bias_info.path if bias_info else None,
                     bias=bias_info.tensor if bias_info else None, transposed=transposed, node=out)


def _projection(node: fx.Node, x: Any, weight: _Weight | None, transposed: bool, bias_arg: Any,
                params: dict[fx.Node, ParamInfo], form: str) -> Projection | None:
    if weight is None or not isinstance(x, fx.Node) or x in params:
        return None
    rows, cols = weight.info.shape
    out_f, in_f = (cols, rows) if transposed else (rows, cols)
    bias = _bias(bias_arg, params, out_f)
    if bias is None:
        return None
    return Projection(node, x, _ref(weight, transposed, bias, node), form, in_f, out_f, [node])


# ---------------------------------------------------------------------------------------------
# Projection forms, registered by op name

ProjectionForm = Callable[[fx.Node, dict, dict], "Projection | None"]
_PROJECTION_FORMS: dict[str, ProjectionForm] = {}


def _form(*ops: str) -> Callable[[ProjectionForm], ProjectionForm]:
    def register(fn: ProjectionForm) -> ProjectionForm:
        for op in ops:
            _PROJECTION_FORMS[op] = fn
        return fn
    return register


@_form("linear")
def _linear(node: fx.Node, params: dict, found: dict) -> Projection | None:
    """`F.linear(x, W, b)` / `aten.linear` (W: [out, in]) and `nn.Linear` leaves (symbolic_trace)."""
    if node.op == "call_module":
        return _linear_module(node)
    weight = _resolve_weight(arg(node, 1, "weight"), params)
    transposed = weight is not None and weight.flips % 2 == 1
    return _projection(node, node.args[0], weight, transposed, arg(node, 2, "bias"), params, "linear")


def _linear_module(node: fx.Node) -> Projection:
    """A `call_module` nn.Linear owns its weight: `weight_node` is the call node itself."""
    mod = submodule(node)
    has_bias = mod.bias is not None
    ref = LinearRef(weight_node=node, weight_path=f"{node.target}.weight", weight=mod.weight,
                    bias_path=f"{node.target}.bias" if has_bias else None,
                    bias=mod.bias if has_bias else None, node=node)
    return Projection(node, node.args[0], ref, "linear", mod.in_features, mod.out_features, [node])


@_form("addmm")
def _addmm(node: fx.Node, params: dict, found: dict) -> Projection | None:
    """`addmm(b, x, W)`: W is [in, out] as stored (GPT-2 Conv1D) or `W.t()` of an [out, in] weight."""
    if arg(node, 3, "beta", 1) != 1 or arg(node, 4, "alpha", 1) != 1:
        return None
    weight = _resolve_weight(node.args[2], params)
    if weight is None:
        return None
    transposed = weight.flips % 2 == 0
    return _projection(node, node.args[1], weight, transposed, node.args[0], params,
                       "conv1d" if transposed else "addmm")


@_form("mm", "matmul")
def _matmul(node: fx.Node, params: dict, found: dict) -> Projection | None:
    """`x @ W.T` (W [out, in]) or `x @ W` (W [in, out], `transposed`); a bias `add` may follow."""
    weight = _resolve_weight(node.args[1], params)
    transposed = weight is not None and weight.flips % 2 == 0
    return _projection(node, node.args[0], weight, transposed, None, params, "matmul")


@_form("add")
def _bias_add(node: fx.Node, params: dict, found: dict) -> Projection | None:
    """`mm(x, W) (+ views) + b`: folds the bias into the bias-less projection it follows."""
    for lhs, rhs in ((0, 1), (1, 0)):
        source, views = strip_back(node.args[lhs]) if isinstance(node.args[lhs], fx.Node) else (None, [])
        proj = found.get(source)
        if proj is None or proj.ref.bias_node is not None or proj.ref.bias is not None:
            continue
        if any(op_name(v) not in ROW_VIEW_OPS for v in views):
            continue
        bias = _bias(node.args[rhs], params, proj.out_features)
        if bias is not None and bias[0] is not None:
            ref = replace(proj.ref, bias_node=bias[0], bias_path=bias[1].path, bias=bias[1].tensor, node=node)
            return replace(proj, node=node, ref=ref, nodes=[*proj.nodes, *reversed(views), node])
    return None


@_form("einsum")
def _einsum(node: fx.Node, params: dict, found: dict) -> Projection | None:
    """`einsum('...d,fd->...f', x, W)` (or `'...d,df->...f'`, transposed): x first, W a 2-D parameter."""
    equation, operands = node.args[0], list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or len(operands) != 2:
        return None
    transposed = _einsum_orientation(equation.replace(" ", ""))
    if transposed is None:
        return None
    weight = _resolve_weight(operands[1], params)
    if weight is None or weight.flips:
        return None
    return _projection(node, operands[0], weight, transposed, None, params, "einsum")


def _einsum_orientation(equation: str) -> bool | None:
    """False for '<b>d,fd-><b>f', True for '<b>d,df-><b>f'; None if not a last-dim projection."""
    lhs, _, out = equation.partition("->")
    inputs = lhs.split(",")
    if len(inputs) != 2 or len(inputs[1]) != 2 or not inputs[0]:
        return None
    x, w = inputs
    contracted = x[-1]
    if contracted not in w or contracted in out:
        return None
    new = w.replace(contracted, "", 1)
    if out != x[:-1] + new or new in x:
        return None
    return w.index(contracted) == 0


def match_projection(node: fx.Node, params: dict[fx.Node, ParamInfo],
                     found: dict[fx.Node, Projection]) -> Projection | None:
    """The projection `node` computes, if any. `found` holds earlier nodes' projections."""
    form = _PROJECTION_FORMS.get(op_name(node)) if node.op in ("call_function", "call_method", "call_module") else None
    return form(node, params, found) if form is not None else None


def find_projections(gm: fx.GraphModule, params: dict[fx.Node, ParamInfo]) -> dict[fx.Node, Projection]:
    """Every projection in `gm`, keyed by its output node, in graph order."""
    found: dict[fx.Node, Projection] = {}
    for node in gm.graph.nodes:
        proj = match_projection(node, params, found)
        if proj is not None:
            for absorbed in proj.nodes[:-1]:  # a bias `add` absorbs the mm before it
                found.pop(absorbed, None)
            found[node] = proj
    return found


# ---------------------------------------------------------------------------------------------
# Slices of a fused projection (Phi-3 gate_up_proj)


@dataclass
class Slice:
    """Rows `[start, stop)` of a projection's output, taken by chunk/split/getitem/slice/narrow."""

    source: fx.Node
    rows_of: Callable[[int], tuple[int, int] | None]  # out_features -> rows
    nodes: list[fx.Node]


def _last_dim(node: fx.Node, dim: Any) -> bool:
    if dim == -1:
        return True
    shape = tensor_shape(node)
    return shape is not None and isinstance(dim, int) and dim == len(shape) - 1


def _chunk_rows(n: Any, i: int) -> Callable[[int], tuple[int, int] | None]:
    def rows(out: int) -> tuple[int, int] | None:
        if not isinstance(n, int) or n <= 0 or out % n or not 0 <= i < n:
            return None
        return (i * out // n, (i + 1) * out // n)
    return rows


def _split_rows(sizes: Any, i: int) -> Callable[[int], tuple[int, int] | None]:
    def rows(out: int) -> tuple[int, int] | None:
        if isinstance(sizes, int) and sizes > 0:
            widths = [sizes] * math.ceil(out / sizes)
        elif isinstance(sizes, (list, tuple)) and all(isinstance(w, int) for w in sizes):
            widths = list(sizes)
        else:
            return None
        if not 0 <= i < len(widths):
            return None
        start = sum(widths[:i])
        return (start, min(start + widths[i], out))
    return rows


def _range_rows(start: Any, stop: Any) -> Callable[[int], tuple[int, int] | None]:
    def rows(out: int) -> tuple[int, int] | None:
        if not all(v is None or isinstance(v, int) for v in (start, stop)):
            return None
        lo, hi, _ = slice(start, stop).indices(out)
        return (lo, hi) if lo < hi else None
    return rows


# op -> (rows function, name of its size argument)
_SPLITS: dict[str, tuple[Callable, str]] = {"chunk": (_chunk_rows, "chunks"), "split": (_split_rows, "split_size_or_sections")}


def _getitem_of_split(node: fx.Node) -> Slice | None:
    """`chunk(p, n, -1)[i]` / `split(p, size_or_sizes, -1)[i]`."""
    parent, i = node.args
    split = _SPLITS.get(op_name(parent)) if isinstance(parent, fx.Node) and isinstance(i, int) else None
    if split is None or not _last_dim(parent.args[0], arg(parent, 2, "dim", 0)):
        return None
    rows_of, size_name = split
    return Slice(parent.args[0], rows_of(arg(parent, 1, size_name), i), [parent, node])


def _getitem_of_tensor(node: fx.Node) -> Slice | None:
    """`p[..., a:b]` / `p[:, :, a:b]`: only the last index may be a non-trivial slice."""
    source, index = node.args
    if not isinstance(index, tuple) or not index or not isinstance(index[-1], slice):
        return None
    last, lead = index[-1], index[:-1]
    if last.step not in (None, 1) or any(x != slice(None) and x is not Ellipsis for x in lead):
        return None
    shape = tensor_shape(source)
    if Ellipsis not in lead and (shape is None or len(index) != len(shape)):
        return None
    return Slice(source, _range_rows(last.start, last.stop), [node])


def _slice_op(node: fx.Node) -> Slice | None:
    """`aten.slice.Tensor(p, -1, a, b)` / `narrow(p, -1, a, n)`."""
    source, dim = node.args[0], arg(node, 1, "dim", 0)
    if not _last_dim(source, dim):
        return None
    if op_name(node) == "narrow":
        start, length = arg(node, 2, "start"), arg(node, 3, "length")
        stop = start + length if isinstance(start, int) and isinstance(length, int) else None
        return Slice(source, _range_rows(start, stop), [node])
    if arg(node, 4, "step", 1) != 1:
        return None
    return Slice(source, _range_rows(arg(node, 2, "start"), arg(node, 3, "end")), [node])


_SLICE_FORMS = {"getitem": lambda n: _getitem_of_split(n) or _getitem_of_tensor(n),
                "slice": _slice_op, "narrow": _slice_op}


def match_slice(node: fx.Node) -> Slice | None:
    """The last-dim slice `node` takes, if any (its `source` still needs pass-throughs stripped)."""
    form = _SLICE_FORMS.get(op_name(node))
    return form(node) if form is not None and len(node.args) >= 2 else None
