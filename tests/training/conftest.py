"""Training tests run single-threaded (see `one_thread`)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and two OpenMP threads on a busy 2-core host stall."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
