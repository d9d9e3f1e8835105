"""`lte compare`: LTE against the selection rules a user would pick instead, at equal budget (issue 9).

    lte compare                      # the full sweep on the shipped Llama LM -> benchmarks/quality/
    lte compare --model gpt2 --targets 0.5,0.9 --methods lte,moefication --out runs/quality
    lte compare --quick --no-decode  # smoke run: a tiny random model, 2 targets, a few steps (the tests run it)

Every method uses the same prepared model (same experts, routers and kernels); only the selection
rule differs (training/baselines.py). For each target sparsity and method it measures held-out
hard-mode sparsity, held-out perplexity, FFN FLOPs per token from the cost model (passes/cost.py
`ffn_cost` at each FFN's achieved sparsity, with the method's own router cost) and batch-1 greedy
decode tokens/s under `torch.compile(backend="lte")`. Methods:

- `dense`; `dense_ft`: the dense model fine-tuned for steps1 + steps2 steps (the demo's equal-budget
  baseline, small_lm/demo.py `finetune_dense`);
- `moefication`, `dejavu`, `oracle_topk`, `oracle_threshold`, `random` (baselines.py), each also
  "+S2": stage 2 under its own frozen masks, LTE's stage 2 (same steps, lr and batches);
- `lte_s1`: LTE stage 1 from fitted routers (`router_init='fit'`, the default), then the hard-mode
  calibration; `lte`: that model after the same stage 2 (= `lte.train(stage1_steps, stage2_steps)`:
  stage 2 reads the training batches after stage 1's; the +S2 runs read the stream from its start).

Decode speed depends on the router's cost and the sparsity, not on which experts are chosen: it is
measured once per target for linear routers (on the `lte` model) and once for the Deja Vu predictor;
oracles compute every expert to choose, so they have none (n/a). Writes `table.md`,
`ppl_vs_sparsity.png` and `results.json` (every number) into `--out` (default benchmarks/quality/).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .baselines import RULES, flops_of_scorer, retarget, select_experts, stage2_config
from .config import TrainConfig

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = (0.3, 0.5, 0.7, 0.8, 0.9)
BASE_METHODS = (*RULES, "lte")
"""What `--methods` selects: a baseline rule (with its +S2 row) or `lte` (rows lte_s1 and lte)."""
LABELS = {"dense": "dense", "dense_ft": "dense, fine-tuned (equal budget)", "moefication": "MoEfication (router only)",
          "dejavu": "Deja Vu predictor", "oracle_topk": "oracle top-k", "oracle_threshold": "oracle threshold",
          "random": "random router", "lte_s1": "LTE stage 1", "lte": "LTE (stage 1 + 2)"}
TOLERANCE = 0.02


@dataclass
class SweepSettings:
    """Budget and measurement settings of one sweep. The defaults are the full sweep, sized for
    <= 60 min on 2 idle cores with the shipped 5.2M-parameter Llama. Measured on the 2-core AVX2
    EPYC, one thread on a free core: a training step (8 x 256 tokens) 1.8 s; fitting MoEfication /
    Deja Vu once 40 / 60 s; a held-out calibration 10-25 s. Six stage-2 runs per target dominate:
    5 targets x (steps1 + 6 steps2) steps, + steps1 + steps2 for the dense fine-tune."""

    targets: tuple[float, ...] = DEFAULT_TARGETS
    methods: tuple[str, ...] = BASE_METHODS
    steps1: int = 80
    steps2: int = 40
    batch_size: int = 8
    seq_len: int = 256
    eval_batches: int = 8
    fit_batches: int = 8
    fit_steps: int = 300
    rank: int = 64
    expert_size: int = 32
    kd_weight: float = 0.0
    kd_temperature: float = 1.0
    kd_stages: str = "both"
    dense_ft_lr: float = 2e-4
    decode: bool = True
    decode_tokens: int = 48
    decode_reps: int = 3
    progress: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.targets or any(not (isinstance(t, float) and 0.0 < t < 1.0) for t in self.targets):
            raise ConfigError("targets", self.targets, "one or more floats in (0, 1)")
        unknown = [m for m in self.methods if m not in BASE_METHODS]
        if unknown or not self.methods:
            raise ConfigError("methods", list(self.methods), f"a non-empty subset of {BASE_METHODS}")
        for name in ("steps1", "steps2", "batch_size", "seq_len", "eval_batches", "fit_batches", "fit_steps", "rank",
                     "expert_size", "decode_tokens", "decode_reps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "seq_len" else 1):
                raise ConfigError(name, value, "a positive integer" + (" >= 2" if name == "seq_len" else ""))

    def train_config(self) -> TrainConfig:
        """LTE's budget; every +S2 run takes its stage 2 from it (baselines.stage2_config)."""
        return TrainConfig(stage1_steps=self.steps1, stage2_steps=self.steps2, batch_size=self.batch_size,
                           seq_len=self.seq_len, eval_batches=self.eval_batches, kd_weight=self.kd_weight,
                           kd_temperature=self.kd_temperature, kd_stages=self.kd_stages, progress=self.progress,
                           plots=False, seed=self.seed)


