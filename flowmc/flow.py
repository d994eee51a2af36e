r"""Normalizing flows: a prior pushed through a stack of coupling layers.

.. math::

    q(\phi) = r(z)\,\Big|\det\frac{\partial f(z)}{\partial z}\Big|^{-1},\qquad \phi = f(z),

so :math:`\log q(\phi) = \log r(z) - \sum_l \log|\det J_l|`. ``forward`` is prior → field.

References:
    Albergo, Kanwar, Shanahan, arXiv:1904.12072; Albergo et al., arXiv:2101.08176.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import Tensor, nn

from flowmc.action import check_field
from flowmc.couplings import AffineCoupling, checkerboard
from flowmc.nets import PeriodicCNN
from flowmc.prior import GaussianPrior
from flowmc.spectral import MomentumScaling, ZeroModeSpline
from flowmc.splines import SplineCoupling

__all__ = ["Flow", "FlowConfig", "build_flow", "Z2SymmetricFlow", "transfer_state_dict"]


@dataclass(frozen=True)
class FlowConfig:
    """Architecture of a coupling flow; stored in every checkpoint.

    Attributes:
        lattice_shape: lattice extents (all even).
        n_layers: number of coupling layers (parities alternate).
        hidden: hidden channels of each conditioner CNN.
        kernel_size: odd convolution kernel size.
        activation: conditioner activation name.
        coupling: ``"affine"``.
        equivariant: make every layer commute with phi -> -phi.
        s_max: bound on the per-layer log-scale.
        prior_sigma: standard deviation of the i.i.d. Gaussian prior.
        momentum: put a :class:`~flowmc.spectral.MomentumScaling` layer first (learned
            :math:`\sigma(k)` per momentum orbit: the Gaussian long-distance part).
        zero_mode_bins: bins of an odd :class:`~flowmc.spectral.ZeroModeSpline` of the
            magnetisation (0: none); ``extra`` may set ``zero_mode_bound`` (default 1.5) and
            ``zero_mode_position`` (``"first"``: after the momentum layer, default; ``"last"``).
        extra: coupling-specific settings (spline: ``n_bins``, ``spline_bound``).
    """

    lattice_shape: tuple[int, ...]
    n_layers: int = 16
    hidden: tuple[int, ...] = (8, 8)
    kernel_size: int = 3
    activation: str = "leaky_relu"
    coupling: str = "affine"
    equivariant: bool = False
    s_max: float = 4.0
    prior_sigma: float = 1.0
    momentum: bool = False
    zero_mode_bins: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lattice_shape", tuple(int(s) for s in self.lattice_shape))
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.n_layers < 1:
            raise ValueError(f"Expected n_layers >= 1; got {self.n_layers}")
        if self.coupling not in COUPLINGS:
            raise ValueError(f"Expected coupling in {sorted(COUPLINGS)}; got {self.coupling!r}")
        if self.zero_mode_bins < 0 or self.zero_mode_bins == 1:
            raise ValueError(f"Expected zero_mode_bins 0 or >= 2; got {self.zero_mode_bins}")
        if self.extra.get("zero_mode_position", "first") not in ("first", "last"):
            raise ValueError(
                "Expected extra['zero_mode_position'] 'first' or 'last'; got "
                f"{self.extra['zero_mode_position']!r}"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lattice_shape"] = list(self.lattice_shape)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FlowConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"Unknown FlowConfig keys: {sorted(unknown)}")
        return cls(**d)


def _affine_layer(cfg: FlowConfig, parity: int) -> nn.Module:
    net = PeriodicCNN(
        len(cfg.lattice_shape),
        1,
        2,
        cfg.hidden,
        cfg.kernel_size,
        cfg.activation,
    )
    return AffineCoupling(
        checkerboard(cfg.lattice_shape, parity), net, s_max=cfg.s_max, equivariant=cfg.equivariant
    )


def _spline_layer(cfg: FlowConfig, parity: int) -> nn.Module:
    """Rational-quadratic spline coupling; ``cfg.extra`` may set ``n_bins`` and ``spline_bound``.

    ``cfg.equivariant`` gives the sign-canonicalised Z2-equivariant spline coupling."""
    n_bins = int(cfg.extra.get("n_bins", 8))
    net = PeriodicCNN(
        len(cfg.lattice_shape), 1, 3 * n_bins - 1, cfg.hidden, cfg.kernel_size, cfg.activation
    )
    return SplineCoupling(
        checkerboard(cfg.lattice_shape, parity),
        net,
        n_bins=n_bins,
        bound=float(cfg.extra.get("spline_bound", 4.0)),
        equivariant=cfg.equivariant,
    )


#: coupling name -> factory(config, parity) -> layer; other modules may register more.
COUPLINGS = {"affine": _affine_layer, "spline": _spline_layer}


class Flow(nn.Module):
    """A normalizing flow: ``prior`` then ``layers`` (prior → field).

    Args:
        prior: a prior with ``sample(n, generator=)`` and ``log_prob(z)``.
        layers: bijections with ``forward(x) -> (y, log_det)`` and ``inverse(y) -> (x, log_det)``.
        config: the :class:`FlowConfig` that built it (kept for checkpoints).
    """

    def __init__(
        self, prior: GaussianPrior, layers: Sequence[nn.Module], config: FlowConfig | None = None
    ) -> None:
        super().__init__()
        self.prior = prior
        self.layers = nn.ModuleList(layers)
        self.config = config
        self.lattice_shape = prior.lattice_shape

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Map prior samples to fields; returns ``(phi, log|det d phi/d z|)``."""
        log_det = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        x = z
        for layer in self.layers:
            x, ld = layer(x)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, phi: Tensor) -> tuple[Tensor, Tensor]:
        """Map fields to prior space; returns ``(z, log|det d z/d phi|)``."""
        log_det = torch.zeros(phi.shape[0], dtype=phi.dtype, device=phi.device)
        x = phi
        for layer in reversed(self.layers):
            x, ld = layer.inverse(x)
            log_det = log_det + ld
        return x, log_det

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` fields with their exact log density: ``(phi (n, *L), log_q (n,))``."""
        z = self.prior.sample(n, generator=generator)
        phi, log_det = self(z)
        return phi, self.prior.log_prob(z) - log_det

    sample_and_log_prob = sample

    def log_prob(self, phi: Tensor) -> Tensor:
        """Exact :math:`\\log q(\\phi)`, shape ``(B,)``."""
        check_field(phi, self.lattice_shape)
        z, log_det = self.inverse(phi)
        return self.prior.log_prob(z) + log_det


class Z2SymmetricFlow(nn.Module):
    r"""The symmetrised proposal :math:`q_s(\phi) = \tfrac12[q(\phi) + q(-\phi)]`.

    Sampling draws from ``flow`` and flips the sign with probability ½; the density is exact for
    any flow (a mixture of two normalised densities). Use it whenever the target is Z2 symmetric,
    so a flow that collapsed onto one of the two modes :math:`\pm\phi` still proposes both.

    Args:
        flow: the underlying :class:`Flow`.
    """

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow
        self.lattice_shape = flow.lattice_shape
        self.config = flow.config

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        phi, log_q = self.flow.sample(n, generator=generator)
        # q_s(+-phi) = [q(phi) + q(-phi)] / 2 whichever sign is kept: one term is known
        log_q_sym = torch.logaddexp(log_q, _mirror(self.flow.log_prob(-phi))) - math.log(2.0)
        u = torch.rand(n, generator=generator, device=phi.device, dtype=phi.dtype)
        sign = torch.where(u < 0.5, -1.0, 1.0).to(phi.dtype)
        return phi * sign.view(-1, *([1] * len(self.lattice_shape))), log_q_sym

    sample_and_log_prob = sample

    def log_prob(self, phi: Tensor) -> Tensor:
        return (
            torch.logaddexp(self.flow.log_prob(phi), _mirror(self.flow.log_prob(-phi)))
            - math.log(2.0)
        )


def _mirror(log_q: Tensor) -> Tensor:
    """The mirror term q(-phi) of a collapsed flow can underflow to NaN (-inf arithmetic) in
    float32; its true value is then negligible, so count it as zero density, not as an error."""
    return torch.nan_to_num(log_q, nan=-float("inf"))


def build_flow(config: FlowConfig) -> Flow:
    """Construct a :class:`Flow` from its configuration (layers alternate parity 0, 1, 0, ...)."""
    prior = GaussianPrior(config.lattice_shape, config.prior_sigma)
    factory = COUPLINGS[config.coupling]
    layers: list[nn.Module] = [factory(config, i % 2) for i in range(config.n_layers)]
    if config.zero_mode_bins:
        zm = ZeroModeSpline(
            config.lattice_shape,
            n_bins=config.zero_mode_bins,
            bound=float(config.extra.get("zero_mode_bound", 1.5)),
            odd=True,
        )
        first = config.extra.get("zero_mode_position", "first") == "first"
        layers = [zm, *layers] if first else [*layers, zm]
    if config.momentum:
        layers = [MomentumScaling(config.lattice_shape), *layers]
    return Flow(prior, layers, config)


def transfer_state_dict(
    state_dict: dict[str, Tensor], old_config: FlowConfig, new_config: FlowConfig
) -> dict[str, Tensor]:
    """Carry a flow's weights to another lattice size of the same architecture (e.g. L → 2L).

    The flow of ``new_config`` is built as a template, and every entry of its state dict is
    filled in as follows:

    * a submodule that defines ``resample_state(state_dict, old_lattice_shape,
      new_lattice_shape) -> state_dict`` receives its own entries of ``state_dict`` (prefix
      removed) and returns its entries for the new lattice (a layer with lattice-shaped
      parameters, e.g. in momentum space, implements this hook; the outermost such module
      handles everything beneath it);
    * a buffer whose trailing dimensions are the old lattice (a checkerboard mask) is taken from
      the template: it is determined by the new configuration;
    * any other tensor (convolution weights and biases) must have the same shape in both and is
      copied unchanged — CNN conditioners with periodic padding are lattice-size agnostic.

    Args:
        state_dict: the old flow's ``state_dict()``.
        old_config: the configuration that built it.
        new_config: the target configuration (normally ``old_config`` with another
            ``lattice_shape``).

    Returns:
        A state dict that ``build_flow(new_config).load_state_dict`` accepts.

    Raises:
        ValueError: if the lattice dimension differs, the entries do not match (another
            architecture), or a parameter's shape depends on the lattice and no module handles it.
    """
    old_shape, new_shape = tuple(old_config.lattice_shape), tuple(new_config.lattice_shape)
    if len(old_shape) != len(new_shape):
        raise ValueError(
            f"Expected a flow of the same lattice dimension; got {old_shape} -> {new_shape}"
        )
    with torch.random.fork_rng(devices=[]):  # the template's random init is discarded
        template = build_flow(new_config)
    target = template.state_dict()
    params = {name for name, _ in template.named_parameters()}
    hooks = {}
    for name, module in template.named_modules():
        if name and hasattr(module, "resample_state"):
            if not any(name.startswith(h + ".") for h in hooks):
                hooks[name] = module
    out: dict[str, Tensor] = {}
    for name, module in hooks.items():
        prefix = name + "."
        sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        new_sub = module.resample_state(sub, old_shape, new_shape)
        out.update({prefix + k: v for k, v in new_sub.items()})
    handled = tuple(h + "." for h in hooks)
    rest_old = {k for k in state_dict if not k.startswith(handled)}
    rest_new = {k for k in target if not k.startswith(handled)}
    if rest_old != rest_new:
        missing, unexpected = sorted(rest_new - rest_old)[:4], sorted(rest_old - rest_new)[:4]
        raise ValueError(
            "Expected the same architecture in both configurations; state dict entries differ: "
            f"missing {missing}, unexpected {unexpected}"
        )
    for key in sorted(rest_new):
        old, new = state_dict[key], target[key]
        lattice_shaped = tuple(old.shape[-len(old_shape):]) == old_shape if old.dim() else False
        if key not in params and lattice_shaped:
            out[key] = new.clone()
        elif tuple(old.shape) == tuple(new.shape):
            out[key] = old.detach().clone()
        else:
            raise ValueError(
                f"Expected {key!r} to have a lattice-independent shape or its module to define "
                f"resample_state; got {tuple(old.shape)} -> {tuple(new.shape)}"
            )
    return out
