"""Functional FFNs: an FFN its module computes with `F.linear`, `@`, `torch.matmul` or `einsum`
on parameters has no projection modules to hook, so `lte.prepare` rewrites that module's forward.

    def forward(self, x):                         # the user's code (gpt-fast / torchtitan style)
        return F.linear(F.silu(F.linear(x, self.w1)) * F.linear(x, self.w3), self.w2)
becomes, from its traced graph (the passes' matcher says where x, h and the down projection are):
    def forward(self, x):
        w1 = self.w1; linear = linear(x, w1); silu = silu(linear); ...; mul = silu * linear_1
        lte_router = self.lte_router
        gates = route_ffn_input(lte_router, x)         # G = router(x); None in dense mode
        gated = gate_ffn_hidden(lte_router, mul, gates)  # lte::apply_gates(h, G, ...); h in dense mode
        return linear(gated, self.w2)

How: the forward of the module that computes the FFN (the FFN's owner, else the nearest ancestor
whose forward does) is traced with torch.fx, every submodule kept as a call, so the graph is that
module's own code and nothing else. The rewritten graph's code becomes the `forward` of a subclass
generated for this one instance (as torch.fx.GraphModule does per instance), and the instance's
`__class__` is swapped to it. Why this mechanism:
- no parameter is copied, moved or renamed: `state_dict` keys, `.to()`/`.half()`, `named_modules()`
  stay the model's own (plus the router, an ordinary submodule);
- `isinstance` holds (a subclass of the user's class, same name), hooks registered on the module
  and on its children keep firing (children are still called as modules), `copy.deepcopy` works
  (the copy shares the class, `self` is the copy);
- the mode is the router's `mode`, read at call time: dense mode runs exactly the traced original
  code, and every graph Dynamo or export traces carries the same router and `lte::apply_gates`
  marker as a hooked module FFN, so the `lte` backend rewrites it into one `lte::sparse_ffn`;
- `lte.load` repeats it from the saved FFN paths alone (the class and its code are not saved).
As in any fx GraphModule, Python values the forward reads while tracing are fixed (`self.eps`);
`self.training` is the exception: the forward is traced in both states and picks one at call time.
`prepare` checks the traced code against the original forward on its example input before any
change (`check_traced`); data-dependent control flow fails the trace: the FFN stays dense.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.utils import _pytree as pytree

from ..errors import UnsupportedFFNError
from ..passes.forms import find_projections
from ..passes.fx_utils import graph_params
from ..passes.match import find_ffns
from .probe import run_example
from .router import LTERouter, gate_ffn_hidden, route_ffn_input
from .spec import FFNSpec

_BASE = "_lte_base_class"  # on a generated class: the user's class it derives from
_SOURCE = "_lte_source_forward"  # on a generated class: the user's forward (what we trace)
_FFNS = "_lte_functional_ffns"  # on a generated class: names of the FFNs rewritten into it


class _OwnCodeTracer(fx.Tracer):
    """Traces one module's own forward: every submodule stays a `call_module` (its code, hooks
    and Python control flow are untouched; only the traced module's code must be traceable)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


# ----------------------------------------------------------------------------- public
def is_rewritten(module: nn.Module) -> bool:
    """True if lte.prepare/load replaced this module's forward (a functional FFN lives in it)."""
    return _BASE in vars(type(module))


def locate(model: nn.Module, spec: FFNSpec) -> str:
    """Path of the module whose forward computes `spec`'s FFN: its owner or the nearest ancestor.

    Raises UnsupportedFFNError naming why when no such forward can be traced or none computes it."""
    errors = []
    for path in _owner_and_ancestors(spec.name):
        module = model.get_submodule(path)
        try:
            graphs = trace_forward(module)
        except UnsupportedFFNError as e:
            errors.append(str(e))
            continue
        if all(_find_match(gm, spec, path) is not None for gm in graphs.values()):
            return path
    why = "; ".join(errors) if errors else f"no forward of {_label(spec.name)} or its ancestors computes it"
    raise UnsupportedFFNError(
        f"{_label(spec.name)}: its projections are not modules (F.linear/@/matmul/einsum on parameters), so LTE "
        f"rewrites the forward that computes it from its torch.fx trace, which failed: {why}; "
        "on_unsupported='skip' keeps it dense")


def trace_forward(module: nn.Module) -> dict[bool, fx.GraphModule]:
    """The module's own (user's) forward traced with training False and True: {training: graph}."""
    was_training = module.training
    graphs = {}
    try:
        for training in (False, True):
            module.training = training  # this module only: children are calls, not traced
            tracer = _OwnCodeTracer()
            tracer.traced_func_name = _SOURCE if is_rewritten(module) else "forward"
            graph = tracer.trace(module)
            graphs[training] = fx.GraphModule(module, graph, class_name=type(module).__name__)
    except Exception as e:  # TraceError, TypeError, ...: user code the tracer cannot follow
        raise UnsupportedFFNError(f"{type(module).__name__}.forward cannot be traced by torch.fx "
                                  f"({type(e).__name__}: {_first_line(e)}); data-dependent Python control flow "
                                  "or non-tensor logic on the inputs keeps it from becoming a graph") from e
    finally:
        module.training = was_training
    return graphs


