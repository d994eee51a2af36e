r"""Prior distributions for flows: i.i.d. Gaussian per lattice site."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flowmc.lattice.action import check_field

__all__ = ["GaussianPrior"]


class GaussianPrior(nn.Module):
    r"""i.i.d. :math:`N(0, \sigma^2)` on every site.

    Args:
        lattice_shape: lattice extents ``(L_1, ..., L_d)``.
        sigma: standard deviation per site (> 0). (The seed notebook passed the variance where
            torch expects the standard deviation; here it is the standard deviation.)
    """

    def __init__(self, lattice_shape: Sequence[int], sigma: float = 1.0) -> None:
        super().__init__()
        sigma = float(sigma)
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"Expected prior sigma > 0; got {sigma}")
        self.lattice_shape = tuple(int(s) for s in lattice_shape)
        self.sigma = sigma
        # a buffer only to follow the module's device/dtype
        self.register_buffer("_ref", torch.zeros(()), persistent=False)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` configurations, shape ``(n, *L)``."""
        z = torch.randn(
            (n, *self.lattice_shape),
            generator=generator,
            device=self._ref.device,
            dtype=self._ref.dtype,
        )
        return z * self.sigma

    def log_prob(self, z: Tensor) -> Tensor:
        """Log density, shape ``(B,)``."""
        check_field(z, self.lattice_shape, "z")
        vol = z[0].numel()
        return -0.5 * (z / self.sigma).pow(2).flatten(1).sum(1) - vol * (
            math.log(self.sigma) + 0.5 * math.log(2 * math.pi)
        )
