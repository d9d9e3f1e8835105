"""FX passes of lte_compile: trace -> match (FFN discovery) -> rewrite; plus the cost model.

Import as `lte_compile.passes`. `find_ffns(gm)` works on Dynamo, torch.export and symbolic_trace
graphs; `find_ffns_in_model(model, *inputs)` captures the Dynamo graphs itself.
`LTERewritePass` (inductor_pass.py, imported on first use) is the rewrite as an Inductor
`pre_grad_custom_pass`.
"""
from .cost import FFNCost, ffn_cost
from .ffn import ACTIVATIONS, FFNMatch, FFNReport, LinearRef, NearMiss, ProjectionSpec
from .match import find_ffns, find_ffns_in_model
from .trace import capture_graphs, export_graph

__all__ = [
    "ACTIVATIONS", "FFNCost", "FFNMatch", "FFNReport", "LinearRef", "NearMiss", "ProjectionSpec",
    "capture_graphs", "export_graph", "ffn_cost", "find_ffns", "find_ffns_in_model", "LTERewritePass",
]


def __getattr__(name: str):
    if name == "LTERewritePass":  # lazy: importing it imports torch._inductor
        from .inductor_pass import LTERewritePass

        return LTERewritePass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
