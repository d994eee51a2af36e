r"""Metropolis sweeps plus Wolff clusters of the embedded Ising signs (Brower & Tamayo 1989).

One :func:`cluster` step of every chain is

1. a **checkerboard multi-hit Metropolis sweep**: the even sites, then the odd sites (parity
   :math:`\sum_\mu x_\mu \bmod 2`), each site hit ``num_hits`` times with the proposal
   :math:`\phi_x' = \phi_x + \delta(2u - 1)`, :math:`u\sim U[0,1)`, accepted with probability
   :math:`\min(1, e^{-\Delta S})`;
2. ``num_clusters`` **Wolff single-cluster flips** of the embedded Ising variables
   :math:`s_x = \operatorname{sign}\phi_x` at fixed :math:`|\phi_x|`.

**The bond probability in flowmc's normalisation.** :class:`~flowmc.lattice.action.Phi4Action` is
:math:`S = \sum_n[\sum_\mu(2\phi_n^2 - \phi_n\phi_{n+\hat\mu} - \phi_n\phi_{n-\hat\mu})
+ m^2\phi_n^2 + \lambda\phi_n^4]`. Since :math:`\sum_n\phi_n\phi_{n-\hat\mu} =
\sum_n\phi_n\phi_{n+\hat\mu}`, the hopping term is :math:`-2\sum_{n,\mu}\phi_n\phi_{n+\hat\mu}`:
every *bond* :math:`b = (n, \mu)` (``V d`` of them) carries :math:`-2\phi_x\phi_y`,
:math:`y = x + \hat\mu`. At fixed :math:`|\phi|` the weight of the signs is therefore an Ising model

.. math::

    e^{-S} \propto \prod_b e^{J_b s_x s_y}, \qquad J_b = 2|\phi_x||\phi_y|,

(the on-site terms depend on :math:`|\phi|` only). Its Fortuin–Kasteleyn / Swendsen–Wang
representation :math:`e^{J s_x s_y} = e^{J}[(1-p) + p\,\delta_{s_x s_y}]` gives the bond
probability

.. math::

    p_b = 1 - e^{-2J_b} = 1 - e^{-4\phi_x\phi_y} \quad (\phi_x\phi_y > 0),\qquad p_b = 0
    \text{ otherwise.}

The issue's :math:`1 - e^{-2\phi_x\phi_y}` is Brower & Tamayo's formula for the hopping form
with one :math:`-\phi_x\phi_y` per bond (coupling :math:`\beta = 1`); in flowmc's normalisation
the coupling per bond is 2, so the factor is 4 (:func:`bond_probability`). The tests check the
detailed balance of one cluster move on a 2x2 lattice by exact enumeration, and that
:math:`1 - e^{-2\phi_x\phi_y}` violates it. On an extent-2 axis the neighbours
:math:`x\pm\hat\mu` coincide and the two bonds :math:`(x,\mu)`, :math:`(x+\hat\mu,\mu)` join the
same pair; they are kept as two bonds with their own uniforms, which is exact because the action
has both terms.

**Why each move is exact.** *Metropolis*: the proposal at one site is symmetric
(:math:`\phi' - \phi` uniform on :math:`[-\delta, \delta)`), so each hit satisfies detailed
balance with respect to the conditional of :math:`\phi_x` given its neighbours, hence leaves
:math:`e^{-S}` invariant; a sweep is a product of such hits. With even extents the sites of one
parity have all neighbours in the other, so their updates are conditionally independent: the
sequential loop over a parity equals the simultaneous checkerboard update (a vectorised
implementation, e.g. on a GPU, could reproduce it given the same uniforms). *Wolff*: conditional
on :math:`|\phi|` the signs follow the Ising model above; the Wolff move (seed site uniform; each
aligned bond of the growing cluster activated once with probability :math:`p_b`; flip the
cluster) satisfies detailed balance for that Ising model: the probabilities of growing cluster
:math:`\mathcal C` from :math:`s` and from the flipped :math:`s'` (summed over the seeds and
internal bonds, which are the same in both) differ only by the boundary bonds, with
:math:`1 - p_b = e^{-2J_b}`: :math:`\prod_{\partial\mathcal C,\,\text{aligned in } s}(1-p_b)`
against :math:`\prod_{\partial\mathcal C,\,\text{aligned in } s'}(1-p_b)`, whose ratio is
:math:`e^{-2\sum_{\partial\mathcal C} J_b s_x s_y} = \pi(s')/\pi(s)`. Since :math:`|\phi|` is
unchanged, the move is exact for the full :math:`\phi^4` measure, for any :math:`\lambda`
(including the free theory). A bond is decided at most once (a rejected bond is never
re-examined: its far end, if it joins later, finds the near end already in the cluster), so a
uniform pre-drawn per bond realises the same law as drawing on demand.

**Randomness.** Everything comes from the passed ``rng``: one ``uniform`` call per step draws, for
every chain from its own stream (:class:`~flowmc.mcmc.rng.ChainRNG`), ``num_hits V`` proposal and
``num_hits V`` accept uniforms, then per cluster one seed uniform and ``V d`` bond uniforms. The
compiled code consumes chain ``c``'s row only, so a chain's trajectory does not depend on the
chains beside it, and saving the generator states resumes bit for bit. (A plain
:class:`torch.Generator` draws the ``(C, n)`` block in one call instead.)

**The compiled path: numba.** The Wolff cluster is a data-dependent graph search, sequential per
chain; in torch it would be a Python loop over sites (or a breadth-first search with many tiny
tensor ops per layer), and ``torch.compile`` on a CPU needs a C++ tool chain at run time without
making the search efficient. A scipy ``connected_components`` of all activated bonds is compiled
and exact too, with no new dependency, but it labels the whole lattice for every cluster and
needs Python glue per call. Measured at (32, -4, 4.572), one thread, 3 hits and 2 clusters per
step (``scripts/bench_cluster.py --scipy-sweeps``, ``docs/results/bench_cluster_L32.json``):
numba 146 us per sweep per chain with 1 chain and 125 us with 32; torch checkerboard + scipy
clusters 1230 us and 388 us. With tau_int(chi2) = 2.7 sweeps that is 0.8 ms per independent
chi2 sample (the issue's plain numba reference: 317 us, 2.6 sweeps, 1.6 ms). About 40% of the
numba step is drawing the uniforms from the torch
generators. numba and llvmlite ship binary wheels for Linux, macOS and Windows, so installing
needs no compiler. The functions compile on first use (1.3 s, once) and are cached on disk
(``cache=True``: 0.2 s to load in a new process), next to this file or, where that is read-only,
in the user's cache directory (or ``NUMBA_CACHE_DIR``); where no cache directory is writable they
are compiled without caching instead. numba is the optional extra ``flowmc-lattice[cluster]``
(also in ``[test]``), not a core dependency, because each numba release bounds the numpy versions
it supports and the rest of flowmc does not need it; building the kernel without it raises an
``ImportError`` that says how to install it. All compiled loops are serial: one chain after the
other, on one thread.

The state is float64 on the CPU (the compiled code works in double precision, like the action);
the action reported in the state is recomputed from the new configuration after every step.

References:
    R. C. Brower, P. Tamayo, "Embedded dynamics for phi^4 theory", Phys. Rev. Lett. 62 (1989) 1087.
    U. Wolff, "Collective Monte Carlo updating for spin systems", Phys. Rev. Lett. 62 (1989) 361.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from flowmc._checks import check_int, check_positive
from flowmc.lattice.action import Phi4Action, check_field
from flowmc.mcmc.kernel import RNG, SamplingAlgorithm
from flowmc.mcmc.rng import draw_uniform

try:  # optional dependency: flowmc-lattice[cluster]
    import numba as _numba
except ImportError:  # pragma: no cover - exercised only without numba
    _numba = None

__all__ = [
    "ClusterState",
    "ClusterInfo",
    "bond_probability",
    "neighbour_table",
    "checkerboard_order",
    "init",
    "adopt",
    "build_kernel",
    "cluster",
    "tune_step_size",
    "require_numba",
]

#: Coupling of one bond in flowmc's normalisation: the hopping term is ``-2 phi_x phi_y``.
BOND_COUPLING = 2.0


class ClusterState(NamedTuple):
    """State of ``C`` chains.

    Attributes:
        phi: ``(C, *L)`` float64 field configurations (CPU).
        action: ``(C,)`` their actions :math:`S[\\phi]`.
    """

    phi: Tensor
    action: Tensor


class ClusterInfo(NamedTuple):
    """Diagnostics of one step, one entry per chain.

    Attributes:
        acceptance_rate: ``(C,)`` fraction of the ``num_hits V`` Metropolis hits accepted.
        cluster_size: ``(C,)`` mean over the step's clusters of the fraction of sites flipped
            (0 when ``num_clusters == 0``).
    """

    acceptance_rate: Tensor
    cluster_size: Tensor


def bond_probability(phi_x: Tensor | float, phi_y: Tensor | float) -> Tensor:
    r"""Wolff bond probability :math:`1 - e^{-4\phi_x\phi_y}` if :math:`\phi_x\phi_y > 0`, else 0.

    The factor 4 is :math:`2J_b` with :math:`J_b = 2|\phi_x\phi_y|`, the embedded Ising coupling
    of flowmc's action (module docstring).
    """
    prod = torch.as_tensor(phi_x, dtype=torch.float64) * torch.as_tensor(phi_y, dtype=torch.float64)
    return torch.where(prod > 0, -torch.expm1(-2.0 * BOND_COUPLING * prod), torch.zeros_like(prod))


# --------------------------------------------------------------------------------------------
# geometry


def neighbour_table(lattice_shape: tuple[int, ...]) -> np.ndarray:
    r"""``(V, 2d)`` int64 flat indices (row-major) of :math:`x+\hat\mu` (columns ``0..d-1``)
    and :math:`x-\hat\mu` (columns ``d..2d-1``), periodic."""
    shape = tuple(int(s) for s in lattice_shape)
    idx = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    fwd = [np.roll(idx, -1, axis=mu).ravel() for mu in range(len(shape))]
    bwd = [np.roll(idx, 1, axis=mu).ravel() for mu in range(len(shape))]
    return np.ascontiguousarray(np.stack(fwd + bwd, axis=1))


def checkerboard_order(lattice_shape: tuple[int, ...]) -> np.ndarray:
    """``(V,)`` int64 flat site indices: the even sites (row-major), then the odd sites."""
    shape = tuple(int(s) for s in lattice_shape)
    parity = np.indices(shape).sum(0).ravel() % 2
    sites = np.arange(parity.size, dtype=np.int64)
    return np.concatenate([sites[parity == 0], sites[parity == 1]])


# --------------------------------------------------------------------------------------------
# compiled core (numba)


def _jit(fn: Callable) -> Callable:
    """``numba.njit(cache=True)``, or without the disk cache where no cache dir is writable."""
    if _numba is None:  # pragma: no cover
        return fn
    try:
        return _numba.njit(cache=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return _numba.njit(cache=False)(fn)


def _metropolis_sweep_py(phi, nbr, order, a, lam, delta, num_hits, u_prop, u_acc):
    """One checkerboard multi-hit sweep of one chain in place; returns the accepted hits."""
    vol = order.shape[0]
    two_d = nbr.shape[1]
    accepted = 0
    k = 0
    for i in range(vol):
        x = order[i]
        h = 0.0
        for j in range(two_d):
            h += phi[nbr[x, j]]
        old = phi[x]
        old2 = old * old
        for _ in range(num_hits):
            new = old + delta * (2.0 * u_prop[k] - 1.0)
            new2 = new * new
            ds = a * (new2 - old2) + lam * (new2 * new2 - old2 * old2) - 2.0 * h * (new - old)
            if ds <= 0.0 or u_acc[k] < math.exp(-ds):
                old = new
                old2 = new2
                accepted += 1
            k += 1
        phi[x] = old
    return accepted


def _wolff_py(phi, nbr, u_seed, u_bond, mark, stamp, stack, bond_factor):
    """One Wolff cluster flip of one chain in place; returns the number of sites flipped.

    ``mark[x] == stamp`` marks the cluster; bond ``(x, mu)`` joins ``x`` and ``nbr[x, mu]`` and
    is activated iff ``u_bond[x * d + mu] < 1 - exp(-bond_factor |phi_x| |phi_y|)`` (aligned
    ends only); ``bond_factor = 2 J_b / (|phi_x||phi_y|) = 4`` is exact (module docstring).
    """
    vol = phi.shape[0]
    d = nbr.shape[1] // 2
    seed = int(u_seed * vol)
    if seed >= vol:
        seed = vol - 1
    s0 = phi[seed]
    mark[seed] = stamp
    phi[seed] = -s0
    if s0 == 0.0:
        return 1
    stack[0] = seed
    top = 1
    size = 1
    while top > 0:
        top -= 1
        x = stack[top]
        ax = abs(phi[x])
        for mu in range(d):
            for side in range(2):
                if side == 0:
                    y = nbr[x, mu]
                    b = x * d + mu
                else:
                    y = nbr[x, d + mu]
                    b = y * d + mu
                if mark[y] == stamp:
                    continue
                py = phi[y]
                if py * s0 <= 0.0:
                    continue
                if u_bond[b] < -math.expm1(-bond_factor * ax * abs(py)):
                    mark[y] = stamp
                    phi[y] = -py
                    stack[top] = y
                    top += 1
                    size += 1
    return size


def _action_py(phi, nbr, a, lam):
    """The action of one chain's flat configuration (``a = 2d + m2``)."""
    vol = phi.shape[0]
    d = nbr.shape[1] // 2
    s = 0.0
    for x in range(vol):
        p = phi[x]
        p2 = p * p
        hop = 0.0
        for mu in range(d):
            hop += phi[nbr[x, mu]]
        s += a * p2 + lam * p2 * p2 - 2.0 * p * hop
    return s


