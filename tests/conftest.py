"""Shared test configuration: one torch thread, a forked RNG per test."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)  # tiny tensors: threading only adds overhead (and oversubscribes)


@pytest.fixture(autouse=True)
def _fork_rng():
    """Every test runs with its own copy of the global RNG state (zuko's conftest pattern)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield
