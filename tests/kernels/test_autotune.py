"""Measured CPU dispatch (kernels/autotune.py): the decision logic with a fake clock, the cache
file per machine and version, and the switches. No real timing here (that is bench_decode's
self-check)."""
from __future__ import annotations

import json

import pytest
import torch

from lte_compile.kernels import autotune, dispatch
from lte_compile.kernels.reference import sparse_ffn_reference

VERSION = {"format": autotune.FORMAT, "cpu": "test cpu", "isa": "avx2", "torch": "x", "source": "abc",
           "extension": True}


class Clock:
    """A fake timer: kernels advance it by their pretend cost."""

    def __init__(self):
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def kernel(self, name: str, cost_s: float):
        def run(*args):
            self.now += cost_s
            self.calls.append(name)
            return sparse_ffn_reference(*args)
        return run


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An isolated process state: cache dir in tmp, autotuning on, no tuner installed."""
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(autotune.ENV_ENABLE, raising=False)
    old = autotune.set_tuner(None)
    autotune.set_enabled(None)
    yield tmp_path
    autotune.set_tuner(old)
    autotune.set_enabled(None)


def _args(T, d=64, E=8, B=16, density=0.5, glu=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = E * B
    x = torch.randn(T, d, generator=g)
    gates = (torch.rand(T, E, generator=g) < density).float()  # exact 0/1: density as asked
    w_up, w_gate, w_down = (torch.randn(N, d, generator=g) for _ in range(3))
    return (x, gates, w_up, w_gate if glu else None, w_down, None, None, None, "silu", B, "hard", 0.5)


def _install(tmp_path, clock, version=VERSION):
    t = autotune.Tuner(tmp_path / "dispatch.json", dict(version), timer=clock, busy=lambda: False)
    autotune.set_tuner(t)
    return t


@pytest.mark.parametrize("cpu_ms,ref_ms,want", [(1.0, 3.0, "cpu"), (3.0, 1.0, "dense"),
                                                (1.0, 1.0, "dense"), (0.99, 1.0, "dense")])
def test_faster_candidate_chosen(fresh, monkeypatch, cpu_ms, ref_ms, want):
    """The faster path by median wins; a tie (within MARGIN) goes to dense, the safe path. The
    output returned is the call's own result (no extra call after timing)."""
    clock = Clock()
    monkeypatch.setitem(dispatch._KERNELS, "cpu", clock.kernel("cpu", cpu_ms / 1e3))
    monkeypatch.setitem(dispatch._KERNELS, "dense", clock.kernel("dense", ref_ms / 1e3))
    tuner = _install(fresh, clock)
    args = _args(T=64)
    y = dispatch.sparse_ffn_forward(*args)
    torch.testing.assert_close(y, sparse_ffn_reference(*args))
    assert tuner.measured == 1
    (entry,) = tuner.entries.values()
    assert entry["kernel"] == want
    reps = entry["reps"]
    assert 1 <= reps <= autotune.MAX_REPS
    assert clock.calls.count("cpu") == clock.calls.count("dense") == 1 + reps  # warm-up + reps
    # interleaved: no two consecutive rounds start with the same candidate
    rounds = [clock.calls[2 + 2 * r] for r in range(reps)]
    assert all(a != b for a, b in zip(rounds, rounds[1:]))
    # the next call of the bucket runs the winner only, without timing
    clock.calls.clear()
    dispatch.sparse_ffn_forward(*_args(T=60, seed=1))  # same T bucket (64) and density tenth
    assert clock.calls == [want] and tuner.measured == 1
    assert dispatch.choose_kernel(args[0], args[2], "hard", args[1], 0.5, w_gate=args[3], w_down=args[4]) == want


def test_median_not_mean(fresh):
    """One slow outlier round does not flip the decision."""
    clock = Clock()
    costs = {"cpu": iter([1e-3] + [1e-3, 1e-3, 50e-3, 1e-3, 1e-3]), "dense": iter([2e-3] * 6)}

    def run(name):
        clock.now += next(costs[name])
        return torch.zeros(1)

    tuner = autotune.Tuner(None, VERSION, timer=clock)
    best, _ = tuner.measure("k", run)
    assert best == "cpu" and tuner.entries["k"]["reps"] == autotune.MAX_REPS