# ----------------------------------------------------------------------------- measuring one model
def ffn_flops_per_token(model: nn.Module, sparsity_per_layer: dict[str, float] | None) -> float:
    """Sum over FFNs of the cost model's FLOPs for one token: dense (None), or at each FFN's
    sparsity with the router's actual cost (linear or Deja Vu; an oracle's selection counted free)."""
    from ..passes import ffn_cost
    from ..plan import routers

    total = 0.0
    for name, r in routers(model).items():
        s = r.spec
        cost = ffn_cost(s.d_model, s.d_ff, s.d_out, s.glu, expert_size=r.expert_size)
        if sparsity_per_layer is None:
            total += cost.evaluate(T=1, s=0.0)["flops_dense"]
            continue
        linear_router = 2 * s.d_model * r.num_experts  # what ffn_cost counts for the router
        total += cost.evaluate(T=1, s=sparsity_per_layer[name])["flops_sparse"] - linear_router + \
            (flops_of_scorer(r) or 0)
    return total


def _measure(model: nn.Module, val_ids: Tensor, st: SweepSettings, prepared: nn.Module | None = None,
             result: Any = None) -> dict[str, Any]:
    """Held-out numbers of `model`: hard mode, or dense when `prepared` (a prepared twin that gives
    the FFN shapes for the FLOPs) is given. `result`: the TrainResult of a run that just measured
    the same held-out batches in hard mode (its numbers are taken, not measured again)."""
    from .evaluate import evaluate

    if result is not None:
        return {"sparsity": result.sparsity, "sparsity_per_layer": result.sparsity_per_layer,
                "loss": result.eval_loss, "ppl": result.eval_ppl,
                "flops_per_token": ffn_flops_per_token(model, result.sparsity_per_layer)}
    mode = "hard" if prepared is None else "dense"
    ev = evaluate(model, val_ids, mode=mode, seq_len=st.seq_len, batch_size=st.batch_size, max_batches=st.eval_batches)
    per_layer = ev.get("sparsity_per_layer") if prepared is None else None
    return {"sparsity": ev.get("sparsity", 0.0) if prepared is None else 0.0, "sparsity_per_layer": per_layer,
            "loss": ev["loss"], "ppl": ev["ppl"], "flops_per_token": ffn_flops_per_token(prepared or model, per_layer)}


