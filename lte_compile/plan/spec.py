"""`FFNSpec`: where one prepared FFN's weights live in the model, by path (what `lte.save` records).

Its projections are the passes' own `ProjectionSpec` records (passes/ffn.py), which also own the
neuron-axis rule: the plan never re-derives which axis of a weight holds the neurons.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..passes.ffn import ProjectionSpec


@dataclass
class FFNSpec:
    """One prepared FFN: its owner module, projections, activation and sizes."""

    name: str  # owner module path, e.g. "model.layers.0.mlp"
    up: ProjectionSpec
    down: ProjectionSpec
    gate: ProjectionSpec | None
    activation: str
    glu: bool
    d_model: int
    d_ff: int
    d_out: int
    form: str

    def projections(self) -> dict[str, ProjectionSpec]:
        """{'up', 'gate', 'down'} -> ProjectionSpec, without a missing gate."""
        return {k: v for k, v in (("up", self.up), ("gate", self.gate), ("down", self.down)) if v is not None}

    def to_dict(self) -> dict:
        return {"name": self.name, **{k: (v.to_dict() if v is not None else None)
                                      for k, v in (("up", self.up), ("gate", self.gate), ("down", self.down))},
                "activation": self.activation, "glu": self.glu, "d_model": self.d_model, "d_ff": self.d_ff,
                "d_out": self.d_out, "form": self.form}

    @classmethod
    def from_dict(cls, d: dict) -> "FFNSpec":
        d = dict(d)
        for k in ("up", "gate", "down"):
            d[k] = ProjectionSpec.from_dict(d[k]) if d.get(k) is not None else None
        return cls(**d)
