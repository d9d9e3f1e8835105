"""Training telemetry: a JSON-lines log, a live progress bar and PNG plots (sparsity per layer, losses).

Every record is one flat-ish dict: `stage`, `step`, the loss terms (`loss`, `task`, `eff`, `sep`),
`eta`, `bias_shift`, `sparsity` (overall fraction of experts off), `sparsity_per_layer` and
`active_per_token` (mean active experts per token, per layer), `lr`, `time_s`. Only rank 0 writes.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class Telemetry:
    """Collects step records; writes `log.jsonl` under `out_dir` (if given) as they come."""

    def __init__(self, out_dir: str | Path | None, *, enabled: bool = True, progress: bool = True):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.enabled = enabled
        self.progress = progress and enabled
        self.records: list[dict[str, Any]] = []
        self.start = time.time()
        self._bar = None
        if self.enabled and self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def log_path(self) -> Path | None:
        return self.out_dir / "log.jsonl" if self.out_dir is not None else None

    def bar(self, total: int, initial: int, desc: str) -> None:
        """Open a tqdm bar for a stage (closing the previous one)."""
        self.close_bar()
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def log(self, record: dict[str, Any], *, write: bool = True) -> None:
        """Record one step (or eval) and update the bar's postfix with live sparsity and loss."""
        record = {**record, "time_s": round(time.time() - self.start, 3)}
        self.records.append(record)
        if self._bar is not None and record.get("kind", "step") == "step":
            self._bar.update(1)
            post = {"loss": f"{record['loss']:.3f}"} if "loss" in record else {}
            if "sparsity" in record:
                post["sparsity"] = f"{record['sparsity']:.3f}"
            self._bar.set_postfix(post, refresh=False)
        if write and self.enabled and self.log_path is not None:
            with self.log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def start_fresh(self) -> None:
        """A new run (not a resume): drop the log of an earlier run in the same directory."""
        self.records = []
        if self.enabled and self.log_path is not None and self.log_path.exists():
            self.log_path.unlink()

    def load(self) -> None:
        """Read back records written by an earlier (killed) run, so plots cover the whole run."""
        if self.log_path is not None and self.log_path.exists():
            self.records = [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def truncate_after(self, stage: str, step: int) -> None:
        """Drop records past a checkpoint (they will be logged again after resuming): steps after it,
        calibrations filed after it, and the final records (`stage` 'final': `finish` always runs
        again, so a re-run on a finished directory does not append a second final record)."""
        order = {"stage1": 1, "stage2": 2, "final": 3}
        keep = [r for r in self.records
                if (order.get(r.get("stage"), 0), r.get("step", 0)) <= (order.get(stage, 0), step)]
        self.records = keep
        if self.enabled and self.log_path is not None:
            self.log_path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def plot(self) -> list[Path]:
        """sparsity.png (overall and per layer vs step) and losses.png (every loss term vs step)."""
        if not (self.enabled and self.out_dir is not None and self.records):
            return []
        return [p for p in (plot_sparsity(self.records, self.out_dir / "sparsity.png"),
                            plot_losses(self.records, self.out_dir / "losses.png")) if p is not None]


def _steps(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Step records with a global x position (stage 2 continues after stage 1)."""
    steps = [r for r in records if r.get("kind", "step") == "step"]
    s1 = max((r["step"] for r in steps if r.get("stage") == "stage1"), default=0)
    return [{**r, "x": r["step"] + (s1 if r.get("stage") == "stage2" else 0)} for r in steps]


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sparsity(records: list[dict[str, Any]], path: Path) -> Path | None:
    rows = [r for r in _steps(records) if "sparsity_per_layer" in r]
    if not rows:
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for layer in rows[-1]["sparsity_per_layer"]:
        ax.plot([r["x"] for r in rows], [r["sparsity_per_layer"].get(layer) for r in rows], lw=1, label=layer)
    ax.plot([r["x"] for r in rows], [r["sparsity"] for r in rows], "k", lw=2, label="overall")
    target = next((r.get("target") for r in reversed(rows) if r.get("target") is not None), None)
    if target is not None:
        ax.axhline(target, color="r", ls="--", lw=1, label=f"target {target:.2f}")
    _stage_line(ax, rows)
    ax.set(xlabel="step", ylabel="fraction of experts off", ylim=(0, 1), title="LTE FFN sparsity per layer")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)
    return path


def plot_losses(records: list[dict[str, Any]], path: Path) -> Path | None:
    rows = [r for r in _steps(records) if "loss" in r]
    if not rows:
        return None
    plt = _figure()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, keys in zip(axes, (("loss", "task"), ("eff",), ("sep",))):
        for k in keys:
            pts = [(r["x"], r[k]) for r in rows if r.get(k) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1, label=k)
        _stage_line(ax, rows)
        ax.set(xlabel="step", title={"loss": "total / task", "eff": "L_eff (mean G^2)", "sep": "L_sep"}[keys[0]])
        ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)
    return path


def _stage_line(ax, rows: list[dict[str, Any]]) -> None:
    s2 = [r["x"] for r in rows if r.get("stage") == "stage2"]
    if s2:
        ax.axvline(min(s2) - 0.5, color="gray", ls=":", lw=1)
