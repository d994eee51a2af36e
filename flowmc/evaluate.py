r"""Quality of a trained flow on fresh samples: ESS, free-energy bound, log Z, sign balance.

For :math:`N` independent draws :math:`\phi_i\sim q` with :math:`w_i = e^{-S(\phi_i)}/q(\phi_i)`:

* reweighting ESS :math:`(\sum w)^2 / (N\sum w^2)` on all :math:`N` samples, and its spread over
  batches (the batch ESS is biased upward for small batches: report the all-sample value);
* variational free energy :math:`F_q = \langle\log q + S\rangle_q \ge -\log Z`;
* :math:`\hat Z = \frac1N\sum_i w_i`, unbiased for any :math:`q`; the error of
  :math:`\log\hat Z` is :math:`\mathrm{sd}(w)/(\bar w\sqrt N)` (delta method);
* the MH acceptance of an independence chain run on the same draws;
* the fraction of samples with :math:`M > 0` (½ for a Z2-symmetric target) with its binomial error.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flowmc import imh
from flowmc.action import Phi4Action
from flowmc.autocorr import kish_ess

__all__ = [
    "evaluate_flow",
    "draw_samples",
    "plot_action_vs_effective",
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


def _kish(log_w: np.ndarray) -> float:
    """Kish ESS with non-finite weights counted as zero weight."""
    log_w = np.asarray(log_w, dtype=np.float64)
    return kish_ess(np.where(np.isfinite(log_w), log_w, -np.inf))


def evaluate_flow(
    proposal: torch.nn.Module,
    action: Phi4Action,
    n: int = 10240,
    *,
    batch_size: int = 1024,
    generator: torch.Generator | None = None,
) -> dict:
    """Evaluate a flow on ``n`` fresh samples (see module docstring).

    Returns:
        A JSON-serialisable dict with keys ``n, batch_size, ess, ess_batch_mean, ess_batch_err,
        f_q, f_q_err, log_z, log_z_err, mh_acceptance, frac_m_positive, frac_m_positive_err,
        n_nonfinite`` (and ``ess_batches``, the per-batch values).
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
    ess_batches = [_kish(b) for b in np.array_split(log_w, n_batches)]
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
    return {
        "n": int(n),
        "batch_size": int(batch_size),
        "ess": _kish(log_w),
        "ess_batch_mean": float(np.mean(ess_batches)),
        "ess_batch_err": float(np.std(ess_batches, ddof=1) / math.sqrt(len(ess_batches)))
        if len(ess_batches) > 1
        else float("nan"),
        "ess_batches": [float(e) for e in ess_batches],
        "f_q": float(f.mean()),
        "f_q_err": float(f.std(ddof=1) / math.sqrt(f.size)),
        "log_z": log_z,
        "log_z_err": log_z_err,
        "mh_acceptance": float(info.is_accepted.double().mean()),
        "frac_m_positive": pos,
        "frac_m_positive_err": _binomial_error(pos, n),
        "n_nonfinite": int((~finite).sum()),
        "_samples": s,
    }


def sign_balance(
    proposal: torch.nn.Module,
    action: Phi4Action,
    n: int = 4096,
    *,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Fraction of ``n`` proposal draws with M > 0 and its binomial error (floored at 1/(2n))."""
    m = draw_samples(proposal, action, n, generator=generator)["magnetization"]
    frac = float(np.mean(m > 0))
    return frac, _binomial_error(frac, n)


def _binomial_error(frac: float, n: int) -> float:
    """Binomial standard error of a fraction, floored at that of one count in ``2n``."""
    return math.sqrt(max(frac * (1 - frac), 0.25 / n) / n)


def needs_symmetrisation(
    flow: torch.nn.Module,
    action: Phi4Action,
    *,
    n: int = 4096,
    threshold: float = 4.0,
    generator: torch.Generator | None = None,
) -> bool:
    """Whether a trained flow should be sampled through ``Z2SymmetricFlow``.

    True when the action is Z2 symmetric, the flow is not Z2 equivariant (an equivariant flow is
    already even) and its draws are sign-imbalanced: the fraction with M > 0 is more than
    ``threshold`` binomial errors from ½, i.e. the flow (nearly) misses one of the modes ±φ.
    Symmetrising is exact for any flow, so a false positive only costs speed.
    """
    if not getattr(action, "is_z2_symmetric", False):
        return False
    cfg = getattr(flow, "config", None)
    if cfg is not None and cfg.equivariant:
        return False
    frac, err = sign_balance(flow, action, n, generator=generator)
    return abs(frac - 0.5) > threshold * err


def plot_action_vs_effective(samples: dict, path: str, title: str = "") -> None:
    """The seed's diagnostic: S against S_eff = -log q (a slope-1 line when q ∝ e^{-S})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s_eff = -samples["log_q"]
    s = samples["action"]
    ok = np.isfinite(s_eff) & np.isfinite(s)
    s_eff, s = s_eff[ok], s[ok]
    b = float(np.mean(s) - np.mean(s_eff))
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    ax.hist2d(s_eff, s, bins=50, cmap="viridis")
    xs = np.linspace(s_eff.min(), s_eff.max(), 4)
    ax.plot(xs, xs + b, ":", color="w", label=f"slope 1, offset {b:.3f}")
    ax.set_xlabel(r"$S_{\mathrm{eff}} = -\log q(\phi)$")
    ax.set_ylabel(r"$S(\phi)$")
    ax.set_title(title or "action vs effective action")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
