"""Configuration of every pytest run of this repository: the tests and the package's doctests.

``python -m pytest`` collects ``tests/`` and, with ``--doctest-modules`` (``pyproject.toml``),
the examples in the docstrings of ``flowmc/``. Both run with one torch thread and each item in
its own copy of the global RNG state, seeded with 0 (zuko's ``conftest.py`` pattern), so no test
or example depends on what ran before it. This file is not part of the installed package.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

torch.set_num_threads(1)  # tiny tensors: threading only adds overhead (and oversubscribes)


@pytest.fixture(autouse=True)
def _fork_rng():
    """Every test and doctest runs with its own copy of the global RNG state, seeded with 0."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test and doctest starts with one torch thread, whatever the one before it set."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The examples of the compiled cluster kernel need numba (``flowmc-lattice[cluster]``, also
    in ``[test]``); without it they are skipped, with the reason, instead of failing."""
    if importlib.util.find_spec("numba") is not None:
        return
    skip = pytest.mark.skip(reason="needs numba (pip install flowmc-lattice[cluster])")
    for item in items:
        if isinstance(item, pytest.DoctestItem) and item.name.startswith("flowmc.mcmc.cluster"):
            item.add_marker(skip)