_metropolis_sweep = _jit(_metropolis_sweep_py)
_wolff = _jit(_wolff_py)
_action_flat = _jit(_action_py)


def _step_py(
    phi, nbr, order, a, lam, delta, num_hits, num_clusters, bond_factor, u, acc, size, action
):
    """All chains, in place: ``phi (C, V)``; ``u (C, n)`` the step's uniforms per chain."""
    num_chains, vol = phi.shape
    d = nbr.shape[1] // 2
    nm = num_hits * vol
    nb = vol * d
    mark = np.zeros(vol, dtype=np.int64)
    stack = np.empty(vol, dtype=np.int64)
    stamp = 0
    for c in range(num_chains):
        row = phi[c]
        uc = u[c]
        accepted = 0
        if num_hits > 0:
            accepted = _metropolis_sweep(
                row, nbr, order, a, lam, delta, num_hits, uc[0:nm], uc[nm : 2 * nm]
            )
        flipped = 0
        off = 2 * nm
        for _ in range(num_clusters):
            stamp += 1
            flipped += _wolff(
                row, nbr, uc[off], uc[off + 1 : off + 1 + nb], mark, stamp, stack, bond_factor
            )
            off += 1 + nb
        acc[c] = accepted / max(nm, 1)
        size[c] = flipped / (vol * max(num_clusters, 1))
        action[c] = _action_flat(row, nbr, a, lam)


