"""The flow passes as they were before the performance work of issue 20 item 4 (commit 08f4d17),
kept verbatim as the reference that tests/flows/test_equivalence.py holds the optimised code to.

Only the pieces that were rewritten live here: the rational-quadratic spline, the spline
coupling's conditioner evaluation and site gather, and the continuous flow's field and integrator.
Everything else (prior, momentum layers, the conv modules themselves) is the library's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flowmc.flows.cnf import TABLEAUS, ContinuousFlow
from flowmc.flows.flow import Flow
from flowmc.flows.nets import PeriodicCNN, with_context
from flowmc.flows.splines import SplineCoupling


def _knots(raw: Tensor, bound: float, min_size: float) -> Tensor:
    k = raw.shape[-1]
    size = min_size + (1 - min_size * k) * torch.softmax(raw, dim=-1)
    cum = F.pad(torch.cumsum(size, dim=-1), (1, 0))
    cum = 2 * bound * cum - bound
    return torch.cat([torch.full_like(cum[..., :1], -bound), cum[..., 1:-1],
                      torch.full_like(cum[..., :1], bound)], dim=-1)  # fmt: skip


def rq_spline(
    x: Tensor, raw_w: Tensor, raw_h: Tensor, raw_d: Tensor, *, bound: float = 4.0,
    inverse: bool = False, min_bin: float = 1e-3, min_deriv: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    shift = math.log(math.expm1(1 - min_deriv))
    xw = _knots(raw_w, bound, min_bin)
    yh = _knots(raw_h, bound, min_bin)
    d = min_deriv + F.softplus(raw_d + shift)
    one = torch.ones_like(d[..., :1])
    d = torch.cat([one, d, one], dim=-1)
    inside = (x > -bound) & (x < bound)
    xc = x.clamp(-bound, bound)
    knots = yh if inverse else xw
    idx = torch.searchsorted(knots[..., 1:-1].contiguous(), xc.unsqueeze(-1).contiguous(),
                             right=True)  # fmt: skip

    def gather(t: Tensor) -> Tensor:
        return torch.gather(t, -1, idx).squeeze(-1)

    idx1 = idx + 1
    x0, x1 = gather(xw), torch.gather(xw, -1, idx1).squeeze(-1)
    y0, y1 = gather(yh), torch.gather(yh, -1, idx1).squeeze(-1)
    d0, d1 = gather(d), torch.gather(d, -1, idx1).squeeze(-1)
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


def _spline_input(layer: SplineCoupling, frozen: Tensor, context: Tensor | None) -> Tensor:
    x = with_context(frozen, context)
    if layer.blur is None:
        return x
    return torch.cat([x[:, :1], layer.blur(frozen), x[:, 1:]], 1)


def _spline_params(layer: SplineCoupling, frozen: Tensor, context: Tensor | None) -> Tensor:
    # a PeriodicCNN's conv stack itself (torch's circular-padding convolutions)
    net = layer.net.net if isinstance(layer.net, PeriodicCNN) else layer.net
    if not layer.equivariant:
        return net(_spline_input(layer, frozen, context))
    ctx = None if context is None else torch.cat([context, context], 0)
    both = net(_spline_input(layer, torch.cat([frozen, -frozen], 0), ctx))
    plus, minus = both.chunk(2, 0)
    k = layer.n_bins
    mirrored = torch.cat(
        [minus[:, :k].flip(1), minus[:, k : 2 * k].flip(1), minus[:, 2 * k :].flip(1)], 1
    )
    return 0.5 * (plus + mirrored)


def spline_transform(
    layer: SplineCoupling, x: Tensor, inverse: bool, context: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The old ``SplineCoupling._transform``."""
    k = layer.n_bins
    frozen = x * (1 - layer.mask)
    params = _spline_params(layer, frozen, context)
    bsz = x.shape[0]
    active = torch.nonzero(layer.mask.flatten() > 0).flatten()
    params = params.flatten(2).index_select(2, active).transpose(1, 2)
    flat = x.flatten(1)
    xa = flat.index_select(1, active)
    ya, ld = rq_spline(xa, params[..., :k], params[..., k : 2 * k], params[..., 2 * k :],
                       bound=layer.bound, inverse=inverse)  # fmt: skip
    out = flat.index_copy(1, active, ya)
    return out.view_as(x), ld.reshape(bsz, -1).sum(1)


