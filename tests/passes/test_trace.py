"""capture_graphs / export_graph / Dynamo source parsing."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo import convert_frame

from lte_compile.passes import capture_graphs, export_graph, find_ffns, find_ffns_in_model
from lte_compile.passes.fx_utils import source_path
from lte_compile.passes.trace import _Recorder
from tests import models


class BrokenStack(nn.Module):
    """Two MLPs with a graph break between them: Dynamo gives two graphs."""

    def __init__(self):
        super().__init__()
        self.first, self.second = models.MLP().eval(), models.MLP(act=nn.GELU()).eval()

    def forward(self, x):
        x = self.first(x)
        torch._dynamo.graph_break()
        return self.second(x)


def _recorder_entries() -> int:
    codes = [ref() for ref in [*convert_frame.input_codes.seen, *convert_frame.output_codes.seen]]
    return sum(isinstance(getattr(e.backend, "compiler_fn", None), _Recorder)
               for code in codes if code is not None for e in _debug_get_cache_entry_list(code))


def test_capture_graphs_gives_backend_inputs():
    model = models.sequential_mlp()
    graphs = capture_graphs(model, models.tokens())
    assert len(graphs) == 1
    gm, example_inputs = graphs[0]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(example_inputs)
    params = {id(p) for p in model.parameters()}
    assert sum(id(t) in params for t in example_inputs) == 4  # the real Parameters, not copies


def test_capture_graphs_leaves_no_compiled_state():
    model = models.sequential_mlp()
    torch.compile(model, backend="eager")(models.tokens())  # another backend's entries must survive
    for _ in range(3):  # repeated captures must not pile up cache entries (recompile limit)
        capture_graphs(model, models.tokens())
    assert _recorder_entries() == 0
    assert "forward" not in vars(model) and not hasattr(model, "_orig_mod")
    assert torch.is_grad_enabled()  # capture ran under no_grad and restored grad mode


def test_graph_breaks_give_several_graphs_with_model_paths():
    """After a break Dynamo traces submodule frames: their sources are relative to the submodule;
    find_ffns_in_model still reports paths on the user's model."""
    model = BrokenStack()
    assert len(capture_graphs(model, models.tokens())) >= 2
    report = find_ffns_in_model(model, models.tokens())
    assert sorted(m.module for m in report) == ["first", "second"]
    assert {m.activation for m in report} == {"relu", "gelu"}
    for m in report:
        assert m.up.weight is model.get_parameter(m.up.weight_path)


def test_export_graph_names_parameters():
    model = models.FunctionalGLU()
    ep = export_graph(model, (models.tokens(),))
    assert isinstance(ep, torch.export.ExportedProgram)
    (m,) = find_ffns(ep)
    assert m.gate.weight is model.w_gate and m.gate.weight_path == "w_gate"


@pytest.mark.parametrize("source, path", [
    ("L['self']._modules['model']._modules['layers']._modules['0']._modules['mlp']._modules['up_proj']"
     "._parameters['weight']", "model.layers.0.mlp.up_proj.weight"),
    ("L['args'][0]._modules['transformer']._modules['h']._modules['1']._parameters['bias']", "transformer.h.1.bias"),
    ("L['model']._modules['0']._buffers['running_mean']", "0.running_mean"),
    ("L['self'].w_up", "w_up"),
    ("L['self']", None),  # the root itself is no parameter path
])
def test_source_path(source, path):
    assert source_path(source) == path