_step_all = _jit(_step_py)


# --------------------------------------------------------------------------------------------
# validation


def require_numba() -> None:
    """Raise ``ImportError`` (saying how to install it) unless numba is importable."""
    if _numba is None:
        raise ImportError(
            "flowmc.mcmc.cluster needs numba; install it with "
            "`pip install flowmc-lattice[cluster]` (or `pip install numba`)"
        )


def _check_action(action: Any) -> Phi4Action:
    if not isinstance(action, Phi4Action):
        raise ValueError(
            f"Expected a flowmc.action.Phi4Action (the cluster move embeds its Ising signs); "
            f"got {type(action).__name__}"
        )
    odd = [s for s in action.lattice_shape if s % 2]
    if odd or min(action.lattice_shape) < 2:
        raise ValueError(
            f"Expected even lattice extents >= 2 for the checkerboard sweep; got "
            f"{action.lattice_shape}"
        )
    return action


def _check_phi(phi: Tensor, action: Phi4Action, name: str = "phi") -> None:
    check_field(phi, action.lattice_shape, name)
    if phi.dtype != torch.float64:
        raise ValueError(f"Expected {name} of dtype torch.float64; got {phi.dtype}")
    if phi.device.type != "cpu":
        raise ValueError(f"Expected {name} on the CPU; got {phi.device}")
    if not bool(torch.isfinite(phi).all()):
        raise ValueError(f"Expected finite values in {name}; got NaN or inf")


