r"""The free-energy density :math:`f(\lambda) = -\log Z(\lambda)/V` along a scan in the coupling.

Two independent estimates:

* **From a flow** (any point a flow serves, :func:`flow_free_energy`): the importance estimate
  :math:`\hat Z = \frac1N\sum_i e^{-S(\phi_i)}/q(\phi_i)` on ``n`` fresh flow draws
  (:func:`flowmc.training.evaluate.evaluate_flow`), unbiased for :math:`Z`;
  :math:`f = -\log\hat Z / V` with the delta-method error
  :math:`\sigma_f = \mathrm{sd}(w)/(\bar w\sqrt N\,V)`. The logarithm biases it by
  :math:`+\sigma_f^2 V/2` (second order; negligible when :math:`\sigma_f V \ll 1`).
* **By thermodynamic integration** (:func:`thermodynamic_integration`):
  :math:`\partial_\lambda\log Z = -\langle\sum_x\phi_x^4\rangle`, so

  .. math:: f(\lambda) = f(\lambda_a) + \int_{\lambda_a}^{\lambda}
            \Big\langle \frac1V\sum_x \phi_x^4\Big\rangle_{\lambda'}\, d\lambda',

  with the integrand measured at every scan point (the analysis primary ``phi4``,
  :func:`flowmc.lattice.observables.phi4_density`) and an **anchor** :math:`(\lambda_a, f_a)`: the
  free theory at :math:`\lambda = 0` when :math:`m^2 > 0` (:func:`free_theory_anchor`: exact
  :math:`\log Z` and exact integrand :math:`3\langle\phi^2\rangle^2` there), or a flow point's
  :math:`f`.

**Integration rules** over the grid (any spacing): ``"quadratic"`` (on each interval the
average of the integrals of the two quadratics through it and its left or right neighbour — on a
uniform grid the weights :math:`h(-1, 13, 13, -1)/24` of the cubic through four points, one
quadratic at the ends; exact for quadratics; error :math:`O(h^4)` inside, :math:`O(h^3)` per end
interval) and ``"trapezoid"`` (exact for a linear integrand; error
:math:`-\frac{h^2}{12}[g'(b) - g'(a)] + O(h^4)`). The **discretisation error** of either is
estimated as the difference between the two rules (3 points or more). That is the trapezoid
rule's leading error wherever the quadratic rule is much more accurate — so it is a
*conservative* estimate for the quadratic rule (``flowmc scan``'s default), and only a
leading-order one for the trapezoid rule (it can fall short where the integrand's curvature
changes fast, e.g. near :math:`\lambda = 0`).

**Statistical error.** The scan points are independent runs, and either rule is linear in the
integrand, :math:`f_k = f_a + \sum_i W_{ki} g_i`, so
:math:`\sigma_{f_k}^2 = \sigma_a^2 + \sum_i W_{ki}^2 \sigma_{g_i}^2` exactly (the anchor's flow
draws are independent of every ensemble).

**Comparison** (:func:`compare_free_energies`): where both a flow estimate and the integral
exist (other than the anchor itself), :math:`z = (f_\mathrm{TI} - f_\mathrm{flow}) /
\sqrt{\sigma_\mathrm{TI}^2 + \sigma_\mathrm{flow}^2 + \delta_\mathrm{disc}^2}`.

References:
    Nicoli et al., "Estimation of thermodynamic observables in lattice field theories with deep
    generative models", arXiv:2007.07115.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from numpy.polynomial import polynomial as P

from flowmc.lattice.action import FreeTheory, Phi4Action
from flowmc.training.evaluate import evaluate_flow

__all__ = [
    "RULES",
    "Anchor",
    "free_theory_anchor",
    "flow_free_energy",
    "integration_weights",
    "ThermodynamicIntegration",
    "thermodynamic_integration",
    "compare_free_energies",
]

#: Integration rules of :func:`thermodynamic_integration`.
RULES = ("trapezoid", "quadratic")


class Anchor(NamedTuple):
    """A known free-energy density where the integration starts.

    Attributes:
        lam: the coupling :math:`\\lambda_a`.
        f: :math:`f(\\lambda_a) = -\\log Z/V`.
        error: its error (0 for the exact free theory).
        source: where it comes from (``"free theory (exact)"``, ``"flow"``).
        phi4: the exact integrand :math:`\\langle\\phi^4\\rangle` per site at ``lam``, if known
            (required when ``lam`` is not a scan point, e.g. the free theory at 0).
    """

    lam: float
    f: float
    error: float
    source: str
    phi4: float | None = None


def free_theory_anchor(m2: float, lattice_shape: Sequence[int]) -> Anchor:
    r"""The exact anchor at :math:`\lambda = 0`: :math:`f = -\log Z_0/V` and
    :math:`\langle\phi_x^4\rangle = 3\langle\phi_x^2\rangle^2` of the free theory.

    Raises:
        ValueError: unless ``m2 > 0`` (the free theory is not normalisable otherwise).

    Example:
        >>> a = free_theory_anchor(1.0, (1,))   # one site: S = phi^2, Z = sqrt(pi)
        >>> round(a.f, 12) == round(-0.5 * math.log(math.pi), 12), a.phi4
        (True, 0.75)
    """
    ft = FreeTheory(float(m2), tuple(lattice_shape))
    return Anchor(0.0, -ft.log_z() / ft.volume, 0.0, "free theory (exact)", 3.0 * ft.phi2() ** 2)


def flow_free_energy(
    proposal: torch.nn.Module,
    action: Phi4Action,
    n: int = 10240,
    *,
    batch_size: int = 1024,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """:math:`f = -\\log\\hat Z/V` from ``n`` fresh draws of a flow.

    Args:
        proposal: the flow (e.g. ``LoadedModel.proposal``) sampling ``action``.
        action: the target.
        n: draws.
        batch_size: draws per flow call.
        generator: their random stream.

    Returns:
        ``{f, error, log_z, log_z_err, n, ess, mh_acceptance, n_nonfinite, seconds}``.
    """
    t0 = time.perf_counter()
    res = evaluate_flow(proposal, action, n, batch_size=batch_size, generator=generator)
    vol = action.volume
    return {
        "f": -res.log_z / vol,
        "error": res.log_z_err / vol,
        "log_z": res.log_z,
        "log_z_err": res.log_z_err,
        "n": int(n),
        "ess": res.ess,
        "mh_acceptance": res.mh_acceptance,
        "n_nonfinite": res.n_nonfinite,
        "seconds": time.perf_counter() - t0,
    }


def _lagrange_integral(nodes: np.ndarray, a: float, b: float) -> np.ndarray:
    """Weights of the integral over ``[a, b]`` of the polynomial through ``nodes``."""
    t = nodes - a
    w = np.empty(nodes.size)
    for m in range(nodes.size):
        others = np.delete(t, m)
        coef = P.polyfromroots(others) / np.prod(t[m] - others)
        anti = P.polyint(coef)
        w[m] = P.polyval(b - a, anti) - P.polyval(0.0, anti)
    return w


def _interval_weights(x: np.ndarray, rule: str) -> np.ndarray:
    """``(K-1, K)``: row ``j`` gives the integral over ``[x_j, x_j+1]``."""
    k = x.size
    out = np.zeros((k - 1, k))
    for j in range(k - 1):
        h = x[j + 1] - x[j]
        if rule == "trapezoid" or k < 3:
            out[j, j] = out[j, j + 1] = 0.5 * h
            continue
        triples = [t for t in ((j - 1, j, j + 1), (j, j + 1, j + 2)) if t[0] >= 0 and t[2] < k]
        for t in triples:
            idx = np.array(t)
            out[j, idx] += _lagrange_integral(x[idx], x[j], x[j + 1]) / len(triples)
    return out


def integration_weights(lams: Sequence[float] | np.ndarray, rule: str = "trapezoid") -> np.ndarray:
    r"""Cumulative integration weights: :math:`\int_{\lambda_0}^{\lambda_k} g \approx W_k \cdot g`.

    Args:
        lams: ``(K,)`` strictly increasing grid, ``K >= 2``.
        rule: ``"trapezoid"`` or ``"quadratic"`` (see the module docstring; with 2 points the
            quadratic rule is the trapezoid).

    Returns:
        ``(K, K)`` array ``W`` (row 0 is zero).

    Example:
        >>> integration_weights([0.0, 1.0, 2.0]) @ np.array([0.0, 1.0, 4.0])   # x^2: 1/3, 8/3
        array([0. , 0.5, 3. ])
        >>> np.round(integration_weights([0.0, 1.0, 2.0], "quadratic") @ [0.0, 1.0, 4.0], 12)
        array([0.        , 0.33333333, 2.66666667])
    """
    x = np.asarray(lams, dtype=np.float64)
    if x.ndim != 1 or x.size < 2 or not np.all(np.isfinite(x)) or np.any(np.diff(x) <= 0):
        raise ValueError(f"Expected a strictly increasing grid of >= 2 finite couplings; got {x}")
    if rule not in RULES:
        raise ValueError(f"Expected rule in {RULES}; got {rule!r}")
    return _weights(tuple(float(v) for v in x), rule).copy()


@functools.lru_cache(maxsize=64)
def _weights(x: tuple[float, ...], rule: str) -> np.ndarray:
    grid = np.asarray(x)
    w = np.zeros((grid.size, grid.size))
    w[1:] = np.cumsum(_interval_weights(grid, rule), axis=0)
    return w


class ThermodynamicIntegration(NamedTuple):
    """:math:`f(\\lambda)` on a scan grid by thermodynamic integration
    (:func:`thermodynamic_integration`).

    Attributes:
        lams: the scan grid.
        f: :math:`f` at each point.
        error: statistical error at each point (anchor included).
        disc: the discretisation-error estimate at each point (NaN with < 3 points).
        anchor: the :class:`Anchor`.
        rule: the integration rule.
        note: what to know (e.g. the anchor lies outside the grid).
    """

    lams: tuple[float, ...]
    f: tuple[float, ...]
    error: tuple[float, ...]
    disc: tuple[float, ...]
    anchor: Anchor
    rule: str
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "lams": list(self.lams),
            "f": list(self.f),
            "error": list(self.error),
            "disc": [None if not math.isfinite(v) else v for v in self.disc],
            "anchor": dict(self.anchor._asdict()),
            "rule": self.rule,
            "note": self.note,
        }


def thermodynamic_integration(
    lams: Sequence[float] | np.ndarray,
    phi4: Sequence[float] | np.ndarray,
    phi4_err: Sequence[float] | np.ndarray,
    anchor: Anchor,
    *,
    rule: str = "quadratic",
) -> ThermodynamicIntegration:
    r""":math:`f(\lambda_k) = f_a + \int_{\lambda_a}^{\lambda_k}\langle\phi^4\rangle\,d\lambda`
    at every scan point, with statistical and discretisation errors (module docstring).

    Args:
        lams: ``(K,)`` strictly increasing couplings of the scan.
        phi4: ``(K,)`` :math:`\langle\frac1V\sum_x\phi_x^4\rangle` at each coupling.
        phi4_err: ``(K,)`` their errors (independent points).
        anchor: the starting point; its coupling must be a scan point, or lie outside the grid
            with ``anchor.phi4`` given (then it is added to the integration grid as an exact
            point).
        rule: ``"quadratic"`` or ``"trapezoid"``.

    Returns:
        :class:`ThermodynamicIntegration` at the K scan couplings.

    Raises:
        ValueError: on bad shapes or values, or an anchor strictly inside the grid but not on a
            grid point, or outside it without ``anchor.phi4``.
    """
    x = np.asarray(lams, dtype=np.float64)
    g = np.asarray(phi4, dtype=np.float64)
    s = np.asarray(phi4_err, dtype=np.float64)
    if x.ndim != 1 or g.shape != x.shape or s.shape != x.shape or x.size < 1:
        raise ValueError(
            f"Expected lams, phi4 and phi4_err as 1-d arrays of one length; got shapes "
            f"{x.shape}, {g.shape}, {s.shape}"
        )
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(g)) and np.all(np.isfinite(s))):
        raise ValueError("Expected finite couplings, phi4 values and errors")
    if np.any(s < 0):
        raise ValueError("Expected phi4 errors >= 0")
    if np.any(np.diff(x) <= 0):
        raise ValueError(f"Expected strictly increasing lams; got {x.tolist()}")
    if rule not in RULES:
        raise ValueError(f"Expected rule in {RULES}; got {rule!r}")
    lam_a = float(anchor.lam)
    note = ""
    hit = np.nonzero(np.isclose(x, lam_a, rtol=0, atol=1e-12 * max(1.0, abs(lam_a))))[0]
    keep = np.arange(x.size)
    if hit.size:
        a = int(hit[0])
        if anchor.phi4 is not None:  # an exact integrand at the anchor replaces the measured one
            g, s = g.copy(), s.copy()
            g[a], s[a] = float(anchor.phi4), 0.0
    elif x[0] < lam_a < x[-1]:
        raise ValueError(
            f"Expected the anchor lam = {lam_a:g} on a scan point or outside the scanned range "
            f"[{x[0]:g}, {x[-1]:g}]"
        )
    else:
        if anchor.phi4 is None:
            raise ValueError(
                f"Expected the anchor's exact integrand (anchor.phi4) for an anchor outside the "
                f"scanned range (lam = {lam_a:g})"
            )
        below = lam_a < x[0]
        x = np.concatenate([[lam_a], x]) if below else np.concatenate([x, [lam_a]])
        g = np.concatenate([[anchor.phi4], g]) if below else np.concatenate([g, [anchor.phi4]])
        s = np.concatenate([[0.0], s]) if below else np.concatenate([s, [0.0]])
        a = 0 if below else x.size - 1
        keep = np.arange(1, x.size) if below else np.arange(x.size - 1)
        note = (
            f"anchor ({anchor.source}) at lam = {lam_a:g}, outside the scan: the interval to "
            f"lam = {x[keep[0] if below else keep[-1]]:g} is integrated with its exact integrand"
        )
    if x.size == 1:
        return ThermodynamicIntegration(
            (float(x[0]),), (float(anchor.f),), (float(anchor.error),), (math.nan,), anchor, rule,
            "one point: the anchor only",
        )  # fmt: skip
    w = integration_weights(x, rule)
    other = integration_weights(x, "quadratic" if rule == "trapezoid" else "trapezoid")
    rel = w - w[a]
    f = anchor.f + rel @ g
    err = np.sqrt(anchor.error**2 + (rel**2) @ (s**2))
    if x.size >= 3:
        disc = np.abs((other - other[a]) @ g - rel @ g)
    else:
        disc = np.full(x.size, math.nan)
        note = "; ".join(filter(None, [note, "2 points: no discretisation-error estimate"]))
    return ThermodynamicIntegration(
        tuple(float(v) for v in x[keep]), tuple(float(v) for v in f[keep]),
        tuple(float(v) for v in err[keep]), tuple(float(v) for v in disc[keep]), anchor, rule,
        note,
    )  # fmt: skip


def compare_free_energies(
    ti: ThermodynamicIntegration, flow: Mapping[float, tuple[float, float]]
) -> list[dict[str, Any]]:
    r"""Thermodynamic integration against flow estimates, point by point.

    Args:
        ti: the integration.
        flow: ``{lam: (f, error)}`` of the flow estimates.

    Returns:
        One dict per scan point: ``lam, f_ti, f_ti_err, disc, f_flow, f_flow_err, diff, z`` with
        :math:`z = (f_\mathrm{TI} - f_\mathrm{flow})/\sqrt{\sigma_\mathrm{TI}^2 +
        \sigma_\mathrm{flow}^2 + \delta_\mathrm{disc}^2}`; ``z`` is ``None`` where there is no
        flow estimate and at the anchor when the anchor is that flow estimate.
    """
    flow_r = {round(float(k), 12): v for k, v in flow.items()}
    out = []
    for lam, f, e, dsc in zip(ti.lams, ti.f, ti.error, ti.disc):
        row: dict[str, Any] = {"lam": lam, "f_ti": f, "f_ti_err": e,
                               "disc": dsc if math.isfinite(dsc) else None,
                               "f_flow": None, "f_flow_err": None, "diff": None, "z": None}
        hit = flow_r.get(round(lam, 12))
        if hit is not None:
            ff, fe = hit
            row.update(f_flow=ff, f_flow_err=fe, diff=f - ff)
            is_anchor = ti.anchor.source == "flow" and abs(lam - ti.anchor.lam) <= 1e-12
            sigma = math.sqrt(e**2 + fe**2 + (dsc if math.isfinite(dsc) else 0.0) ** 2)
            if not is_anchor and sigma > 0:
                row["z"] = (f - ff) / sigma
        out.append(row)
    return out
