"""find_ffns on Dynamo, torch.export and symbolic_trace graphs of tiny models.

Each match is checked twice: structurally (count, activation, GLU, dims, weight paths that resolve
to the very Parameters of the model) and numerically (the FFN rebuilt from the match's LinearRefs,
applied to the value of `input_node`, equals the value the graph computes at `output_node`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from lte_compile.passes import FFNMatch, FFNReport, capture_graphs, export_graph, find_ffns, find_ffns_in_model
from tests import models

# ---------------------------------------------------------------------------------------------
# Expected FFNs per architecture


@dataclass(frozen=True)
class Expected:
    modules: tuple[str, ...]  # owning module of each FFN, in graph order
    activation: str
    glu: bool
    d_ff: int
    form: str  # in Dynamo and training-IR export graphs
    up: str  # weight names relative to the module
    gate: str | None
    down: str


def _layers(template: str, n: int = models.LAYERS) -> tuple[str, ...]:
    return tuple(template.format(i) for i in range(n))


_LLAMA_LIKE = dict(modules=_layers("model.layers.{}.mlp"), activation="silu", glu=True, d_ff=models.FFN,
                   form="linear", up="up_proj", gate="gate_proj", down="down_proj")
_T5 = dict(modules=_layers("encoder.block.{}.layer.1.DenseReluDense") + _layers("decoder.block.{}.layer.2.DenseReluDense"),
           d_ff=models.FFN, form="linear", down="wo")

ARCHS: dict[str, Expected] = {
    "llama": Expected(**_LLAMA_LIKE),
    "mistral": Expected(**_LLAMA_LIKE),
    "qwen2": Expected(**_LLAMA_LIKE),
    "gemma": Expected(**{**_LLAMA_LIKE, "activation": "gelu_tanh"}),
    "phi3": Expected(**{**_LLAMA_LIKE, "form": "fused_gate_up", "up": "gate_up_proj", "gate": "gate_up_proj"}),
    "gpt2": Expected(_layers("transformer.h.{}.mlp"), "gelu_tanh", False, 4 * models.HIDDEN, "conv1d", "c_fc", None, "c_proj"),
    "gpt_neox": Expected(_layers("gpt_neox.layers.{}.mlp"), "gelu", False, models.FFN, "linear",
                         "dense_h_to_4h", None, "dense_4h_to_h"),
    "opt": Expected(_layers("model.decoder.layers.{}"), "relu", False, models.FFN, "linear", "fc1", None, "fc2"),
    "bert": Expected(_layers("encoder.layer.{}"), "gelu", False, models.FFN, "linear",
                     "intermediate.dense", None, "output.dense"),
    "roberta": Expected(_layers("encoder.layer.{}"), "gelu", False, models.FFN, "linear",
                        "intermediate.dense", None, "output.dense"),
    "t5": Expected(**_T5, activation="relu", glu=False, up="wi", gate=None),
    "t5_gated": Expected(**_T5, activation="gelu_tanh", glu=True, up="wi_1", gate="wi_0"),
}
DECOMPOSED = ("llama", "phi3", "gpt2", "bert")  # export + run_decompositions(): permute/addmm/mm forms

# ---------------------------------------------------------------------------------------------
# Helpers

_ACT = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh"), "silu": F.silu,
        "relu2": lambda a: F.relu(a) * F.relu(a), "quick_gelu": lambda a: a * torch.sigmoid(1.702 * a)}


def _project(ref, x: torch.Tensor) -> torch.Tensor:
    weight = ref.weight.t() if ref.transposed else ref.weight
    bias = ref.bias
    if ref.rows is not None:
        weight, bias = weight[slice(*ref.rows)], None if bias is None else bias[slice(*ref.rows)]
    return F.linear(x, weight, bias)


def reference_ffn(match: FFNMatch, x: torch.Tensor, gates: torch.Tensor | None = None) -> torch.Tensor:
    """The FFN the match describes, rebuilt from its LinearRefs alone."""
    h = _ACT[match.activation](_project(match.gate or match.up, x))
    if match.glu:
        h = h * _project(match.up, x)
    if match.prepared:
        h = torch.ops.lte.apply_gates(h, gates, match.expert_size, match.mode, match.tau)
    return _project(match.down, h)


def node_values(gm: fx.GraphModule, args: list, nodes: set[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """Run `gm` on `args` and keep the values of `nodes`."""
    values = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in nodes:
                values[n] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(*args)
    return values


def assert_matches_compute_ffn(gm: fx.GraphModule, args: list, report: FFNReport) -> None:
    wanted = {n for m in report for n in (m.input_node, m.output_node, m.gates_node) if n is not None}
    values = node_values(gm, args, wanted)
    for m in report:
        out = values[m.output_node]
        with torch.no_grad():
            ref = reference_ffn(m, values[m.input_node], values.get(m.gates_node))
        # float32, same ops in another order: a few ulps of the output scale
        torch.testing.assert_close(ref.reshape(out.shape), out, atol=1e-5, rtol=1e-4, msg=lambda s: f"{m.module}: {s}")


def assert_expected(report: FFNReport, exp: Expected, model: nn.Module, *, check_form: bool = True) -> None:
    assert [m.module for m in report] == list(exp.modules), report.near_misses
    assert report.near_misses == []
    for m in report:
        assert (m.activation, m.glu, m.d_model, m.d_ff, m.d_out) == (exp.activation, exp.glu, models.HIDDEN, exp.d_ff,
                                                                     models.HIDDEN)
        paths = {k: (f"{m.module}.{v}.weight" if v else None) for k, v in (("up", exp.up), ("gate", exp.gate),
                                                                          ("down", exp.down))}
        assert m.weight_paths() == paths
        assert m.up.weight is model.get_parameter(paths["up"])
        assert m.down.weight is model.get_parameter(paths["down"])
        assert m.output_node in m.nodes and m.input_node not in m.nodes
        assert not m.prepared
        if check_form:
            assert m.form == exp.form


@functools.cache
def _hf(name: str) -> nn.Module:
    return models.hf_model(name)


# ---------------------------------------------------------------------------------------------
# Transformers architectures


@pytest.mark.parametrize("arch", ARCHS)
def test_dynamo_graph(arch):
    model, exp = _hf(arch), ARCHS[arch]
    graphs = capture_graphs(model, **models.hf_inputs(arch))
    assert len(graphs) == 1  # all these models trace without graph breaks
    gm, example_inputs = graphs[0]
    report = find_ffns(gm, example_inputs)
    assert_expected(report, exp, model)
    assert_matches_compute_ffn(gm, example_inputs, report)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_graph(arch):
    model, exp, inputs = _hf(arch), ARCHS[arch], models.hf_inputs(arch)
    ep = export_graph(model, (), inputs)
    report = find_ffns(ep)
    assert_expected(report, exp, model)
    assert_matches_compute_ffn(ep.graph_module, ep._graph_module_flat_inputs((), inputs), report)


@pytest.mark.parametrize("arch", DECOMPOSED)
def test_decomposed_export_graph(arch):
    """After run_decompositions linear is permute+addmm/mm with views, dropout a clone."""
    model, exp, inputs = _hf(arch), ARCHS[arch], models.hf_inputs(arch)
    ep = export_graph(model, (), inputs).run_decompositions()
    report = find_ffns(ep)
    assert_expected(report, exp, model, check_form=False)
    assert {m.form for m in report} <= {"addmm", "matmul", "conv1d", "fused_gate_up"}
    assert_matches_compute_ffn(ep.graph_module, ep._graph_module_flat_inputs((), inputs), report)


def test_dynamic_shapes_gpt2():
    """Regression: under dynamic=True Dynamo lifts `math.pi` to an input, so gelu_new's
    sqrt(2/pi) is a SymFloat node, not a literal; the decomposed-gelu pattern missed it."""
    model, graphs = _hf("gpt2"), []
    compiled = torch.compile(model, backend=lambda gm, ex: graphs.append((gm, ex)) or gm.forward, dynamic=True)
    with torch.no_grad():
        compiled(**models.hf_inputs("gpt2"))
    report = find_ffns(*graphs[0])
    assert_expected(report, ARCHS["gpt2"], model)
    assert any(isinstance(e, torch.SymInt) for e in graphs[0][1])  # the graph really is dynamic


def test_phi3_fused_gate_up_rows():
    """Phi-3 chunks gate_up_proj(x) in two: the first half is the gate, the second the up."""
    report = find_ffns(export_graph(_hf("phi3"), (), models.hf_inputs("phi3")))
    for m in report:
        assert m.gate.rows == (0, models.FFN) and m.up.rows == (models.FFN, 2 * models.FFN)
        assert m.gate.weight_node is m.up.weight_node and m.gate.node is m.up.node


def test_gpt2_conv1d_is_transposed_with_bias():
    report = find_ffns(export_graph(_hf("gpt2"), (), models.hf_inputs("gpt2")))
    for m in report:
        assert m.up.transposed and m.down.transposed
        assert m.up.weight.shape == (models.HIDDEN, 4 * models.HIDDEN)
        assert m.down.bias_path == f"{m.module}.c_proj.bias"


def test_find_ffns_in_model_paths_resolve_on_the_model():
    model = _hf("qwen2")
    report = find_ffns_in_model(model, **models.hf_inputs("qwen2"))
    assert_expected(report, ARCHS["qwen2"], model)
    for m in report:
        assert m.gate.weight is model.get_parameter(m.gate.weight_path)


def test_find_ffns_leaves_graph_unchanged_and_needs_no_example_inputs():
    """Without example inputs, paths come from the Dynamo sources and shapes from example_value."""
    gm, example_inputs = capture_graphs(_hf("gpt2"), **models.hf_inputs("gpt2"))[0]
    before = str(gm.graph)
    with_inputs, without = find_ffns(gm, example_inputs), find_ffns(gm)
    assert str(gm.graph) == before
    assert [m.weight_paths() for m in without] == [m.weight_paths() for m in with_inputs]
    assert [m.d_ff for m in without] == [4 * models.HIDDEN] * models.LAYERS
    assert all(m.up.weight is None for m in without)


# ---------------------------------------------------------------------------------------------
# Hand-written modules, in all three graph kinds


@dataclass(frozen=True)
class Handwritten:
    activation: str
    glu: bool
    form: str
    paths: dict[str, str | None]
    transposed_down: bool = False


HANDWRITTEN: dict[str, Handwritten] = {
    "sequential": Handwritten("gelu", False, "linear", {"up": "0.weight", "gate": None, "down": "2.weight"}),
    "functional_glu": Handwritten("silu", True, "linear", {"up": "w_up", "gate": "w_gate", "down": "w_down"}),
    "matmul": Handwritten("gelu_tanh", False, "matmul", {"up": "w_in", "gate": None, "down": "w_out"}, True),
    "einsum": Handwritten("relu", False, "einsum", {"up": "w_in", "gate": None, "down": "w_out"}),
    "mlp": Handwritten("relu", False, "linear", {"up": "up.weight", "gate": None, "down": "down.weight"}),
}


def _graph_of(kind: str, module: nn.Module, x: torch.Tensor) -> tuple[fx.GraphModule | torch.export.ExportedProgram, list]:
    """(graph for find_ffns, inputs to run its graph module)."""
    if kind == "dynamo":
        (gm, example_inputs), = capture_graphs(module, x)
        return gm, example_inputs
    if kind == "export":
        ep = export_graph(module, (x,))
        return ep, ep._graph_module_flat_inputs((x,), {})
    return fx.symbolic_trace(module), [x]


@pytest.mark.parametrize("kind", ["dynamo", "export", "symbolic_trace"])
@pytest.mark.parametrize("name", HANDWRITTEN)
def test_handwritten(name, kind):
    module, exp, x = models.HANDWRITTEN[name](), HANDWRITTEN[name], models.tokens()
    graph, args = _graph_of(kind, module, x)
    report = find_ffns(graph, None if kind == "export" else args)
    assert len(report) == 1 and report.near_misses == []
    m = report[0]
    assert (m.activation, m.glu, m.form, m.d_model, m.d_ff, m.d_out) == (exp.activation, exp.glu, exp.form, 16, 64, 16)
    assert m.weight_paths() == exp.paths
    assert m.down.transposed == exp.transposed_down
    gm = graph.graph_module if kind == "export" else graph
    assert_matches_compute_ffn(gm, args, report)


def _hf_activation(name: str, **kwargs) -> nn.Module:
    import transformers.activations

    return getattr(transformers.activations, name)(**kwargs)


# activation module -> the name find_ffns must report (decomposed forms included)
ACTIVATIONS = {
    "nn.ReLU": (nn.ReLU, "relu"),
    "nn.GELU": (nn.GELU, "gelu"),
    "nn.GELU(tanh)": (functools.partial(nn.GELU, approximate="tanh"), "gelu_tanh"),
    "nn.SiLU": (nn.SiLU, "silu"),
    "x*sigmoid(x)": (models.SigmoidSiLU, "silu"),
    "NewGELU": (functools.partial(_hf_activation, "NewGELUActivation"), "gelu_tanh"),
    "FastGELU": (functools.partial(_hf_activation, "FastGELUActivation"), "gelu_tanh"),
    "AccurateGELU": (functools.partial(_hf_activation, "AccurateGELUActivation"), "gelu_tanh"),
    "GELU(python)": (functools.partial(_hf_activation, "GELUActivation", use_gelu_python=True), "gelu"),
}


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_forms(act):
    make, expected = ACTIVATIONS[act]
    module, x = models.MLP(act=make()).eval(), models.tokens()
    (gm, example_inputs), = capture_graphs(module, x)
    report = find_ffns(gm, example_inputs)
    assert [m.activation for m in report] == [expected] and report.near_misses == []
    assert_matches_compute_ffn(gm, example_inputs, report)


@pytest.mark.parametrize("kind", ["dynamo", "export"])
@pytest.mark.parametrize("split", models.FusedGLU.SPLITS)
def test_fused_gate_up_spellings(split, kind):
    graph, args = _graph_of(kind, models.FusedGLU(split), models.tokens())
    report = find_ffns(graph, None if kind == "export" else args)
    (m,) = report
    assert m.form == "fused_gate_up" and m.glu and m.d_ff == 64
    assert m.gate.rows == (0, 64) and m.up.rows == (64, 128) and m.up.bias_path == "gate_up.bias"
    assert_matches_compute_ffn(graph.graph_module if kind == "export" else graph, args, report)


class _Fn(nn.Module):
    """An activation written as a lambda (each spelling below is one user's way to write it)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _relu_times_itself(x: torch.Tensor) -> torch.Tensor:
    r = torch.relu(x)
    return r * r  # one relu node used twice


# Spellings of squared ReLU and quick GELU -> name; each is checked in Dynamo, export (training IR)
# and decomposed export graphs: Dynamo records operator.pow / torch.pow / Tensor.pow / torch.square
# / operator.mul, export aten.pow.Tensor_Scalar / aten.square (-> pow after run_decompositions) / aten.mul.
NEW_SPELLINGS = {
    "relu(x)**2": (lambda: _Fn(lambda x: F.relu(x) ** 2), "relu2"),
    "torch.pow(relu(x),2)": (lambda: _Fn(lambda x: torch.pow(F.relu(x), 2)), "relu2"),
    "relu(x).pow(2)": (lambda: _Fn(lambda x: F.relu(x).pow(2)), "relu2"),
    "torch.square(relu(x))": (lambda: _Fn(lambda x: torch.square(F.relu(x))), "relu2"),
    "x.relu().square()": (lambda: _Fn(lambda x: x.relu().square()), "relu2"),
    "relu(x)*relu(x)": (lambda: _Fn(lambda x: F.relu(x) * F.relu(x)), "relu2"),
    "r*r": (lambda: _Fn(_relu_times_itself), "relu2"),
    "nn.ReLU()(x)**2.0": (lambda: _Fn(lambda x, r=nn.ReLU(): r(x) ** 2.0), "relu2"),
    "ReLUSquaredActivation": (functools.partial(_hf_activation, "ReLUSquaredActivation"), "relu2"),
    "x*sigmoid(1.702x)": (lambda: _Fn(lambda x: x * torch.sigmoid(1.702 * x)), "quick_gelu"),
    "sigmoid(x*1.702)*x": (lambda: _Fn(lambda x: torch.sigmoid(x * 1.702) * x), "quick_gelu"),
    "QuickGELUActivation": (functools.partial(_hf_activation, "QuickGELUActivation"), "quick_gelu"),
}


@pytest.mark.parametrize("kind", ["dynamo", "export", "decomposed"])
@pytest.mark.parametrize("spelling", NEW_SPELLINGS)
def test_relu2_and_quick_gelu_spellings(spelling, kind):
    make, expected = NEW_SPELLINGS[spelling]
    module, x = models.MLP(act=make()).eval(), models.tokens()
    graph, args = _graph_of("export" if kind == "decomposed" else kind, module, x)
    if kind == "decomposed":  # core ATen: aten.square becomes aten.pow.Tensor_Scalar
        graph = graph.run_decompositions()
        args = graph._graph_module_flat_inputs((x,), {})
    report = find_ffns(graph, args if kind == "dynamo" else None)
    assert [m.activation for m in report] == [expected] and report.near_misses == [], report.near_misses
    assert_matches_compute_ffn(graph if kind == "dynamo" else graph.graph_module, args, report)


@pytest.mark.parametrize("kind", ["dynamo", "export"])
@pytest.mark.parametrize("act", ["relu2", "quick_gelu"])
def test_relu2_and_quick_gelu_in_a_glu(act, kind):
    """act(gate) * up with the new activations (ReGLU-squared, a quick-GELU GLU)."""
    fn = {"relu2": lambda a: torch.square(F.relu(a)), "quick_gelu": lambda a: a * torch.sigmoid(1.702 * a)}[act]

    class GLU(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.gate, self.up, self.down = nn.Linear(16, 64), nn.Linear(16, 64), nn.Linear(64, 16)

        def forward(self, x):
            return self.down(fn(self.gate(x)) * self.up(x))

    graph, args = _graph_of(kind, GLU().eval(), models.tokens())
    report = find_ffns(graph, None if kind == "export" else args)
    (m,) = report
    assert (m.activation, m.glu) == (act, True) and report.near_misses == []
    assert_matches_compute_ffn(graph.graph_module if kind == "export" else graph, args, report)


@pytest.mark.parametrize("act, op", [
    (lambda: _Fn(lambda x: F.relu(x) ** 3), "pow"),  # cubed ReLU: not relu2
    (lambda: _Fn(lambda x: x * torch.sigmoid(1.5 * x)), "sigmoid"),  # not 1.702: not quick_gelu
    (lambda: _Fn(lambda x: 0.5 * F.relu(x) ** 2), "mul"),  # scaled: not relu2
    (nn.Mish, "mish"),
])
@pytest.mark.parametrize("kind", ["dynamo", "export"])
def test_unsupported_activations_are_near_misses_naming_the_op(act, op, kind):
    graph, args = _graph_of(kind, models.MLP(act=act()).eval(), models.tokens())
    report = find_ffns(graph, None if kind == "export" else args)
    assert len(report) == 0
    (miss,) = report.near_misses
    ops = miss.reason.split("reads [", 1)[1].split("]", 1)[0].split(", ")
    assert miss.reason.startswith("unknown activation") and op in ops, miss.reason


def test_symbolic_trace_linear_leaves_name_their_module():
    """A call_module nn.Linear holds its own weight: weight_node is the call node itself."""
    gm = fx.symbolic_trace(models.MLP())
    (m,) = find_ffns(gm)
    assert m.up.weight_node.op == "call_module" and m.up.weight_node.target == "up"
    assert m.up.weight is gm.get_submodule("up").weight and m.down.bias is gm.get_submodule("down").bias


def test_stacked_projections_match_once():
    """Linear-GELU-Linear-GELU-Linear: two overlapping candidates; the first wins."""
    torch.manual_seed(0)
    stack = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 16))
    report = find_ffns(fx.symbolic_trace(stack))
    assert [m.weight_paths()["down"] for m in report] == ["2.weight"]
    assert len(report.near_misses) == 1 and "shares nodes" in report.near_misses[0].reason