def check_traced(model: nn.Module, paths: Iterable[str], args: tuple, kwargs: dict) -> dict[str, str]:
    """Run `model(*args, **kwargs)` once (eval, no_grad) and compare, for each module at `paths`,
    its traced forward with its real one on the inputs it got. Returns {path: why it differs}."""
    problems: dict[str, str] = {}
    checked: set[str] = set()
    handles = []
    for path in paths:
        fn = _callable(trace_forward(model.get_submodule(path))[False])
        handles.append(model.get_submodule(path).register_forward_hook(
            _comparing_hook(path, fn, problems, checked), with_kwargs=True))
    run_example(model, args, kwargs, handles)
    for path in paths:
        if path not in checked:
            problems[path] = f"{_label(path)} did not run on the example input, so its traced forward is unchecked"
    return problems


def rewrite(model: nn.Module, path: str, routers: list[LTERouter]) -> None:
    """Make the forward of the module at `path` route the FFNs of `routers` (all FFNs it computes:
    those rewritten earlier are kept). Traces first, changes the module last."""
    module = model.get_submodule(path)
    earlier = set(getattr(type(module), _FFNS, ()))
    everything = {r.spec.name: r for r in module.modules() if isinstance(r, LTERouter) and r.spec.name in earlier}
    everything.update({r.spec.name: r for r in routers})
    graphs = trace_forward(module)
    for gm in graphs.values():
        for router in everything.values():
            _insert_routing(gm, module, router, path)
        gm.graph.lint()
        gm.recompile()
    _install(module, _forward_of(graphs), tuple(everything))


# ----------------------------------------------------------------------------- the rewrite
def _insert_routing(gm: fx.GraphModule, module: nn.Module, router: LTERouter, path: str) -> None:
    """Insert `route_ffn_input(router, x)` and `gate_ffn_hidden(router, h, G)` before the down
    projection reads h: the work RouteHook and GateHook do for module FFNs."""
    match = _find_match(gm, router.spec, path)
    if match is None:
        raise UnsupportedFFNError(f"{_label(router.spec.name)}: not found in the traced forward of {_label(path)}")
    down = find_projections(gm, graph_params(gm))[match.down.node]
    reader = next(n for n in down.nodes if down.x in n.all_input_nodes)  # the op that reads h
    graph, target = gm.graph, _relative_path(module, router)
    gm.add_submodule(target, router)  # the throwaway GraphModule mirrors `module`, so lint checks the target
    with graph.inserting_before(reader):
        router_node = graph.get_attr(target)
        gates = graph.call_function(route_ffn_input, (router_node, match.input_node))
        gated = graph.call_function(gate_ffn_hidden, (router_node, down.x, gates))
    reader.replace_input_with(down.x, gated)


def _find_match(gm: fx.GraphModule, spec: FFNSpec, path: str):
    """The FFN of `gm` with `spec`'s weights (paths relative to the traced module), or None."""
    prefix = f"{path}." if path else ""
    want = {role: (p.weight[len(prefix):] if p.weight.startswith(prefix) else None)
            for role, p in (("up", spec.up), ("gate", spec.gate), ("down", spec.down)) if p is not None}
    want.setdefault("gate", None)
    for m in find_ffns(gm).matches:
        if m.weight_paths() == want and m.d_ff == spec.d_ff and m.activation == spec.activation:
            return m
    return None


def _relative_path(module: nn.Module, target: nn.Module) -> str:
    return next(name for name, m in module.named_modules(remove_duplicate=False) if m is target)


def _callable(gm: fx.GraphModule) -> Callable:
    """The graph's generated code as a plain function of (self, *inputs)."""
    return type(gm).forward


def _forward_of(graphs: dict[bool, fx.GraphModule]) -> Callable:
    eval_fn, train_fn = _callable(graphs[False]), _callable(graphs[True])
    if graphs[False].code == graphs[True].code:
        return eval_fn

    def forward(self, *args, **kwargs):
        return (train_fn if self.training else eval_fn)(self, *args, **kwargs)

    forward.__signature__ = inspect.signature(eval_fn)
    return forward


def _install(module: nn.Module, forward: Callable, ffns: tuple[str, ...]) -> None:
    """Swap the module's class for a subclass of the user's class whose forward is `forward`."""
    base = getattr(type(module), _BASE, type(module))
    namespace = {"forward": forward, _BASE: base, _SOURCE: base.forward, _FFNS: ffns,
                 "__module__": base.__module__, "__qualname__": base.__qualname__, "__doc__": base.__doc__}
    module.__class__ = type(base.__name__, (base,), namespace)


# ----------------------------------------------------------------------------- checking a trace
def _comparing_hook(path: str, traced: Callable, problems: dict[str, str], checked: set[str]):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if path in checked:
            return
        checked.add(path)
        try:
            again = traced(module, *args, **kwargs)
        except Exception as e:
            problems[path] = f"its traced forward fails on the example input ({type(e).__name__}: {_first_line(e)})"
            return
        why = _difference(output, again)
        if why:
            problems[path] = (f"its traced forward differs from the real one on the example input ({why}): Python "
                              "branches on the inputs (`is None`, isinstance, ...) were fixed while tracing")
    return hook


def _difference(a: Any, b: Any) -> str | None:
    leaves_a, spec_a = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    if spec_a != spec_b:
        return "the outputs have different structures"
    for x, y in zip(leaves_a, leaves_b):
        if isinstance(x, Tensor) != isinstance(y, Tensor):
            return "an output is a tensor in one and not in the other"
        if isinstance(x, Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                return f"an output is {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}"
            if not torch.equal(x, y) and not (x.is_floating_point() and torch.equal(x.isnan(), y.isnan())
                                              and torch.equal(x.nan_to_num(), y.nan_to_num())):
                return "output values differ"
    return None


# ----------------------------------------------------------------------------- small helpers
def _owner_and_ancestors(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _label(path: str) -> str:
    return path or "<root>"


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
