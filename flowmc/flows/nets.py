"""Periodic convolutional conditioners for coupling layers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
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

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


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
