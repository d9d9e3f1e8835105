"""End-to-end decode benchmark: a Llama under `torch.compile(backend="lte")` (hard mode, routers
forced to sparsity s) against its dense twin under `torch.compile(backend="inductor")`.

    python benchmarks/bench_decode.py [--quick] [--layers 4] [--dtypes float32 bfloat16]
                                      [--batches 1 16] [--prefill 512] [--out table.md]
    python benchmarks/bench_decode.py --device cuda --mode reduce-overhead --shape llama2-7b ...
    lte bench decode ...               (the CLI runs this script)

`--device cuda` runs the models on the GPU (the Triton kernels); `--mode reduce-overhead` compiles
every variant with CUDA graphs; `--shape llama2-7b` uses Llama-2-7B layers; `--check-eager` also
decodes each variant eagerly and prints the share of equal greedy tokens and the first step's
logits error; `--no-phi` skips the no-FFN twin. After warm-up the run checks that nothing recompiled while it was timing.

Model: transformers' LlamaForCausalLM with TinyLlama-1.1B proportions (hidden 2048, intermediate
5632, 32 heads / 4 kv heads, vocab 32000), `--layers` layers (default 4; TinyLlama has 22), random
weights. `--quick`: hidden 512, intermediate 1408, 8/2 heads, vocab 8192, 2 layers, prefill 64,
8 decode steps, 3 repetitions (most of its time is Inductor compiling 3 shapes x 2 models).

Sparsity: `lte.prepare(model, lte.Config(kmeans_iters=0))` (clustering quality is irrelevant with
random weights), then every router gets random weights N(0, 1/d) and a per-layer bias calibrated
so that a fraction s of the (token, expert) pairs has gate <= tau: the bias is
logit(tau) - (the s-quantile of the router's logits over a calibration batch of random tokens),
computed in hard mode layer after layer (so each layer sees the hidden states the sparse layers
before it produce). Masks are therefore per token (each token's logits differ), with about
(1-s)E experts per token on average; the measured density of used pairs is printed. s = 0 is the
control: bias +30, every expert on (the same work as dense, through the LTE path).

Workloads (each a fresh greedy decode on transformers' StaticCache; the prompt's prefill runs
eagerly, only the timed steps are compiled, `dynamic=False`):
    decode b=1, decode b=16   tokens/s over `--new-tokens` steps after a 16-token prompt
    prefill P                 one forward over P tokens (batch 1, logits of the last token only)
Each repetition runs every variant (dense, then lte at each s; order rotated per repetition);
medians over `--reps`.

Columns: tokens/s, ratio = lte / dense, GB/s = weight bytes a step must read / step time (decode
only; lte: FFN bytes scaled by the fraction of experts some token of the step uses, 1 - s^b for
independent masks), the bound 1/(1 - f s) with f = FFN share of the weight bytes a step reads
(memory-bound decode; for prefill the same f is the FFN share of the matmul FLOPs, attention
scores aside), and attained = (ratio - 1) / (bound - 1), the share of the attainable saving.
That bound assumes every part of the dense step runs at the same bytes (or FLOPs) per second; where
it does not (small models: the non-FFN GEMVs are slower per byte than the FFN's), φ measures the
FFNs' share of the dense step's time directly, from a third variant, the dense twin whose FFNs
return zeros (`SkipFFN`: the fastest any sparsity could make the model), and the last two columns
give the bound 1/(1 - φ s) and the share of it attained.

After the table: the dispatch decisions the run measured (kernels/autotune.py: bucket, chosen path,
median ms of both): the timed self-check that the chosen path was the faster one on this machine.
`--breakdown`: the per-FFN cost at batch 1 (first of `--dtypes`) split into router, op call
overhead, index/launch and kernel (manual timers on one layer's weights). `--profile S`: torch.profiler's per-op CPU time of
a compiled batch-1 decode step, dense and lte at sparsity S (where a step's milliseconds go).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import platform
import statistics
import sys
import time

import torch

SPARSITIES = (0.0, 0.5, 0.75, 0.9)
DEFAULT_OUT = None
VECTOR_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
PROMPT = 16


def shape(args) -> dict:
    if getattr(args, "shape", None) == "llama2-7b":
        return dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                    vocab_size=32000)
    if args.quick:
        return dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2,
                    vocab_size=8192)
    return dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                vocab_size=32000)


def build(args, dtype):
    import transformers

    cfg = transformers.LlamaConfig(**shape(args), num_hidden_layers=args.layers,
                                   max_position_embeddings=max(2048, args.prefill + 64),
                                   attn_implementation=attention(args))
    torch.manual_seed(args.seed)
    dense = transformers.LlamaForCausalLM(cfg).eval()
    return dense.to(args.device, dtype), cfg


def attention(args) -> str:
    """transformers' attention for both models: `--attn`, else "eager" on the CPU, "sdpa" on CUDA.
    Why not SDPA on the CPU: Inductor's code around `_scaled_dot_product_flash_attention_for_cpu`
    corrupts the heap on torch 2.13.0+cpu in this benchmark's fp32 decode (8 layers at batch 16,
    or batch 1 with zero FFNs; glibc aborts; the dense model alone, without lte_compile, and
    never with eager attention), so SDPA timings could come from a corrupted process."""
    return getattr(args, "attn", None) or ("sdpa" if torch.device(args.device).type == "cuda" else "eager")


def weight_bytes(cfg, dtype) -> tuple[float, float]:
    """(FFN bytes, all bytes) one decode step reads: every layer's matrices + lm_head (the
    embedding is a row gather; norms are negligible)."""
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = h // cfg.num_attention_heads * cfg.num_key_value_heads
    size = torch.finfo(dtype).bits // 8
    ffn = L * 3 * h * i
    attn = L * (2 * h * h + 2 * h * kv)
    return ffn * size, (ffn + attn + cfg.vocab_size * h) * size


class SkipFFN(torch.nn.Module):
    """An FFN that costs nothing (returns zeros): the dense twin with it in every layer is the
    fastest any FFN sparsity could make the model, which measures the FFN's share of step time."""

    def forward(self, x):
        return torch.zeros_like(x)


