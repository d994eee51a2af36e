r"""Coupling layers with checkerboard masks.

Direction convention (used throughout flowmc): ``forward`` maps prior → field (the sampling
direction) and returns :math:`\log|\det \partial y/\partial x|`; ``inverse`` maps field → prior and
returns :math:`\log|\det \partial x/\partial y|`, the negative of the forward one at the same point.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flowmc.flows.nets import with_context

__all__ = ["checkerboard", "AffineCoupling"]


def checkerboard(lattice_shape: Sequence[int], parity: int) -> Tensor:
    """Checkerboard mask of the given parity, shape ``lattice_shape``.

    Sites where ``sum(coords) % 2 == parity`` get 1 (they are *transformed*); the others get 0
    (they are *frozen* and condition the transformation).

    Raises:
        ValueError: if an extent is odd (a checkerboard cannot tile a periodic odd extent).
    """
    shape = tuple(int(s) for s in lattice_shape)
    if any(s % 2 for s in shape):
        raise ValueError(
            f"Expected even lattice extents for checkerboard masks; got lattice_shape={shape}"
        )
    if parity not in (0, 1):
        raise ValueError(f"Expected parity 0 or 1; got {parity}")
    grids = torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij")
    return ((sum(grids) % 2) == parity).to(torch.get_default_dtype())


class AffineCoupling(nn.Module):
    r"""Affine coupling :math:`y = m\odot(x e^{s} + t) + (1-m)\odot x`, with
    :math:`(s, t) = \mathrm{net}((1-m)\odot x)`.

    The scale is soft-clipped, :math:`s = s_{max}\tanh(\hat s/s_{max})`, so a bad step can never
    produce an infinite Jacobian. With ``equivariant=True`` the layer commutes with
    :math:`\phi\to-\phi`: :math:`s` is made even and :math:`t` odd by evaluating the net on
    :math:`\pm x` (Z2 equivariant flow, cf. arXiv:2101.08176 sec. 5).

    Args:
        mask: ``(*L)`` tensor of 0/1, 1 = transformed sites.
        net: conditioner mapping ``(B, 1 + c, *L)`` to ``(B, 2, *L)`` (``c`` context channels,
            e.g. the coupling of a conditional flow, see :func:`flowmc.flows.nets.with_context`).
        s_max: bound on :math:`|s|` per layer.
        equivariant: symmetrise the conditioner for Z2 equivariance.
    """

    def __init__(
        self, mask: Tensor, net: nn.Module, s_max: float = 4.0, equivariant: bool = False
    ) -> None:
        super().__init__()
        self.register_buffer("mask", mask.clone())
        self.net = net
        self.s_max = float(s_max)
        self.equivariant = bool(equivariant)

    def _st(self, frozen: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.equivariant:
            ctx = None if context is None else torch.cat([context, context], 0)
            out = self.net(with_context(torch.cat([frozen, -frozen], 0), ctx))
            a, b = out.chunk(2, 0)
            raw_s = 0.5 * (a[:, 0] + b[:, 0])
            t = 0.5 * (a[:, 1] - b[:, 1])
        else:
            out = self.net(with_context(frozen, context))
            raw_s, t = out[:, 0], out[:, 1]
        s = self.s_max * torch.tanh(raw_s / self.s_max)
        return s * self.mask, t * self.mask

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s, t = self._st(x * (1 - self.mask), context)
        y = x * torch.exp(s) + t
        return y, s.flatten(1).sum(1)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s, t = self._st(y * (1 - self.mask), context)
        x = (y - t) * torch.exp(-s)
        return x, -s.flatten(1).sum(1)
