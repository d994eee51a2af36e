r"""Quality of a trained flow on fresh samples: ESS, free-energy bound, log Z, sign balance.

For :math:`N` independent draws :math:`\phi_i\sim q` with :math:`w_i = e^{-S(\phi_i)}/q(\phi_i)`:

* reweighting ESS :math:`(\sum w)^2 / (N\sum w^2)` on all :math:`N` samples, and its spread over
  batches (the batch ESS is biased upward for small batches: report the all-sample value);
* variational free energy :math:`F_q = \langle\log q + S\rangle_q \ge -\log Z`;
* :math:`\hat Z = \frac1N\sum_i w_i`, unbiased for any :math:`q`; the error of
  :math:`\log\hat Z` is :math:`\mathrm{sd}(w)/(\bar w\sqrt N)` (delta method);
* the MH acceptance of an independence chain run on the same draws;
* the fraction of samples with :math:`M > 0` (½ for a Z2-symmetric target) with its binomial error
  (:func:`flowmc.analysis.diagnostics.binomial_error`) and the outcome of the one Z2 sign rule
  (:func:`flowmc.analysis.diagnostics.sign_balance_rule`), which also decides, after training,
  whether a flow is sampled through its Z2-symmetrised density (:func:`needs_symmetrisation`).

:func:`evaluate_flow` returns a :class:`FlowEvaluation`; tables and plots of it are in
:mod:`flowmc.report` (:func:`~flowmc.report.eval_table`,
:func:`~flowmc.report.plot_action_vs_effective`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from flowmc.analysis.autocorr import kish_ess
from flowmc.analysis.diagnostics import Z2_SIGMA, SignBalance, binomial_error, sign_balance_rule
from flowmc.flows.cnf import DISCREPANCY_TOLERANCE
from flowmc.flows.flow import base_flow
from flowmc.lattice.action import Phi4Action
from flowmc.mcmc import imh

__all__ = [
    "weights_by_magnetization",
    "FlowEvaluation",
    "evaluate_flow",
    "evaluate_model",
    "draw_samples",
    "sign_balance",
    "needs_symmetrisation",
]


@torch.no_grad()
def draw_samples(
    proposal: torch.nn.Module,
    action: Phi4Action,
    n: int,
    *,
    batch_size: int = 1024,
    generator: torch.Generator | None = None,
    keep_configs: bool = False,
) -> dict[str, np.ndarray]:
    """Draw ``n`` flow samples in batches; returns float64 arrays ``action``, ``log_q``,
    ``magnetization`` (and ``configs`` if asked)."""
    out: dict[str, list] = {"action": [], "log_q": [], "magnetization": [], "configs": []}
    done = 0
    while done < n:
        k = min(batch_size, n - done)
        phi, log_q = proposal.sample(k, generator=generator)
        out["action"].append(action(phi).double().cpu().numpy())
        out["log_q"].append(log_q.double().cpu().numpy())
        out["magnetization"].append(phi.flatten(1).sum(1).double().cpu().numpy())
        if keep_configs:
            out["configs"].append(phi.cpu().numpy())
        done += k
    res = {k: np.concatenate(v) for k, v in out.items() if v}
    return res


@dataclass
class FlowEvaluation:
    r"""Quality of a flow on fresh samples (:func:`evaluate_flow`).

    Indexing gives the JSON form (``res["ess"]``); :meth:`to_dict` returns all of it.

    Attributes:
        n: number of samples.
        batch_size: samples per flow call (and per ESS batch).
        ess: Kish ESS fraction of all ``n`` samples.
        ess_batch_mean, ess_batch_err: mean of the per-batch ESS and its standard error.
        ess_batches: the per-batch values.
        f_q, f_q_err: variational free energy :math:`F_q \\ge -\\log Z` and its error.
        log_z, log_z_err: :math:`\\log\\hat Z` and its delta-method error.
        mh_acceptance: acceptance of an independence MH chain run on the same draws.
        frac_m_positive, frac_m_positive_err: fraction with ``M > 0`` and its binomial error.
        n_nonfinite: samples with a non-finite weight (counted as zero weight).
        z2_symmetric_action: whether the target is Z2 symmetric.
        sign_balance: the Z2 sign rule's outcome (``None`` if the target is not Z2 symmetric).
        by_magnetization: where the flow errs, per bin of the magnetisation density
            :math:`\bar\phi` (:func:`weights_by_magnetization`).
        integration: for a flow with continuous layers, one dict per layer: ``steps``, ``sd``,
            ``mean``, ``rms`` and ``max`` of the log-density discrepancy
            :math:`\ell_N - \ell_{2N}` over the draws, the backward
            integration's ``round_trip`` error, the ``tolerance`` ``flowmc sample`` applies and
            whether it is ``within`` it (:func:`flowmc.flows.flow.check_integration`); ``[]``
            otherwise.
        seconds, model, action, symmetric, log_z_exact: filled by :func:`evaluate_model`.
        samples: the draws, ``{"action", "log_q", "magnetization"}`` float64 arrays ``(n,)``.
    """

    n: int
    batch_size: int
    ess: float
    ess_batch_mean: float
    ess_batch_err: float
    ess_batches: list[float]
    f_q: float
    f_q_err: float
    log_z: float
    log_z_err: float
    mh_acceptance: float
    frac_m_positive: float
    frac_m_positive_err: float
    n_nonfinite: int
    z2_symmetric_action: bool
    sign_balance: SignBalance | None
    by_magnetization: list[dict[str, float]] = field(default_factory=list)
    integration: list[dict[str, Any]] = field(default_factory=list)
    seconds: float | None = None
    model: str | None = None
    action: dict | None = None
    symmetric: bool | None = None
    log_z_exact: float | None = None
    samples: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: every attribute except ``samples``; ``sign_balance`` as a dict."""
        skip = ("samples", "sign_balance")
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        out["ess_batches"] = list(self.ess_batches)
        sb = self.sign_balance
        out["sign_balance"] = None if sb is None else dict(sb._asdict())
        out["z2_imbalanced"] = None if sb is None else sb.imbalanced
        for key in ("seconds", "model", "action", "symmetric", "log_z_exact"):
            if out[key] is None:
                del out[key]
        return out

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()


