"""Periodic convolutional conditioners for coupling layers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PeriodicCNN", "ACTIVATIONS", "with_context", "Blur"]

#: The conditioners' activation functions by name.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "leaky_relu": nn.LeakyReLU,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
#: the memory format of the hidden activations: channels last, where torch has one (the
#: convolutions of a few channels are about twice as fast in it on CPU, and the channels of a
#: site are contiguous for the output layer's per-site matrix product)
_FORMAT = {2: torch.channels_last, 3: torch.channels_last_3d}


def _slab(ndim: int, axis: int, index: slice, pads: Sequence[int]) -> tuple[slice, ...]:
    """Index of ``index`` along spatial ``axis`` of a padded ``(N, C, *S)`` tensor, restricted
    to the interior along the spatial axes before it (the order in which :class:`_CircularPad`
    fills the halo)."""
    out = [slice(None)] * ndim
    for a in range(axis):
        out[2 + a] = slice(pads[a], -pads[a] or None)
    out[2 + axis] = index
    return tuple(out)


class _CircularPad(torch.autograd.Function):
    """Periodic padding into one preallocated buffer (channels last for 2-d and 3-d): the
    interior is copied once and only the halo slabs are filled; the backward folds the halo's
    gradient back onto the opposite edges. ``F.pad(x, mode="circular")`` computes the same
    values with more copies (and returns a contiguous tensor whatever the input's format)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, pads: tuple[int, ...]) -> Tensor:  # noqa: D102
        d = len(pads)
        shape = (*x.shape[:2], *(n + 2 * p for n, p in zip(x.shape[2:], pads)))
        fmt = _FORMAT.get(d, torch.contiguous_format)
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        out[(slice(None), slice(None), *(slice(p, -p or None) for p in pads))] = x
        for axis in reversed(range(d)):  # last axis first, over the interior of the earlier ones
            p, n = pads[axis], x.shape[2 + axis]
            if p:
                out[_slab(out.dim(), axis, slice(0, p), pads)] = (
                    out[_slab(out.dim(), axis, slice(n, n + p), pads)])  # fmt: skip
                out[_slab(out.dim(), axis, slice(n + p, n + 2 * p), pads)] = (
                    out[_slab(out.dim(), axis, slice(p, 2 * p), pads)])  # fmt: skip
        ctx.pads = pads
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        pads = ctx.pads
        g = g.clone()
        for axis in range(len(pads)):  # the adjoint of the forward's slab copies, in reverse
            p, n = pads[axis], g.shape[2 + axis] - 2 * pads[axis]
            if p:
                g[_slab(g.dim(), axis, slice(p, 2 * p), pads)] += (
                    g[_slab(g.dim(), axis, slice(n + p, n + 2 * p), pads)])  # fmt: skip
                g[_slab(g.dim(), axis, slice(n, n + p), pads)] += (
                    g[_slab(g.dim(), axis, slice(0, p), pads)])  # fmt: skip
        return g[(slice(None), slice(None), *(slice(p, -p or None) for p in pads))], None


def _activate(act: nn.Module, h: Tensor) -> Tensor:
    """``act(h)``, in place where autograd allows it (the backward of these needs only the
    result): ``h`` must be a temporary of the caller's."""
    if isinstance(act, nn.LeakyReLU) and act.negative_slope > 0:
        return F.leaky_relu(h, act.negative_slope, inplace=True)
    if isinstance(act, nn.ReLU):
        return torch.relu_(h)
    if isinstance(act, nn.Tanh):
        return h.tanh_()
    return act(h)


def circular_pad(x: Tensor, pads: Sequence[int]) -> Tensor:
    """Periodic padding of ``x (N, C, *S)`` by ``pads[a]`` sites on both sides of spatial axis
    ``a``; the values of ``F.pad(x, ..., mode="circular")``, returned channels last (2-d, 3-d)."""
    return _CircularPad.apply(x, tuple(int(p) for p in pads))


class PeriodicCNN(nn.Module):
    """A stack of d-dimensional convolutions with circular padding (periodic boundaries).

    Args:
        dim: lattice dimension d (1, 2 or 3).
        in_channels: input channels.
        out_channels: output channels.
        hidden: channels of the hidden layers, e.g. ``(8, 8)``.
        kernel_size: odd kernel size (the same on every axis).
        activation: name in :data:`ACTIVATIONS`, used between layers.
        zero_init: initialise the last layer to zero, so the coupling starts at the identity.
        bias: use biases (a Z2-odd net needs ``bias=False`` and an odd activation).
        out_kernel_size: kernel size of the output layer (default ``kernel_size``; 1 makes the
            widest layer a per-site linear map: cheaper, with a smaller receptive field).
    """

    def __init__(
        self,
        dim: int,
        in_channels: int,
        out_channels: int,
        hidden: Sequence[int] = (8, 8),
        kernel_size: int = 3,
        activation: str = "leaky_relu",
        zero_init: bool = True,
        bias: bool = True,
        out_kernel_size: int | None = None,
    ) -> None:
        super().__init__()
        out_kernel_size = kernel_size if out_kernel_size is None else int(out_kernel_size)
        if out_kernel_size < 1 or out_kernel_size % 2 == 0:
            raise ValueError(f"Expected an odd out_kernel_size >= 1; got {out_kernel_size}")
        if dim not in _CONV:
            raise ValueError(f"Expected lattice dimension 1, 2 or 3 for a CNN flow; got {dim}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"Expected an odd kernel_size >= 1; got {kernel_size}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"Expected activation in {sorted(ACTIVATIONS)}; got {activation!r}")
        conv = _CONV[dim]
        sizes = [in_channels, *hidden, out_channels]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(sizes[:-1], sizes[1:])):
            k = out_kernel_size if i == len(sizes) - 2 else kernel_size
            layers.append(
                conv(cin, cout, k, padding=k // 2, padding_mode="circular", bias=bias)
            )
            if i < len(sizes) - 2:
                layers.append(ACTIVATIONS[activation]())
        self.net = nn.Sequential(*layers)
        if zero_init:
            last = layers[-1]
            nn.init.zeros_(last.weight)
            if last.bias is not None:
                nn.init.zeros_(last.bias)

    def _conv(
        self, conv: nn.Module, h: Tensor, weight: Tensor, bias: Tensor | None,
        act: nn.Module | None = None,
    ) -> Tensor:
        """``conv`` with the given weight and bias, its circular padding by :func:`circular_pad`
        (the layers are built with stride 1, no dilation, one group), after the activation
        ``act`` of the previous layer: applied in place to the padded buffer (elementwise, so
        it commutes with the padding), or to ``h`` itself, a convolution's output."""
        pads = tuple(k // 2 for k in conv.kernel_size)
        if any(pads):
            h = circular_pad(h, pads)
        if act is not None:
            h = _activate(act, h)
        return _CONV_FN[len(pads)](h, weight, bias)

    def _trunk(self, x: Tensor) -> tuple[Tensor, nn.Module | None]:
        """Every layer but the output layer, hidden activations channels last (2-d, 3-d); the
        last activation is returned unapplied (``(h, act)``), for the caller to fuse."""
        *trunk, _ = self.net
        h, act = x, None
        for layer in trunk:
            if isinstance(layer, nn.modules.conv._ConvNd):
                h, act = self._conv(layer, h, layer.weight, layer.bias, act), None
            elif h is x:  # never in place on the caller's input
                h = layer(h)
            else:
                if act is not None:
                    h = _activate(act, h)
                act = layer
        return h, act

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, *L)`` → ``(B, out_channels, *L)``: the stack of circular-padding
        convolutions (``self.net``), evaluated with :func:`circular_pad`."""
        last = self.net[-1]
        h, act = self._trunk(x)
        return self._conv(last, h, last.weight, last.bias, act).contiguous()

    def forward_at(self, x: Tensor, sites: Tensor, pair_perm: Tensor | None = None) -> Tensor:
        r"""The output at some sites only, channels first: ``(out_channels, B, len(sites))``.

        ``forward(x).flatten(2)[:, :, sites].movedim(1, 0)``, computed more cheaply: a ``1x1``
        output layer runs as one matrix product at ``sites`` only, and every channel comes out
        as a contiguous plane over the samples and sites (what a per-site transformation with
        per-channel parameters vectorises over, :func:`flowmc.flows.splines.rq_spline_bins_first`).

        With ``pair_perm`` (a permutation of the output channels), ``x`` holds two batches
        ``[a; b]`` of ``B`` samples each and the result is
        :math:`\tfrac12[\mathrm{net}(a) + P\,\mathrm{net}(b)]` at the sites (``P`` permutes
        the channels): the symmetrised conditioner of a Z2-equivariant coupling. The output
        layer is linear, so both halves go through it at once, with the weight
        :math:`\tfrac12[W, PW]` on the stacked hidden channels.

        Args:
            x: ``(B, in_channels, *L)``, or ``(2B, ...)`` with ``pair_perm``.
            sites: ``(A,)`` flat indices of the wanted sites.
            pair_perm: ``(out_channels,)`` permutation, or ``None``.
        """
        last = self.net[-1]
        h, act = self._trunk(x)
        w, bias = last.weight, last.bias
        nb, ch = h.shape[:2]
        if pair_perm is not None:
            w = 0.5 * torch.cat([w, w[pair_perm]], 1)
            bias = None if bias is None else 0.5 * (bias + bias[pair_perm])
        if all(k == 1 for k in last.kernel_size):
            # (N, V, Ch) rows of the wanted sites (a view when h is channels last)
            hs = h.reshape(nb, ch, -1).transpose(1, 2).index_select(1, sites)
            if pair_perm is not None:  # both halves' hidden channels side by side
                hs = torch.cat([hs[: nb // 2], hs[nb // 2 :]], -1)
            if act is not None:  # on the gathered sites only
                hs = _activate(act, hs)
            hs = hs.reshape(-1, hs.shape[-1]).t()  # (Ch', B A)
            w = w.flatten(1)
            out = torch.mm(w, hs) if bias is None else torch.addmm(bias[:, None], w, hs)
            return out.view(-1, nb if pair_perm is None else nb // 2, sites.shape[0])
        if pair_perm is not None:
            h = torch.cat(h.chunk(2, 0), 1)
        out = self._conv(last, h, w, bias, act)  # (B, C, *L) channels last
        rows = out.movedim(1, -1).reshape(out.shape[0], -1, out.shape[1])  # (B, V, C)
        return rows.index_select(1, sites).permute(2, 0, 1).contiguous()


def with_context(x: Tensor, context: Tensor | None) -> Tensor:
    """Conditioner input: ``x (B, *L)`` as one channel, plus one constant channel per context
    variable (``context (B,)`` or ``(B, c)``); returns ``(B, 1 + c, *L)``."""
    x = x.unsqueeze(1)
    if context is None:
        return x
    ctx = context.reshape(x.shape[0], -1).to(x.dtype)
    planes = ctx.view(*ctx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.cat([x, planes], 1)


class Blur(nn.Module):
    r"""Smoothed copies of a field as extra conditioner channels: long-range information at the
    cost of one FFT pair.

    For each width :math:`s > 0` the channel is the field convolved (periodically) with a Gaussian
    of width :math:`s` sites, :math:`\tilde x(k)\,e^{-s^2\hat k^2/2}`; width ``0`` gives the field's
    mean (the zero mode) broadcast over the lattice. Linear and translation-equivariant, defined in
    lattice units (so the same widths work on every lattice size).

    Args:
        lattice_shape: lattice extents.
        widths: Gaussian widths in sites (0: the mean).
    """

    def __init__(self, lattice_shape: Sequence[int], widths: Sequence[float]) -> None:
        super().__init__()
        self.lattice_shape = tuple(int(n) for n in lattice_shape)
        self.widths = tuple(float(w) for w in widths)
        if any(w < 0 for w in self.widths):
            raise ValueError(f"Expected blur widths >= 0; got {self.widths}")
        grids = torch.meshgrid(
            *[torch.fft.fftfreq(n) * 2 * math.pi for n in self.lattice_shape[:-1]],
            torch.fft.rfftfreq(self.lattice_shape[-1]) * 2 * math.pi,
            indexing="ij",
        )
        khat2 = sum(4 * torch.sin(k / 2) ** 2 for k in grids)
        filters = [
            torch.exp(-0.5 * w * w * khat2) if w > 0 else (khat2 == 0).to(khat2.dtype)
            for w in self.widths
        ]
        self.register_buffer("filters", torch.stack(filters), persistent=False)
        self._dims = tuple(range(-len(self.lattice_shape), 0))

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, *L)`` → ``(B, len(widths), *L)``."""
        xk = torch.fft.rfftn(x, dim=self._dims).unsqueeze(1)
        out = torch.fft.irfftn(xk * self.filters.to(xk.real.dtype), s=self.lattice_shape,
                               dim=self._dims)
        return out.to(x.dtype)