# ---------------------------------------------------------------------------------------------
# Near misses


@pytest.mark.parametrize("kind", ["dynamo", "export"])
def test_hidden_activation_used_elsewhere_is_a_near_miss(kind):
    graph, args = _graph_of(kind, models.LeakyMLP(), models.tokens())
    report = find_ffns(graph, None if kind == "export" else args)
    assert len(report) == 0
    (miss,) = report.near_misses
    assert miss.reason.startswith("intermediate used elsewhere") and "output" in miss.reason


def test_unknown_activation_is_a_near_miss():
    report = find_ffns_in_model(models.MLP(act=nn.Tanh()), models.tokens())
    assert len(report) == 0
    (miss,) = report.near_misses
    assert "unknown activation" in miss.reason and "tanh" in miss.reason and "up.weight" in miss.reason


def test_gate_and_up_reading_different_inputs_is_a_near_miss():
    x = models.tokens()
    report = find_ffns_in_model(models.TwoInputGLU(), x, x + 1)
    assert len(report) == 0
    (miss,) = report.near_misses
    assert "read different inputs" in miss.reason


def test_broadcast_gate_is_a_shape_near_miss():
    report = find_ffns_in_model(models.BroadcastGLU(), models.tokens())
    assert len(report) == 0
    (miss,) = report.near_misses
    assert miss.reason.startswith("shapes inconsistent") and "gate 1" in miss.reason


