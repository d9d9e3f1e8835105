"""Test-wide settings. The environment variables must be set before torch/triton are imported."""
import os

# Triton kernels run on the CPU through the interpreter; must be set before any @triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Edits to an op's fake/kernel/backward do not invalidate AOTAutogradCache (it treats OpOverload
# nodes as safe): force caches off.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# ci: the profile `make test` uses; long: LTE_HYPOTHESIS_PROFILE=long for the long property run
# (10x the examples, via lte_compile.testing.examples, since explicit max_examples override profiles).
settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=10, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("LTE_HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402
import torch  # noqa: E402


def _global_torch_state() -> dict:
    """Process-wide torch settings a test could leave changed for every later test (issue 7:
    an op call that fails only after other modules ran is what a leak looks like)."""
    return {
        "default dtype": torch.get_default_dtype(),
        "grad enabled": torch.is_grad_enabled(),
        "inference mode": torch.is_inference_mode_enabled(),
        "deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
        "threads": torch.get_num_threads(),
        # No public API lists active modes; a mode left on the stack changes every later op call.
        "dispatch modes": torch._C._len_torch_dispatch_stack(),
        "function modes": torch._C._len_torch_function_stack(),
    }


@pytest.fixture(autouse=True)
def no_global_state_leak():
    """Every test leaves torch's global state as it found it."""
    before = _global_torch_state()
    yield
    after = _global_torch_state()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not changed, f"the test changed global torch state (before, after): {changed}"


@pytest.fixture
def op_calls(monkeypatch):
    """The activation name of every lte::sparse_ffn forward that reaches a kernel (a spy on dispatch)."""
    from lte_compile.kernels import dispatch

    calls, forward = [], dispatch.sparse_ffn_forward

    def spy(*args, **kwargs):
        calls.append(args[8])
        return forward(*args, **kwargs)

    monkeypatch.setattr(dispatch, "sparse_ffn_forward", spy)
    return calls
