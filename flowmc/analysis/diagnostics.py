r"""Sampler diagnostics shared by the analysis, the flow evaluation and training.

One home for each rule, so that ``flowmc analyze``, ``flowmc eval`` and ``flowmc train`` (its
automatic Z2 symmetrisation) cannot drift apart:

* :func:`binomial_error` — the standard error of a fraction;
* :func:`sign_balance_rule` — **the** Z2 sign rule: a Z2-symmetric target has
  :math:`P(M > 0) = \tfrac12` and :math:`\langle m\rangle = 0`, and a sample is called
  *sign-imbalanced* when either is more than :data:`Z2_SIGMA` standard errors away;
* :func:`longest_rejection_run`, :func:`sign_changes`, :func:`stuck_chains` — per-chain
  statistics of the stored rows;
* :func:`acceptance_by_kernel` — the acceptance of every kernel whose per-row flags an
  ensemble stores (flow proposal, HMC trajectory, ...).

Every function is pure numpy on ``(n, C)`` arrays (``n`` rows, ``C`` chains).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from flowmc._checks import is_int

__all__ = [
    "Z2_SIGMA",
    "SignBalance",
    "binomial_error",
    "sign_balance_rule",
    "longest_rejection_run",
    "sign_changes",
    "stuck_chains",
    "kernel_of_sampler",
    "acceptance_by_kernel",
]

#: Threshold, in standard errors, of every Z2 sign-balance decision (analysis warnings, eval
#: warning, automatic symmetrisation after training).
Z2_SIGMA = 4.0


def binomial_error(frac: float, n: int) -> float:
    r"""Standard error of a fraction of ``n`` independent trials, floored at one count in ``2n``.

    .. math:: \sigma = \sqrt{\max(p(1-p),\ 1/(4n)) / n}

    The floor keeps a one-sided sample (``p = 0`` or ``1``) from getting error 0, which would
    make every z-score against it infinite.

    Args:
        frac: the observed fraction :math:`p \in [0, 1]`.
        n: the number of trials (>= 1).

    Returns:
        The standard error.

    Raises:
        ValueError: if ``n < 1`` or ``frac`` is outside [0, 1].

    Example:
        >>> binomial_error(0.5, 100)
        0.05
    """
    if int(n) != n or n < 1:
        raise ValueError(f"Expected n >= 1 trials; got {n!r}")
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"Expected a fraction in [0, 1]; got {frac!r}")
    return math.sqrt(max(frac * (1.0 - frac), 0.25 / n) / n)


class SignBalance(NamedTuple):
    """Outcome of :func:`sign_balance_rule`.

    Attributes:
        frac_positive: fraction of configurations with :math:`M > 0`.
        frac_error: its standard error.
        z_frac: :math:`|p - 1/2| / \\sigma_p` (``inf`` when the error is 0 and p != 1/2).
        m_over_error: :math:`\\langle m\\rangle/\\sigma_m` if given, else ``None``.
        imbalanced: ``z_frac > threshold`` or ``|m_over_error| > threshold``.
        threshold: the threshold used.
    """

    frac_positive: float
    frac_error: float
    z_frac: float
    m_over_error: float | None
    imbalanced: bool
    threshold: float


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.copysign(math.inf, num)


def sign_balance_rule(
    frac_positive: float,
    frac_error: float,
    *,
    m_over_error: float | None = None,
    threshold: float = Z2_SIGMA,
) -> SignBalance:
    r"""The Z2 sign rule: is a sample of a Z2-symmetric target sign-imbalanced?

    Imbalanced when :math:`|p_{M>0} - \tfrac12| > t\,\sigma_p`, or (if given)
    :math:`|\langle m\rangle|/\sigma_m > t`, with :math:`t` = ``threshold``. Callers supply
    the error that fits their data: :func:`binomial_error` for independent flow draws, the
    Gamma-method error of the indicator series (floored at the binomial error) for a Markov
    chain. Only meaningful for a Z2-symmetric action; checking that is the caller's job.

    Args:
        frac_positive: fraction with :math:`M > 0`.
        frac_error: its standard error.
        m_over_error: :math:`\langle m\rangle / \sigma_m`, or ``None`` to use the fraction only.
        threshold: the number of standard errors (default :data:`Z2_SIGMA`).

    Returns:
        :class:`SignBalance`.

    Example:
        >>> sign_balance_rule(0.5, 0.01).imbalanced, sign_balance_rule(0.6, 0.01).imbalanced
        (False, True)
    """
    z_frac = abs(_ratio(frac_positive - 0.5, frac_error))
    bad = z_frac > threshold or (m_over_error is not None and abs(m_over_error) > threshold)
    return SignBalance(
        float(frac_positive),
        float(frac_error),
        float(z_frac),
        None if m_over_error is None else float(m_over_error),
        bool(bad),
        float(threshold),
    )


def _as_rows(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"Expected {name} of shape (n, C); got {arr.shape}")
    return arr


def longest_rejection_run(accepted: Any) -> np.ndarray:
    """Longest run of consecutive rejected rows of each chain.

    Args:
        accepted: ``(n, C)`` booleans (``True`` = the row's proposal was accepted).

    Returns:
        ``(C,)`` int64 array.

    Example:
        >>> longest_rejection_run([[True], [False], [False], [True]]).tolist()
        [2]
    """
    acc = _as_rows(accepted, "accepted").astype(bool)
    out = np.zeros(acc.shape[1], dtype=np.int64)
    for c in range(acc.shape[1]):
        rej = np.concatenate([[0], (~acc[:, c]).astype(np.int8), [0]])
        d = np.diff(rej)
        starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
        if starts.size:
            out[c] = int((ends - starts).max())
    return out


def sign_changes(m: Any) -> list[int]:
    """Number of sign changes of ``m`` along the rows, per chain (zeros are skipped).

    Args:
        m: ``(n, C)`` magnetisations.

    Example:
        >>> sign_changes([[1.0], [-1.0], [0.0], [-2.0], [3.0]])
        [2]
    """
    arr = _as_rows(m, "m")
    out = []
    for c in range(arr.shape[1]):
        s = np.sign(arr[:, c])
        s = s[s != 0]
        out.append(int(np.count_nonzero(s[1:] != s[:-1])))
    return out


def stuck_chains(m: Any, *, n_sd: float = 3.0) -> list[int]:
    """Chains that never changed sign while ``|mean m| > n_sd`` times their spread.

    Such a chain samples one Z2 sector only (broken phase), even when the chains together
    look balanced (one chain at +m0, one at -m0).

    Args:
        m: ``(n, C)`` magnetisations.
        n_sd: the spread multiple.

    Returns:
        The indices of the stuck chains.
    """
    arr = _as_rows(m, "m").astype(np.float64)
    crossings = sign_changes(arr)
    return [
        c
        for c in range(arr.shape[1])
        if crossings[c] == 0 and abs(float(arr[:, c].mean())) > n_sd * float(arr[:, c].std())
    ]


def kernel_of_sampler(sampler: Mapping[str, Any]) -> str:
    """The kernel whose acceptance the generic per-row scalar ``accepted`` records.

    ``"flow"`` for flow ensembles (``sampler["name"]`` starting with ``flow``) and for the
    hybrid (its ``accepted`` is the flow step's), ``"hmc"`` for HMC, else the sampler name.
    """
    name = str(sampler.get("name", "") or "sampler")
    if name.startswith("flow") or name == "hybrid":
        return "flow"
    return name


def acceptance_by_kernel(
    scalars: Mapping[str, np.ndarray], sampler: Mapping[str, Any]
) -> tuple[dict[str, float], list[str]]:
    """Acceptance rate of every kernel whose per-row flags are stored.

    Rules (documented in ``docs/analysis.md``):

    * ``accepted`` (or ``is_accepted``) belongs to :func:`kernel_of_sampler`;
    * ``<kernel>_accepted``: per-row counts of accepted moves, divided by the moves per row
      ``sampler[f"{kernel}_traj"]`` (e.g. ``hmc_traj``) when the sampler records it, else
      booleans (counts larger than 1 without it: the kernel is skipped with a note);
    * ``<kernel>_acceptance``: per-row acceptance fractions or probabilities, averaged.

    A ``<kernel>_...`` entry overrides ``accepted`` for the same kernel, and
    ``<kernel>_acceptance`` overrides ``<kernel>_accepted`` (probabilities have less noise).

    Args:
        scalars: per-row scalars, each ``(n, C)``.
        sampler: the ensemble's ``sampler`` attribute.

    Returns:
        ``({kernel: acceptance}, notes)``.
    """
    out: dict[str, float] = {}
    notes: list[str] = []
    for generic in ("accepted", "is_accepted"):
        if generic in scalars:
            out[kernel_of_sampler(sampler)] = float(np.mean(np.asarray(scalars[generic], float)))
            break
    for suffix in ("_accepted", "_acceptance"):
        for name in sorted(scalars):
            if not name.endswith(suffix) or name == "is_accepted":
                continue
            kernel = name[: -len(suffix)]
            x = np.asarray(scalars[name], dtype=np.float64)
            if not np.all(np.isfinite(x)):
                notes.append(f"scalar {name!r} has non-finite values: {kernel} acceptance skipped")
                continue
            per_row = sampler.get(f"{kernel}_traj")
            counted = is_int(per_row, minimum=1)
            if suffix == "_accepted" and counted:  # counts of accepted moves out of per_row
                x = x / per_row
            elif suffix == "_accepted" and x.size and float(x.max()) > 1.0:
                notes.append(
                    f"scalar {name!r} counts accepted moves per row but the sampler "
                    f"attribute {kernel + '_traj'!r} (moves per row) is missing: "
                    f"{kernel} acceptance skipped"
                )
                continue
            out[kernel] = float(x.mean()) if x.size else float("nan")
    return out, notes
