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

from flowmc._checks import check_int
from flowmc.flows.cnf import DISCREPANCY_TOLERANCE, ContinuousFlow, Discrepancy, log_det_discrepancy
from flowmc.flows.couplings import AffineCoupling, checkerboard
from flowmc.flows.nets import Blur, PeriodicCNN
from flowmc.flows.prior import GaussianPrior
from flowmc.flows.spectral import MomentumScaling, ZeroModeSpectrum, ZeroModeSpline
from flowmc.flows.splines import SplineCoupling
from flowmc.lattice.action import check_field

__all__ = [
    "Flow", "FlowAt", "FlowConfig", "build_flow", "Z2SymmetricFlow", "transfer_state_dict",
    "check_integration", "base_flow", "CNF_SETTINGS",
]


@dataclass(frozen=True)
class FlowConfig:
    r"""Architecture of a coupling flow; stored in every checkpoint.

    Attributes:
        lattice_shape: lattice extents (all even).
        n_layers: number of coupling layers (parities alternate).
        hidden: hidden channels of each conditioner CNN.
        kernel_size: odd convolution kernel size.
        activation: conditioner activation name.
        coupling: the layer family: ``"affine"`` or ``"spline"`` (coupling layers with
            checkerboard masks and CNN conditioners), or ``"cnf"`` (an equivariant continuous
            flow, :mod:`flowmc.flows.cnf`: ``n_layers`` ODE blocks, settings in ``extra``, see
            :data:`CNF_SETTINGS`; ``hidden``, ``kernel_size``, ``activation`` and ``s_max`` do not
            apply).
        equivariant: make every layer commute with phi -> -phi.
        s_max: bound on the per-layer log-scale.
        prior_sigma: standard deviation of the i.i.d. Gaussian prior.
        momentum: put a :class:`~flowmc.flows.spectral.MomentumScaling` layer first (learned
            :math:`\sigma(k)` per momentum orbit: the Gaussian long-distance part).
        zero_mode_bins: bins of an odd :class:`~flowmc.flows.spectral.ZeroModeSpline` of the
            magnetisation (0: none); ``extra`` may set ``zero_mode_bound`` (default 1.5) and
            ``zero_mode_position`` (``"first"``: after the momentum layer, default; ``"last"``);
            ``extra["zero_mode_spectrum"] = D`` adds a
            :class:`~flowmc.flows.spectral.ZeroModeSpectrum` (momentum scales depending on the
            magnetisation, powers up to D; scale ``zero_mode_scale``, default 0.5) after it.
        condition: ``{}`` for a flow of one action, or ``{"lam": [lo, hi]}`` for a flow
            conditioned on the quartic coupling over that range (every conditioner gets the
            normalised coupling as an extra constant channel; the global layers' parameters become
            quadratics in it); see :meth:`Flow.at`.
        extra: coupling-specific settings (spline: ``n_bins``, ``spline_bound``,
            ``out_kernel``: kernel size of the conditioner's output layer, ``blur``: widths of
            smoothed copies of the frozen field fed to the conditioner, 0 for its mean).
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
    condition: dict = field(default_factory=dict)
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
        if self.condition:
            object.__setattr__(self, "condition", _check_condition(self.condition))
        if self.extra.get("zero_mode_position", "first") not in ("first", "last"):
            raise ValueError(
                "Expected extra['zero_mode_position'] 'first' or 'last'; got "
                f"{self.extra['zero_mode_position']!r}"
            )

    @property
    def z2_equivariant(self) -> bool:
        """Whether every layer commutes with phi -> -phi (then q(-phi) = q(phi) exactly): the
        equivariant couplings, and a continuous flow (its site features are odd)."""
        return bool(self.equivariant or self.coupling == "cnf")

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


#: polynomial degree in the coupling of the global layers of a conditional flow
CONDITION_DEGREE = 2


def _check_condition(condition: dict) -> dict:
    if set(condition) != {"lam"}:
        raise ValueError(f"Expected condition {{'lam': [lo, hi]}}; got {condition!r}")
    try:
        lo, hi = (float(v) for v in condition["lam"])
    except (TypeError, ValueError):
        raise ValueError(f"Expected condition lam = [lo, hi]; got {condition['lam']!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
        raise ValueError(f"Expected a lam range 0 <= lo < hi; got [{lo}, {hi}]")
    return {"lam": [lo, hi]}


def _n_context(cfg: FlowConfig) -> int:
    return len(cfg.condition)


def _affine_layer(cfg: FlowConfig, parity: int) -> nn.Module:
    net = PeriodicCNN(
        len(cfg.lattice_shape),
        1 + _n_context(cfg),
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

    ``cfg.equivariant`` gives the Z2-equivariant (symmetrised) spline coupling."""
    n_bins = int(cfg.extra.get("n_bins", 8))
    widths = cfg.extra.get("blur", [])
    blur = Blur(cfg.lattice_shape, widths) if widths else None
    net = PeriodicCNN(
        len(cfg.lattice_shape), 1 + len(widths) + _n_context(cfg), 3 * n_bins - 1, cfg.hidden,
        cfg.kernel_size, cfg.activation, out_kernel_size=cfg.extra.get("out_kernel"),
    )
    return SplineCoupling(
        checkerboard(cfg.lattice_shape, parity),
        net,
        n_bins=n_bins,
        bound=float(cfg.extra.get("spline_bound", 4.0)),
        equivariant=cfg.equivariant,
        blur=blur,
    )


