"""Periodic convolutional conditioners for coupling layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["PeriodicCNN", "ACTIVATIONS", "with_context"]

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
    ) -> None:
        super().__init__()
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
            layers.append(
                conv(
                    cin,
                    cout,
                    kernel_size,
                    padding=kernel_size // 2,
                    padding_mode="circular",
                    bias=bias,
                )
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
