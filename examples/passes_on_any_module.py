"""Run the FFN-discovery pass on arbitrary modules: a traced graph in, FFN records out.

    python examples/passes_on_any_module.py
"""
import torch
import torch.nn.functional as F
from torch import nn

from lte_compile.passes import find_ffns, find_ffns_in_model


class GLU(nn.Module):
    """A SwiGLU written with F.linear on the module's own parameters (no nn.Linear)."""

    def __init__(self, d=32, d_ff=128):
        super().__init__()
        self.w_gate, self.w_up = nn.Parameter(torch.randn(d_ff, d)), nn.Parameter(torch.randn(d_ff, d))
        self.w_down = nn.Parameter(torch.randn(d, d_ff))

    def forward(self, x):
        return F.linear(F.silu(F.linear(x, self.w_gate)) * F.linear(x, self.w_up), self.w_down)


def main():
    x = torch.randn(4, 32)
    mlp = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Dropout(0.1), nn.Linear(128, 32))
    for name, model in (("nn.Sequential MLP", mlp), ("F.linear SwiGLU", GLU())):
        print(f"== {name}: Dynamo graph")
        for m in find_ffns_in_model(model.eval(), x):
            print(f"  {m.module or '<root>'}: {m.form}, act={m.activation}, glu={m.glu}, "
                  f"d={m.d_model}, d_ff={m.d_ff}, weights={m.weight_paths()}")
    print("== nn.Sequential MLP: torch.fx.symbolic_trace graph")
    gm = torch.fx.symbolic_trace(mlp)
    report = find_ffns(gm)
    for m in report:
        print(f"  {m.form}, act={m.activation}, up={m.up.weight_path}, down={m.down.weight_path}")
    print("near misses:", [str(n) for n in report.near_misses] or "none")


if __name__ == "__main__":
    main()
