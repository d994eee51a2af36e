r"""An equivariant continuous flow: a neural ODE whose vector field is a lattice-wide convolution.

The field moves along the ODE :math:`\dot\phi = v(\phi, t)` from :math:`t = 0` (the prior) to
:math:`t = 1` (the target), with the vector field of Gerdes et al. (arXiv:2207.00283)

.. math::

    v_x(\phi, t) = \sum_y \sum_{c=1}^{C} K_c(x - y, t)\, g_c(\phi_y), \qquad
    g_c(\phi) = \sum_{f=1}^{F} M_{cf} \sin(\omega_f \phi) + m_c\,\phi ,

site features :math:`g_c` (a learned bank of frequencies :math:`\omega_f` contracted to ``C``
channels, plus the field itself) convolved over the *whole* lattice with kernels that are shared
over each orbit of the displacement :math:`x - y` under the lattice's point group (reflections
:math:`r_\mu \to -r_\mu`, permutations of axes of equal extent), and depend on time through a few
Fourier modes, :math:`K_c(r, t) = \sum_{\tau} W_{o(r) c \tau}\, T_\tau(t)`. The convolution runs by
FFT, :math:`O(V \log V)` per channel. The map is therefore equivariant under translations, the
point group and :math:`\phi \to -\phi` (the features are odd). The divergence is exact and cheap,
because only the :math:`y = x` term of the sum depends on :math:`\phi_x`:

.. math::

    \nabla\!\cdot v = \sum_c K_c(0, t) \sum_x g_c'(\phi_x), \qquad
    \frac{d}{dt}\log\Big|\det\frac{\partial\phi_t}{\partial\phi_0}\Big| = \nabla\!\cdot v .

**The integrator and exactness.** The ODE is integrated with a fixed-step explicit Runge–Kutta
method (``"rk4"`` by default; ``"rk38"``, ``"midpoint"``, ``"euler"``), carrying the log
determinant as an extra state. The map :math:`\Phi_N` of ``N`` steps is a bijection (for steps
small against the field's Lipschitz constant) and it *is* the proposal; the carried
:math:`\ell_N = \int \nabla\!\cdot v\,dt` is only an approximation of :math:`\log|\det J_{\Phi_N}|`,
with an error :math:`\delta = \ell_N - \log|\det J_{\Phi_N}| = O(h^p)` (:math:`p = 4` for RK4).
An independence Metropolis–Hastings chain that uses :math:`\log q = \log r(z) - \ell_N` samples
:math:`p\,e^{\delta}/\langle e^{\delta}\rangle_p` exactly instead of :math:`p`: a constant part of
:math:`\delta` cancels in every acceptance ratio, and to first order an expectation is biased by
:math:`\mathrm{Cov}_p(O, \delta)`, at most :math:`\sigma_O\,\mathrm{sd}(\delta)`. The exact
:math:`\log|\det J_{\Phi_N}|` costs ``V`` backward passes (:func:`exact_log_det`); the cheap
estimate is :math:`\ell_N - \ell_{2N}` (:func:`log_det_discrepancy`), which on trained flows has
a 3-8 times larger spread than :math:`\delta` and is correlated with it (0.85-0.96). The tests
compare :math:`\ell_N` with the autograd log determinant on small lattices and check the
:math:`h^4` convergence; ``flowmc eval`` reports the estimate and ``flowmc sample`` refuses a flow
whose spread exceeds :data:`DISCREPANCY_TOLERANCE` (docs/recipes.md).

**Training.** Reverse-KL training can exploit integration error (the carried log determinant is
a free parameter for the optimiser once it no longer tracks the map): the loss then falls below
:math:`-\log Z`. Two measures prevent it: the time dependence has few Fourier modes (``n_time``),
so the field varies slowly against the step; and in training mode the layer integrates the first
``penalty_batch`` samples a second time with :func:`coprime_steps` steps (a grid that shares no
interior point with the first) and adds ``penalty * mean((l_N - l_N')^2)`` to the loss
(:meth:`ContinuousFlow.auxiliary_loss`).

**Conditional flows.** With ``degree`` (a flow conditioned on the coupling, see
:class:`flowmc.flows.flow.FlowConfig` ``condition``), the kernel weights are polynomials of that
degree in the normalised context :math:`t_\lambda \in [-1, 1]`, one value per sample.

**Another lattice size.** The kernel lives on displacements, so :meth:`ContinuousFlow.
resample_state` carries it to a larger lattice: displacements with every :math:`|r_\mu|` below half
the old extent keep their weights, the new ones (longer range) start at zero.

Direction convention as in :mod:`flowmc.flows.couplings`: ``forward`` is prior → field.

References:
    Gerdes, de Haan, Rainone, Bondesan, Cheng, "Learning lattice quantum field theories with
    equivariant continuous flows", arXiv:2207.00283 (SciPost Phys. 15, 238);
    Chen, Rubanova, Bettencourt, Duvenaud, arXiv:1806.07366 (neural ODEs);
    Finlay, Jacobsen, Nurbekyan, Oberman, arXiv:2002.02798 (keeping ODE flows easy to integrate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from flowmc._checks import check_int
from flowmc.flows.spectral import poly_basis

__all__ = [
    "TABLEAUS",
    "DISCREPANCY_TOLERANCE",
    "Tableau",
    "ContinuousFlow",
    "displacement_orbits",
    "coprime_steps",
    "log_det_discrepancy",
    "exact_log_det",
    "Discrepancy",
]

#: Standard deviation over configurations of :math:`\ell_N - \ell_{2N}` above which ``flowmc
#: sample`` refuses a continuous flow. Below it the first-order bias of an expectation is below
#: ``1e-3`` of the observable's standard deviation (measured on trained flows, the estimate is
#: 3-8 times *larger* than the spread of the true error :math:`\ell_N - \log|\det J_{\Phi_N}|`),
#: under the statistical error of any chain shorter than about :math:`10^6` independent samples.
DISCREPANCY_TOLERANCE = 1e-3

#: default :attr:`ContinuousFlow.chunk_sites`: 32768 sites (128 samples at L = 16, 32 at L = 32)
#: keep a stage's working set near 10 MB; on the reference CPU (one thread) whole batches of 256
#: were 1.2x (L = 16) and 2.8x (L = 32) slower, memory-bound, and chunks of 4096 sites slower
#: again (Python overhead per call)
CHUNK_SITES = 32768


class Tableau(NamedTuple):
    """An explicit Runge–Kutta method: ``c`` nodes, ``a`` (lower-triangular rows), ``b`` weights,
    and its ``order``."""

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int


#: The fixed-step integrators by name.
TABLEAUS: dict[str, Tableau] = {
    "euler": Tableau((0.0,), ((),), (1.0,), 1),
    "midpoint": Tableau((0.0, 0.5), ((), (0.5,)), (0.0, 1.0), 2),
    "rk4": Tableau(
        (0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
        (1 / 6, 1 / 3, 1 / 3, 1 / 6), 4,
    ),
    "rk38": Tableau(
        (0.0, 1 / 3, 2 / 3, 1.0), ((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
        (1 / 8, 3 / 8, 3 / 8, 1 / 8), 4,
    ),
}


def displacement_orbits(lattice_shape: Sequence[int]) -> tuple[np.ndarray, int]:
    """Orbit of every displacement :math:`r` (mod the lattice) under the point group.

    The group is generated by the reflections :math:`r_\\mu \\to -r_\\mu` and the permutations of
    axes of equal extent. Orbit 0 is :math:`r = 0`; orbits are numbered by their first
    displacement in C order.

    Args:
        lattice_shape: the extents.

    Returns:
        ``(orbit, n_orbits)``: an integer array of ``lattice_shape`` and the number of orbits.

    Example:
        >>> orbit, n = displacement_orbits((4, 4))
        >>> n, int(orbit[1, 0]) == int(orbit[0, 3]) == int(orbit[3, 0])
        (6, True)
    """
    shape = tuple(int(s) for s in lattice_shape)
    r = np.indices(shape).reshape(len(shape), -1).T  # (V, d)
    ext = np.array(shape)
    folded = np.minimum(r, ext - r)
    key = np.empty_like(folded)
    col = 0
    for s in sorted(set(shape)):  # sort the folded components within axes of equal extent
        axes = [mu for mu, e in enumerate(shape) if e == s]
        key[:, col:col + len(axes)] = np.sort(folded[:, axes], axis=1)
        col += len(axes)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # number orbits by first appearance (C order)
    return order[inverse.ravel()].reshape(shape), len(first)


def coprime_steps(n: int) -> int:
    """The step count near ``2n/3`` that shares no interior grid point with ``n`` steps (coprime
    with ``n``): the second integration of the training penalty."""
    m = max(1, round(2 * n / 3))
    while math.gcd(m, n) != 1:
        m -= 1
    return m


def _khat(kernel: Tensor, n_dims: int) -> Tensor:
    """The kernels' Fourier transforms as :class:`_Field` takes them: ``(..., Bk, C, *L)`` real
    even kernels to ``(..., C, Bk, *K)`` real (the rfft of an even kernel is real)."""
    dims = tuple(range(-n_dims, 0))
    return torch.fft.rfftn(kernel, dim=dims).real.movedim(-n_dims - 1, -n_dims - 2).contiguous()


def _half_weights(shape: Sequence[int], like: Tensor) -> Tensor:
    """``(K_last,)`` multiplicity of each last-axis bin of an rfft over ``shape``: 1 for the zero
    bin (and the Nyquist bin of an even extent), 2 for the others (they stand for a pair)."""
    n = int(shape[-1])
    w = torch.full((n // 2 + 1,), 2.0, dtype=like.dtype, device=like.device)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    return w


def _features(pf: Tensor, freq: Tensor) -> tuple[Tensor, Tensor]:
    r"""Site features over ``N`` sites ``pf (1, N)``: ``(F + 1, N)`` rows
    :math:`\sin(\omega_f\phi)` and a last row :math:`\phi` (so that one matrix product with
    ``[mix, lin]`` gives the channels), and :math:`\cos(\omega_f\phi)` ``(F, N)``."""
    n_f = freq.shape[0]
    buf = pf.new_empty(n_f + 1, pf.shape[1])
    x = torch.mul(freq[:, None], pf, out=buf[:n_f])
    c = torch.cos(x)
    x.sin_()
    buf[n_f] = pf[0]
    return buf, c


class _Field(torch.autograd.Function):
    r"""One evaluation of the vector field and its divergence, with an analytic backward.

    Saves only ``phi`` (and the small parameters): the ``(F, B V)`` features are recomputed in
    the backward pass, so training memory grows with ``B V`` per stage, not ``B V F``. Every
    array runs over ``N = B V`` contiguous sites (features ``(F + 1, N)``, channels ``(C, N)``),
    so the sines, the contraction (one matrix product) and the FFTs are single passes.

    Inputs: ``phi (B, *L)``, ``freq (F,)``, ``mix (C, F)``, ``lin (C,)``, ``khat (C, Bk, *K)``
    the rfft of the real, even kernels (:func:`_khat`; ``Bk`` is 1 or ``B``), ``k0 (Bk, C)`` their
    value at ``r = 0``. Outputs: ``v (B, *L)`` and ``div (B,)``.
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any, phi: Tensor, freq: Tensor, mix: Tensor, lin: Tensor, khat: Tensor, k0: Tensor
    ) -> tuple[Tensor, Tensor]:
        shape, dims = phi.shape[1:], tuple(range(-phi.dim() + 1, 0))
        b, n_ch, volume = phi.shape[0], mix.shape[0], phi[0].numel()
        feats, c = _features(phi.reshape(1, -1), freq)  # (F + 1, N), (F, N)
        csum = c.view(-1, b, volume).sum(-1)  # (F, B)
        g = torch.mm(torch.cat([mix, lin[:, None]], 1), feats)  # (C, N)
        gh = torch.fft.rfftn(g.view(n_ch, b, *shape), dim=dims)  # (C, B, *K)
        v = torch.fft.irfftn(gh.mul_(khat).sum(0), s=shape, dim=dims)
        a = k0 @ (mix * freq)  # (Bk, F)
        div = (csum.t() * a).sum(1) + volume * (k0 @ lin)
        ctx.save_for_backward(phi, freq, mix, lin, khat, k0)
        return v, div

    @staticmethod
    def backward(ctx: Any, gv: Tensor, gdiv: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        phi, freq, mix, lin, khat, k0 = ctx.saved_tensors
        shape, dims = phi.shape[1:], tuple(range(-phi.dim() + 1, 0))
        b, n_ch, volume = phi.shape[0], mix.shape[0], phi[0].numel()
        per_sample = k0.shape[0] > 1
        pf = phi.reshape(1, -1)  # (1, N)
        feats, c = _features(pf, freq)
        s = feats[:-1]  # (F, N)
        g = torch.mm(torch.cat([mix, lin[:, None]], 1), feats)  # (C, N)
        # v = sum_c K_c * g_c with even kernels: dL/dg_c = K_c * gv; v = irfft(sum_c ghat_c khat_c)
        # gives dL/dkhat_c = Re(rfft(gv) conj(ghat_c)) w_k / V (w_k: the bin's multiplicity)
        gvh = torch.fft.rfftn(gv, dim=dims)  # (B, *K)
        gg = torch.fft.irfftn(gvh * khat, s=shape, dim=dims).view(n_ch, -1)  # (C, N)
        gh = torch.fft.rfftn(g.view(n_ch, b, *shape), dim=dims)  # (C, B, *K)
        prod = (gh.conj() * gvh).real  # (C, B, *K)
        gkhat = prod if per_sample else prod.sum(1, keepdim=True)
        gkhat = gkhat * (_half_weights(shape, gkhat) / volume)
        # through g = mix sin(freq phi) + lin phi
        p = (mix.t() @ gg).mul_(c)  # (F, N)
        gphi = (freq @ p).add_(lin @ gg)  # (N,)
        gmix = gg @ s.t()
        glin = gg @ pf[0]
        pphi = p @ pf[0]  # (F,)
        # through div_b = sum_f a_bf sum_x cos(freq_f phi_bx) + V k0_b.lin, a = k0 (mix * freq)
        a = k0 @ (mix * freq)  # (Bk, F)
        af = a * freq
        s3 = s.view(-1, b, volume)  # (F, B, V)
        if per_sample:
            sa = torch.einsum("bf,fbv->bv", af, s3)
        else:
            sa = (af[0] @ s).view(b, volume)
        gphi = gphi.view(b, volume).sub_(gdiv[:, None] * sa)
        sphi = torch.einsum("fbv,bv->bf", s3, phi.reshape(b, volume))  # (B, F)
        ga = gdiv[:, None] * c.view(-1, b, volume).sum(-1).t()  # (B, F)
        gfreq = pphi - (gdiv[:, None] * a * sphi).sum(0)
        if not per_sample:
            ga = ga.sum(0, keepdim=True)
        gfreq = gfreq + (ga * (k0 @ mix)).sum(0)
        gmix = gmix + k0.t() @ (ga * freq)
        gdiv_k = gdiv[:, None] if per_sample else gdiv.sum().reshape(1, 1)
        gk0 = (ga * freq) @ mix.t() + volume * gdiv_k * lin
        glin = glin + volume * (gdiv_k * k0).sum(0)
        return gphi.view(phi.shape), gfreq, gmix, glin, gkhat, gk0


class ContinuousFlow(nn.Module):
    r"""The equivariant continuous flow layer (see the module docstring).

    Args:
        lattice_shape: the lattice.
        n_freq: frequencies :math:`\omega_f` of the site features (initialised uniform in
            ``(0, freq_max)``).
        n_channels: channels :math:`C` the features are contracted to.
        n_time: Fourier modes of the time dependence (odd: a constant and ``(n_time - 1) / 2``
            sine/cosine pairs).
        int_steps: integration steps ``N`` over :math:`t \in [0, 1]`.
        integrator: a name in :data:`TABLEAUS`.
        degree: polynomial degree in the context of a conditional layer (``None``: unconditional).
        penalty: weight of the training penalty on :math:`(\ell_N - \ell_{N'})^2` (0: none).
        penalty_batch: samples integrated a second time for the penalty.
        freq_max: upper end of the initial frequencies.
    """

    def __init__(
        self,
        lattice_shape: Sequence[int],
        *,
        n_freq: int = 16,
        n_channels: int = 12,
        n_time: int = 7,
        int_steps: int = 20,
        integrator: str = "rk4",
        degree: int | None = None,
        penalty: float = 100.0,
        penalty_batch: int = 16,
        freq_max: float = 5.0,
    ) -> None:
        super().__init__()
        for name, value, lo in (("n_freq", n_freq, 1), ("n_channels", n_channels, 1),
                                ("n_time", n_time, 1), ("int_steps", int_steps, 1),
                                ("penalty_batch", penalty_batch, 0)):  # fmt: skip
            check_int(name, value, lo, strict=False)
        if n_time % 2 != 1:
            raise ValueError(f"Expected an odd n_time (a constant and sine/cosine pairs); got "
                             f"{n_time}")  # fmt: skip
        if integrator not in TABLEAUS:
            raise ValueError(f"Expected integrator in {sorted(TABLEAUS)}; got {integrator!r}")
        if not (math.isfinite(penalty) and penalty >= 0):
            raise ValueError(f"Expected penalty >= 0; got {penalty}")
        self.lattice_shape = tuple(int(s) for s in lattice_shape)
        self.n_freq, self.n_channels, self.n_time = int(n_freq), int(n_channels), int(n_time)
        self.int_steps, self.integrator = int(int_steps), integrator
        self.degree = None if degree is None else int(degree)
        self.penalty, self.penalty_batch = float(penalty), int(penalty_batch)
        orbit, n_orbits = displacement_orbits(self.lattice_shape)
        self.register_buffer("orbit", torch.from_numpy(orbit), persistent=False)
        self.n_orbits = n_orbits
        self.freq = nn.Parameter(torch.rand(self.n_freq) * freq_max)
        mix = torch.empty(self.n_channels, self.n_freq + 1)
        nn.init.orthogonal_(mix)
        mix = mix / (self.n_freq + 1)
        self.mix = nn.Parameter(mix[:, :-1].contiguous())
        self.lin = nn.Parameter(mix[:, -1].contiguous())
        tail = () if self.degree is None else (self.degree + 1,)
        # zero kernels: the flow starts as the identity
        self.weight = nn.Parameter(torch.zeros(n_orbits, self.n_channels, self.n_time, *tail))
        self._aux: Tensor | None = None
        #: samples are integrated in chunks of at most this many sites (:meth:`integrate`; at
        #: least one sample): a stage's arrays, ``(F + C)`` floats and a few complex ones per
        #: site, then stay in cache; ``0`` integrates whole batches. Samples are independent, so
        #: the result does not depend on it
        self.chunk_sites = CHUNK_SITES

    def extra_repr(self) -> str:
        return (
            f"lattice_shape={self.lattice_shape}, n_freq={self.n_freq}, "
            f"n_channels={self.n_channels}, n_time={self.n_time}, int_steps={self.int_steps}, "
            f"integrator={self.integrator!r}, degree={self.degree}"
        )

    def _time_features(self, t: Tensor) -> Tensor:
        """``(T, n_time)``: 1, sin(2 pi k t), cos(2 pi k t) for k = 1..(n_time - 1) / 2."""
        k = torch.arange(1, (self.n_time - 1) // 2 + 1, dtype=t.dtype, device=t.device)
        arg = 2 * math.pi * t[:, None] * k
        return torch.cat([torch.ones_like(t)[:, None], torch.sin(arg), torch.cos(arg)], 1)

    def _kernels(self, times: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """The kernels at ``times (T,)`` as :class:`_Field` takes them: their Fourier transforms
        ``(T, C, Bk, *K)`` and their values at ``r = 0``, ``(T, Bk, C)``.

        A conditional layer's kernels are polynomials in the context: the ``degree + 1``
        coefficient kernels are transformed (``T (degree + 1) C`` FFTs) and combined per sample
        in Fourier space, instead of transforming ``T B C`` per-sample kernels."""
        tf = self._time_features(times)  # (T, n_time)
        basis = poly_basis(context, self.degree, self.weight)
        n_dims = len(self.lattice_shape)
        if basis is None:
            kw = torch.einsum("oct,Tt->Toc", self.weight, tf).unsqueeze(1)  # (T, 1, O, C)
            return _khat(kw[:, :, self.orbit].movedim(-1, 2), n_dims), kw[:, :, 0, :]
        kw = torch.einsum("octp,Tt->Tpoc", self.weight, tf)  # (T, P, O, C)
        khat_p = _khat(kw[:, :, self.orbit].movedim(-1, 2), n_dims)  # (T, C, P, *K)
        khat = torch.einsum("tcp...,bp->tcb...", khat_p, basis).contiguous()
        return khat, torch.einsum("tpc,bp->tbc", kw[:, :, 0, :], basis)

    def field(
        self, phi: Tensor, t: float, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The vector field and its divergence at time ``t``: ``(v (B, *L), div (B,))``."""
        khat, k0 = self._kernels(torch.tensor([float(t)], dtype=phi.dtype), context)
        return _Field.apply(phi, self.freq, self.mix, self.lin, khat[0], k0[0])

    def integrate(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        steps: int | None = None,
        reverse: bool = False,
        integrator: str | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""Integrate from ``t = 0`` to ``1`` (``reverse``: from 1 to 0) with fixed steps.

        Args:
            x: ``(B, *L)`` start configurations.
            context: ``(B,)`` normalised couplings of a conditional layer.
            steps: integration steps (default ``int_steps``).
            reverse: integrate backwards in time (the approximate inverse map).
            integrator: a name in :data:`TABLEAUS` (default the layer's).

        Returns:
            ``(x_end (B, *L), ell (B,))`` with ``ell`` the integrated divergence: the log
            determinant of the map in the direction of integration.
        """
        n = self.int_steps if steps is None else int(steps)
        tab = TABLEAUS[integrator or self.integrator]
        h = 1.0 / n
        nodes = torch.tensor(tab.c, dtype=x.dtype, device=x.device)
        times = ((torch.arange(n, dtype=x.dtype, device=x.device)[:, None] + nodes) * h).ravel()
        if reverse:
            times = 1.0 - times
        khat, k0 = self._kernels(times, context)  # every stage's kernels at once
        per_sample = k0.shape[1] > 1
        volume = math.prod(self.lattice_shape)
        size = max(1, self.chunk_sites // volume) if self.chunk_sites > 0 else x.shape[0]
        if x.shape[0] <= size:
            return self._integrate(x, khat, k0, tab, n, reverse)
        parts = []
        for start in range(0, x.shape[0], size):
            rows = slice(start, start + size)
            parts.append(self._integrate(
                x[rows], khat[:, :, rows] if per_sample else khat,
                k0[:, rows] if per_sample else k0, tab, n, reverse,
            ))  # fmt: skip
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _integrate(
        self, x: Tensor, khat: Tensor, k0: Tensor, tab: Tableau, n: int, reverse: bool
    ) -> tuple[Tensor, Tensor]:
        """The stage loop of :meth:`integrate` for one chunk of samples, with the stages'
        kernels ``khat (T, C, Bk, *K)`` and ``k0 (T, Bk, C)``."""
        # unbind (not indexing): the backward stacks the stages' gradients once instead of
        # scattering each into a full-size zero tensor
        khats, k0s = khat.unbind(0), k0.unbind(0)
        h = 1.0 / n
        sign = -1.0 if reverse else 1.0
        ell = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        n_stages = len(tab.c)
        for i in range(n):
            vs, ds = [], []
            for j in range(n_stages):
                y = x
                for aj, vj in zip(tab.a[j], vs):
                    if aj:
                        y = torch.add(y, vj, alpha=sign * h * aj)
                v, d = _Field.apply(y, self.freq, self.mix, self.lin,
                                    khats[i * n_stages + j], k0s[i * n_stages + j])  # fmt: skip
                vs.append(v)
                ds.append(d)
            for bj, vj, dj in zip(tab.b, vs, ds):
                if bj:
                    x = torch.add(x, vj, alpha=sign * h * bj)
                    ell = torch.add(ell, dj, alpha=h * bj)
        return x, ell

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Prior → field: ``(phi, log|det d phi/d z|)`` (the integrated divergence)."""
        phi, ell = self.integrate(z, context)
        if self.training and self.penalty > 0 and self.penalty_batch > 0 and (
            torch.is_grad_enabled()
        ):
            k = min(self.penalty_batch, z.shape[0])
            sub = None if context is None else context[:k]
            _, ell2 = self.integrate(z[:k], sub, steps=coprime_steps(self.int_steps))
            self._aux = self.penalty * (ell[:k] - ell2).pow(2).mean()
        return phi, ell

    def inverse(self, phi: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Field → prior by backward integration: ``(z, log|det dz/d phi|)``.

        This is the inverse of the *continuous* map; it inverts :meth:`forward` only up to the
        integration error (the round trip is measured by :func:`log_det_discrepancy`)."""
        z, ell = self.integrate(phi, context, reverse=True)
        return z, -ell

    def auxiliary_loss(self) -> Tensor | None:
        """The training penalty of the last forward pass in training mode (then cleared)."""
        aux, self._aux = self._aux, None
        return aux

    def resample_state(
        self,
        state: dict[str, Tensor],
        old_lattice_shape: Sequence[int],
        new_lattice_shape: Sequence[int],
    ) -> dict[str, Tensor]:
        """This layer's state on another lattice (the hook of
        :func:`flowmc.flows.flow.transfer_state_dict`).

        Kernel weights are carried by displacement: a displacement whose components all lie
        strictly inside half the old extents keeps the weight of its old orbit; longer ones
        (new to the larger lattice, or the old lattice's wrap-around shell) start at zero. The
        site features and the time dependence carry over unchanged.
        """
        old = tuple(int(s) for s in old_lattice_shape)
        new = tuple(int(s) for s in new_lattice_shape)
        if len(old) != len(new):
            raise ValueError(
                f"Expected lattices of the same dimension; got {old} and {new}"
            )
        old_orbit, n_old = displacement_orbits(old)
        new_orbit, n_new = displacement_orbits(new)
        w = state["weight"]
        if w.shape[0] != n_old:
            raise ValueError(
                f"Expected a weight with {n_old} orbits for lattice {old}; got {w.shape[0]}"
            )
        out = {k: v.clone() for k, v in state.items()}
        weight = torch.zeros((n_new, *w.shape[1:]), dtype=w.dtype)
        r = np.indices(new).reshape(len(new), -1).T
        folded = np.minimum(r, np.array(new) - r)
        inside = (2 * folded < np.array(old)).all(1)
        for rf, rn in zip(folded[inside], r[inside]):
            weight[new_orbit[tuple(rn)]] = w[old_orbit[tuple(rf)]]
        out["weight"] = weight
        return out


class Discrepancy(NamedTuple):
    """How far the carried log determinant is from converged, over a batch of samples.

    Attributes:
        steps: the integration steps ``N`` of the flow.
        sd: standard deviation over the samples of :math:`\\ell_N - \\ell_{2N}` (the part that
            can bias a Metropolis–Hastings chain; a constant part cancels in its ratios).
        mean: its mean.
        rms: its root mean square.
        max: its largest absolute value.
        round_trip: largest :math:`|z - \\Phi^{-1}_N(\\Phi_N(z))|` (backward integration).
        n: samples used.
    """

    steps: int
    sd: float
    mean: float
    rms: float
    max: float
    round_trip: float
    n: int


def log_det_discrepancy(
    layer: ContinuousFlow,
    z: Tensor,
    context: Tensor | None = None,
    *,
    steps: int | None = None,
) -> Discrepancy:
    r"""Compare the carried log determinant at ``N`` and ``2N`` steps on prior samples ``z``.

    For a method of order :math:`p` the error of :math:`\ell_N` is
    :math:`(\ell_N - \ell_{2N})\,2^p/(2^p - 1)` to leading order.

    Args:
        layer: the continuous-flow layer.
        z: ``(B, *L)`` inputs of the layer (prior samples pushed through the layers before it).
        context: ``(B,)`` context of a conditional layer.
        steps: ``N`` (default the layer's ``int_steps``).

    Returns:
        A :class:`Discrepancy`.
    """
    n = layer.int_steps if steps is None else int(steps)
    with torch.no_grad():
        phi, ell = layer.integrate(z, context, steps=n)
        _, ell2 = layer.integrate(z, context, steps=2 * n)
        back, _ = layer.integrate(phi, context, steps=n, reverse=True)
    d = (ell - ell2).double()
    sd = float(d.std()) if d.numel() > 1 else 0.0
    return Discrepancy(
        n, sd, float(d.mean()), float(d.pow(2).mean().sqrt()), float(d.abs().max()),
        float((back - z).abs().max()), int(z.shape[0]),
    )


def exact_log_det(
    layer: ContinuousFlow,
    x: Tensor,
    context: Tensor | None = None,
    *,
    steps: int | None = None,
) -> Tensor:
    r"""The exact :math:`\log|\det J|` of the discrete ``steps``-step map at each configuration,
    from the full Jacobian by autograd: ``V`` backward passes per configuration (use small
    lattices, or a few samples; float64 for a meaningful comparison with :math:`\ell_N`).

    Args:
        layer: the continuous-flow layer.
        x: ``(B, *L)`` inputs of the layer.
        context: ``(B,)`` context of a conditional layer.
        steps: ``N`` (default the layer's ``int_steps``).

    Returns:
        ``(B,)`` log determinants.
    """
    shape = tuple(x.shape[1:])
    out = []
    for b in range(x.shape[0]):
        ctx = None if context is None else context[b:b + 1]

        def fn(v: Tensor, ctx: Tensor | None = ctx) -> Tensor:
            return layer.integrate(v.view(1, *shape), ctx, steps=steps)[0].flatten()

        jac = torch.autograd.functional.jacobian(fn, x[b].flatten())
        out.append(torch.linalg.slogdet(jac).logabsdet.detach())
    return torch.stack(out)