def test_big_calls_get_fewer_reps(fresh):
    clock = Clock()

    def run(name):
        clock.now += 0.2  # 200 ms a call: prefill-sized
        return torch.zeros(1)

    tuner = autotune.Tuner(None, VERSION, timer=clock)
    tuner.measure("k", run)
    assert tuner.entries["k"]["reps"] == 1  # warm-up + one timed round of each


def test_small_T_is_a_rule_without_timing(fresh, monkeypatch):
    """Decode (T <= SMALL_T) takes the gathered kernel even where dense would time faster."""
    clock = Clock()
    monkeypatch.setitem(dispatch._KERNELS, "cpu", clock.kernel("cpu", 9.0))
    monkeypatch.setitem(dispatch._KERNELS, "dense", clock.kernel("dense", 1e-3))
    tuner = _install(fresh, clock)
    for T in range(1, autotune.SMALL_T + 1):
        dispatch.sparse_ffn_forward(*_args(T=T, density=1.0))
    assert clock.calls == ["cpu"] * autotune.SMALL_T and tuner.measured == 0


def test_tiny_problem_uses_constant_rule(fresh, monkeypatch):
    clock = Clock()
    monkeypatch.setitem(dispatch._KERNELS, "cpu", clock.kernel("cpu", 1e-3))
    monkeypatch.setitem(dispatch._KERNELS, "dense", clock.kernel("dense", 9.0))
    tuner = _install(fresh, clock)
    args = _args(T=64, d=4, E=2, B=4, density=1.0)  # T*N*d = 2048 < MIN_WORK; dense batch
    dispatch.sparse_ffn_forward(*args)
    assert clock.calls == [dispatch.constant_rule(torch.float32, 64, 1.0)] == ["dense"]
    assert tuner.measured == 0


def test_bucket_keys():
    k = lambda **kw: autotune.bucket(**{"dtype": torch.float32, "d": 8, "d_out": 8, "n": 64,  # noqa: E731
                                        "expert_size": 16, "glu": True, "T": 17, "density": 0.52,
                                        "threads": 2, **kw})
    assert k() == k(T=32) == k(density=0.47) != k(T=33)
    assert len({k(), k(density=0.56), k(dtype=torch.bfloat16), k(glu=False), k(d_out=4), k(threads=4),
                k(expert_size=32)}) == 7
    assert autotune.pow2_ceil(1) == 1 and autotune.pow2_ceil(5) == 8 and autotune.pow2_ceil(512) == 512


def test_cache_written_and_reread(fresh):
    clock = Clock()
    run = lambda name: (setattr(clock, "now", clock.now + (1e-3 if name == "cpu" else 2e-3)),  # noqa: E731
                        torch.zeros(1))[1]
    path = fresh / "sub" / "dispatch.json"
    t1 = autotune.Tuner(path, VERSION, timer=clock, busy=lambda: False)
    assert t1.measure("key-a", run)[0] == "cpu"
    data = json.loads(path.read_text())
    assert data["version"] == VERSION and data["entries"]["key-a"]["kernel"] == "cpu"
    # a fresh tuner (another process) reads it and does not time again
    t2 = autotune.Tuner(path, VERSION, timer=clock, busy=lambda: False)
    assert t2.lookup("key-a") == "cpu" and t2.measured == 0 and t2.used == {"key-a"}
    # entries of two processes are merged, not overwritten
    t1.measure("key-b", run)
    t2.measure("key-c", run)
    assert set(json.loads(path.read_text())["entries"]) == {"key-a", "key-b", "key-c"}
    # another torch / extension source / CPU: the file's entries are discarded
    for field, value in (("torch", "y"), ("source", "def"), ("cpu", "other cpu"), ("extension", False)):
        assert autotune.Tuner(path, {**VERSION, field: value}, timer=clock).lookup("key-a") is None
    # a corrupt file is an empty cache
    path.write_text("{not json")
    assert autotune.Tuner(path, VERSION).lookup("key-a") is None


