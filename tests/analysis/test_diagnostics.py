"""flowmc.analysis.diagnostics: the one Z2 sign rule (used by analyze, eval and train), the one
binomial error, rejection runs, sign changes and per-kernel acceptance. About 2 s."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowmc import report
from flowmc.analysis import diagnostics
from flowmc.analysis import ensemble as analysis
from flowmc.analysis.diagnostics import (
    SignBalance,
    acceptance_by_kernel,
    binomial_error,
    longest_rejection_run,
    sign_balance_rule,
    sign_changes,
    stuck_chains,
)
from flowmc.flows.flow import FlowConfig, build_flow
from flowmc.io.ensemble import EnsembleWriter
from flowmc.lattice.action import FreeTheory, Phi4Action
from flowmc.training import evaluate


def test_binomial_error_and_floor() -> None:
    assert binomial_error(0.5, 100) == pytest.approx(0.05, rel=1e-15)
    assert binomial_error(0.2, 400) == pytest.approx(math.sqrt(0.16 / 400), rel=1e-15)
    # a one-sided sample is floored at one count in 2n, never 0
    assert binomial_error(1.0, 100) == binomial_error(0.0, 100) == pytest.approx(0.005)
    for bad in ((0.5, 0), (1.5, 10), (-0.1, 10)):
        with pytest.raises(ValueError, match="Expected"):
            binomial_error(*bad)


def test_sign_balance_rule() -> None:
    assert sign_balance_rule(0.5, 0.01) == SignBalance(0.5, 0.01, 0.0, None, False, 4.0)
    assert sign_balance_rule(0.625, 0.03125).imbalanced is False  # exactly 4 sigma: not beyond
    assert sign_balance_rule(0.6251, 0.03125).imbalanced is True
    assert sign_balance_rule(0.46, 0.01, threshold=3.0).imbalanced is True
    # the magnetisation alone can trip it (a balanced fraction, a shifted mean)
    assert sign_balance_rule(0.5, 0.01, m_over_error=-4.5).imbalanced is True
    assert sign_balance_rule(0.5, 0.01, m_over_error=3.9).imbalanced is False
    assert sign_balance_rule(1.0, 0.0).z_frac == math.inf


def test_rows_statistics() -> None:
    acc = np.ones((20, 3), bool)
    acc[2:9, 0] = False
    acc[15:18, 2] = False
    acc[19, 2] = False
    assert longest_rejection_run(acc).tolist() == [7, 0, 3]
    m = np.array([[1.0, 2.0], [-1.0, 2.1], [0.0, 1.9], [2.0, 2.0]])
    assert sign_changes(m) == [2, 0]
    assert stuck_chains(m) == [1]  # chain 1 never crossed, mean 2 > 3 x spread 0.07
    with pytest.raises(ValueError, match=r"shape \(n, C\)"):
        sign_changes(np.zeros(5))


def test_acceptance_by_kernel_rules() -> None:
    rng = np.random.default_rng(0)
    acc = rng.random((50, 2)) < 0.6
    assert acceptance_by_kernel({"accepted": acc}, {"name": "flow-imh"}) == (
        {"flow": acc.mean()}, [])
    assert acceptance_by_kernel({"accepted": acc}, {"name": "hmc"})[0] == {"hmc": acc.mean()}
    flow = rng.random((50, 2)) < 0.3
    counts = rng.integers(0, 5, (50, 2)).astype(float)
    probs = rng.random((50, 2))
    hyb = {"name": "hybrid", "hmc_traj": 4}
    got, notes = acceptance_by_kernel({"accepted": flow, "flow_accepted": flow,
                                       "hmc_accepted": counts}, hyb)  # fmt: skip
    assert got == pytest.approx({"flow": flow.mean(), "hmc": counts.mean() / 4}) and not notes
    got, _ = acceptance_by_kernel({"hmc_accepted": counts, "hmc_acceptance": probs}, hyb)
    assert got["hmc"] == pytest.approx(probs.mean())  # probabilities win over counts
    got, notes = acceptance_by_kernel({"hmc_accepted": counts}, {"name": "hybrid"})
    assert got == {} and "'hmc_traj'" in notes[0]
    bad = probs.copy()
    bad[0, 0] = np.nan
    got, notes = acceptance_by_kernel({"hmc_acceptance": bad}, hyb)
    assert got == {} and "non-finite" in notes[0]


@pytest.fixture(scope="module")
def balanced_ensemble(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Exact free-theory samples (Z2 symmetric, balanced), 2 chains x 300."""
    shape, n, c = (4, 4), 300, 2
    phi = FreeTheory(0.5, shape).sample(n * c, generator=torch.Generator().manual_seed(1))
    phi = phi.numpy().reshape(n, c, *shape)
    path = tmp_path_factory.mktemp("z2") / "z2.h5"
    scalars = {"magnetization": phi.reshape(n, c, -1).sum(-1), "accepted": np.ones((n, c), bool)}
    with EnsembleWriter.create(
        path, lattice_shape=shape, n_chains=c, scalar_names=list(scalars),
        action={"m2": 0.5, "lam": 0.0}, sampler={"name": "hmc"}, store_configs=False,
    ) as w:  # fmt: skip
        w.append(scalars=scalars, state={"phi": phi[-1]}, wall_time=0.0)
    return str(path)