#: settings of a continuous-flow layer that ``FlowConfig.extra`` may give, with their defaults
CNF_SETTINGS = {
    "n_freq": 16,
    "n_channels": 12,
    "n_time": 7,
    "int_steps": 20,
    "integrator": "rk4",
    "penalty": 100.0,
    "penalty_batch": 16,
}


def _cnf_layer(cfg: FlowConfig, parity: int) -> nn.Module:
    """An equivariant continuous flow (:mod:`flowmc.flows.cnf`); ``cfg.extra`` may set the keys of
    :data:`CNF_SETTINGS`. ``hidden``, ``kernel_size``, ``activation``, ``s_max`` and ``parity``
    do not apply (the layer has no mask)."""
    kw = {k: cfg.extra.get(k, v) for k, v in CNF_SETTINGS.items()}
    return ContinuousFlow(
        cfg.lattice_shape, degree=CONDITION_DEGREE if cfg.condition else None, **kw
    )


#: layer family name -> factory(config, parity) -> layer; other modules may register more.
COUPLINGS = {"affine": _affine_layer, "spline": _spline_layer, "cnf": _cnf_layer}


class Flow(nn.Module):
    """A normalizing flow: ``prior`` then ``layers`` (prior → field).

    A flow built with ``config.condition = {"lam": [lo, hi]}`` is *conditional*: every method
    takes the quartic coupling ``lam`` (a float or one value per sample, inside the range) and
    :meth:`at` gives the flow at one coupling with the plain interface.

    Args:
        prior: a prior with ``sample(n, generator=)`` and ``log_prob(z)``.
        layers: bijections with ``forward(x, context) -> (y, log_det)`` and
            ``inverse(y, context) -> (x, log_det)`` (``context`` is ``None`` unless conditional).
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
        self.condition: dict = dict(config.condition) if config is not None else {}

    @property
    def is_conditional(self) -> bool:
        """Whether the flow takes the coupling ``lam`` as an input."""
        return bool(self.condition)

    @property
    def lam_range(self) -> tuple[float, float] | None:
        """The coupling range ``(lo, hi)`` of a conditional flow, else ``None``."""
        return tuple(self.condition["lam"]) if self.condition else None

    def _context(self, lam: float | Tensor | None, n: int, like: Tensor) -> Tensor | None:
        """The normalised context ``t = (2 lam - lo - hi) / (hi - lo)`` in [-1, 1], ``(n,)``."""
        if not self.condition:
            if lam is not None:
                raise ValueError(
                    "Expected no lam for a flow of one action (it is not conditional); got "
                    f"{lam!r}"
                )
            return None
        if lam is None:
            raise ValueError(
                f"Expected lam in {list(self.lam_range)} for this conditional flow; got None"
            )
        lo, hi = self.lam_range
        lam_t = torch.as_tensor(lam, dtype=like.dtype, device=like.device).reshape(-1)
        if lam_t.numel() == 1:
            lam_t = lam_t.expand(n)
        if lam_t.shape != (n,):
            raise ValueError(f"Expected lam of shape ({n},) or a scalar; got {tuple(lam_t.shape)}")
        tol = 1e-9 * (hi - lo)
        if bool(((lam_t < lo - tol) | (lam_t > hi + tol)).any()):
            bad = float(lam_t[(lam_t < lo - tol) | (lam_t > hi + tol)][0])
            raise ValueError(
                f"Expected lam inside the flow's range [{lo:g}, {hi:g}]; got {bad:g}"
            )
        return (2.0 * lam_t - (lo + hi)) / (hi - lo)

    def forward(self, z: Tensor, lam: float | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Map prior samples to fields; returns ``(phi, log|det d phi/d z|)``."""
        ctx = self._context(lam, z.shape[0], z)
        log_det = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        x = z
        for layer in self.layers:
            x, ld = layer(x, ctx) if ctx is not None else layer(x)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, phi: Tensor, lam: float | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Map fields to prior space; returns ``(z, log|det d z/d phi|)``."""
        ctx = self._context(lam, phi.shape[0], phi)
        log_det = torch.zeros(phi.shape[0], dtype=phi.dtype, device=phi.device)
        x = phi
        for layer in reversed(self.layers):
            x, ld = layer.inverse(x, ctx) if ctx is not None else layer.inverse(x)
            log_det = log_det + ld
        return x, log_det

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        lam: float | Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Draw ``n`` fields with their exact log density: ``(phi (n, *L), log_q (n,))``."""
        z = self.prior.sample(n, generator=generator)
        phi, log_det = self(z, lam)
        return phi, self.prior.log_prob(z) - log_det

    def from_noise(
        self, eps: Tensor, u: Tensor | None = None, lam: float | Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Map given standard-normal noise to fields: ``(phi (B, *L), log_q (B,))``.

        ``sample(n, generator=g)`` equals ``from_noise(torch.randn((n, *L), generator=g))``; the
        samplers draw ``eps`` from per-chain streams (:mod:`flowmc.mcmc.rng`) instead.

        Args:
            eps: ``(B, *L)`` i.i.d. N(0, 1) noise (scaled by the prior's sigma here).
            u: ignored (accepted so that every proposal has the signature of
                :meth:`Z2SymmetricFlow.from_noise`).
        """
        z = eps * self.prior.sigma
        phi, log_det = self(z, lam)
        return phi, self.prior.log_prob(z) - log_det

    sample_and_log_prob = sample

    def log_prob(self, phi: Tensor, lam: float | Tensor | None = None) -> Tensor:
        """Exact :math:`\\log q(\\phi)`, shape ``(B,)``."""
        check_field(phi, self.lattice_shape)
        z, log_det = self.inverse(phi, lam)
        return self.prior.log_prob(z) + log_det

    def auxiliary_loss(self) -> Tensor | None:
        """The training penalties the layers recorded in their last forward pass (the
        integration-error penalty of a continuous flow), summed; ``None`` if there are none.
        Reading them clears them."""
        total = None
        for layer in self.layers:
            aux = layer.auxiliary_loss() if hasattr(layer, "auxiliary_loss") else None
            if aux is not None:
                total = aux if total is None else total + aux
        return total

    @property
    def continuous_layers(self) -> list[ContinuousFlow]:
        """The layers that integrate an ODE (their log determinant is approximate)."""
        return [m for m in self.layers if isinstance(m, ContinuousFlow)]

    def set_int_steps(self, n: int) -> None:
        """Integrate every continuous layer with ``n`` steps from now on.

        Raises:
            ValueError: if ``n`` is not an integer >= 1 or the flow has no continuous layers.
        """
        n = check_int("int_steps", n, 1, strict=False)
        if not self.continuous_layers:
            raise ValueError("Expected a flow with continuous layers (coupling cnf); this has none")
        for layer in self.continuous_layers:
            layer.int_steps = int(n)

    def integration_discrepancy(
        self,
        n: int = 64,
        *,
        seed: int = 0,
        lam: float | None = None,
        steps: int | None = None,
    ) -> list[Discrepancy]:
        r"""How well each continuous layer's carried log determinant has converged.

        Draws ``n`` prior samples (a fixed ``seed``), pushes them through the layers before each
        continuous layer and compares that layer's :math:`\ell_N` with :math:`\ell_{2N}`
        (:func:`flowmc.flows.cnf.log_det_discrepancy`). A flow without continuous layers gives
        ``[]``.

        Args:
            n: samples.
            seed: seed of the samples.
            lam: the coupling of a conditional flow (default: the middle of its range).
            steps: integration steps to assess (default each layer's ``int_steps``).
        """
        if not self.continuous_layers:
            return []
        g = torch.Generator(device=self.prior._ref.device).manual_seed(int(seed))
        if self.is_conditional and lam is None:
            lam = sum(self.lam_range) / 2
        with torch.no_grad():
            x = self.prior.sample(n, generator=g)
            ctx = self._context(lam, n, x)
            out = []
            for layer in self.layers:
                if isinstance(layer, ContinuousFlow):
                    out.append(log_det_discrepancy(layer, x, ctx, steps=steps))
                x, _ = layer(x, ctx) if ctx is not None else layer(x)
        return out

    def draw_lam(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Couplings for a training batch of a conditional flow: stratified uniform over the
        range (one draw in each of ``n`` equal sub-intervals, shuffled), ``(n,)``."""
        if not self.condition:
            raise ValueError("Expected a conditional flow (config.condition); this one is not")
        ref = self.prior._ref
        lo, hi = self.lam_range
        u = torch.rand(n, generator=generator, device=ref.device, dtype=ref.dtype)
        perm = torch.randperm(n, generator=generator, device=ref.device)
        return lo + (hi - lo) * (perm.to(ref.dtype) + u) / n

    def at(self, lam: float) -> FlowAt:
        """This conditional flow at one coupling, with the plain (unconditional) interface.

        Raises:
            ValueError: if the flow is not conditional or ``lam`` is outside its range.
        """
        return FlowAt(self, lam)


class FlowAt(nn.Module):
    """A conditional :class:`Flow` at a fixed coupling: ``sample(n, generator=)`` and
    ``log_prob(phi)`` as for a flow of one action (what samplers and evaluators take).

    Args:
        flow: a conditional flow.
        lam: the coupling, inside ``flow.lam_range``.
    """

    def __init__(self, flow: Flow, lam: float) -> None:
        super().__init__()
        if not flow.is_conditional:
            raise ValueError(
                "Expected a conditional flow (trained over a lam range); this one is not"
            )
        lam = float(lam)
        lo, hi = flow.lam_range
        if not lo <= lam <= hi:
            raise ValueError(f"Expected lam inside the flow's range [{lo:g}, {hi:g}]; got {lam:g}")
        self.flow = flow
        self.lam = lam
        self.lattice_shape = flow.lattice_shape
        self.config = flow.config
        self.prior = flow.prior

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.flow(z, self.lam)

    def inverse(self, phi: Tensor) -> tuple[Tensor, Tensor]:
        return self.flow.inverse(phi, self.lam)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        return self.flow.sample(n, generator=generator, lam=self.lam)

    def from_noise(self, eps: Tensor, u: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.flow.from_noise(eps, lam=self.lam)

    sample_and_log_prob = sample

    def log_prob(self, phi: Tensor) -> Tensor:
        return self.flow.log_prob(phi, self.lam)


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

    def sample(
        self, n: int, *, generator: torch.Generator | None = None, **lam: float | Tensor
    ) -> tuple[Tensor, Tensor]:
        phi, log_q = self.flow.sample(n, generator=generator, **lam)
        # q_s(+-phi) = [q(phi) + q(-phi)] / 2 whichever sign is kept: one term is known
        log_q_sym = torch.logaddexp(log_q, _mirror(self.flow.log_prob(-phi, **lam))) - math.log(
            2.0
        )
        u = torch.rand(n, generator=generator, device=phi.device, dtype=phi.dtype)
        sign = torch.where(u < 0.5, -1.0, 1.0).to(phi.dtype)
        return phi * sign.view(-1, *([1] * len(self.lattice_shape))), log_q_sym

    sample_and_log_prob = sample

    def from_noise(
        self, eps: Tensor, u: Tensor, **lam: float | Tensor
    ) -> tuple[Tensor, Tensor]:
        """As :meth:`sample`, from given noise: ``eps (B, *L)`` N(0, 1) for the flow and
        ``u (B,)`` uniforms in [0, 1) for the sign (flipped where ``u < 1/2``)."""
        phi, log_q = self.flow.from_noise(eps, **lam)
        log_q_sym = torch.logaddexp(log_q, _mirror(self.flow.log_prob(-phi, **lam))) - math.log(
            2.0
        )
        sign = torch.where(u < 0.5, -1.0, 1.0).to(phi.dtype)
        return phi * sign.view(-1, *([1] * len(self.lattice_shape))), log_q_sym

    def log_prob(self, phi: Tensor, **lam: float | Tensor) -> Tensor:
        return (
            torch.logaddexp(
                self.flow.log_prob(phi, **lam), _mirror(self.flow.log_prob(-phi, **lam))
            )
            - math.log(2.0)
        )


def base_flow(proposal: nn.Module) -> tuple[Flow | None, float | None]:
    """The :class:`Flow` under a proposal (:class:`FlowAt`, :class:`Z2SymmetricFlow`, or the flow
    itself) and the coupling a conditional one is used at; ``(None, None)`` for any other
    density (which then has no continuous layers to check)."""
    lam, flow = None, proposal
    while not isinstance(flow, Flow):
        lam = getattr(flow, "lam", lam)
        flow = getattr(flow, "flow", None)
        if flow is None:
            return None, None
    return flow, lam


def check_integration(
    proposal: nn.Module,
    name: str = "the flow",
    *,
    tolerance: float = DISCREPANCY_TOLERANCE,
    n: int = 64,
) -> list[Discrepancy]:
    r"""Refuse a proposal whose continuous layers integrate too coarsely to be used in an exact
    chain: the sd over draws of :math:`\ell_N - \ell_{2N}` must not exceed ``tolerance``
    (:data:`flowmc.flows.cnf.DISCREPANCY_TOLERANCE`; the bias this allows is discussed in
    :mod:`flowmc.flows.cnf`).

    Args:
        proposal: a :class:`Flow`, :class:`FlowAt` or :class:`Z2SymmetricFlow`.
        name: how the error message names the flow (e.g. its file).
        tolerance: the largest sd of the discrepancy accepted.
        n: samples the discrepancy is measured on.

    Returns:
        The measured discrepancies (``[]`` for a flow without continuous layers).

    Raises:
        ValueError: one line naming the flow, the measured discrepancy and the remedy.
    """
    flow, lam = base_flow(proposal)
    found = [] if flow is None else flow.integration_discrepancy(n, lam=lam)
    for d in found:
        if not d.sd <= tolerance:
            raise ValueError(
                f"{name}: its continuous flow's log density is not converged at {d.steps} "
                f"integration steps (sd of l_N - l_2N over draws = {d.sd:.2g} > tolerance "
                f"{tolerance:g}); use more steps (--int-steps) or retrain"
            )
    return found


def _mirror(log_q: Tensor) -> Tensor:
    """The mirror term q(-phi) of a collapsed flow can underflow to NaN (-inf arithmetic) in
    float32; its true value is then negligible, so count it as zero density, not as an error."""
    return torch.nan_to_num(log_q, nan=-float("inf"))


def build_flow(config: FlowConfig) -> Flow:
    """Construct a :class:`Flow` from its configuration (layers alternate parity 0, 1, 0, ...)."""
    prior = GaussianPrior(config.lattice_shape, config.prior_sigma)
    degree = CONDITION_DEGREE if config.condition else None
    factory = COUPLINGS[config.coupling]
    layers: list[nn.Module] = [factory(config, i % 2) for i in range(config.n_layers)]
    if config.zero_mode_bins:
        zm = ZeroModeSpline(
            config.lattice_shape,
            n_bins=config.zero_mode_bins,
            bound=float(config.extra.get("zero_mode_bound", 1.5)),
            odd=True,
            degree=degree,
        )
        first = config.extra.get("zero_mode_position", "first") == "first"
        layers = [zm, *layers] if first else [*layers, zm]
    if config.extra.get("zero_mode_spectrum"):  # magnetisation-dependent momentum scales
        zs = ZeroModeSpectrum(
            config.lattice_shape,
            powers=int(config.extra["zero_mode_spectrum"]),
            scale=float(config.extra.get("zero_mode_scale", 0.5)),
            degree=degree,
        )
        at = 1 if (config.zero_mode_bins and first) else 0
        layers = [*layers[:at], zs, *layers[at:]]
    if config.momentum:
        layers = [MomentumScaling(config.lattice_shape, degree=degree), *layers]
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