def without_ffns(dense):
    """A copy of `dense` whose decoder layers skip their MLP (for the measured bound)."""
    model = copy.deepcopy(dense)
    for layer in model.model.layers:
        layer.mlp = SkipFFN()
    return model


def prepare_sparse(dense, cfg, args):
    import lte_compile as lte

    model = lte.prepare(copy.deepcopy(dense), lte.Config(kmeans_iters=0))
    g = torch.Generator().manual_seed(args.seed + 1)
    for r in lte.routers(model).values():
        with torch.no_grad():
            w = r.linear.weight
            w.copy_(torch.randn(w.shape, generator=g) / math.sqrt(w.shape[1]))
    lte.set_mode(model, "hard")
    return model


def calibrate(model, cfg, s: float, args) -> dict[str, float]:
    """Sets every router's bias for sparsity s (see the module doc); returns name -> bias."""
    import lte_compile as lte

    routers = lte.routers(model)
    if s == 0.0:
        biases = {name: 30.0 for name in routers}
    else:
        tau = next(iter(routers.values())).tau
        g = torch.Generator().manual_seed(args.seed + 2)
        ids = torch.randint(cfg.vocab_size, (4, 64), generator=g).to(args.device)
        biases = {}
        for name, r in routers.items():  # layer order: earlier layers already at sparsity s
            seen = []
            hook = r.register_forward_hook(lambda m, a, out: seen.append(a[0].detach()))
            with torch.no_grad():
                r.linear.bias.fill_(30.0)  # this layer and later ones dense while calibrating
                for later in list(routers.values())[list(routers).index(name) + 1:]:
                    later.linear.bias.fill_(30.0)
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
            hook.remove()
            z = torch.cat([r.linear(x.reshape(-1, x.shape[-1]).to(r.linear.weight.dtype)) for x in seen])
            z = (z - r.linear.bias).flatten().float()
            biases[name] = math.log(tau / (1 - tau)) - torch.quantile(z[:1 << 24], s).item()
            with torch.no_grad():
                r.linear.bias.fill_(biases[name])
    set_biases(model, biases)
    return biases


def set_biases(model, biases: dict[str, float]) -> None:
    import lte_compile as lte

    with torch.no_grad():
        for name, r in lte.routers(model).items():
            r.linear.bias.fill_(biases[name])


