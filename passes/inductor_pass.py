"""The LTE rewrite as an Inductor custom graph pass, for pipelines that own their `torch.compile`.

    from lte_compile.passes import LTERewritePass
    model = lte.prepare(model, ...)  # hard mode for inference
    compiled = torch.compile(model, backend="inductor",
                             options={"pre_grad_custom_pass": LTERewritePass()})

Hook: Inductor's `pre_grad_custom_pass` (torch/_inductor/config.py). It is the only custom hook
that sees the graph BEFORE AOTAutograd: `compile_fx` hands Dynamo's GraphModule to
`aot_module_simplified`, which runs the pre-grad passes on it and only then traces the joint
forward/backward graph. So the rewritten `lte::sparse_ffn` gets its own autograd formula (training
works), exactly as in the `lte` backend. The joint/post-grad hooks run after AOTAutograd: the
backward of the masked dense FFN already exists there and the parameters are anonymous
`primals_*`/`arg*` placeholders, so the rewrite would be wrong (training) or find nothing.

The graph a pre-grad pass gets is Dynamo's own: placeholders keep their `grapharg` source (the
parameter path) and `example_value` metadata, which is all `find_ffns` needs (no example inputs).

Caching: `uuid()` hashes this package's source files, the op schema file and the pass options, so
Inductor may run the pass "late" (after its FX-graph cache lookup) and a change to the pass or the
options is a cache miss (Inductor's `CustomGraphPass` contract).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .match import find_ffns
from .rewrite import rewrite_ffns

logger = logging.getLogger(__name__)

_APPLY_GATES = "lte::apply_gates"


@dataclass
class PassRecord:
    """One call of the pass: FFNs found, rewritten into `lte::sparse_ffn`, skipped (with reasons)."""

    ffns_found: int
    prepared: int
    rewritten: list[str]
    skipped: list[str]
    near_misses: list[str]


@dataclass
class LTERewritePass(CustomGraphPass):
    """Inductor `pre_grad_custom_pass`: rewrite every prepared FFN (an `lte.apply_gates` marker)
    of the graph into one `lte::sparse_ffn` call; unprepared FFNs and other graphs are unchanged.

    rewrite: False only finds and records (the graph is left as is).
    strict: raise if a graph has `lte.apply_gates` markers that did not all become sparse FFNs
        (default: log a warning; those FFNs run masked dense, still correct).
    `records` holds one `PassRecord` per call (Dynamo graph), newest last.
    """

    rewrite: bool = True
    strict: bool = False
    records: list[PassRecord] = field(default_factory=list, compare=False, repr=False)

    def __call__(self, graph: fx.Graph) -> None:
        gm = graph.owning_module
        if gm is None:
            raise TypeError("LTERewritePass needs a graph owned by a GraphModule (Inductor's pre-grad graph is)")
        report = find_ffns(gm)
        prepared = [m for m in report.matches if m.prepared]
        rewritten, skipped = [], []
        if self.rewrite and prepared:
            result = rewrite_ffns(gm, report)
            rewritten, skipped = result.rewritten, result.skipped
        self.records.append(PassRecord(len(report.matches), len(prepared), rewritten, skipped,
                                       [str(n) for n in report.near_misses]))
        markers = sum(1 for n in graph.nodes if n.op == "call_function" and _is_apply_gates(n))
        if self.rewrite and markers:
            msg = (f"LTERewritePass: {markers} lte.apply_gates marker(s) left after the rewrite "
                   f"({len(rewritten)} FFN(s) rewritten; skipped: {skipped or 'none'}; near misses: "
                   f"{[str(n) for n in report.near_misses] or 'none'}). Those FFNs run masked dense. "
                   "Is the pass installed as `pre_grad_custom_pass` (not a post-grad/joint hook)?")
            if self.strict:
                raise RuntimeError(msg)
            logger.warning(msg)
        logger.info("LTERewritePass: %d FFN(s) found, %d prepared, %d rewritten to lte::sparse_ffn",
                    len(report.matches), len(prepared), len(rewritten))

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.compare}

    def uuid(self) -> bytes:
        """Stable across processes: the pass's source files, the op definitions and the options."""
        return get_hash_for_files(source_files(), json.dumps(self.options(), sort_keys=True))


def _is_apply_gates(node: fx.Node) -> bool:
    from .fx_utils import op_name

    return op_name(node) == _APPLY_GATES


def source_files() -> tuple[str, ...]:
    """What the pass's behaviour depends on: the passes package and the lte ops' definitions."""
    here = Path(__file__).resolve().parent
    kernels = here.parent / "kernels"
    files = sorted(here.glob("*.py")) + [kernels / "ops.py", kernels / "reference.py"]
    return tuple(str(p) for p in files if p.exists())
