r"""Rational-quadratic spline couplings with linear tails (checkerboard masks).

Each transformed site is mapped by a monotone rational-quadratic spline on :math:`[-B, B]` with
:math:`K` bins whose widths, heights and interior knot derivatives come from a periodic CNN of the
frozen sites; outside :math:`[-B, B]` the map is the identity (linear tails, boundary derivatives
fixed to 1), so the layer is a bijection of :math:`\mathbb{R}` per site with an exact,
elementwise log-determinant. With the last conditioner layer zero-initialised the spline starts
as the identity (uniform bins, unit derivatives).

Direction convention as in :mod:`flowmc.flows.couplings`: ``forward`` is prior → field.

References:
    Durkan, Bekasov, Murray, Papamakarios, "Neural Spline Flows", arXiv:1906.04032;
    Gregory and Delp, "Piecewise rational quadratic interpolation" (1982).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowmc.flows.nets import PeriodicCNN, with_context

__all__ = ["rq_spline", "rq_spline_bins_first", "SplineCoupling", "CHUNK_SITES"]

#: default :attr:`SplineCoupling.chunk_sites`: 32768 sites (128 samples at L = 16, 32 at L = 32;
#: the Z2-equivariant conditioner sees twice that). On the reference CPU (one thread) sampling the
#: default flow in whole batches of 256 was 1.2x (L = 16) and 1.7x (L = 32) slower
#: (memory-bound), and chunks of 16 samples slower again (per-call overhead)
CHUNK_SITES = 32768


def _knots(raw: Tensor, bound: float, min_size: float) -> Tensor:
    """Cumulative knot positions ``(K+1, ...)`` from unnormalised bin sizes ``(K, ...)`` (bins
    first: every bin is a plane, so softmax and cumsum run over contiguous planes)."""
    k = raw.shape[0]
    # in place where autograd allows (neither product with a number nor cumsum keeps its output)
    size = torch.softmax(raw, dim=0).mul(1 - min_size * k).add_(min_size)
    interior = torch.cumsum(size[:-1], dim=0).mul_(2 * bound).sub_(bound)
    # the end points exactly (cumsum rounding)
    end = torch.full_like(interior[:1], bound)
    return torch.cat([-end, interior, end], dim=0)


def rq_spline(
    x: Tensor,
    raw_w: Tensor,
    raw_h: Tensor,
    raw_d: Tensor,
    *,
    bound: float = 4.0,
    inverse: bool = False,
    min_bin: float = 1e-3,
    min_deriv: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    r"""Monotone rational-quadratic spline on :math:`[-B, B]`, identity outside.

    Args:
        x: ``(...)`` inputs (outputs of the spline when ``inverse=True``).
        raw_w: ``(..., K)`` unnormalised bin widths.
        raw_h: ``(..., K)`` unnormalised bin heights.
        raw_d: ``(..., K-1)`` unconstrained interior knot derivatives (``0`` gives 1).
        bound: half-width :math:`B` of the spline interval.
        inverse: evaluate the inverse map.
        min_bin: smallest bin width/height as a fraction of :math:`2B`.
        min_deriv: smallest knot derivative.

    Returns:
        ``(y, log_det)``, both shaped like ``x``: the elementwise map and
        :math:`\log|dy/dx|` (of the map actually applied: forward or inverse).
    """
    return rq_spline_bins_first(
        x, raw_w.movedim(-1, 0), raw_h.movedim(-1, 0), raw_d.movedim(-1, 0), bound=bound,
        inverse=inverse, min_bin=min_bin, min_deriv=min_deriv,
    )


def rq_spline_bins_first(
    x: Tensor,
    raw_w: Tensor,
    raw_h: Tensor,
    raw_d: Tensor,
    *,
    bound: float = 4.0,
    inverse: bool = False,
    min_bin: float = 1e-3,
    min_deriv: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """:func:`rq_spline` with the bins as the *first* dimension of the parameters:
    ``raw_w, raw_h (K, ...)``, ``raw_d (K-1, ...)``. With contiguous per-bin planes (what a
    coupling's conditioner produces) every step is a vectorised pass over the sites: torch's CPU
    softmax over a short last dim is about 10x slower than over a leading one, and the bin
    search is a count over planes instead of ``searchsorted`` + ``gather`` along a short dim."""
    shift = math.log(math.expm1(1 - min_deriv))  # softplus(0 + shift) + min_deriv == 1
    xw = _knots(raw_w, bound, min_bin)
    yh = _knots(raw_h, bound, min_bin)
    d = F.softplus(raw_d + shift).add_(min_deriv)  # softplus' backward needs only its input
    one = torch.ones_like(d[:1])
    d = torch.cat([one, d, one], dim=0)  # linear tails: unit slope at the boundaries

    inside = (x > -bound) & (x < bound)
    xc = x.clamp(-bound, bound)
    knots = yh if inverse else xw
    # bin index: number of interior knots <= x (what searchsorted(..., right=True) returns)
    idx = (knots[1:-1] <= xc).sum(0, keepdim=True)
    idx = torch.cat([idx, idx + 1]).expand(2, *xw.shape[1:])  # both ends of the bin

    x0, x1 = torch.gather(xw, 0, idx).unbind(0)
    y0, y1 = torch.gather(yh, 0, idx).unbind(0)
    d0, d1 = torch.gather(d, 0, idx).unbind(0)
    w, h = x1 - x0, y1 - y0
    s = h / w
    if not inverse:
        xi = (xc - x0) / w
        om = xi * (1 - xi)
        den = s + (d1 + d0 - 2 * s) * om
        y = y0 + h * (s * xi * xi + d0 * om) / den
        dnum = s * s * (d1 * xi * xi + 2 * s * om + d0 * (1 - xi) ** 2)
        log_det = torch.log(dnum) - 2 * torch.log(den)
    else:
        dy = xc - y0
        a = h * (s - d0) + dy * (d1 + d0 - 2 * s)
        b = h * d0 - dy * (d1 + d0 - 2 * s)
        c = -s * dy
        disc = (b * b - 4 * a * c).clamp_min(0)
        xi = (2 * c) / (-b - torch.sqrt(disc))
        y = x0 + xi * w
        om = xi * (1 - xi)
        den = s + (d1 + d0 - 2 * s) * om
        dnum = s * s * (d1 * xi * xi + 2 * s * om + d0 * (1 - xi) ** 2)
        log_det = -(torch.log(dnum) - 2 * torch.log(den))
    y = torch.where(inside, y, x)
    log_det = torch.where(inside, log_det, torch.zeros_like(log_det))
    return y, log_det


class SplineCoupling(nn.Module):
    r"""Checkerboard coupling whose transformed sites go through a rational-quadratic spline.

    :math:`y = m\odot g_\theta(x) + (1-m)\odot x` with :math:`\theta = \mathrm{net}((1-m)\odot x)`
    and :math:`g_\theta` the spline of :func:`rq_spline` (identity outside :math:`[-B, B]`).

    With ``equivariant=True`` the layer commutes with :math:`\phi\to-\phi`: the spline
    parameters are symmetrised so that :math:`g_{\theta(-c)}(-x) = -g_{\theta(c)}(x)` (see
    :meth:`_params`); the conditioner then runs on :math:`\pm c`, twice the cost.

    Args:
        mask: ``(*L)`` tensor of 0/1, 1 = transformed sites.
        net: conditioner mapping ``(B, 1 + c, *L)`` to ``(B, 3K-1, *L)`` (``c`` context
            channels of a conditional flow, see :func:`flowmc.flows.nets.with_context`).
        n_bins: number of spline bins :math:`K`.
        bound: half-width :math:`B` of the spline interval.
        equivariant: make the layer :math:`\mathbb{Z}_2` equivariant (see above).
        blur: optional :class:`flowmc.flows.nets.Blur`; its smoothed copies of the frozen sites are
            extra conditioner channels (after the field, before the context).

    Raises:
        ValueError: if ``n_bins < 2`` or ``bound <= 0``.
    """

    def __init__(
        self, mask: Tensor, net: nn.Module, n_bins: int = 8, bound: float = 4.0,
        equivariant: bool = False,
        blur: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if n_bins < 2:
            raise ValueError(f"Expected n_bins >= 2; got {n_bins}")
        if not bound > 0:
            raise ValueError(f"Expected bound > 0; got {bound}")
        self.register_buffer("mask", mask.clone())
        self.register_buffer(
            "active", torch.nonzero(mask.flatten() > 0).flatten(), persistent=False
        )
        self.net = net
        self.n_bins = int(n_bins)
        self.bound = float(bound)
        self.equivariant = bool(equivariant)
        self.blur = blur
        k = self.n_bins  # the mirror R of a spline's parameters (see _params), as a permutation
        mirror = torch.cat([torch.arange(k).flip(0), torch.arange(k, 2 * k).flip(0),
                            torch.arange(2 * k, 3 * k - 1).flip(0)])  # fmt: skip
        self.register_buffer("mirror", mirror, persistent=False)
        #: samples are transformed in chunks of at most this many sites (at least one sample),
        #: so the conditioner's activations stay in cache; ``0``: whole batches
        self.chunk_sites = CHUNK_SITES

    def _input(self, frozen: Tensor, context: Tensor | None) -> Tensor:
        """Conditioner input: the frozen sites, smoothed copies (``blur``) and the context."""
        x = with_context(frozen, context)
        if self.blur is None:
            return x
        return torch.cat([x[:, :1], self.blur(frozen), x[:, 1:]], 1)

    def _params(self, frozen: Tensor, context: Tensor | None) -> Tensor:
        r"""Spline parameters ``(B, 3K-1, *L)`` from the frozen sites; Z2-symmetrised if asked:
        :math:`\theta(c) = \frac12[\mathrm{net}(c) + R\,\mathrm{net}(-c)]`, with :math:`R` the
        mirror :math:`x\to-x` of a spline (bin widths, heights and knot derivatives reversed),
        so :math:`\theta(-c) = R\theta(c)` and :math:`g_{\theta(-c)}(-x) = -g_{\theta(c)}(x)`."""
        if not self.equivariant:
            return self.net(self._input(frozen, context))
        ctx = None if context is None else torch.cat([context, context], 0)
        both = self.net(self._input(torch.cat([frozen, -frozen], 0), ctx))
        plus, minus = both.chunk(2, 0)
        k = self.n_bins
        mirrored = torch.cat(
            [minus[:, :k].flip(1), minus[:, k : 2 * k].flip(1), minus[:, 2 * k :].flip(1)], 1
        )
        return 0.5 * (plus + mirrored)

    def _active_params(self, frozen: Tensor, context: Tensor | None) -> Tensor:
        """The spline parameters at the transformed sites, ``(3K-1, B, A)`` (channels first).

        A :class:`~flowmc.flows.nets.PeriodicCNN` conditioner evaluates its output layer at
        those sites only (:meth:`~flowmc.flows.nets.PeriodicCNN.forward_at`), the Z2
        symmetrisation folded into it; the input's smoothed copies of :math:`-c` are the
        negated ones of :math:`c` (the blur is linear). Any other conditioner goes through
        :meth:`_params`. Both give :meth:`_params` at the active sites (up to rounding)."""
        if not isinstance(self.net, PeriodicCNN):
            params = self._params(frozen, context)  # (B, 3K-1, *L)
            return params.flatten(2).index_select(2, self.active).movedim(1, 0)
        if not self.equivariant:
            return self.net.forward_at(self._input(frozen, context), self.active)
        field = frozen.unsqueeze(1)
        if self.blur is not None:
            field = torch.cat([field, self.blur(frozen)], 1)
        both = torch.cat([field, -field], 0)  # the conditioner's input at +c and -c
        if context is not None:
            ctx = context.reshape(frozen.shape[0], -1).to(both.dtype).repeat(2, 1)
            planes = ctx.view(*ctx.shape, *([1] * (frozen.dim() - 1))).expand(
                -1, -1, *frozen.shape[1:]
            )
            both = torch.cat([both, planes], 1)
        return self.net.forward_at(both, self.active, pair_perm=self.mirror)

    def _transform(
        self, x: Tensor, inverse: bool, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        k = self.n_bins
        params = self._active_params(x * (1 - self.mask), context)  # (3K-1, B, A)
        flat = x.flatten(1)
        ya, ld = rq_spline_bins_first(
            flat.index_select(1, self.active),
            params[:k],
            params[k : 2 * k],
            params[2 * k :],
            bound=self.bound,
            inverse=inverse,
        )
        out = flat.index_copy(1, self.active, ya)
        return out.view_as(x), ld.sum(1)

    def _chunked(
        self, x: Tensor, inverse: bool, context: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """:meth:`_transform` over chunks of at most :attr:`chunk_sites` sites (samples are
        independent)."""
        n = x.shape[0]
        size = max(1, self.chunk_sites // x[0].numel()) if self.chunk_sites > 0 else n
        if n <= size:
            return self._transform(x, inverse, context)
        parts = [
            self._transform(x[i : i + size], inverse,
                            None if context is None else context[i : i + size])
            for i in range(0, n, size)
        ]  # fmt: skip
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._chunked(x, False, context)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._chunked(y, True, context)