# --------------------------------------------------------------------------------------------
# kernel


def init(phi: Tensor, action: Phi4Action) -> ClusterState:
    """The :class:`ClusterState` of ``C`` chains at ``phi``.

    Args:
        phi: ``(C, *L)`` float64 CPU configurations, finite.
        action: the :class:`~flowmc.lattice.action.Phi4Action`.

    Raises:
        ValueError: for a wrong shape, dtype or device, non-finite values, or an action that
            is not a ``Phi4Action`` with even extents.
    """
    action = _check_action(action)
    _check_phi(phi, action)
    return ClusterState(phi, action(phi))


def adopt(own: ClusterState | None, other: Any, action: Phi4Action) -> ClusterState:
    """The :class:`ClusterState` at the position of ``other`` (any state with ``phi``/``action``).

    Nothing is cached beyond ``phi`` and ``action``, so ``own`` is not needed; ``other.action``
    is reused as it is.

    Raises:
        ValueError: as :func:`init`, for ``other.phi``.
    """
    del own
    _check_phi(other.phi, _check_action(action), "other.phi")
    return ClusterState(other.phi, other.action)


def build_kernel(
    action: Phi4Action,
    *,
    step_size: float = 1.0,
    num_hits: int = 3,
    num_clusters: int = 2,
) -> Callable[[ClusterState, RNG], tuple[ClusterState, ClusterInfo]]:
    r"""Build ``step(state, rng) -> (state, info)``: one Metropolis sweep, then the clusters.

    Args:
        action: the :class:`~flowmc.lattice.action.Phi4Action` (even extents >= 2, any dimension).
        step_size: Metropolis proposal half-width :math:`\delta > 0`.
        num_hits: Metropolis hits per site and sweep (>= 0; 0 skips the sweep).
        num_clusters: Wolff clusters per step (>= 0; 0 skips them).

    Returns:
        The kernel; it is pure (the input state is not modified) and draws its randomness only
        from ``rng``, one ``(C, n)`` uniform block per step (module docstring).

    Raises:
        ImportError: without numba.
        ValueError: for invalid parameters or actions.
    """
    return _build_kernel(
        action, step_size=step_size, num_hits=num_hits, num_clusters=num_clusters,
        bond_factor=2.0 * BOND_COUPLING,
    )


