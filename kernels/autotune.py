"""Measured CPU dispatch: which of two paths runs a hard-mode `lte::sparse_ffn` call, decided by
timing both on this machine, once per shape bucket, like Triton's autotuner.

The two candidates (`CANDIDATES`):
    "cpu"        the C++ gathered kernel (reads and multiplies only the used experts' rows)
    "dense"      dense GEMMs (MKL / oneDNN via at::mm) for every expert, one fused C++ pass
                 act(gate) * up * mask over [T, N], the dense down GEMM with the bias folded in:
                 the GEMMs and elementwise passes Inductor runs for the dense FFN, so the fallback
                 costs what dense costs (cpu.dense_masked_ffn; the reference without a compiler)

Which is faster depends on the CPU (AVX2 vs AVX-512, AVX512-BF16, cores, cache sizes), the
BLAS build, T, the shapes and the density of used (token, expert) pairs; constants measured on
one machine were 1.6-3x wrong on another (issue 10). So the first call of a bucket times both:

    bucket = dtype, d, d_out, N, expert_size, glu, T rounded up to a power of 2,
             density of used (token, expert) pairs in tenths, torch threads

Timing: one warm-up call of each (also the cost estimate), then `reps` interleaved rounds
(alternating order) with reps = BUDGET_S / cost clamped to [1, MAX_REPS]: a small shape pays a
few ms once, a prefill-sized one two calls of each path. Medians decide; the gathered kernel must
beat dense by MARGIN, else dense (the safe choice: "never slower than dense").

No timing (cheap rules, `rule`):
- T <= SMALL_T (batch-1..4 decode): "cpu". There the FFN is memory-bound (<= 4 FLOPs per weight
  element against a machine balance of tens), so time is bytes read; the gathered kernel reads
  only the rows of experts some token uses (a subset of dense's bytes, equal at s = 0) and
  streams contiguous expert blocks, so it is never the slower path by more than its fixed cost.
- T * N * d < MIN_WORK MACs: tiny problems (tests, toy models), where the two paths differ by
  microseconds and timing noise would decide: the constant rule of `dispatch` (`constant_rule`).

Decisions are cached in memory and in a JSON file per machine and version:
    $LTE_CACHE_DIR or $XDG_CACHE_HOME/lte_compile or ~/.cache/lte_compile,
    file dispatch-<isa>-<torch version>-<hash of csrc/sparse_ffn_cpu.cpp and cpu.py>.json
so a new torch, another ISA or an edited kernel starts a new file; inside, the CPU's model name,
the core count and whether the extension built are checked too (a home directory shared between
machines of one ISA), and a mismatch discards the entries. A decision timed while the machine is
oversubscribed (1-minute load average above the core count) is used by this process but not
written: the next process times that bucket again.

Switches: LTE_AUTOTUNE=0 (or `set_enabled(False)`, or `with disabled():`) uses the constant rule
everywhere (today's behaviour before this module); `clear_cache()` forgets every decision (memory
and file). `dispatch.set_kernel(name)` still forces one kernel and bypasses all of this.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

CANDIDATES = ("cpu", "dense")  # the measured paths; "dense" is the safe one
SAFE = "dense"
SMALL_T = 4          # T <= SMALL_T: memory-bound decode, the gathered kernel without timing
MIN_WORK = 1 << 18   # T*N*d below this: too small to time reliably, constant rule
BUDGET_S = 0.03      # timed rounds after the warm-up: about this long (at least 1 round)
MAX_REPS = 5
MARGIN = 0.03        # the gathered kernel must be this much faster than dense to be chosen
ENV_ENABLE = "LTE_AUTOTUNE"
ENV_CACHE_DIR = "LTE_CACHE_DIR"
FORMAT = 1

# The candidates' code: the C++ kernels and their Python wrappers (the dense fallback's weight copy).
_SOURCES = (Path(__file__).resolve().parent / "csrc" / "sparse_ffn_cpu.cpp", Path(__file__).resolve().parent / "cpu.py")
_enabled: bool | None = None  # None: the environment decides
_tuner: "Tuner | None" = None


# -- switches -----------------------------------------------------------------------------------

def enabled() -> bool:
    """True if CPU hard-mode calls are dispatched by measurement (default; LTE_AUTOTUNE=0 off)."""
    if _enabled is not None:
        return _enabled
    return os.environ.get(ENV_ENABLE, "1").strip().lower() not in ("0", "false", "no", "off")


def set_enabled(flag: bool | None) -> None:
    """Turn measured dispatch on/off for this process (None: back to LTE_AUTOTUNE)."""
    global _enabled
    _enabled = flag


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block, the constant rule decides (no timing, no cache)."""
    global _enabled
    old, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = old


def clear_cache() -> None:
    """Forget every measured decision: this process's and the cache file of this version."""
    global _tuner
    if _tuner is not None:
        _tuner.clear()
    else:
        with contextlib.suppress(OSError):
            cache_path().unlink()
    _tuner = None


# -- keys ---------------------------------------------------------------------------------------

def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lte_compile"


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """First 12 hex digits of the sha256 of the candidates' sources, the C++ kernels and cpu.py
    ('nosource' if one is missing)."""
    try:
        return hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES)).hexdigest()[:12]
    except OSError:
        return "nosource"