# ----------------------------------------------------------------------------- the sweep
class _Sweep:
    """Runs every method at every target on copies of one prepared model; collects rows."""

    def __init__(self, dense: nn.Module, train_ids: Tensor, val_ids: Tensor, st: SweepSettings,
                 say: Callable[[str], None]):
        import lte_compile as lte

        self.dense, self.train_ids, self.val_ids, self.st, self.say = dense, train_ids, val_ids, st, say
        self.base = copy.deepcopy(dense)
        lte.prepare(self.base, lte.Config(expert_size=st.expert_size))  # dense mode: the dense model's outputs
        self.cfg = st.train_config()
        self.teacher = dense if st.kd_weight > 0 else None
        self.rows: list[dict[str, Any]] = []
        self.decode_models: dict[float, dict[str, nn.Module]] = {}
        self.fitted: dict[str, nn.Module] = {}  # rule -> selected model at the first target (refit never)

    def row(self, method: str, target: float | None, model: nn.Module, clock: tuple[float, float], result=None,
            **extra) -> None:
        """Measure `model` and record it; `clock` = (wall, CPU) seconds when this method's step began."""
        seconds, cpu_s = time.perf_counter() - clock[0], time.process_time() - clock[1]
        measured = _measure(model, self.val_ids, self.st, self.base if target is None else None, result)
        rec = {"method": method, "label": LABELS[method.removesuffix("+S2")] + (" +S2" if method.endswith("+S2") else ""),
               "target": target, **measured,
               "seconds": round(seconds, 1), "cpu_s": round(cpu_s, 1), **extra}
        rec["within_tolerance"] = None if target is None or method.startswith("oracle_topk") else \
            abs(rec["sparsity"] - target) <= TOLERANCE
        self.rows.append(rec)
        self.say(f"  {rec['label']:<40} target {target if target is not None else '-':<4} sparsity "
                 f"{rec['sparsity']:.3f}  ppl {rec['ppl']:8.2f}  ({seconds:.0f} s, CPU {cpu_s:.0f} s)")

    def dense_rows(self) -> None:
        from ..small_lm.demo import finetune_dense

        self.row("dense", None, self.base, _clock())
        tuned, t0 = copy.deepcopy(self.dense), _clock()
        finetune_dense(tuned, self.train_ids, self.st.steps1 + self.st.steps2, self.st.dense_ft_lr,
                       self.st.batch_size, self.st.seq_len)
        self.row("dense_ft", None, tuned, t0, steps=self.st.steps1 + self.st.steps2)

    def train(self, model: nn.Module, cfg: TrainConfig, start: int = 0):
        """`lte.train` on the training stream from batch `start` (LTE's stage 2 continues after
        the batches its stage 1 read, as in one `lte.train` call; every other run starts at 0)."""
        from .batches import TokenBatches
        from .driver import train

        data = TokenBatches(self.train_ids, cfg.seq_len, cfg.batch_size, cfg.seed, position=start)
        return train(model, data, cfg, eval_data=self.val_ids, teacher=self.teacher)

    def target_rows(self, target: float) -> None:
        self.say(f"target sparsity {target}")
        kept = {}
        for method in self.st.methods:
            t0, first, result = _clock(), "lte_s1" if method == "lte" else method, None  # clock includes fitting
            if method == "lte":
                model = copy.deepcopy(self.base)
                result = self.train(model, replace(self.cfg, stage2_steps=0, target_sparsity=target))
            else:
                model = self.select(method, target)
            self.row(first, target, model, t0, result)
            t0 = _clock()
            result = self.train(model, stage2_config(self.cfg, method, target),
                                start=self.st.steps1 if method == "lte" else 0)
            self.row("lte" if method == "lte" else f"{method}+S2", target, model, t0, result, steps2=self.st.steps2)
            if method in ("lte", "dejavu") or (method in ("moefication", "random") and "lte" not in self.st.methods):
                kept[method] = model  # decode-speed stand-ins (see decode); the other copies are dropped
        self.decode_models[target] = {kind: kept[m] for kind, m in (("linear", _linear_model(kept)),
                                                                     ("dejavu", "dejavu")) if m in kept}

    def select(self, rule: str, target: float) -> nn.Module:
        """A copy of the prepared model under `rule` at `target`: fitted at the first target, then
        only recalibrated (the predictors do not depend on the target)."""
        st = self.st
        if rule not in self.fitted:
            model = copy.deepcopy(self.base)
            select_experts(model, rule, self.train_ids, eval_data=self.val_ids, target_sparsity=target,
                           batches=st.fit_batches, seq_len=st.seq_len, batch_size=st.batch_size, steps=st.fit_steps,
                           rank=st.rank, tolerance=TOLERANCE, seed=st.seed)
            self.fitted[rule] = model
            return copy.deepcopy(model)
        model = copy.deepcopy(self.fitted[rule])
        retarget(model, rule, self.val_ids, target_sparsity=target, batches=st.fit_batches, seq_len=st.seq_len,
                 batch_size=st.batch_size, tolerance=TOLERANCE)
        return model

    def run(self) -> list[dict[str, Any]]:
        self.dense_rows()
        for target in self.st.targets:
            self.target_rows(target)
        if self.st.decode:
            self.decode()
        return self.rows

    def decode(self) -> None:
        """Batch-1 decode tokens/s: dense under Inductor once, each router kind per target under
        the lte backend, interleaved with dense so each ratio sees the same host load."""
        self.say("batch-1 decode (torch.compile: dense 'inductor', sparse 'lte')")
        speeds = decode_speeds(self.dense, self.decode_models, self.st.decode_tokens, self.st.decode_reps)
        for rec in self.rows:
            rec["decode"] = _decode_entry(rec, speeds)


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _linear_model(kept: dict[str, nn.Module]) -> str | None:
    """The model whose decode speed stands for every linear-router row of a target: LTE if run."""
    return next((m for m in ("lte", "moefication", "random") if m in kept), None)


