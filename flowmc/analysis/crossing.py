r"""Crossings of finite-size curves: the critical coupling from two or more volumes.

At a continuous transition the dimensionless ratios :math:`U_4` and :math:`\xi_2/L` do not
depend on :math:`L` at the critical coupling (up to scaling corrections), so the curves of two
volumes cross there. :func:`find_crossing` locates the crossing of two curves sampled on one
grid :math:`\lambda_1 < \dots < \lambda_K`, each point with an independent error (the points of
a scan are independent runs); :func:`pairwise_crossings` does it for every pair of volumes.

**Bracket.** With :math:`d_i = y^{(2)}_i - y^{(1)}_i` and
:math:`\sigma_{d,i}^2 = \sigma^{(1)2}_i + \sigma^{(2)2}_i`, a crossing lies between grid points
:math:`i` and :math:`i+1` where :math:`d` changes sign. If it never does, there is **no crossing
inside** :math:`[\lambda_1, \lambda_K]` (reported, with the point of closest approach in units
of :math:`\sigma_d`); if it does more than once (noise, or several crossings), the most
significant bracket is used — the one that best splits the grid into :math:`d < 0` on one side
and :math:`d > 0` on the other (largest :math:`\pm(\sum_{j > i} z_j - \sum_{j \le i} z_j)`,
:math:`z_j = d_j/\sigma_{d,j}`, sign by the direction of the change), robust to an isolated
noisy flip — and a note says so.

**Interpolation** (``method``):

* ``"quadratic"`` (default): a weighted least-squares quadratic in :math:`\lambda` (weights
  :math:`1/\sigma_{d,i}^2`) fitted to :math:`d` on ``window`` consecutive points centred on the
  bracket (4 by default: the bracket and one neighbour on each side, clipped to the grid; 3 points
  interpolate exactly); :math:`\lambda^*` is its real root inside the scanned range nearest to
  the bracket. It is exact for curves that are quadratic in :math:`\lambda` over the window and
  averages the noise of the neighbours. With only 2 grid points it falls back to ``"linear"``.
* ``"linear"``: the root of the straight line through the two bracketing points,
  :math:`\lambda^* = \lambda_i + (\lambda_{i+1} - \lambda_i)\, d_i/(d_i - d_{i+1})` (biased by the
  curvature of :math:`d`, :math:`O(h^2)`).

The curve value at the crossing (:math:`U_4^*`) is the same interpolation of the mean curve
:math:`(y^{(1)} + y^{(2)})/2` at :math:`\lambda^*`.

**Errors.** A *parametric bootstrap over the points*: ``n_boot`` replicas draw every point of
both curves from :math:`N(y_i, \sigma_i^2)` independently and redo the interpolation on the
same window; ``error`` is the standard deviation of the replicas' :math:`\lambda^*` (its own
uncertainty ``error_error`` :math:`\approx` ``error`` :math:`/\sqrt{2(B-1)}`). Replicas whose
interpolant has no real root inside the scanned range are counted in ``n_failed`` (a note warns
when they exceed 1%: the crossing is then not significant). ``error_linear`` is the linear
propagation :math:`\sigma^2 = \sum_i (\partial\lambda^*/\partial y_i)^2\sigma_i^2` (derivatives
by central differences), which the bootstrap reproduces when the errors are small against the
slope difference of the curves, and exceeds where the crossing angle is shallow (the bootstrap
then captures the non-linearity).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from flowmc._checks import is_int

__all__ = ["Crossing", "find_crossing", "pairwise_crossings", "METHODS"]

#: Interpolation methods of :func:`find_crossing`.
METHODS = ("quadratic", "linear")
#: Fraction of failed bootstrap replicas above which a note says the crossing is not significant.
FAILED_NOTE = 0.01


class Crossing(NamedTuple):
    """The crossing of one observable between two volumes (:func:`find_crossing`).

    Attributes:
        observable: the curve's name (e.g. ``"binder"``, ``"xi2_over_L"``).
        sizes: ``(L1, L2)``.
        found: whether the difference changes sign inside the scanned range.
        lam: the crossing :math:`\\lambda^*` (``None`` if not found).
        error: its bootstrap error (``None`` without bootstrap).
        error_error: the uncertainty of ``error``, ``error / sqrt(2 (n_boot - 1))``.
        error_linear: its linearly propagated error.
        value: the curves' common value at the crossing (e.g. :math:`U_4^*`).
        value_error: its bootstrap error.
        value_error_linear: its linearly propagated error.
        bracket: the grid interval ``(lam_i, lam_i+1)`` holding the sign change.
        n_brackets: how many grid intervals hold a sign change.
        method: the interpolation used (``"quadratic"`` or ``"linear"``).
        window: the couplings of the points the interpolation used.
        chi2: the quadratic fit's :math:`\\chi^2` of the difference (``None`` if linear).
        dof: its degrees of freedom.
        n_boot: bootstrap replicas.
        n_failed: replicas without a root inside the scanned range.
        range: the scanned range ``(lam_1, lam_K)`` (points used).
        note: what to know about this result (no crossing, several sign changes, ...).
    """

    observable: str
    sizes: tuple[int, int]
    found: bool
    lam: float | None = None
    error: float | None = None
    error_error: float | None = None
    error_linear: float | None = None
    value: float | None = None
    value_error: float | None = None
    value_error_linear: float | None = None
    bracket: tuple[float, float] | None = None
    n_brackets: int = 0
    method: str = "quadratic"
    window: tuple[float, ...] = ()
    chi2: float | None = None
    dof: int | None = None
    n_boot: int = 0
    n_failed: int = 0
    range: tuple[float, float] | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dict(self._asdict())
        d["sizes"] = list(self.sizes)
        for key in ("bracket", "window", "range"):
            d[key] = None if d[key] is None else list(d[key])
        return d


def _as_1d(name: str, x: Any, k: int | None = None) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or (k is not None and arr.size != k):
        want = "a 1-d array" if k is None else f"a 1-d array of {k} values"
        raise ValueError(f"Expected {name} as {want}; got shape {arr.shape}")
    return arr


def _window(i: int, k: int, n: int) -> np.ndarray:
    """``k`` consecutive indices centred on the bracket ``(i, i+1)``, clipped to ``[0, n)``."""
    start = min(max(i - (k - 2) // 2, 0), n - k)
    return np.arange(start, start + k)


class _Interp:
    """The interpolation of one bracket, vectorised over replicas ``(B, K)``."""

    def __init__(
        self, x: np.ndarray, s_d: np.ndarray, s_m: np.ndarray, i: int, method: str, window: int
    ) -> None:
        self.x = x
        self.i = i
        self.method = method
        self.lo, self.hi = float(x[0]), float(x[-1])
        self.center = 0.5 * (x[i] + x[i + 1])
        if method == "quadratic":
            self.idx = _window(i, window, x.size)
            xs = x[self.idx]
            self.x0 = float(xs.mean())
            self.scale = float(xs.max() - xs.min()) or 1.0
            t = (xs - self.x0) / self.scale
            a = np.stack([np.ones_like(t), t, t * t], axis=1)
            self.proj_d = self._projector(a, s_d[self.idx])
            self.proj_m = self._projector(a, s_m[self.idx])
            self.design = a
        else:
            self.idx = np.array([i, i + 1])

    @staticmethod
    def _projector(a: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Weighted least squares: coefficients = data @ P.T (weights 1/s^2; s = 0 -> equal)."""
        w = 1.0 / np.where(s > 0, s, 1.0) ** 2
        if not np.all(s > 0):
            w = np.ones_like(s)
        aw = a.T * w
        return np.linalg.solve(aw @ a, aw)

    def roots(self, d: np.ndarray) -> np.ndarray:
        """The crossing of each replica of ``d`` ``(B, K)``; NaN where there is none."""
        x = self.x
        if self.method == "linear":
            i = self.i
            d0, d1 = d[:, i], d[:, i + 1]
            with np.errstate(divide="ignore", invalid="ignore"):
                lam = x[i] + (x[i + 1] - x[i]) * d0 / (d0 - d1)
        else:
            c0, c1, c2 = (d[:, self.idx] @ self.proj_d.T).T
            lam = self._quadratic_root(c0, c1, c2)
        ok = np.isfinite(lam) & (lam >= self.lo) & (lam <= self.hi)
        return np.where(ok, lam, np.nan)

    def _quadratic_root(self, c0: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
        """The real root of c0 + c1 t + c2 t^2 (t = (lam - x0)/scale) inside the range nearest
        to the bracket's centre."""
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            disc = c1 * c1 - 4.0 * c2 * c0
            sq = np.sqrt(np.where(disc >= 0, disc, np.nan))
            q = -0.5 * (c1 + np.where(c1 >= 0, 1.0, -1.0) * sq)
            r1, r2 = q / c2, c0 / q
            flat = np.abs(c2) <= 1e-12 * np.maximum(np.abs(c1), 1e-300)
            lin = -c0 / c1
            r1 = np.where(flat, lin, r1)
            r2 = np.where(flat, np.nan, r2)
        cands = np.stack([r1, r2], axis=1) * self.scale + self.x0
        inside = np.isfinite(cands) & (cands >= self.lo) & (cands <= self.hi)
        dist = np.where(inside, np.abs(cands - self.center), np.inf)
        pick = np.argmin(dist, axis=1)
        lam = cands[np.arange(cands.shape[0]), pick]
        return np.where(np.isfinite(dist.min(axis=1)), lam, np.nan)

    def values(self, mean: np.ndarray, lam: np.ndarray) -> np.ndarray:
        """The mean curve ``(B, K)`` interpolated at each replica's ``lam`` ``(B,)``."""
        x = self.x
        if self.method == "linear":
            i = self.i
            u = (lam - x[i]) / (x[i + 1] - x[i])
            return mean[:, i] + u * (mean[:, i + 1] - mean[:, i])
        c = mean[:, self.idx] @ self.proj_m.T
        t = (lam - self.x0) / self.scale
        return c[:, 0] + c[:, 1] * t + c[:, 2] * t * t

    def chi2(self, d: np.ndarray, s_d: np.ndarray) -> tuple[float | None, int | None]:
        if self.method == "linear":
            return None, None
        coef = d[self.idx] @ self.proj_d.T
        resid = d[self.idx] - self.design @ coef
        s = s_d[self.idx]
        if not np.all(s > 0):
            return None, None
        return float(np.sum((resid / s) ** 2)), int(self.idx.size - 3)


def _fmt(x: float) -> str:
    return f"{x:g}"


def find_crossing(
    lams: Sequence[float] | np.ndarray,
    y1: Sequence[float] | np.ndarray,
    err1: Sequence[float] | np.ndarray,
    y2: Sequence[float] | np.ndarray,
    err2: Sequence[float] | np.ndarray,
    *,
    observable: str = "",
    sizes: tuple[int, int] = (0, 0),
    method: str = "quadratic",
    window: int = 4,
    n_boot: int = 2000,
    seed: int = 0,
) -> Crossing:
    r"""The crossing of two curves sampled on one grid, with its error (see the module docstring).

    Args:
        lams: ``(K,)`` strictly increasing couplings, ``K >= 2``.
        y1: ``(K,)`` the first curve (volume ``sizes[0]``).
        err1: ``(K,)`` its errors (>= 0).
        y2: ``(K,)`` the second curve.
        err2: ``(K,)`` its errors (>= 0).
        observable: name of the curves (for the result and notes).
        sizes: the two volumes ``(L1, L2)`` (for the result and notes).
        method: ``"quadratic"`` or ``"linear"`` interpolation.
        window: points of the quadratic fit (>= 3).
        n_boot: bootstrap replicas (0: no bootstrap, only the linear propagation).
        seed: seed of the bootstrap's random numbers.

    Returns:
        :class:`Crossing` (``found=False`` with a note when the curves do not cross inside the
        grid).

    Raises:
        ValueError: on inputs of the wrong shape, non-finite values, negative errors, a grid
            that is not strictly increasing, or bad ``method``/``window``/``n_boot``.

    Example:
        >>> lam = [1.0, 2.0, 3.0]
        >>> c = find_crossing(lam, [0.1, 0.2, 0.3], [0.01] * 3, [0.0, 0.2, 0.4], [0.01] * 3,
        ...                   n_boot=0)
        >>> round(c.lam, 12), round(c.value, 12)
        (2.0, 0.2)
    """
    x, a, ea, b, eb = _check_curves(lams, y1, err1, y2, err2)
    if method not in METHODS:
        raise ValueError(f"Expected method in {METHODS}; got {method!r}")
    if not is_int(window, minimum=3, strict=False):
        raise ValueError(f"Expected window >= 3 points; got {window!r}")
    if not is_int(n_boot, minimum=0, strict=False):
        raise ValueError(f"Expected n_boot >= 0; got {n_boot!r}")
    window, n_boot = int(window), int(n_boot)
    sizes = (int(sizes[0]), int(sizes[1]))
    rng_ = (float(x[0]), float(x[-1]))
    base = {"observable": observable, "sizes": sizes, "method": method, "range": rng_}

    d = b - a
    s_d = np.sqrt(ea**2 + eb**2)
    brackets = _brackets(d)
    if not brackets:
        return Crossing(**base, found=False,
                        note=_no_crossing_note(x, d, s_d, observable or "y", sizes))  # fmt: skip
    notes: list[str] = []
    i = _best_bracket(brackets, d, s_d)
    if len(brackets) > 1:
        notes.append(
            f"the difference changes sign in {len(brackets)} grid intervals (noise, or several "
            f"crossings); using the most significant, [{_fmt(x[i])}, {_fmt(x[i + 1])}]"
        )
    interp, lam, value = _interpolate(x, a, b, s_d, i, method, window, notes)
    chi2, dof = interp.chi2(d, s_d)
    err_lin, val_err_lin = _linear_errors(interp, a, b, ea, eb)
    err, err_err, val_err, n_failed = _bootstrap(interp, a, b, ea, eb, n_boot, seed, notes)
    return Crossing(
        **{**base, "method": interp.method}, found=True, lam=lam, error=err,
        error_error=err_err, error_linear=err_lin, value=value, value_error=val_err,
        value_error_linear=val_err_lin, bracket=(float(x[i]), float(x[i + 1])),
        n_brackets=len(brackets), window=tuple(float(v) for v in x[interp.idx]), chi2=chi2,
        dof=dof, n_boot=n_boot, n_failed=n_failed, note="; ".join(notes),
    )  # fmt: skip


def _check_curves(
    lams: Any, y1: Any, err1: Any, y2: Any, err2: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The two curves as float arrays ``(lams, y1, err1, y2, err2)``, checked."""
    x = _as_1d("lams", lams)
    k = x.size
    a, b = _as_1d("y1", y1, k), _as_1d("y2", y2, k)
    ea, eb = _as_1d("err1", err1, k), _as_1d("err2", err2, k)
    if k < 2:
        raise ValueError(f"Expected at least 2 grid points; got {k}")
    if not np.all(np.isfinite(np.concatenate([x, a, b, ea, eb]))):
        raise ValueError("Expected finite couplings, values and errors (drop missing points)")
    if np.any(ea < 0) or np.any(eb < 0):
        raise ValueError("Expected errors >= 0")
    if np.any(np.diff(x) <= 0):
        raise ValueError(f"Expected strictly increasing lams; got {x.tolist()}")
    return x, a, ea, b, eb


def _brackets(d: np.ndarray) -> list[int]:
    """The grid intervals ``(i, i+1)`` where the difference ``d`` changes sign (or is 0)."""
    k = d.size
    brackets = [i for i in range(k - 1) if d[i] == 0 or d[i] * d[i + 1] < 0]
    if k >= 2 and d[-1] == 0 and (k - 2) not in brackets:
        brackets.append(k - 2)
    return brackets


def _best_bracket(brackets: list[int], d: np.ndarray, s_d: np.ndarray) -> int:
    """The sign change that best splits the grid into ``d < 0`` and ``d > 0`` (the module
    docstring's score); the only one if there is one."""
    if len(brackets) == 1:
        return brackets[0]
    zs = d / np.where(s_d > 0, s_d, 1.0)
    cum = np.cumsum(zs)

    def score(j: int) -> float:
        rising = 1.0 if d[j + 1] > d[j] else -1.0
        return rising * ((cum[-1] - cum[j]) - cum[j])

    return max(brackets, key=lambda j: (score(j), -j))


def _no_crossing_note(
    x: np.ndarray, d: np.ndarray, s_d: np.ndarray, name: str, sizes: tuple[int, int]
) -> str:
    """What to say when the difference keeps its sign: where it comes closest to 0."""
    z = np.abs(d) / np.where(s_d > 0, s_d, np.inf)
    j = int(np.argmin(np.where(s_d > 0, z, np.abs(d))))
    sign = ">" if d[0] > 0 else "<"
    return (
        f"no crossing of {name} between L={sizes[0]} and L={sizes[1]} inside "
        f"[{_fmt(float(x[0]))}, {_fmt(float(x[-1]))}]: {name}(L={sizes[1]}) - "
        f"{name}(L={sizes[0]}) {sign} 0 at all {x.size} points (closest at lam = "
        f"{_fmt(float(x[j]))}, {z[j]:.1f} sigma)"
    )


def _interpolate(
    x: np.ndarray, a: np.ndarray, b: np.ndarray, s_d: np.ndarray, i: int, method: str,
    window: int, notes: list[str],
) -> tuple[_Interp, float, float]:
    """The interpolation of bracket ``i`` and the crossing ``(interp, lam, value)``; falls back
    to linear with 2 points or a quadratic without a root in range (noted in ``notes``)."""
    k = x.size
    used = method
    if method == "quadratic" and k < 3:
        used = "linear"
        notes.append("2 grid points: linear interpolation")
    win = min(window, k)
    s_m = 0.5 * s_d
    interp = _Interp(x, s_d, s_m, i, used, win)
    mean = 0.5 * (a + b)
    d = b - a
    lam = float(interp.roots(d[None])[0])
    if not math.isfinite(lam):  # the fitted quadratic has no root in range: use the bracket
        notes.append("the quadratic fit has no root inside the range; linear interpolation")
        interp = _Interp(x, s_d, s_m, i, "linear", win)
        lam = float(interp.roots(d[None])[0])
    value = float(interp.values(mean[None], np.array([lam]))[0])
    return interp, lam, value


def _linear_errors(
    interp: _Interp, a: np.ndarray, b: np.ndarray, ea: np.ndarray, eb: np.ndarray
) -> tuple[float, float]:
    """The linearly propagated errors of the crossing and of its value: central differences in
    every input that the interpolation uses."""
    k = a.size
    sig = np.concatenate([ea, eb])
    grad_lam, grad_val = np.zeros(2 * k), np.zeros(2 * k)
    idx = np.nonzero(sig > 0)[0]
    if idx.size:
        h = 1e-4 * sig[idx]
        rep = np.tile(np.concatenate([a, b]), (2 * idx.size, 1))
        rows = np.arange(idx.size)
        rep[2 * rows, idx] += h
        rep[2 * rows + 1, idx] -= h
        ra, rb = rep[:, :k], rep[:, k:]
        lr = interp.roots(rb - ra)
        vr = interp.values(0.5 * (ra + rb), lr)
        grad_lam[idx] = (lr[0::2] - lr[1::2]) / (2 * h)
        grad_val[idx] = (vr[0::2] - vr[1::2]) / (2 * h)
    err_lin = float(math.sqrt(np.nansum((grad_lam * sig) ** 2)))
    val_err_lin = float(math.sqrt(np.nansum((grad_val * sig) ** 2)))
    return err_lin, val_err_lin


def _bootstrap(
    interp: _Interp, a: np.ndarray, b: np.ndarray, ea: np.ndarray, eb: np.ndarray, n_boot: int,
    seed: int, notes: list[str],
) -> tuple[float | None, float | None, float | None, int]:
    """The parametric bootstrap over the points: ``(error, error_error, value_error,
    n_failed)``; ``None`` errors without replicas (or fewer than 2 with a root)."""
    err = err_err = val_err = None
    n_failed = 0
    if n_boot > 0:
        k = a.size
        gen = np.random.default_rng(seed)
        ra = a + ea * gen.standard_normal((n_boot, k))
        rb = b + eb * gen.standard_normal((n_boot, k))
        lr = interp.roots(rb - ra)
        ok = np.isfinite(lr)
        n_failed = int(n_boot - ok.sum())
        if ok.sum() >= 2:
            vr = interp.values(0.5 * (ra[ok] + rb[ok]), lr[ok])
            err = float(np.std(lr[ok], ddof=1))
            err_err = err / math.sqrt(2 * (ok.sum() - 1))
            val_err = float(np.std(vr, ddof=1))
        if n_failed > FAILED_NOTE * n_boot:
            notes.append(
                f"{n_failed} of {n_boot} bootstrap replicas have no crossing inside the range: "
                "the crossing is not significant at this precision (errors unreliable)"
            )
    return err, err_err, val_err, n_failed


def pairwise_crossings(
    curves: Mapping[int, tuple[Sequence[float], Sequence[float | None], Sequence[float | None]]],
    *,
    observable: str,
    **kwargs: Any,
) -> list[Crossing]:
    """:func:`find_crossing` for every pair of volumes ``L1 < L2``.

    Args:
        curves: ``{L: (lams, values, errors)}``; points whose value or error is ``None`` or not
            finite are dropped, and each pair uses the couplings both curves have.
        observable: the curves' name.
        **kwargs: passed to :func:`find_crossing` (``method``, ``window``, ``n_boot``, ``seed``).

    Returns:
        One :class:`Crossing` per pair, ordered by ``(L1, L2)``; a pair with fewer than 2 common
        points gets ``found=False`` and a note.
    """
    out = []
    for l1, l2 in itertools.combinations(sorted(curves), 2):
        pts = []
        for L in (l1, l2):
            lam, val, err = curves[L]
            pts.append({
                round(float(x), 12): (float(v), float(e))
                for x, v, e in zip(lam, val, err)
                if v is not None and e is not None and math.isfinite(v) and math.isfinite(e)
            })  # fmt: skip
        common = sorted(set(pts[0]) & set(pts[1]))
        if len(common) < 2:
            out.append(Crossing(
                observable=observable, sizes=(l1, l2), found=False,
                note=f"{observable}: fewer than 2 points with values at both L={l1} and L={l2}",
            ))  # fmt: skip
            continue
        ya, ea = zip(*(pts[0][c] for c in common))
        yb, eb = zip(*(pts[1][c] for c in common))
        out.append(find_crossing(common, ya, ea, yb, eb, observable=observable, sizes=(l1, l2),
                                 **kwargs))  # fmt: skip
    return out
