r"""Per-chain random streams: chain ``c`` of a run with seed ``s`` draws from its own generator.

Every Markov chain owns one :class:`torch.Generator`, seeded from
``np.random.SeedSequence([seed, c])`` with ``c`` the chain's *global* index (scheme
``"per-chain-v1"``, recorded as ``sampler["rng"]`` in every ensemble). A kernel asks
:class:`ChainRNG` for ``normal(shape)`` or ``uniform(shape)`` and gets a ``(C, *shape)`` tensor
whose row ``c`` was drawn from chain ``c``'s generator alone. Hence:

* the trajectory of chain ``c`` depends only on ``(seed, c)`` and the sampler settings, not on how
  many chains run beside it or in which batch/process (a run of chains ``[0, 1, 2, 3]`` equals,
  chain for chain, runs of ``[0, 1]`` and ``[2, 3]``; the tests check it);
* the generator states are one ``(C, S)`` ``uint8`` array (:meth:`ChainRNG.get_state`), saved with
  every commit of an ensemble so that a resumed run continues bit for bit.

Two exceptions, documented where they occur: the dual-averaging step-size tuning of an HMC warm-up
averages the acceptance over all chains of the run (so the tuned step size depends on the chain
set; pass a fixed step size to reproduce a subset of chains, or shard the run with
:mod:`flowmc.sampling.shards`, which averages over all ranks' chains), and the adaptive warm-up
trains one flow on all chains' configurations. Streams that belong to the run as a whole (e.g. the
minibatches of the adaptive warm-up) come from :func:`run_generator`, keyed
``SeedSequence(seed, spawn_key=(k,))``, disjoint from every chain key.

The helpers :func:`draw_normal` and :func:`draw_uniform` also accept a plain
:class:`torch.Generator` (one stream for the whole batch, drawn in one call), which the kernels
keep supporting for quick experiments and the unit tests.

Example:
    >>> rng = ChainRNG(seed=1, chain_ids=range(2, 4))
    >>> rng.normal((3,)).shape
    torch.Size([2, 3])
    >>> a = ChainRNG(seed=1, chain_ids=range(4)).normal((3,))
    >>> b = ChainRNG(seed=1, chain_ids=[2, 3]).normal((3,))
    >>> bool(torch.equal(a[2:], b))
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from flowmc._checks import check_int, is_int

__all__ = ["RNG_SCHEME", "ChainRNG", "chain_seed", "run_generator", "draw_normal", "draw_uniform"]

#: Name of the seeding scheme, stored as ``sampler["rng"]`` in ensembles.
RNG_SCHEME = "per-chain-v1"


def _check_seed(seed: int) -> int:
    return check_int("seed", seed, 0, strict=False)


def chain_seed(seed: int, chain: int) -> int:
    """The 64-bit ``manual_seed`` of chain ``chain`` (global index) of a run with ``seed``."""
    seed = _check_seed(seed)
    if not is_int(chain, minimum=0, strict=False):
        raise ValueError(f"Expected a chain index >= 0; got {chain!r}")
    state = np.random.SeedSequence([seed, int(chain)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def run_generator(seed: int, key: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator for randomness that belongs to the whole run (not to one chain).

    Seeded from ``np.random.SeedSequence(seed, spawn_key=(key,))``, which never coincides with a
    chain key ``SeedSequence([seed, c])``.

    Args:
        seed: the run's seed (>= 0).
        key: which run-level stream (e.g. 1 = adaptive warm-up).
        device: device of the generator.
    """
    seq = np.random.SeedSequence(_check_seed(seed), spawn_key=(int(key),))
    state = seq.generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