def evaluate_flow(
    proposal: torch.nn.Module,
    action: Phi4Action,
    n: int = 10240,
    *,
    batch_size: int = 1024,
    generator: torch.Generator | None = None,
) -> FlowEvaluation:
    """Evaluate a flow on ``n`` fresh samples (see module docstring).

    Returns:
        :class:`FlowEvaluation` (``res["ess"]`` etc. give its JSON form).
    """
    if n < 2:
        raise ValueError(f"Expected n >= 2 samples; got {n}")
    if batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1; got {batch_size}")
    s = draw_samples(proposal, action, n, batch_size=batch_size, generator=generator)
    log_w = -s["action"] - s["log_q"]
    finite = np.isfinite(log_w)
    lw = log_w[finite]
    n_batches = max(n // batch_size, 1)
    ess_batches = [kish_ess(b, nonfinite="zero") for b in np.array_split(log_w, n_batches)]
    shift = lw.max()
    w = np.exp(lw - shift)
    z_mean = w.sum() / n
    log_z = float(np.log(z_mean) + shift)
    log_z_err = float(np.std(np.where(finite, np.exp(log_w - shift), 0.0)) / z_mean / math.sqrt(n))
    f = s["log_q"][finite] + s["action"][finite]
    # an independence MH chain run on these same draws, in order
    state = imh.IMHState(
        torch.zeros(1, 1), torch.tensor([s["action"][0]]), torch.tensor([s["log_q"][0]])
    )
    gen = torch.Generator().manual_seed(12345)
    log_u = torch.rand(n - 1, 1, generator=gen, dtype=torch.float64).log()
    _, info = imh.accept_reject(
        state,
        torch.zeros(n - 1, 1, 1),
        torch.from_numpy(s["action"][1:]).view(-1, 1),
        torch.from_numpy(s["log_q"][1:]).view(-1, 1),
        log_u,
    )
    pos = float(np.mean(s["magnetization"] > 0))
    pos_err = binomial_error(pos, n)
    z2 = bool(getattr(action, "is_z2_symmetric", False))
    return FlowEvaluation(
        n=int(n),
        batch_size=int(batch_size),
        ess=kish_ess(log_w, nonfinite="zero"),
        ess_batch_mean=float(np.mean(ess_batches)),
        ess_batch_err=float(np.std(ess_batches, ddof=1) / math.sqrt(len(ess_batches)))
        if len(ess_batches) > 1
        else float("nan"),
        ess_batches=[float(e) for e in ess_batches],
        f_q=float(f.mean()),
        f_q_err=float(f.std(ddof=1) / math.sqrt(f.size)),
        log_z=log_z,
        log_z_err=log_z_err,
        mh_acceptance=float(info.is_accepted.double().mean()),
        frac_m_positive=pos,
        frac_m_positive_err=pos_err,
        n_nonfinite=int((~finite).sum()),
        z2_symmetric_action=z2,
        sign_balance=sign_balance_rule(pos, pos_err) if z2 else None,
        by_magnetization=weights_by_magnetization(
            s["magnetization"] / math.prod(action.lattice_shape), log_w
        ),
        samples=s,
    )


def weights_by_magnetization(
    mbar: np.ndarray, log_w: np.ndarray, n_bins: int = 8, min_count: int = 20
) -> list[dict[str, float]]:
    r"""Importance weights binned by the magnetisation density: where a flow errs.

    For equal-count bins of :math:`\bar\phi = M/V` (over the draws of the flow) each entry
    gives the bin's range, the fraction of draws in it under the flow (``q_frac``) and under the
    target (``p_frac``, the normalised weight in the bin: a mismatch means the magnetisation's
    distribution is wrong), and the mean (relative to the overall mean) and standard deviation
    of :math:`\log w` there (a large spread means the flow is poor in that region, e.g. at
    :math:`\bar\phi \approx 0` near a transition, where the configurations hold domain walls).

    Args:
        mbar: ``(n,)`` magnetisation densities of the draws.
        log_w: ``(n,)`` their log weights (non-finite: weight 0).
        n_bins: bins (equal numbers of draws).
        min_count: bins with fewer finite draws are merged away (few draws: fewer bins).

    Returns:
        A list of dicts ``{lo, hi, q_frac, p_frac, mean_log_w, sd_log_w, n}``.
    """
    mbar = np.asarray(mbar, dtype=np.float64)
    log_w = np.asarray(log_w, dtype=np.float64)
    finite = np.isfinite(log_w)
    n_bins = int(max(1, min(n_bins, finite.sum() // max(min_count, 1))))
    edges = np.quantile(mbar, np.linspace(0.0, 1.0, n_bins + 1))
    edges[0], edges[-1] = -np.inf, np.inf
    shift = log_w[finite].max() if finite.any() else 0.0
    w = np.where(finite, np.exp(np.where(finite, log_w, shift) - shift), 0.0)
    total = w.sum()
    mean_all = log_w[finite].mean() if finite.any() else float("nan")
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (mbar >= lo) & (mbar < hi) if np.isfinite(hi) else mbar >= lo
        ok = sel & finite
        out.append({
            "lo": float(mbar[sel].min()) if sel.any() else float("nan"),
            "hi": float(mbar[sel].max()) if sel.any() else float("nan"),
            "n": int(sel.sum()),
            "q_frac": float(sel.mean()),
            "p_frac": float(w[sel].sum() / total) if total > 0 else float("nan"),
            "mean_log_w": float(log_w[ok].mean() - mean_all) if ok.any() else float("nan"),
            "sd_log_w": float(log_w[ok].std()) if ok.sum() > 1 else float("nan"),
        })
    return out


def evaluate_model(
    model: Any,
    n: int = 10240,
    *,
    batch_size: int = 1024,
    generator: torch.Generator | None = None,
) -> FlowEvaluation:
    """:func:`evaluate_flow` on a :class:`~flowmc.io.checkpoint.LoadedModel`, with provenance.

    Fills ``seconds``, ``model`` (its path), ``action`` (parameters), ``symmetric`` and, for the
    free theory (``lam == 0``), the exact ``log_z_exact``.
    """
    t0 = time.perf_counter()
    res = evaluate_flow(model.proposal, model.action, n, batch_size=batch_size, generator=generator)
    res.integration = integration_report(model.proposal)
    res.seconds = time.perf_counter() - t0
    res.model = str(model.path)
    res.action = model.action.params()
    res.symmetric = bool(model.symmetric)
    if model.action.lam == 0:
        res.log_z_exact = float(model.action.free_theory().log_z())
    return res


def integration_report(proposal: torch.nn.Module, n: int = 256) -> list[dict[str, Any]]:
    """The log-density discrepancy of each continuous layer of ``proposal`` on ``n`` draws, with
    the tolerance ``flowmc sample`` applies (``[]`` for a flow without continuous layers)."""
    flow, lam = base_flow(proposal)
    if flow is None:
        return []
    return [
        {**d._asdict(), "tolerance": DISCREPANCY_TOLERANCE,
         "within": bool(d.sd <= DISCREPANCY_TOLERANCE)}
        for d in flow.integration_discrepancy(n, lam=lam)
    ]


def sign_balance(
    proposal: torch.nn.Module,
    action: Phi4Action,
    n: int = 4096,
    *,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Fraction of ``n`` proposal draws with M > 0 and its binomial error
    (:func:`flowmc.analysis.diagnostics.binomial_error`)."""
    m = draw_samples(proposal, action, n, generator=generator)["magnetization"]
    frac = float(np.mean(m > 0))
    return frac, binomial_error(frac, n)


def needs_symmetrisation(
    flow: torch.nn.Module,
    action: Phi4Action,
    *,
    n: int = 4096,
    threshold: float = Z2_SIGMA,
    generator: torch.Generator | None = None,
) -> bool:
    """Whether a trained flow should be sampled through ``Z2SymmetricFlow``.

    True when the action is Z2 symmetric, the flow is not Z2 equivariant (an equivariant flow is
    already even) and its draws are sign-imbalanced by the one Z2 sign rule
    (:func:`flowmc.analysis.diagnostics.sign_balance_rule`): the fraction with M > 0 is more than
    ``threshold`` binomial errors from ½, i.e. the flow (nearly) misses one of the modes ±φ.
    Symmetrising is exact for any flow, so a false positive only costs speed.
    """
    if not getattr(action, "is_z2_symmetric", False):
        return False
    cfg = getattr(flow, "config", None)
    if cfg is not None and cfg.equivariant:
        return False
    frac, err = sign_balance(flow, action, n, generator=generator)
    return sign_balance_rule(frac, err, threshold=threshold).imbalanced