def test_busy_machine_decision_not_written(fresh):
    """A decision timed on an oversubscribed machine is used in-process, not written to the file."""
    clock = Clock()
    path = fresh / "dispatch.json"
    t = autotune.Tuner(path, VERSION, timer=clock, busy=lambda: True)
    t.measure("k", lambda name: (setattr(clock, "now", clock.now + 1e-3), torch.zeros(1))[1])
    assert t.lookup("k") == "dense" and not path.exists()
    t.busy = lambda: False
    t.measure("k2", lambda name: (setattr(clock, "now", clock.now + 1e-3), torch.zeros(1))[1])
    assert set(json.loads(path.read_text())["entries"]) == {"k2"}


def test_cache_path_has_the_version_keys(fresh, monkeypatch):
    path = autotune.cache_path()
    assert path.parent == fresh
    assert path.name == f"dispatch-{autotune._isa()}-{torch.__version__}-{autotune.source_hash()}.json"
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert autotune.cache_path() != path  # new torch: new file
    monkeypatch.delenv(autotune.ENV_CACHE_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(fresh / "xdg"))
    assert autotune.cache_dir() == fresh / "xdg" / "lte_compile"


def test_clear_cache(fresh):
    clock = Clock()
    t = _install(fresh, clock)
    t.measure("k", lambda name: (setattr(clock, "now", clock.now + 1e-3), torch.zeros(1))[1])
    assert t.path.exists()
    autotune.clear_cache()
    assert not t.path.exists() and not t.entries and autotune.decisions() == {}


@pytest.mark.parametrize("how", ["env", "function", "context"])
def test_disabled_uses_constants(fresh, monkeypatch, how):
    clock = Clock()
    monkeypatch.setitem(dispatch._KERNELS, "cpu", clock.kernel("cpu", 9.0))
    monkeypatch.setitem(dispatch._KERNELS, "dense", clock.kernel("dense", 1e-3))
    tuner = _install(fresh, clock)
    sparse, dense = _args(T=64, density=0.1), _args(T=64, density=1.0)
    if how == "env":
        monkeypatch.setenv(autotune.ENV_ENABLE, "0")
        ctx = torch.no_grad()
    elif how == "function":
        autotune.set_enabled(False)
        ctx = torch.no_grad()
    else:
        ctx = autotune.disabled()
    with ctx:
        assert not autotune.enabled()
        dispatch.sparse_ffn_forward(*sparse)
        dispatch.sparse_ffn_forward(*dense)
    assert clock.calls == ["cpu", "dense"]  # the constant rule: T >= 32, density 0.1 / 1.0
    assert tuner.measured == 0 and not tuner.path.exists()


def test_set_kernel_still_forces(fresh, monkeypatch):
    clock = Clock()
    monkeypatch.setitem(dispatch._KERNELS, "cpu", clock.kernel("cpu", 1e-3))
    monkeypatch.setitem(dispatch._KERNELS, "dense", clock.kernel("dense", 9.0))
    tuner = _install(fresh, clock)
    with dispatch.set_kernel("dense"):
        dispatch.sparse_ffn_forward(*_args(T=64))
    assert clock.calls == ["dense"] and tuner.measured == 0


def test_real_kernels_agree_through_tuning(fresh):
    """With the real kernels (real clock), whichever is chosen gives the reference's output."""
    args = _args(T=48, d=64, E=8, B=32, density=0.4)
    y = dispatch.sparse_ffn_forward(*args)
    torch.testing.assert_close(y, sparse_ffn_reference(*args), atol=1e-3, rtol=1e-4)
    assert autotune.tuner().measured == 1
    assert autotune.cache_path().exists() != bool(autotune.decisions().popitem()[1].get("busy"))


def test_cuda_rule():
    """CUDA: the Triton kernel at one token, cuBLAS + mask above (dispatch.cuda_rule's H200 data)."""
    assert dispatch.cuda_rule(1) == "triton"
    assert {dispatch.cuda_rule(T) for T in (2, 4, 8, 16, 2048)} == {"reference"}