def _build_kernel(
    action: Phi4Action,
    *,
    step_size: float,
    num_hits: int,
    num_clusters: int,
    bond_factor: float,
) -> Callable[[ClusterState, RNG], tuple[ClusterState, ClusterInfo]]:
    """:func:`build_kernel` with the bond factor as a parameter (the tests' negative controls
    use a wrong one; 4 is exact)."""
    require_numba()
    action = _check_action(action)
    delta = check_positive("step_size", step_size)
    num_hits = check_int("num_hits", num_hits, 0)
    num_clusters = check_int("num_clusters", num_clusters, 0)
    bond_factor = float(bond_factor)
    shape = action.lattice_shape
    vol, d = action.volume, action.dim
    nbr = neighbour_table(shape)
    order = checkerboard_order(shape)
    a = 2.0 * d + action.m2
    lam = action.lam
    num_uniforms = 2 * num_hits * vol + num_clusters * (1 + vol * d)

    def step(state: ClusterState, rng: RNG) -> tuple[ClusterState, ClusterInfo]:
        phi0 = state.phi
        if phi0.dtype != torch.float64 or tuple(phi0.shape[1:]) != shape:
            raise ValueError(
                f"Expected state.phi of shape (C, {', '.join(map(str, shape))}) and dtype "
                f"torch.float64; got {tuple(phi0.shape)} {phi0.dtype}"
            )
        c = phi0.shape[0]
        u = draw_uniform(rng, (c, num_uniforms), dtype=torch.float64, device="cpu")
        phi = phi0.reshape(c, vol).clone()
        acc = np.empty(c)
        size = np.empty(c)
        s = np.empty(c)
        _step_all(
            phi.numpy(), nbr, order, a, lam, delta, num_hits, num_clusters, bond_factor,
            u.numpy(), acc, size, s,
        )
        new = ClusterState(phi.view(phi0.shape), torch.from_numpy(s))
        return new, ClusterInfo(torch.from_numpy(acc), torch.from_numpy(size))

    return step