def _router_kind(method: str) -> str | None:
    base = method.removesuffix("+S2")
    if base.startswith("oracle"):
        return None
    return "dejavu" if base == "dejavu" else ("dense" if base in ("dense", "dense_ft") else "linear")


def _decode_entry(rec: dict[str, Any], speeds: dict) -> dict[str, Any]:
    kind = _router_kind(rec["method"])
    if kind is None:
        return {"tokens_per_s": None, "note": "n/a: an oracle computes every expert to choose"}
    if kind == "dense":
        return {"tokens_per_s": speeds["dense"], "note": "dense, Inductor"}
    got = speeds.get((rec["target"], kind))
    if got is None:
        return {"tokens_per_s": None, "note": "not measured"}
    return {"tokens_per_s": got["tokens_per_s"], "vs_dense": got["vs_dense"], "tokens_match_eager": got["match"],
            "note": f"lte backend; {kind} router (measured on the {got['model']} model at this target)"}


def decode_speeds(dense: nn.Module, models: dict[float, dict[str, nn.Module]], new_tokens: int,
                  reps: int) -> dict:
    """{'dense': tok/s, (target, kind): {'tokens_per_s', 'vs_dense', 'match', 'model'}}: medians of
    `reps` interleaved greedy decodes of `new_tokens` after a 4-token prompt; the compiled sparse
    tokens are checked against eager hard mode (a wrong compiled model reports no speed)."""
    import lte_compile as lte
    from ..small_lm.demo import _decode_time

    prompt = torch.tensor([[5, 6, 7, 8]])
    dense = copy.deepcopy(dense).eval()
    out: dict = {}
    dense_times: list[float] = []
    # One compiled forward per model instance (same code object): raise Dynamo's recompile limit so
    # later models are compiled, not silently run eagerly.
    with torch._dynamo.config.patch(recompile_limit=8 + 4 * sum(len(v) for v in models.values())):
        dense_fn = torch.compile(dense.forward, backend="inductor", fullgraph=True)
        _decode_time(dense, dense_fn, prompt, 4)
        for target, kinds in models.items():
            for kind, model in kinds.items():
                model = model.eval()
                lte.set_mode(model, "hard")
                fn = torch.compile(model.forward, backend="lte", fullgraph=True)
                _decode_time(model, fn, prompt, 4)
                eager, compiled = [], []
                _decode_time(model, model.forward, prompt, 16, eager)
                _decode_time(model, fn, prompt, 16, compiled)
                times, base = [], []
                for _ in range(reps):
                    base.append(_decode_time(dense, dense_fn, prompt, new_tokens))
                    times.append(_decode_time(model, fn, prompt, new_tokens))
                dense_times += base
                tps, dense_tps = new_tokens / _median(times), new_tokens / _median(base)
                out[(target, kind)] = {"tokens_per_s": tps if eager == compiled else None, "vs_dense": tps / dense_tps,
                                       "match": eager == compiled, "model": "Deja Vu" if kind == "dejavu" else "LTE"}
    torch._dynamo.reset()
    out["dense"] = new_tokens / _median(dense_times) if dense_times else None
    return out


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


