"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread (restored afterwards). Micro ViTs and small
    probes are all per-op overhead: on a shared 2-core machine two threads per process were
    measured 5x slower than one. Results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
