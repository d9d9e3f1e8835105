"""Activation forms an FFN's hidden layer takes in a graph, normalised for `find_ffns` (match.py):
relu, gelu (erf), gelu_tanh (also GPT-2's decomposed `gelu_new`), silu (also `x * sigmoid(x)`),
relu2 (squared ReLU: `relu(x)**2`, `torch.square(relu(x))`, `relu(x) * relu(x)`, `.pow(2)`; Primer,
Nemotron, HF `ReLUSquaredActivation`) and quick_gelu (`x * sigmoid(1.702 * x)`, HF `QuickGELUActivation`).

The graphs spell them (checked on torch 2.13): Dynamo `operator.pow` / `torch.pow` / `Tensor.pow`
(call_method) / `torch.square` / `operator.mul`; torch.export `aten.pow.Tensor_Scalar`,
`aten.square.default` (decomposed to `aten.pow.Tensor_Scalar` by `run_decompositions`), `aten.mul.Tensor`.
`op_name` folds all of these to "pow" / "square" / "mul".

Decomposed spellings are matched as (op, *operands) pattern trees, commutative ops in either order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

from torch import fx

from .fx_utils import arg, op_name, scalar_value, submodule

@dataclass
class Activation:
    name: str  # one of ACTIVATIONS: relu | gelu | gelu_tanh | silu | relu2 | quick_gelu
    input: fx.Node
    nodes: list[fx.Node]


X = "X"  # the pattern variable: the activation's input
_QUICK_GELU = 1.702  # CLIP's quick GELU: x * sigmoid(1.702 x)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_COMMUTATIVE = frozenset({"mul", "add"})

_NEW_GELU_INNER = ("mul", _SQRT_2_OVER_PI, ("add", X, ("mul", 0.044715, ("pow", X, 3.0))))
_FAST_GELU_INNER = ("mul", ("mul", X, _SQRT_2_OVER_PI), ("add", 1.0, ("mul", ("mul", 0.044715, X), X)))

# Decomposed activations as (op, *operands) trees; floats match constants, X the input node.
_DECOMPOSED: dict[str, list[tuple]] = {
    "gelu_tanh": [
        # GPT-2 / T5 `NewGELUActivation`: 0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3)))
        ("mul", ("mul", 0.5, X), ("add", 1.0, ("tanh", _NEW_GELU_INNER))),
        # `FastGELUActivation`: 0.5*x*(1+tanh(x*0.7978845608*(1+0.044715*x*x)))
        ("mul", ("mul", 0.5, X), ("add", 1.0, ("tanh", _FAST_GELU_INNER))),
    ],
    "gelu": [
        # `GELUActivation(use_gelu_python=True)`: x*0.5*(1+erf(x/sqrt(2)))
        ("mul", ("mul", X, 0.5), ("add", 1.0, ("erf", ("div", X, math.sqrt(2.0))))),
        ("mul", ("mul", X, 0.5), ("add", 1.0, ("erf", ("mul", X, 1.0 / math.sqrt(2.0))))),
    ],
    "silu": [("mul", X, ("sigmoid", X))],
    "quick_gelu": [("mul", X, ("sigmoid", ("mul", _QUICK_GELU, X)))],
    "relu2": [
        ("pow", ("relu", X), 2.0),  # relu(x)**2, torch.pow(relu(x), 2), relu(x).pow(2), aten.pow.Tensor_Scalar
        ("square", ("relu", X)),  # torch.square(relu(x)), HF ReLUSquaredActivation, aten.square
        ("mul", ("relu", X), ("relu", X)),  # r * r (one relu node) or relu(x) * relu(x) (two)
    ],
}


def _gelu_kind(node: fx.Node) -> str | None:
    approximate = submodule(node).approximate if node.op == "call_module" else arg(node, 1, "approximate", "none")
    return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)


_DIRECT: dict[str, Callable[[fx.Node], str | None]] = {
    "relu": lambda n: "relu", "silu": lambda n: "silu", "gelu": _gelu_kind,
}


def match_activation(node: fx.Node) -> Activation | None:
    """The activation `node` computes: a single op (`F.gelu`, `nn.SiLU`, ...) or a decomposed one."""
    direct = _DIRECT.get(op_name(node))
    if direct is not None and node.args and isinstance(node.args[0], fx.Node):
        name = direct(node)
        return Activation(name, node.args[0], [node]) if name else None
    for name, patterns in _DECOMPOSED.items():
        for pattern in patterns:
            binding: dict[str, fx.Node] = {}
            nodes: list[fx.Node] = []
            if _match(pattern, node, binding, nodes):
                return Activation(name, binding[X], list(dict.fromkeys(nodes)))  # r * r: one relu node
    return None


def _match(pattern: Any, value: Any, binding: dict, nodes: list) -> bool:
    """Match a pattern tree against the graph at `value`; mul/add match in either operand order."""
    if pattern is X:
        if not isinstance(value, fx.Node):
            return False
        return binding.setdefault(X, value) is value
    if isinstance(pattern, float):
        number = scalar_value(value)
        return number is not None and math.isclose(number, pattern, rel_tol=1e-6)
    op, *operands = pattern
    if not isinstance(value, fx.Node) or op_name(value) != op or len(value.args) != len(operands):
        return False
    orders = [value.args, value.args[::-1]] if op in _COMMUTATIVE else [value.args]
    for args in orders:
        trial_binding, trial_nodes = dict(binding), []
        if all(_match(p, a, trial_binding, trial_nodes) for p, a in zip(operands, args)):
            binding.update(trial_binding)
            nodes.extend([*trial_nodes, value])
            return True
    return False