# ----------------------------------------------------------------------------- outputs
def machine_header() -> dict[str, Any]:
    """CPU name, vector ISA, the relevant flags, threads and versions (kernels/cpu.py)."""
    from ..kernels.cpu import cpu_flags, cpu_name, isa

    vector = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))
    return {"cpu": cpu_name(), "isa": isa()[0], "cpu_flags": vector, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def markdown_table(results: dict[str, Any]) -> str:
    """The results as markdown: a header (machine, model, budget), then one row per method and target."""
    h, st = results["header"], results["settings"]
    fair = next((r["ppl"] for r in results["rows"] if r["method"] == "dense_ft"), None)
    lines = [f"# Quality at equal budget: {h['model']['name']}", "",
             f"- machine: {h['machine']['cpu']} (ISA {h['machine']['isa']}; flags {' '.join(h['machine']['cpu_flags'])}); "
             f"{h['machine']['threads']} torch thread(s); torch {h['machine']['torch']}",
             f"- model: {h['model']['name']}, {h['model']['params'] / 1e6:.2f}M parameters, "
             f"{'/'.join(map(str, h['model']['experts']))} experts per FFN of {st['expert_size']} neurons",
             f"- budget: LTE stage 1 {st['steps1']} + stage 2 {st['steps2']} steps; every +S2 row: {st['steps2']} "
             f"stage-2 steps; dense fine-tuned {st['steps1'] + st['steps2']} steps; batch {st['batch_size']} x "
             f"{st['seq_len']} tokens; routers fitted on {st['fit_batches']} batches ({st['fit_steps']} steps)"
             + (f"; distillation weight {st['kd_weight']}, T {st['kd_temperature']}, in {st.get('kd_stages', 'both')}"
                if st['kd_weight'] else ""),
             f"- held-out: {st['eval_batches']} batches of the held-out works; sparsity = fraction of FFN experts off "
             f"(hard mode); tolerance ±{TOLERANCE} for calibrated rules (top-k: k = round((1 - target) E))",
             f"- command: `{h['command']}` ({h['wall_s'] / 60:.1f} min; CPU {h['cpu_s'] / 60:.1f} min)", "",
             "| method | target | sparsity | held-out ppl | vs dense FT | FFN MFLOP/token | decode tok/s (batch 1) | s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        dec = r.get("decode") or {}
        tps = _fmt(dec.get("tokens_per_s"), ".1f") + (f" ({dec['vs_dense']:.2f}x)" if dec.get("vs_dense") else "")
        flag = "" if r["within_tolerance"] in (None, True) else " (off target)"
        vs = "n/a" if fair is None else f"{100 * (r['ppl'] / fair - 1):+.1f} %"
        lines.append(f"| {r['label']} | {_fmt(r['target'], '.2f') if r['target'] else '-'} | "
                     f"{r['sparsity']:.3f}{flag} | {_fmt(r['ppl'], '.2f')} | {vs} | "
                     f"{r['flops_per_token'] / 1e6:.2f}{'*' if r['method'].startswith('oracle') else ''} | "
                     f"{tps if r.get('decode') else 'not measured'} | {r['seconds']:.0f} |")
    lines += ["", "`*` oracle: the FLOPs of its experts with the selection counted free; it computes every expert "
              "to choose, so it has no decode speed. Decode speed is measured once per target for linear routers "
              "(on the LTE model) and once for the Deja Vu predictor; each ratio is against the dense model under "
              "Inductor timed interleaved with it (the dense rows: the median of those runs). s: wall seconds of "
              "the row's step (selection or stage 1; +S2: stage 2) with its held-out evaluation."]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Held-out perplexity vs achieved sparsity, one line per method; dense and dense FT as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    by_method: dict[str, list[dict]] = {}
    for r in results["rows"]:
        if r["target"] is None:
            ax.axhline(r["ppl"], ls=":" if r["method"] == "dense" else "--", c="k" if r["method"] == "dense" else "gray",
                       label=r["label"])
        else:
            by_method.setdefault(r["method"], []).append(r)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bases = list(dict.fromkeys(m.removesuffix("+S2").replace("lte_s1", "lte") for m in by_method))
    for method, rows in by_method.items():
        base = method.removesuffix("+S2").replace("lte_s1", "lte")
        adapted = method.endswith("+S2") or method == "lte"
        rows = sorted(rows, key=lambda r: r["sparsity"])
        ax.plot([r["sparsity"] for r in rows], [r["ppl"] for r in rows], marker="o" if adapted else "x",
                ls="-" if adapted else "--", c=colors[bases.index(base) % len(colors)], label=rows[0]["label"])
    ax.set_xlabel("achieved held-out FFN sparsity (fraction of experts off)")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_yscale("log")
    ax.set_title(f"{results['header']['model']['name']}: perplexity vs sparsity at equal budget", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"table": out_dir / "table.md", "plot": out_dir / "ppl_vs_sparsity.png", "json": out_dir / "results.json"}
    paths["table"].write_text(markdown_table(results))
    plot(results, paths["plot"])
    paths["json"].write_text(json.dumps(results, indent=2, default=str))
    return paths


# ----------------------------------------------------------------------------- models and data
def _tiny_llama(vocab_size: int) -> nn.Module:
    """The --quick model: a random Llama, d 64, 2 layers, d_ff 256 (16 experts of 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=256,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                        max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=0,
                                        eos_token_id=0, pad_token_id=0)).eval()


def load_model_and_data(model: str, quick: bool) -> tuple[nn.Module, Tensor, Tensor, dict[str, Any]]:
    """(dense model, training tokens, held-out tokens, model header). `model`: llama | gpt2 | a
    directory written by lte_compile.small_lm.model; --quick: a tiny random Llama on one training
    and one held-out work (the whole corpus takes ~10 s to tokenize)."""
    from ..small_lm.corpus import asset_path, encode_texts, load_works, split_works
    from ..small_lm.model import EOS, corpus_tokens, load_small_lm, load_tokenizer

    if quick:
        tok = load_tokenizer()
        train, val = split_works(load_works())
        dense = _tiny_llama(tok.get_vocab_size())
        train_ids, val_ids = encode_texts(tok, train[:1], tok.token_to_id(EOS)), encode_texts(tok, val[:1], tok.token_to_id(EOS))
        name, info = "tiny random Llama (--quick)", {}
    else:
        arch, path = (model, None) if model in ("llama", "gpt2") else (None, Path(model))
        if path is not None and not (path / "config.json").exists():
            raise ConfigError("--model", model, "llama, gpt2 or a directory written by lte_compile.small_lm.model "
                              "(with config.json and model.safetensors)")
        dense, tok = load_small_lm(arch or "llama", path)
        train_ids, val_ids = corpus_tokens(tok)
        info_path = (path or asset_path(arch)) / "train_info.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        name = f"small LM {model} ({type(dense).__name__})"
    header = {"name": name, "params": sum(p.numel() for p in dense.parameters()),
              "pretrain_val_ppl": info.get("val_ppl"), "pretrain_tokens": info.get("train_tokens_seen")}
    return dense, train_ids, val_ids, header


# ----------------------------------------------------------------------------- command line
QUICK = dict(targets=(0.5, 0.8), steps1=4, steps2=2, batch_size=4, seq_len=32, eval_batches=2, fit_batches=2,
             fit_steps=20, rank=16, expert_size=16, decode_tokens=8, decode_reps=1, progress=False)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 0.5,0.9") from None


def parser() -> argparse.ArgumentParser:
    d = SweepSettings()
    p = argparse.ArgumentParser(prog="lte compare", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama", help="llama | gpt2 | a directory saved by lte_compile.small_lm.model")
    p.add_argument("--targets", type=_floats, default=None, help=f"comma-separated (default {','.join(map(str, d.targets))})")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(BASE_METHODS)} (default all)")
    for name in ("steps1", "steps2", "batch_size", "seq_len", "eval_batches", "fit_batches", "fit_steps", "rank",
                 "expert_size", "decode_tokens", "decode_reps"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {getattr(d, name)}")
    p.add_argument("--kd-weight", type=float, default=0.0, help="logit distillation from the dense model in every "
                   "training run (LTE and +S2); 0 = off")
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--kd-stages", choices=["stage1", "stage2", "both"], default="both",
                   help="where distillation applies (stage 2 also covers every +S2 run)")
    p.add_argument("--no-decode", action="store_true", help="skip the compiled decode benchmark")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny random model, 2 targets, a few steps")
    p.add_argument("--out", default="benchmarks/quality", help="directory for table.md, ppl_vs_sparsity.png, results.json")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="combine the results.json of sweeps run in parallel (e.g. one process per core, each with "
                        "its own --targets) into one table and plot in --out; runs nothing")
    return p


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from sweeps of disjoint targets run in parallel with the same settings: the dense
    rows of the first, every target row, wall time the longest part's, CPU time the sum."""
    keys = [k for k in parts[0]["settings"] if k != "targets"]
    for part in parts[1:]:
        differ = [k for k in keys if part["settings"].get(k) != parts[0]["settings"][k]]
        if differ or part["header"]["model"] != parts[0]["header"]["model"]:
            raise ConfigError("merge", differ or "model", "sweeps of the same model and settings (only --targets differ)")
    targets = [t for part in parts for t in part["settings"]["targets"]]
    if len(set(targets)) != len(targets):
        raise ConfigError("merge", targets, "sweeps of disjoint targets")
    rows = [r for r in parts[0]["rows"] if r["target"] is None]
    rows += sorted((r for part in parts for r in part["rows"] if r["target"] is not None), key=lambda r: r["target"])
    header = {**parts[0]["header"], "command": " & ".join(p["header"]["command"] for p in parts) + " (in parallel)",
              "wall_s": max(p["header"]["wall_s"] for p in parts), "cpu_s": sum(p["header"]["cpu_s"] for p in parts)}
    return {"header": header, "settings": {**parts[0]["settings"], "targets": sorted(targets)}, "rows": rows}


def settings_from(args: argparse.Namespace) -> SweepSettings:
    given = {k: v for k, v in vars(args).items() if k in SweepSettings.__dataclass_fields__ and v is not None}
    if args.methods is not None:
        given["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    given |= {"decode": not args.no_decode, "kd_weight": args.kd_weight, "kd_temperature": args.kd_temperature,
              "kd_stages": args.kd_stages}
    return SweepSettings(**({**QUICK, **given} if args.quick else given))


def main(argv: list[str] | None = None) -> int:
    import sys

    from ..errors import LTEError

    args = parser().parse_args(argv)
    if args.merge:
        return _merge_main(args.merge, Path(args.out))
    try:
        st = settings_from(args)  # settings first: a bad value is reported before anything loads
        st.train_config()
    except LTEError as e:
        print(f"lte compare: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = run(args.model, st, quick=args.quick, command="lte compare " + " ".join(argv or sys.argv[1:]))
    except LTEError as e:
        print(f"lte compare: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(old_threads)
    paths = write_outputs(results, Path(args.out))
    print(markdown_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _merge_main(dirs: list[str], out: Path) -> int:
    import sys

    missing = [d for d in dirs if not (Path(d) / "results.json").is_file()]
    if missing:
        print(f"lte compare: error: no results.json in {missing}; give directories written by lte compare --out",
              file=sys.stderr)
        return 2
    try:
        results = merge_results([json.loads((Path(d) / "results.json").read_text()) for d in dirs])
    except ConfigError as e:
        print(f"lte compare: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    paths = write_outputs(results, out)
    print(markdown_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def run(model: str, st: SweepSettings, *, quick: bool = False, command: str = "lte compare",
        say: Callable[[str], None] = print) -> dict[str, Any]:
    """The sweep: load, run every method at every target, return every number (see `write_outputs`)."""
    from ..plan import routers

    t0, cpu0 = _clock()
    dense, train_ids, val_ids, model_header = load_model_and_data(model, quick)
    sweep = _Sweep(dense, train_ids, val_ids, st, say)
    model_header["experts"] = sorted({r.num_experts for r in routers(sweep.base).values()})
    rows = sweep.run()
    header = {"machine": machine_header(), "model": model_header, "command": command,
              "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    return {"header": header, "settings": asdict(st), "rows": rows}