@pytest.mark.parametrize("forced", [True, False])
def test_one_z2_rule_decides_everywhere(
    balanced_ensemble: str, monkeypatch: pytest.MonkeyPatch, forced: bool
) -> None:
    """analyze's warning, eval's warning and train's automatic symmetrisation all follow
    diagnostics.sign_balance_rule: forcing its verdict flips all three (before, each had its
    own inline comparison and none of them would follow)."""
    assert analysis.sign_balance_rule is diagnostics.sign_balance_rule
    assert evaluate.sign_balance_rule is diagnostics.sign_balance_rule
    calls: list[str] = []

    def spy(frac: float, err: float, **kw: object) -> SignBalance:
        calls.append("call")
        return sign_balance_rule(frac, err, **kw)._replace(imbalanced=forced)

    monkeypatch.setattr(analysis, "sign_balance_rule", spy)
    monkeypatch.setattr(evaluate, "sign_balance_rule", spy)
    res = analysis.analyze(balanced_ensemble)
    assert any("Z2 sign balance is off" in w for w in res["warnings"]) is forced
    shape = (4, 4)
    action = Phi4Action(-4.0, 8.0, shape)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        flow = build_flow(FlowConfig(shape, n_layers=2, hidden=(4,)))
    gen = torch.Generator().manual_seed(0)
    assert evaluate.needs_symmetrisation(flow, action, n=256, generator=gen) is forced
    ev = evaluate.evaluate_flow(flow, action, 256, batch_size=128, generator=gen)
    assert ev.sign_balance.imbalanced is forced and ev["z2_imbalanced"] is forced
    assert ("sign-imbalanced" in report.eval_table(ev)) is forced
    assert len(calls) == 3


def test_real_rule_is_quiet_on_balanced_data(balanced_ensemble: str) -> None:
    """Negative control for the spy test: the real rule does not fire on balanced data."""
    res = analysis.analyze(balanced_ensemble)
    assert res.diagnostics.sign_balance.imbalanced is False
    assert not any("Z2" in w for w in res["warnings"])


def test_weights_by_magnetization_locates_the_error() -> None:
    """Equal-count bins of m: exact weights give p_frac == q_frac and no spread (control);
    weights that are noisy only near m = 0 show the spread there and nowhere else, and a flow
    that under-weights m > 0 shows p_frac above q_frac there."""
    from flowmc.training.evaluate import weights_by_magnetization

    rng = np.random.default_rng(0)
    m = rng.uniform(-1, 1, 20000)
    flat = weights_by_magnetization(m, np.zeros_like(m), n_bins=4)
    assert len(flat) == 4 and all(b["n"] == 5000 for b in flat)
    for b in flat:
        assert abs(b["p_frac"] - b["q_frac"]) < 1e-12 and b["sd_log_w"] == 0.0
    noisy = np.where(np.abs(m) < 0.25, rng.normal(0, 1.0, m.size), 0.0)
    bins = weights_by_magnetization(m, noisy, n_bins=4)
    sds = [b["sd_log_w"] for b in bins]
    assert sds[0] == 0.0 and sds[3] == 0.0 and min(sds[1], sds[2]) > 0.5
    tilted = weights_by_magnetization(m, np.where(m > 0, np.log(2.0), 0.0), n_bins=2)
    assert tilted[1]["p_frac"] == pytest.approx(2 / 3, abs=0.01) and tilted[1]["q_frac"] == 0.5
    few = weights_by_magnetization(m[:30], np.zeros(30))  # too few draws: fewer bins
    assert len(few) == 1 and few[0]["n"] == 30
