"""Moved to `lte_compile.testing` (the public property-testing harness). This re-export remains
only for tests/api/test_cluster.py until it imports `lte_compile.testing` itself; then delete it."""
from lte_compile.testing import FFNCase, MASK_KINDS, TAU, examples, gate_mask, sparse_ffn_cases  # noqa: F401
