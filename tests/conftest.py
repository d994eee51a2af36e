"""Fixtures shared by the test modules (the RNG and thread settings of every test and doctest
are in the repository's top-level ``conftest.py``; plain helpers in ``tests/helpers.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import save_small_flow


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small untrained flow for ``Phi4Action(-1, 1, (4, 4))``, sampled Z2-symmetrised, with a
    recorded training time (12.5 s) and recipe; one per test module."""
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return save_small_flow(path, symmetric=True, meta={"training_time_s": 12.5, "recipe": "test"})