def _isa() -> str:
    from .cpu import isa
    return isa()[0]


def _cpu_name() -> str:
    from .cpu import cpu_name
    return cpu_name()


def cache_path() -> Path:
    """The decisions file of this ISA, torch version and kernel source."""
    return cache_dir() / f"dispatch-{_isa()}-{torch.__version__}-{source_hash()}.json"


def machine_version() -> dict:
    """What, besides the file name's keys, a cached decision depends on."""
    from .cpu import extension_available
    return {"format": FORMAT, "cpu": _cpu_name(), "cores": os.cpu_count(), "isa": _isa(),
            "torch": torch.__version__, "source": source_hash(), "extension": extension_available()}


def pow2_ceil(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def bucket(dtype: torch.dtype, d: int, d_out: int, n: int, expert_size: int, glu: bool, T: int,
           density: float, threads: int | None = None) -> str:
    """The cache key of one call: calls with one key share a decision."""
    threads = torch.get_num_threads() if threads is None else threads
    tenths = min(10, max(0, int(density * 10 + 0.5)))
    return (f"{str(dtype).removeprefix('torch.')}|d={d}|dout={d_out}|N={n}|B={expert_size}|glu={int(glu)}"
            f"|T={pow2_ceil(T)}|p={tenths / 10:.1f}|threads={threads}")


# -- the tuner ----------------------------------------------------------------------------------

class Tuner:
    """Decisions per bucket: looked up in memory, else in `path`, else measured (and saved).

    `timer` returns seconds (time.perf_counter); tests inject a fake clock. `version` is compared
    with the file's: a different one discards the file's entries.
    """

    def __init__(self, path: Path | None, version: dict, timer: Callable[[], float] = time.perf_counter,
                 busy: Callable[[], bool] | None = None):
        self.path, self.version, self.timer = path, version, timer
        self.busy = machine_busy if busy is None else busy
        self.entries: dict[str, dict] = self._read()
        self.measured = 0  # buckets timed by this tuner (for tests and the benchmark header)
        self.used: set[str] = set()  # buckets whose decision this process looked up or made

    def _read(self) -> dict[str, dict]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != self.version:
            return {}
        entries = data.get("entries")
        return {k: v for k, v in entries.items() if isinstance(v, dict) and v.get("kernel") in CANDIDATES} \
            if isinstance(entries, dict) else {}

    def _write(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            mine = {k: v for k, v in self.entries.items() if not v.get("busy")}
            merged = {**self._read(), **mine}  # keep what other processes wrote meanwhile
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".dispatch-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": self.version, "entries": merged}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only home must not break the op: decide per process
            warnings.warn(f"lte_compile: cannot write the dispatch cache {self.path} ({e}); "
                          "decisions are kept for this process only", RuntimeWarning, stacklevel=3)
            self.path = None

    def lookup(self, key: str) -> str | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        self.used.add(key)
        return entry["kernel"]

    def measure(self, key: str, run: Callable[[str], Tensor],
                names: tuple[str, ...] = CANDIDATES) -> tuple[str, Tensor]:
        """Time `run(name)` for each name (interleaved, medians), record the winner, and return
        (winner, its output) so the call being tuned is not computed once more."""
        timer = self.timer
        outs: dict[str, Tensor] = {}
        cost = 0.0
        for name in names:  # warm-up (first-use allocations, oneDNN primitive creation): not counted
            t0 = timer()
            outs[name] = run(name)
            cost += timer() - t0
        reps = max(1, min(MAX_REPS, int(BUDGET_S / max(cost, 1e-9))))
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(reps):
            for name in (names if r % 2 == 0 else names[::-1]):
                t0 = timer()
                outs[name] = run(name)
                times[name].append(timer() - t0)
        med = {n: statistics.median(v) for n, v in times.items()}
        best = min(names, key=lambda n: med[n])
        if best != SAFE and SAFE in med and med[best] > med[SAFE] * (1 - MARGIN):
            best = SAFE  # within noise of dense: dense
        entry = {"kernel": best, "ms": {n: round(m * 1e3, 4) for n, m in med.items()}, "reps": reps}
        if self.busy():
            entry["busy"] = True  # timed on an oversubscribed machine: this process only
        self.entries[key] = entry
        self.used.add(key)
        self.measured += 1
        if not entry.get("busy"):
            self._write()
        return best, outs[best]

    def clear(self) -> None:
        self.entries.clear()
        self.used.clear()
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()


def machine_busy() -> bool:
    """True if more runnable processes than cores (1-minute load average): timings taken now
    reflect other jobs as much as the two paths, so their decision is not written to the file."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:  # no load average (Windows): trust the timing
        return False


def tuner() -> Tuner:
    """This process's tuner (created on first use: reads the cache file of this version)."""
    global _tuner
    if _tuner is None:
        _tuner = Tuner(cache_path(), machine_version())
    return _tuner


def set_tuner(t: Tuner | None) -> Tuner | None:
    """Install `t` as the process's tuner (None: a fresh one on next use); returns the previous."""
    global _tuner
    old, _tuner = _tuner, t
    return old


def decisions() -> dict[str, dict]:
    """The decisions this process used (bucket -> {"kernel", "ms", "reps"[, "busy"]}), for reports."""
    return {k: _tuner.entries[k] for k in sorted(_tuner.used)} if _tuner is not None else {}