def test_plain_linear_chains_are_not_near_misses():
    """Attention, norms, embeddings and LM heads must not be reported at all (checked on Llama)."""
    report = find_ffns(export_graph(_hf("llama"), (), models.hf_inputs("llama")))
    assert len(report) == models.LAYERS and report.near_misses == []


# ---------------------------------------------------------------------------------------------
# Prepared models (lte.apply_gates before the down projection)


@pytest.mark.parametrize("kind", ["dynamo", "export"])
def test_prepared_graph_carries_router_gates(kind):
    stack, x = models.prepared_glu_stack(expert_size=32, mode="hard", tau=0.5), models.tokens()
    graph, args = _graph_of(kind, stack, x)
    report = find_ffns(graph, None if kind == "export" else args)
    assert [m.module for m in report] == ["0", "1"] and report.near_misses == []
    for m in report:
        assert m.prepared and (m.expert_size, m.mode, m.tau) == (32, "hard", 0.5)
        assert m.apply_gates_node in m.nodes and m.gates_node not in m.nodes
        router = m.gates_node.args[0]  # sigmoid(linear(x, W_router, b_router))
        assert "sigmoid" in m.gates_node.name and router.args[0] is m.input_node
        assert m.activation == "silu" and m.glu
    gm = graph.graph_module if kind == "export" else graph
    assert_matches_compute_ffn(gm, args, report)