def cluster(
    action: Phi4Action,
    step_size: float = 1.0,
    num_hits: int = 3,
    num_clusters: int = 2,
) -> SamplingAlgorithm:
    """User-facing kernel: ``SamplingAlgorithm(init, step, adopt)`` with the action bound in.

    Args:
        action: the :class:`~flowmc.lattice.action.Phi4Action` (even extents, any dimension).
        step_size: Metropolis proposal half-width :math:`\\delta > 0`.
        num_hits: Metropolis hits per site and sweep.
        num_clusters: Wolff clusters per step.

    Returns:
        ``SamplingAlgorithm`` with ``init(phi) -> ClusterState``,
        ``step(state, rng) -> (ClusterState, ClusterInfo)`` and ``adopt``.

    Raises:
        ImportError: without numba.
        ValueError: for invalid parameters (see :func:`build_kernel`).

    Example:
        >>> from flowmc.lattice.action import Phi4Action
        >>> from flowmc.mcmc.rng import ChainRNG
        >>> action = Phi4Action(-4.0, 8.0, (4, 4))
        >>> sampler = cluster(action, step_size=1.0)
        >>> state = sampler.init(torch.zeros(2, 4, 4, dtype=torch.float64))
        >>> state, info = sampler.step(state, ChainRNG(seed=0, chain_ids=2))
        >>> info.cluster_size.shape
        torch.Size([2])
    """
    kernel = build_kernel(
        action, step_size=step_size, num_hits=num_hits, num_clusters=num_clusters
    )

    def init_fn(phi: Tensor) -> ClusterState:
        return init(phi, action)

    def adopt_fn(own: ClusterState | None, other: Any) -> ClusterState:
        return adopt(own, other, action)

    return SamplingAlgorithm(init_fn, kernel, adopt_fn)


def _local_mean(x: Tensor) -> float:
    return float(x.mean())


def tune_step_size(
    action: Phi4Action,
    state: ClusterState,
    rng: RNG,
    *,
    target_accept: float = 0.5,
    num_warmup: int = 100,
    initial_step_size: float = 1.0,
    num_hits: int = 3,
    num_clusters: int = 2,
    chain_mean: Callable[[Tensor], float] | None = None,
) -> tuple[ClusterState, float, dict[str, list[float]]]:
    r"""Warm up while adapting :math:`\delta` towards a target Metropolis acceptance; freeze it.

    Robbins–Monro on :math:`\log\delta`: after warm-up step :math:`m` with mean (over chains)
    acceptance :math:`\alpha_m`, :math:`\log\delta \mathrel{+}= (\alpha_m - \alpha^*)/\sqrt m`.
    The returned :math:`\delta` is the geometric mean over the second half of the warm-up.
    Adaptation breaks the Markov property, so the warm-up states are discarded; sampling with the
    frozen :math:`\delta` is exact. The mean runs over the chains of the run (``chain_mean``), so
    the tuned value depends on the chain set (as for HMC's step size).

    Args:
        action: the action.
        state: initial :class:`ClusterState`.
        rng: the only source of randomness.
        target_accept: target acceptance :math:`\alpha^*\in(0, 1)`.
        num_warmup: warm-up steps, >= 2.
        initial_step_size: starting :math:`\delta > 0`.
        num_hits: Metropolis hits per site.
        num_clusters: Wolff clusters per step during the warm-up.
        chain_mean: the mean of a per-chain ``(C,)`` tensor over all chains of the run; default
            the mean over the chains held here (:func:`flowmc.mcmc.hmc.local_mean`). A shard of
            a run spread over processes passes :class:`flowmc.sampling.shards.GatheredMean`,
            so that every shard tunes the step size of the whole run.

    Returns:
        ``(state, step_size, history)`` with history lists ``step_size`` and
        ``acceptance_rate``.

    Raises:
        ValueError: for invalid parameters.
    """
    target_accept = float(target_accept)
    if not 0.0 < target_accept < 1.0:
        raise ValueError(f"Expected target_accept in (0, 1); got {target_accept}")
    num_warmup = check_int("num_warmup", num_warmup, 2)
    num_hits = check_int("num_hits", num_hits, 1)
    log_delta = math.log(check_positive("initial_step_size", initial_step_size))
    mean = chain_mean or _local_mean
    history: dict[str, list[float]] = {"step_size": [], "acceptance_rate": []}
    for m in range(1, num_warmup + 1):
        delta = math.exp(log_delta)
        kernel = build_kernel(
            action, step_size=delta, num_hits=num_hits, num_clusters=num_clusters
        )
        state, info = kernel(state, rng)
        alpha = mean(info.acceptance_rate)
        history["step_size"].append(delta)
        history["acceptance_rate"].append(alpha)
        log_delta += (alpha - target_accept) / math.sqrt(m)
    half = history["step_size"][num_warmup // 2 :]
    step_size = math.exp(sum(math.log(x) for x in half) / len(half))
    return state, step_size, history