class ChainRNG:
    """One :class:`torch.Generator` per chain.

    Args:
        seed: the run's seed (integer >= 0).
        chain_ids: global indices of the chains held here (a ``range`` or a sequence of distinct
            integers >= 0), or an ``int`` ``C`` for ``range(C)``.
        device: device of the generators (and of the tensors they draw).

    Raises:
        ValueError: for a negative seed, no chains, or repeated/negative chain indices.
    """

    def __init__(
        self,
        seed: int,
        chain_ids: Iterable[int] | int,
        device: str | torch.device = "cpu",
    ) -> None:
        self.seed = _check_seed(seed)
        ids = range(int(chain_ids)) if isinstance(chain_ids, (int, np.integer)) else chain_ids
        self.chain_ids: tuple[int, ...] = tuple(int(c) for c in ids)
        if not self.chain_ids:
            raise ValueError("Expected at least one chain id; got none")
        if len(set(self.chain_ids)) != len(self.chain_ids) or min(self.chain_ids) < 0:
            raise ValueError(f"Expected distinct chain ids >= 0; got {self.chain_ids}")
        self.device = torch.device(device)
        self.generators = [
            torch.Generator(device=self.device).manual_seed(chain_seed(self.seed, c))
            for c in self.chain_ids
        ]

    @property
    def num_chains(self) -> int:
        """Number of chains ``C``."""
        return len(self.generators)

    def __len__(self) -> int:
        return len(self.generators)

    def __repr__(self) -> str:
        ids = self.chain_ids
        span = f"{ids[0]}..{ids[-1]}" if ids == tuple(range(ids[0], ids[-1] + 1)) else str(ids)
        return f"ChainRNG(seed={self.seed}, chains={span}, device={self.device})"

    def _draw(self, shape: Sequence[int], dtype: torch.dtype, kind: str) -> Tensor:
        shape = tuple(int(s) for s in shape)
        out = torch.empty((self.num_chains, *shape), dtype=dtype, device=self.device)
        for row, gen in zip(out, self.generators):
            if kind == "normal":
                row.normal_(generator=gen)
            else:
                row.uniform_(generator=gen)
        return out

    def normal(self, shape: Sequence[int], dtype: torch.dtype = torch.float64) -> Tensor:
        """Standard normal variates, ``(C, *shape)``; row ``c`` from chain ``c``'s generator."""
        return self._draw(shape, dtype, "normal")

    def uniform(self, shape: Sequence[int], dtype: torch.dtype = torch.float64) -> Tensor:
        """Uniform variates in [0, 1), ``(C, *shape)``; row ``c`` from chain ``c``'s generator."""
        return self._draw(shape, dtype, "uniform")

    def get_state(self) -> np.ndarray:
        """The generator states as one ``(C, S)`` ``uint8`` array (a copy)."""
        return np.stack([g.get_state().cpu().numpy() for g in self.generators])

    def set_state(self, state: np.ndarray | Tensor) -> None:
        """Restore the states saved by :meth:`get_state`.

        Raises:
            ValueError: if ``state`` does not have one row per chain of the right size.
        """
        arr = np.asarray(state.cpu() if isinstance(state, Tensor) else state)
        want = (self.num_chains, self.generators[0].get_state().numel())
        if arr.shape != want or arr.dtype != np.uint8:
            raise ValueError(
                f"Expected a generator state of shape {want} and dtype uint8; got "
                f"{arr.shape} {arr.dtype}"
            )
        for gen, row in zip(self.generators, arr):
            gen.set_state(torch.from_numpy(np.ascontiguousarray(row)))


def _check_rows(rng: ChainRNG, shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if not shape or shape[0] != rng.num_chains:
        raise ValueError(
            f"Expected a leading chain axis of size {rng.num_chains} (the ChainRNG's chains); "
            f"got shape {shape}"
        )
    return shape[1:]


def draw_normal(
    rng: ChainRNG | torch.Generator | None,
    shape: Sequence[int],
    *,
    dtype: torch.dtype,
    device: str | torch.device,
) -> Tensor:
    """Standard normals of ``shape = (C, ...)``: per chain from a :class:`ChainRNG`, or in one
    call from a plain generator (``None``: torch's global generator)."""
    if isinstance(rng, ChainRNG):
        return rng.normal(_check_rows(rng, shape), dtype)
    return torch.randn(tuple(shape), generator=rng, dtype=dtype, device=device)


def draw_uniform(
    rng: ChainRNG | torch.Generator | None,
    shape: Sequence[int],
    *,
    dtype: torch.dtype,
    device: str | torch.device,
) -> Tensor:
    """Uniforms in [0, 1) of ``shape = (C, ...)``, as :func:`draw_normal`."""
    if isinstance(rng, ChainRNG):
        return rng.uniform(_check_rows(rng, shape), dtype)
    return torch.rand(tuple(shape), generator=rng, dtype=dtype, device=device)
