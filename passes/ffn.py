"""Records the FFN matcher produces: what an FFN is, and why a near miss is not one.

Letters: T tokens, d model dim, d_ff FFN width, E experts, B expert size.
These records are the contract between `find_ffns` (match), `lte.prepare` (plan),
`rewrite_ffns` (rewrite) and `lte inspect` (report).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")


@dataclass
class LinearRef:
    """One projection of an FFN: `y = x @ W.T + b` (or `x @ W + b` when `transposed`).

    `weight_path` / `bias_path` are parameter paths in the user's model
    (`model.layers.0.mlp.up_proj.weight`) when the graph lets us resolve them, else None.
    `rows` selects a slice of a fused weight's output rows (Phi-3 `gate_up_proj` chunked):
    `(start, stop)` in the un-transposed [out, in] orientation.
    """

    weight_node: fx.Node
    weight_path: str | None = None
    weight: torch.Tensor | None = None
    bias_node: fx.Node | None = None
    bias_path: str | None = None
    bias: torch.Tensor | None = None
    transposed: bool = False  # weight stored [in, out] (GPT-2 Conv1D, matmul with W)
    rows: tuple[int, int] | None = None
    node: fx.Node | None = None  # the node computing this projection's output


@dataclass
class FFNMatch:
    """An FFN region `y = down(act(gate(x)) * up(x))` (GLU) or `y = down(act(up(x)))`.

    `input_node` is x ([..., d]); `output_node` computes y ([..., d_out]) including the down
    bias. `gates_node` is the router output G ([..., E]) when the model was prepared by
    `lte.prepare` (an `lte.apply_gates` node sits before the down projection), else None.
    `module` is the owning module path (lowest common owner of the weights), for reports.
    """

    module: str
    input_node: fx.Node
    output_node: fx.Node
    up: LinearRef
    down: LinearRef
    gate: LinearRef | None
    activation: str
    glu: bool
    d_model: int
    d_ff: int
    d_out: int
    form: str  # e.g. "linear", "conv1d", "addmm", "matmul", "fused_gate_up"
    gates_node: fx.Node | None = None
    apply_gates_node: fx.Node | None = None
    expert_size: int | None = None  # from the apply_gates node when prepared
    mode: str | None = None  # "soft" | "hard" from the apply_gates node when prepared
    tau: float | None = None
    nodes: list[fx.Node] = field(default_factory=list)  # interior nodes of the region

    @property
    def prepared(self) -> bool:
        return self.gates_node is not None

    def weight_paths(self) -> dict[str, str | None]:
        refs = {"up": self.up, "gate": self.gate, "down": self.down}
        return {k: (r.weight_path if r is not None else None) for k, r in refs.items()}


@dataclass
class NearMiss:
    """A region that looked like an FFN but is not rewritten, and why (written for a reader)."""

    node: fx.Node
    reason: str
    module: str | None = None

    def __str__(self) -> str:
        where = self.module or self.node.name
        return f"{where}: {self.reason}"


@dataclass
class FFNReport:
    """What `find_ffns` returns: the matches and the near misses."""

    matches: list[FFNMatch] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)

    def __iter__(self):
        return iter(self.matches)

    def __len__(self) -> int:
        return len(self.matches)

    def __getitem__(self, i: int) -> FFNMatch:
        return self.matches[i]
