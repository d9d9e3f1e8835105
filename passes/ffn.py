"""Records the FFN matcher produces: what an FFN is, and why a near miss is not one.

Letters: T tokens, d model dim, d_ff FFN width, E experts, B expert size.
These records are the contract between `find_ffns` (match), `lte.prepare` (plan),
`rewrite_ffns` (rewrite) and `lte inspect` (report).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from lte_compile.kernels import ACTIVATIONS  # noqa: E402  the op's activation names (one owner)


@dataclass(frozen=True)
class ProjectionSpec:
    """Where one FFN projection's weights live in the model, and the neuron-axis rule.

    The one owner of "which axis of a stored weight indexes the FFN's d_ff neurons": the output
    axis of up/gate (axis 0 of an [out, in] weight, 1 when `transposed`, GPT-2 Conv1D [in, out]),
    the input axis of down. `rows` selects a slice of a fused weight's outputs (Phi-3 gate_up),
    `(start, stop)` in the un-transposed [out, in] orientation. Serialisable: `lte.save` stores it.
    """

    weight: str
    bias: str | None = None
    transposed: bool = False
    rows: tuple[int, int] | None = None
    down: bool = False  # the down projection: neurons are its inputs

    @property
    def module(self) -> str:
        """Path of the module owning the weight ('' for the root)."""
        return self.weight.rpartition(".")[0]

    @property
    def neuron_axis(self) -> int:
        """Axis of the stored weight that indexes the d_ff neurons."""
        return (0 if self.transposed else 1) if self.down else (1 if self.transposed else 0)

    def neuron_rows(self, w: torch.Tensor) -> torch.Tensor:
        """The stored weight as [N, other] neuron rows (a view; fused slice applied)."""
        w = w if self.neuron_axis == 0 else w.t()
        return w if self.rows is None else w[self.rows[0]:self.rows[1]]

    def bias_rows(self, b: torch.Tensor | None) -> torch.Tensor | None:
        """The bias entries of these neurons (down's bias is per output: unchanged)."""
        return b if b is None or self.rows is None or self.down else b[self.rows[0]:self.rows[1]]

    def to_dict(self) -> dict:
        return {"weight": self.weight, "bias": self.bias, "transposed": self.transposed,
                "rows": list(self.rows) if self.rows else None, "down": self.down}

    @classmethod
    def from_dict(cls, d: dict) -> "ProjectionSpec":
        return cls(d["weight"], d.get("bias"), bool(d.get("transposed", False)),
                   tuple(d["rows"]) if d.get("rows") is not None else None, bool(d.get("down", False)))


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

    def projection(self, down: bool = False) -> ProjectionSpec | None:
        """The serialisable record of this projection (None if its weight has no parameter path)."""
        if self.weight_path is None:
            return None
        return ProjectionSpec(self.weight_path, self.bias_path, self.transposed, self.rows, down)


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