class DensityMeter:
    """Mean density of used (token, expert) pairs over the routers' calls (eager hooks)."""

    def __init__(self, model):
        import lte_compile as lte
        self.used = self.total = 0
        self.hooks = [r.register_forward_hook(self._hook) for r in lte.routers(model).values()]
        self.taus = {id(r): r.tau for r in lte.routers(model).values()}

    def _hook(self, m, a, out):
        self.used += int((out > self.taus[id(m)]).sum())
        self.total += out.numel()

    def close(self) -> float:
        for h in self.hooks:
            h.remove()
        return self.used / max(1, self.total)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def decode(model, fn, cache, batch: int, new_tokens: int, prompt,
           around_steps=contextlib.nullcontext) -> tuple[float, list[int]]:
    """Greedy decode of `new_tokens` after an eager prefill of `prompt`; (seconds of the steps, tokens).
    The steps (not the prefill) run inside `around_steps()` (e.g. a profiler)."""
    dev = prompt.device
    with torch.no_grad():
        tok = prefill_prompt(model, cache, prompt)
        toks = [tok]
        positions = torch.arange(prompt.shape[1], prompt.shape[1] + new_tokens, device=dev)
        sync(dev)
        start = time.perf_counter()
        with around_steps():
            for i in range(new_tokens):
                out = fn(input_ids=tok, past_key_values=cache, cache_position=positions[i:i + 1], use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
                toks.append(tok)
        sync(dev)
        elapsed = time.perf_counter() - start
    require_finite(out.logits, "decode")
    return elapsed, torch.cat(toks, 1)[0].tolist()


def prefill(fn, ids) -> float:
    with torch.no_grad():
        sync(ids.device)
        start = time.perf_counter()
        out = fn(input_ids=ids, use_cache=False, logits_to_keep=1)
        sync(ids.device)
        elapsed = time.perf_counter() - start
    require_finite(out.logits, "prefill")
    return elapsed


def require_finite(logits, what: str) -> None:
    """Timing a model that computes NaN says nothing (a NaN row switches every expert off, so the
    lte model even looks fast): stop. Seen with Inductor's AVX2 code (ATEN_CPU_CAPABILITY=avx2)
    on torch 2.13.0+cpu, whose 8-layer fp32 prefill gives NaN logits for the dense model too."""
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"bench_decode: the compiled model's {what} logits are not finite; its timings "
                           "would be meaningless (check the model, or the ISA-limiting variables in the header)")


def compile_counts() -> str:
    """Dynamo's graphs compiled so far and Inductor's CUDA-graph skips (a change while timing =
    a recompile, or a graph that stopped replaying)."""
    from torch._dynamo.utils import counters
    return (f"graphs compiled {counters['stats']['unique_graphs']}, "
            f"cudagraph skips {sum(counters['inductor'].get(k, 0) for k in counters['inductor'] if 'cudagraph' in k)}")


def eager_token_check(fns, biases, sparsities, record, caches, batch, new_tokens, prompt) -> str:
    """Each compiled variant against the same model run eagerly: the share of greedy tokens (in
    `record`) that agree, and the first step's logits error, max |compiled - eager| / max |eager|
    (random-weight models have near-tied logits, so a kernel's rounding can flip a token and the
    sequences part; the logits error is the measure that does not depend on ties; dense shows how
    much Inductor's own rounding does)."""
    out = []
    for name, s in [("dense", None)] + [("lte", s) for s in sparsities]:
        model, fn = fns[name]
        if s is not None:
            set_biases(model, biases[s])
        toks = decode(model, model.forward, caches[name], batch, new_tokens, prompt)[1]
        same = sum(a == b for a, b in zip(toks, record[(name, s)])) / len(toks)
        eager, compiled = (first_step_logits(model, f, caches[name], prompt) for f in (model.forward, fn))
        err = (compiled - eager).abs().max() / eager.abs().max()
        out.append(f"{name}{'' if s is None else f' s={s}'} {same:.0%} (logits {err:.1e})")
    return "tokens equal to eager (first step's logits error): " + ", ".join(out)


def first_step_logits(model, fn, cache, prompt):
    """fp64 logits of the first decode step through `fn` after an eager prefill of `prompt`."""
    with torch.no_grad():
        tok = prefill_prompt(model, cache, prompt)
        pos = torch.arange(prompt.shape[1], prompt.shape[1] + 1, device=prompt.device)
        return fn(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True).logits.double()