class Field(torch.autograd.Function):
    """The old ``_Field`` (real-space kernels in, the kernel's rfft taken per call)."""

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any, phi: Tensor, freq: Tensor, mix: Tensor, lin: Tensor, kernel: Tensor, k0: Tensor
    ) -> tuple[Tensor, Tensor]:
        shape, dims = phi.shape[1:], tuple(range(-phi.dim() + 1, 0))
        b, n_ch = phi.shape[0], mix.shape[0]
        x = phi.reshape(-1, 1) * freq
        g = torch.addmm(phi.reshape(-1, 1) * lin, torch.sin(x), mix.t())
        g = g.reshape(b, -1, n_ch).transpose(1, 2).reshape(b, n_ch, *shape)
        khat = torch.fft.rfftn(kernel, dim=dims).real
        v = torch.fft.irfftn((torch.fft.rfftn(g, dim=dims) * khat).sum(1), s=shape, dim=dims)
        csum = torch.cos(x).reshape(b, -1, freq.shape[0]).sum(1)
        a = k0 @ (mix * freq)
        div = (csum * a).sum(1) + phi[0].numel() * (k0 @ lin)
        ctx.save_for_backward(phi, freq, mix, lin, khat, k0)
        return v, div

    @staticmethod
    def backward(ctx: Any, gv: Tensor, gdiv: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        phi, freq, mix, lin, khat, k0 = ctx.saved_tensors
        shape, dims = phi.shape[1:], tuple(range(-phi.dim() + 1, 0))
        b, (n_ch, n_f), volume = phi.shape[0], mix.shape, phi[0].numel()
        per_sample = k0.shape[0] > 1
        phif = phi.reshape(b, -1, 1)
        x = phif * freq
        s, c = torch.sin(x), torch.cos(x)
        g = torch.baddbmm(phif * lin, s, mix.t().expand(b, n_f, n_ch))
        gvh = torch.fft.rfftn(gv, dim=dims).unsqueeze(1)
        gg = torch.fft.irfftn(gvh * khat, s=shape, dim=dims).reshape(b, n_ch, -1)
        gh = torch.fft.rfftn(g.transpose(1, 2).reshape(b, n_ch, *shape), dim=dims)
        prod = gvh * gh.conj()
        gkernel = torch.fft.irfftn(prod if per_sample else prod.sum(0, keepdim=True),
                                   s=shape, dim=dims)  # fmt: skip
        p = torch.bmm(gg.transpose(1, 2), mix.expand(b, n_ch, n_f)) * c
        gphi = p @ freq + gg.transpose(1, 2) @ lin
        gmix = torch.einsum("bcv,bvf->cf", gg, s)
        glin = torch.einsum("bcv,bv->c", gg, phif.squeeze(-1))
        pphi = (p * phif).sum(1)
        a = k0 @ (mix * freq)
        af = a * freq
        sa = torch.bmm(s, af.unsqueeze(-1)).squeeze(-1) if per_sample else s @ af[0]
        gphi = gphi - gdiv[:, None] * sa
        sphi = (s * phif).sum(1)
        ga = gdiv[:, None] * c.sum(1)
        gfreq = pphi.sum(0) - (gdiv[:, None] * a * sphi).sum(0)
        if not per_sample:
            ga = ga.sum(0, keepdim=True)
        gfreq = gfreq + (ga * (k0 @ mix)).sum(0)
        gmix = gmix + k0.t() @ (ga * freq)
        gdiv_k = gdiv[:, None] if per_sample else gdiv.sum().reshape(1, 1)
        gk0 = (ga * freq) @ mix.t() + volume * gdiv_k * lin
        glin = glin + volume * (gdiv_k * k0).sum(0)
        return gphi.reshape(phi.shape), gfreq, gmix, glin, gkernel, gk0


def kernels(layer: ContinuousFlow, times: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
    """The old ``ContinuousFlow._kernels``: real-space kernels ``(T, Bk, C, *L)`` (one per sample
    for a conditional layer) and ``(T, Bk, C)``."""
    tf = layer._time_features(times)
    basis = None if layer.degree is None else torch.stack(
        [context.reshape(-1).to(layer.weight.dtype) ** p for p in range(layer.degree + 1)], 1)
    if basis is None:
        kw = torch.einsum("oct,Tt->Toc", layer.weight, tf).unsqueeze(1)
    else:
        kw = torch.einsum("octp,Tt,bp->Tboc", layer.weight, tf, basis)
    kernel = kw[:, :, layer.orbit]
    return kernel.movedim(-1, 2), kw[:, :, 0, :]


def integrate(
    layer: ContinuousFlow, x: Tensor, context: Tensor | None = None, *, steps: int | None = None,
    reverse: bool = False, integrator: str | None = None,
) -> tuple[Tensor, Tensor]:
    """The old ``ContinuousFlow.integrate``."""
    n = layer.int_steps if steps is None else int(steps)
    tab = TABLEAUS[integrator or layer.integrator]
    h = 1.0 / n
    nodes = torch.tensor(tab.c, dtype=x.dtype, device=x.device)
    times = ((torch.arange(n, dtype=x.dtype, device=x.device)[:, None] + nodes) * h).ravel()
    if reverse:
        times = 1.0 - times
    kernel, k0 = kernels(layer, times, context)
    sign = -1.0 if reverse else 1.0
    ell = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    n_stages = len(tab.c)
    for i in range(n):
        vs, ds = [], []
        for j in range(n_stages):
            y = x
            for aj, vj in zip(tab.a[j], vs):
                if aj:
                    y = y + (sign * h * aj) * vj
            v, d = Field.apply(y, layer.freq, layer.mix, layer.lin,
                               kernel[i * n_stages + j], k0[i * n_stages + j])  # fmt: skip
            vs.append(v)
            ds.append(d)
        for bj, vj, dj in zip(tab.b, vs, ds):
            if bj:
                x = x + (sign * h * bj) * vj
                ell = ell + (h * bj) * dj
    return x, ell


def _layer_map(layer: torch.nn.Module, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    if isinstance(layer, SplineCoupling):
        return spline_transform(layer, x, inverse)
    if isinstance(layer, ContinuousFlow):
        y, ell = integrate(layer, x, reverse=inverse)
        return y, (-ell if inverse else ell)
    return layer.inverse(x) if inverse else layer(x)


def log_prob(flow: Flow, phi: Tensor) -> Tensor:
    """``flow.log_prob`` with the reference layers (unconditional flows)."""
    log_det = torch.zeros(phi.shape[0], dtype=phi.dtype)
    x = phi
    for layer in reversed(flow.layers):
        x, ld = _layer_map(layer, x, True)
        log_det = log_det + ld
    return flow.prior.log_prob(x) + log_det


def forward(flow: Flow, z: Tensor) -> tuple[Tensor, Tensor]:
    """``flow(z)`` with the reference layers (unconditional flows)."""
    log_det = torch.zeros(z.shape[0], dtype=z.dtype)
    x = z
    for layer in flow.layers:
        x, ld = _layer_map(layer, x, False)
        log_det = log_det + ld
    return x, log_det
