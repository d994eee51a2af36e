"""Helpers shared by several test modules (the shared fixtures are in ``conftest.py``)."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import torch
from scipy.stats import norm

from flowmc.flows.flow import FlowConfig, build_flow
from flowmc.io.checkpoint import save_checkpoint
from flowmc.io.ensemble import open_ensemble
from flowmc.lattice.action import Phi4Action


def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def bonferroni(m: int, alpha: float = 0.01) -> float:
    """The two-sided z threshold of ``m`` simultaneous checks at level ``alpha``."""
    return float(norm.ppf(1 - alpha / (2 * m)))


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_small_flow(path: Path, shape: tuple[int, ...] = (4, 4), *, symmetric: bool = False,
                    meta: dict | None = None) -> Path:  # fmt: skip
    """A small untrained flow (2 affine layers, weights ~ N(0, 0.05^2) from seed 0) for
    ``Phi4Action(-1, 1, shape)``, saved as a checkpoint at ``path``."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        flow = build_flow(FlowConfig(shape, n_layers=2, hidden=(4,), prior_sigma=0.6))
        for p in flow.parameters():
            torch.nn.init.normal_(p, std=0.05)
    save_checkpoint(path, flow, Phi4Action(-1.0, 1.0, shape), symmetric=symmetric, meta=meta)
    return path


def ensemble_dump(path: Path) -> dict[str, bytes]:
    """Every committed byte of an ensemble that a resumed run must reproduce."""
    with open_ensemble(path) as ens:
        out = {f"scalars/{k}": ens.scalar(k).tobytes() for k in ens.scalar_names}
        if ens.has_configs:
            out["configs"] = np.asarray(ens.configs).tobytes()
        arrays, attrs = ens.load_state()
        out.update({f"state/{k}": v.tobytes() for k, v in arrays.items()})
        out["state_attrs"] = repr(sorted(attrs.items())).encode()
        out["n"] = str(ens.n).encode()
    return out