def prefill_prompt(model, cache, prompt):
    """Eager prefill of `prompt` into the reset `cache`; the greedy next token, [batch, 1]."""
    cache.reset()
    pos = torch.arange(prompt.shape[1], device=prompt.device)
    out = model(input_ids=prompt, past_key_values=cache, cache_position=pos, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


def header(args, argv) -> list[str]:
    from lte_compile.kernels import autotune
    from lte_compile.kernels.cpu import cpu_flags, cpu_name, isa, isa_limits

    import transformers
    flags = cpu_flags()
    vec = " ".join(f for f in VECTOR_FLAGS if f in flags) or "-"
    gpu = []
    if torch.device(args.device).type == "cuda":
        import triton
        gpu = [f"- GPU: {torch.cuda.get_device_name(args.device)}; CUDA {torch.version.cuda}, triton {triton.__version__}; "
               f"torch.compile mode {args.mode or 'default'}"]
    return [*gpu, f"- CPU: {cpu_name()}; kernel ISA `{isa()[0]}`; vector flags: {vec}{isa_limits()}",
            f"- torch {torch.__version__}, transformers {transformers.__version__}, Python "
            f"{platform.python_version()}, {torch.get_num_threads()} threads, {attention(args)} attention, "
            f"load average at start {os.getloadavg()[0]:.1f}"
            + (" (**busy machine: other processes share the cores; timings are noisy**)"
               if os.getloadavg()[0] > 0.75 * (os.cpu_count() or 1) else ""),
            f"- measured dispatch (kernels/autotune.py): {'on' if autotune.enabled() else 'off (constants)'}; "
            f"cache {autotune.cache_path() if autotune.enabled() else '-'}",
            f"- command: `python benchmarks/bench_decode.py {' '.join(argv)}`".replace("  ", " ")]


def fmt(x, spec=".2f") -> str:
    return "—" if x is None else format(x, spec)


def run(args, argv) -> str:
    import lte_compile as lte  # noqa: F401  (registers the backend)
    from lte_compile.kernels import autotune
    from transformers import StaticCache

    # Three models of one class (dense, no-FFN twin, lte) share the forward's code object, and each
    # compiles once per workload shape: past Dynamo's default limit of 8 entries per code object
    # the remaining variants would silently run eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    lines = ["# Decode benchmark: `lte` vs `inductor` (bench_decode.py)", "", *header(args, argv)]
    print("\n".join(lines), flush=True)
    sparsities = args.sparsity
    table = ["| dtype | workload | s | measured density | dense tok/s | lte tok/s | ratio lte/dense | "
             "GB/s dense / lte | bound 1/(1-f·s) | attained | φ | bound 1/(1-φ·s) | attained (φ) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for dt_name in args.dtypes:
        dtype = getattr(torch, dt_name)
        dense, cfg = build(args, dtype)
        sparse = prepare_sparse(dense, cfg, args)
        ffn_b, all_b = weight_bytes(cfg, dtype)
        f = ffn_b / all_b
        biases = {}
        t0 = time.perf_counter()
        for s in sparsities:
            biases[s] = calibrate(sparse, cfg, s, args)
        print(f"{dt_name}: f = FFN share of weight bytes = {f:.3f}; routers calibrated in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        no_ffn = without_ffns(dense) if args.phi else None
        compiled = lambda m, backend: torch.compile(m.forward, backend=backend, dynamic=False, mode=args.mode)  # noqa: E731
        fns = {"dense": (dense, compiled(dense, "inductor")), "lte": (sparse, compiled(sparse, "lte"))}
        if no_ffn is not None:
            fns["no-ffn"] = (no_ffn, compiled(no_ffn, "inductor"))
        variants = [("dense", None)] + ([("no-ffn", None)] if no_ffn is not None else []) + \
            [("lte", s) for s in sparsities]
        workloads = [("decode", b) for b in args.batches] + ([("prefill", args.prefill)] if args.prefill else [])
        g = torch.Generator().manual_seed(args.seed + 3)
        for kind, n in workloads:
            if kind == "decode":
                prompt = torch.randint(cfg.vocab_size, (n, PROMPT), generator=g).to(args.device)
                caches = {k: StaticCache(config=cfg, max_cache_len=PROMPT + args.new_tokens + 1) for k in fns}
                tokens_per_call = n * args.new_tokens
            else:
                ids = torch.randint(cfg.vocab_size, (1, n), generator=g).to(args.device)
                tokens_per_call = n

            def once(name, s, record=None):
                model, fn = fns[name]
                if s is not None:
                    set_biases(model, biases[s])
                if kind == "decode":
                    secs, toks = decode(model, fn, caches[name], n, args.new_tokens, prompt)
                    if record is not None:
                        record[(name, s)] = toks
                    return secs
                return prefill(fn, ids)

            t0 = time.perf_counter()
            record = {}
            # compile + warm-up (and the autotuners' first-use timing: the lte sparsity nearest 0.5
            # first, so the Triton autotuner, whose key has no density, times a typical mask)
            for name, s in sorted(variants, key=lambda v: v[1] is None or abs(v[1] - 0.5)):
                once(name, s, record)
            density = {}
            for s in sparsities:  # density of used pairs, measured eagerly on this workload's input
                set_biases(sparse, biases[s])
                meter = DensityMeter(sparse)
                with torch.no_grad():
                    sparse(input_ids=prompt if kind == "decode" else ids, use_cache=False, logits_to_keep=1)
                density[s] = meter.close()
            match = "" if kind != "decode" or 0.0 not in sparsities else \
                f"; s=0 tokens {'match' if record[('lte', 0.0)] == record[('dense', None)] else 'DIFFER from'} dense"
            if kind == "decode" and args.check_eager:
                match += "; " + eager_token_check(fns, biases, sparsities, record, caches, n, args.new_tokens, prompt)
            print(f"  {dt_name} {kind} {n}: compile + warm-up {time.perf_counter() - t0:.0f} s{match}", flush=True)
            times = {v: [] for v in variants}
            before = compile_counts()
            for rep in range(args.reps):
                k = rep % len(variants)
                for v in variants[k:] + variants[:k]:
                    times[v].append(once(*v))
            after = compile_counts()
            if after != before:
                print(f"  WARNING: compiles during the timed repetitions ({before} -> {after}): the timings "
                      "include compiling", flush=True)
            else:
                print(f"  no recompiles during the timed repetitions ({after})", flush=True)
            med = {v: statistics.median(t) for v, t in times.items()}
            dense_tps = tokens_per_call / med[("dense", None)]
            # phi: the FFNs' measured share of the dense step's time (dense twin without FFNs).
            phi = 1 - med[("no-ffn", None)] / med[("dense", None)] if no_ffn is not None else None
            label = f"decode b={n}" if kind == "decode" else f"prefill {n}"
            for s in sparsities:
                tps = tokens_per_call / med[("lte", s)]
                ratio = tps / dense_tps
                bound = 1 / (1 - f * s)
                attained = (ratio - 1) / (bound - 1) if s > 0 else None
                timed_bound = 1 / (1 - phi * s) if phi is not None else None
                timed_attained = (ratio - 1) / (timed_bound - 1) if s > 0 and phi and phi > 0 else None
                if kind == "decode":
                    steps = args.new_tokens
                    union = 1 - s ** n if s > 0 else 1.0
                    gbs = (f"{all_b * steps / med[('dense', None)] / 1e9:.1f} / "
                           f"{(all_b - ffn_b * (1 - union)) * steps / med[('lte', s)] / 1e9:.1f}")
                else:
                    gbs = "—"
                row = (f"| {dt_name} | {label} | {s} | {density[s]:.2f} | {dense_tps:.1f} | {tps:.1f} | "
                       f"{ratio:.2f}x | {gbs} | {bound:.2f}x | {fmt(attained)} | {fmt(phi)} | "
                       f"{fmt(timed_bound)}{'x' if timed_bound else ''} | {fmt(timed_attained)} |")
                table.append(row)
                print("  " + row, flush=True)
        del fns, dense, sparse, no_ffn
        torch._dynamo.reset()
    out = lines + ["", f"f = FFN share of the weight bytes a decode step reads ({args.layers} layers); "
                   "φ = FFN share of the dense step's time, measured: 1 - t(dense twin whose FFNs return "
                   "zeros) / t(dense); "
                   f"{args.new_tokens} decode steps after a {PROMPT}-token prompt; medians of {args.reps} "
                   f"interleaved repetitions; load average at end {os.getloadavg()[0]:.1f}.", "", *table]
    decisions = autotune.decisions()
    print(f"dispatch: {len(decisions)} bucket(s) decided by measurement in this process "
          f"({autotune.tuner().measured if decisions else 0} timed now, the rest from the cache file)", flush=True)
    if decisions:
        out += ["", "Dispatch decisions this run used (bucket: chosen; median ms of each path when it was "
                "timed; `busy`: timed under load, not cached):", ""]
        out += [f"- `{k}`: **{v['kernel']}** ({', '.join(f'{n} {ms:.3f}' for n, ms in v['ms'].items())}; "
                f"{v['reps']} reps{', busy' if v.get('busy') else ''})" for k, v in sorted(decisions.items())]
    return "\n".join(out)


def breakdown(args) -> str:
    """Per-FFN cost at batch 1 (one layer's weights, eager op calls, medians of many calls), in the
    first of `--dtypes` (the router fp32, as LTERouter keeps it)."""
    import torch.nn.functional as F

    from lte_compile.kernels import dispatch, ops
    from lte_compile.kernels.reference import sparse_ffn_reference

    sh = shape(args)
    d, N = sh["hidden_size"], sh["intermediate_size"]
    B, tau = 32, 0.5
    E = N // B
    dtype = getattr(torch, args.dtypes[0])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, d, generator=g).to(dtype)
    w_up, w_gate, w_down = ((torch.randn(N, d, generator=g) / d ** 0.5).to(dtype) for _ in range(3))
    w_r, b_r = torch.randn(E, d, generator=g) / d ** 0.5, torch.zeros(E)
    dense_w_down = w_down.t().contiguous()  # [d, N]: nn.Linear layout
    from lte_compile.kernels.cpu import sparse_ffn_cpu

    def t(fn, n=200):
        for _ in range(5):
            fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    lines = ["", f"## Per-FFN breakdown at batch 1 (d={d}, N={N}, B={B}, {args.dtypes[0]}, {torch.get_num_threads()} threads; "
             "median ms of 200 eager calls)", "",
             "| s | router (linear+sigmoid) | op call overhead (sparse_ffn_inference vs direct kernel; "
             "sparse_ffn with autograd) | index + launch (kernel, no expert on) | kernel | router + op | "
             "routed op (router inside) | dense FFN (3 F.linear) | ratio dense / routed |",
             "|---|---|---|---|---|---|---|---|---|"]
    dense_ms = t(lambda: F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), dense_w_down))
    router_ms = t(lambda: torch.sigmoid(F.linear(x.float(), w_r, b_r)))
    none = torch.zeros(1, E)
    index_ms = t(lambda: sparse_ffn_cpu(x, none, w_up, w_gate, w_down, None, None, None, "silu", B, "hard", tau))
    for s in args.sparsity:
        gates = torch.zeros(1, E)
        gates[0, torch.randperm(E, generator=g)[:round((1 - s) * E)]] = 1.0
        a = (x, gates, w_up, w_gate, w_down, None, None, None, "silu", B, "hard", tau)
        kernel_ms = t(lambda: sparse_ffn_cpu(*a))
        # A router bias that switches on the same experts as `gates` for this x.
        b_s = torch.where(gates[0] > 0, 30.0, -30.0) - F.linear(x.float(), w_r)[0]
        with torch.no_grad():  # as a decode step calls them; the compiled graph calls the first
            op_ms = t(lambda: ops.sparse_ffn_inference(*a))
            autograd_op_ms = t(lambda: ops.sparse_ffn(*a))
            routed_ms = t(lambda: ops.routed_sparse_ffn_inference(x, w_r, b_s, w_up, w_gate, w_down, None, None,
                                                                  None, "silu", B, tau))
        total = router_ms + op_ms
        lines.append(f"| {s} | {router_ms:.3f} | {op_ms - kernel_ms:.3f}; {autograd_op_ms - kernel_ms:.3f} | "
                     f"{index_ms:.3f} | {kernel_ms - index_ms:.3f} | {total:.3f} | {routed_ms:.3f} | "
                     f"{dense_ms:.3f} | {dense_ms / routed_ms:.2f}x |")
    del dispatch, sparse_ffn_reference
    print("\n".join(lines), flush=True)
    return "\n".join(lines)


