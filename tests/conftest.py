"""Test-wide settings. The environment variables must be set before torch/triton are imported."""
import os

# Triton kernels run on the CPU through the interpreter; must be set before any @triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Edits to an op's fake/kernel/backward do not invalidate AOTAutogradCache (FACTS.md): force caches off.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# ci: the profile `make test` uses; long: LTE_HYPOTHESIS_PROFILE=long for the long property run
# (10x the examples, via tests.strategies.examples, since explicit max_examples override profiles).
settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=10, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("LTE_HYPOTHESIS_PROFILE", "ci"))