def profile_step(args) -> str:
    """Per-op CPU time of one compiled decode step at the first of `--batches`, dense and lte at
    sparsity `args.profile` (torch.profiler over `args.new_tokens` steps; the eager prefill is
    excluded): where a step's milliseconds go, beside the table's ratios."""
    import lte_compile as lte  # noqa: F401  (registers the backend)
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    dtype = getattr(torch, args.dtypes[0])
    dense, cfg = build(args, dtype)
    sparse = prepare_sparse(dense, cfg, args)
    set_biases(sparse, calibrate(sparse, cfg, args.profile, args))
    batch = args.batches[0]
    prompt = torch.randint(cfg.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(args.seed + 3))
    lines = ["", f"## Profile of a batch-{batch} decode step ({args.dtypes[0]}, s = {args.profile}, {args.layers} layers, "
             f"{torch.get_num_threads()} threads; ms per step, self CPU time, top ops)", ""]
    for name, model, backend in (("dense", dense, "inductor"), ("lte", sparse, "lte")):
        fn = torch.compile(model.forward, backend=backend, dynamic=False)
        cache = StaticCache(config=cfg, max_cache_len=PROMPT + args.new_tokens + 1)
        decode(model, fn, cache, batch, args.new_tokens, prompt)  # compile + warm-up
        step_ms = decode(model, fn, cache, batch, args.new_tokens, prompt)[0] / args.new_tokens * 1e3
        prof = profile(activities=[ProfilerActivity.CPU])  # the compiled steps only, not the prefill
        decode(model, fn, cache, batch, args.new_tokens, prompt, around_steps=lambda: prof)
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
        lines += [f"**{name}** ({backend}): {step_ms:.1f} ms per step unprofiled", "",
                  "| op | calls per step | self ms per step | total ms per step |", "|---|---|---|---|"]
        lines += [f"| `{e.key[:60]}` | {e.count / args.new_tokens:g} | {e.self_cpu_time_total / 1e3 / args.new_tokens:.2f} | "
                  f"{e.cpu_time_total / 1e3 / args.new_tokens:.2f} |" for e in events]
        lines.append("")
    print("\n".join(lines), flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="hidden 512, vocab 8192, prefill 64, few tokens")
    p.add_argument("--shape", choices=["tinyllama", "llama2-7b"], default="tinyllama",
                   help="layer proportions (llama2-7b: hidden 4096, intermediate 11008, 32/32 heads)")
    p.add_argument("--no-phi", dest="phi", action="store_false",
                   help="skip the no-FFN twin (one compile less; no φ columns)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 4, quick 2)")
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--prefill", type=int, default=None, help="prefill tokens (default 512, quick 64; 0: skip)")
    p.add_argument("--sparsity", nargs="+", type=float, default=list(SPARSITIES))
    p.add_argument("--new-tokens", type=int, default=None, help="decode steps timed (default 32, quick 8)")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 5, quick 3)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda (the Triton kernels)")
    p.add_argument("--mode", default=None, help="torch.compile mode for every variant, e.g. reduce-overhead "
                   "(CUDA graphs)")
    p.add_argument("--check-eager", action="store_true",
                   help="also decode each variant eagerly and print the share of equal greedy tokens")
    p.add_argument("--breakdown", action="store_true", help="also print the per-FFN cost split at batch 1")
    p.add_argument("--no-decode", action="store_true", help="only the breakdown / profile")
    p.add_argument("--profile", type=float, default=None, metavar="S",
                   help="also profile one decode step per op at the first of --batches (torch.profiler), dense and lte at sparsity S "
                   "(in the first of --dtypes)")
    p.add_argument("--attn", default=None, choices=["eager", "sdpa"],
                   help="transformers' attention implementation (default: eager on the CPU, sdpa on CUDA)")
    p.add_argument("--out", default=None, help="write the markdown table to this file")
    args = p.parse_args(argv)
    args.layers = args.layers or (2 if args.quick else 4)
    if args.prefill is None:
        args.prefill = 64 if args.quick else 512
    args.new_tokens = args.new_tokens or (8 if args.quick else 32)
    args.reps = args.reps or (3 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    text = "" if args.no_decode else run(args, argv)
    if args.breakdown:
        text += "\n" + breakdown(args)
    if args.profile is not None:
        text += "\n" + profile_step(args)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
