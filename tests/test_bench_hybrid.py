"""The verdict logic of ``scripts/bench_hybrid.py`` (issue 11's benchmark), without sampling.

The end-to-end ``--quick`` run is in ``tests/test_scripts.py``.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_hybrid", ROOT / "scripts/bench_hybrid.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_hybrid"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("bench_hybrid", None)


def _rec(label, tau, dtau, per_config, *, reliable=True, m=(0.0, 1.0), crossings=(5.0,),
         train_per_config=None):  # fmt: skip
    """A method record as ``record()`` builds it, for an observable with the given tau_int."""
    obs = {}
    for k in ("chi2", "abs_m"):
        obs[k] = {"tau_int": tau, "tau_int_error": dtau, "reliable": reliable,
                  "cost_per_independent_s": 2 * tau * per_config,
                  "cost_per_independent_with_training_s": None if train_per_config is None
                  else 2 * tau * (per_config + train_per_config)}  # fmt: skip
    obs["m"] = {"value": m[0], "error": m[1], "reliable": reliable}
    return {"label": label, "observables": obs, "sign_changes_per_100": list(crossings)}


def test_cost_ratio_and_its_error(bench):
    hyb = _rec("hybrid_K2", tau=2.0, dtau=0.2, per_config=1e-3)  # 4.0 ms per independent
    hmc = _rec("hmc_tau2", tau=10.0, dtau=1.5, per_config=1e-3)  # 20 ms
    r = bench.cost_ratio(hyb, hmc)
    assert r["ratio"] == pytest.approx(0.2)
    assert r["ratio_error"] == pytest.approx(0.2 * math.hypot(0.1, 0.15))


def test_ratio_verdict_target_and_negative_control(bench):
    hmc = _rec("hmc_tau2", tau=10.0, dtau=0.5, per_config=1e-3)
    good = _rec("hybrid_K2", tau=2.0, dtau=0.1, per_config=1e-3)  # ratio 0.20 +- 0.014
    v = bench.ratio_verdict(good, hmc, 0.25)
    assert v["method"] == "hybrid_K2" and v["reference"] == "hmc_tau2"
    assert v["pass"] and v["pass_at_2sigma"] and not v["fail_at_2sigma"]
    # negative control: the same hybrid 1.5x slower per configuration misses the target
    bad = _rec("hybrid_K2", tau=2.0, dtau=0.1, per_config=1.5e-3)  # ratio 0.30 +- 0.021
    v = bench.ratio_verdict(bad, hmc, 0.25)
    assert v["pass"] is False and v["fail_at_2sigma"] and not v["pass_at_2sigma"]
    # undecided: ratio below the target but within 2 sigma of it
    close = _rec("hybrid_K2", tau=2.4, dtau=0.3, per_config=1e-3)  # 0.24 +- 0.032
    v = bench.ratio_verdict(close, hmc, 0.25)
    assert v["pass"] and not v["pass_at_2sigma"] and not v["fail_at_2sigma"]
    # an unreliable tau_int is carried into the verdict
    assert bench.ratio_verdict(_rec("h", 2.0, 0.1, 1e-3, reliable=False), hmc, 0.25)[
        "reliable"] is False  # fmt: skip
    assert bench.ratio_verdict(None, hmc, 0.25)["pass"] is None
    assert bench.ratio_verdict(good, hmc, None)["pass"] is None  # no target: reported only


def test_ratio_with_training_charges_the_method_only(bench):
    hmc = _rec("hmc", tau=10.0, dtau=0.5, per_config=1e-3)
    hyb = _rec("hybrid_K1", tau=2.0, dtau=0.1, per_config=1e-3, train_per_config=4e-3)
    v = bench.ratio_verdict(hyb, hmc, 0.25)
    assert v["ratio"] == pytest.approx(0.2)
    assert v["ratio_with_training"] == pytest.approx(1.0)  # 2*2*(1+4) ms / 20 ms


def test_broken_verdict_and_negative_controls(bench):
    ok = _rec("hybrid_K2", 1.0, 0.1, 1e-3, m=(0.10, 0.05), crossings=(3.0, 1.0, 7.5))
    v = bench.broken_verdict(ok, z_crit=2.576)
    assert v["m_over_error"] == pytest.approx(2.0)
    assert v["pass"] and v["m_zero"] and v["tunnels"] and v["min_sign_changes_per_100"] == 1.0
    # <m> 4 errors from zero: the chains do not sample both modes in proportion
    off = _rec("hybrid_K2", 1.0, 0.1, 1e-3, m=(0.20, 0.05), crossings=(3.0, 2.0))
    assert bench.broken_verdict(off, z_crit=2.576)["pass"] is False
    # one chain that tunnels less than once per 100 configurations
    stuck = _rec("hybrid_K2", 1.0, 0.1, 1e-3, m=(0.0, 0.05), crossings=(3.0, 0.5))
    v = bench.broken_verdict(stuck, z_crit=2.576)
    assert v["m_zero"] and not v["tunnels"] and v["pass"] is False
    # a chain frozen in one sector (error 0 on a nonzero mean) is not "zero within errors"
    frozen = _rec("hmc_tau1", 1.0, 0.1, 1e-3, m=(1.3, 0.0), crossings=(0.0,))
    assert bench.broken_verdict(frozen, z_crit=2.576)["m_zero"] is False


def test_pick_best_prefers_a_reliable_tau(bench):
    cheap_unreliable = _rec("hmc_tau4", tau=1.0, dtau=0.5, per_config=1e-3, reliable=False)
    a = _rec("hmc_tau1", tau=9.0, dtau=1.0, per_config=1e-3)
    b = _rec("hmc_tau2", tau=5.0, dtau=0.5, per_config=1.5e-3)  # 15 ms < 18 ms
    assert bench.pick_best([a, cheap_unreliable, b])["label"] == "hmc_tau2"
    assert bench.pick_best([cheap_unreliable])["label"] == "hmc_tau4"  # none reliable: cheapest
    assert bench.pick_best([]) is None


def test_cost_entry_is_wall_times_two_tau_over_n(bench):
    from flowmc.analysis.ensemble import Estimate

    est = Estimate(value=1.0, error=0.1, tau_int=3.0, tau_int_error=0.3, ess=100.0, window=20,
                   reliable=True)  # fmt: skip
    e = bench.cost_entry(est, cost_per_config=2e-3, train_cost_per_config=1e-3)
    assert e["cost_per_independent_s"] == pytest.approx(12e-3)
    assert e["cost_per_independent_error_s"] == pytest.approx(1.2e-3)
    assert e["cost_per_independent_with_training_s"] == pytest.approx(18e-3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "nope=x.pt"], "--model: expected a point of --points"),
        (["--points", "L8"], "--model: no flow for point(s) ['L8']"),
        (["--points", "L9", "--model", "L9=x.pt"], "--points: expected distinct names"),
        (["--point", "x=8,-4"], "--point: expected NAME=L,M2,LAM"),
        (["--point", "x=7,-4,1", "--points", "x"], "L even >= 2"),
        (["--quick", "--hmc-lengths", "1,-2"], "--hmc-lengths: expected numbers > 0"),
        (["--quick", "--hybrid-k", "1,1"], "--hybrid-k: expected distinct integers"),
        (["--quick", "--seconds", "5", "--max-n", "500"], "--max-n works with a fixed --n"),
    ],
)
def test_bad_arguments_are_one_line_errors(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err


def test_points_and_quick_defaults(bench):
    args = bench.parse_args(["--quick", "--point", "tiny=4,-4,3,broken", "--points", "tiny,q-sym"])
    assert [p.name for p in args.point_list] == ["tiny", "q-sym"]
    assert args.point_list[0].broken and args.point_list[0].target is None
    assert args.n == bench.QUICK["n"] and args.hybrid_k == [0, 1, 2]
    args = bench.parse_args(["--quick", "--n", "64"])
    assert args.n == 64  # an explicit option wins over --quick's
    full = {p.name: (p.L, p.m2, p.lam, p.target, p.broken) for p in bench.POINTS.values()}
    assert full == {  # issue 11's points and targets
        "crit16": (16, -4.0, 4.25, 0.25, False), "L8": (8, -4.0, 8.0, 1.25, False),
        "E2": (8, -4.0, 6.008, 1.25, False), "E5": (14, -4.0, 5.113, 1.25, False),
        "broken16": (16, -4.0, 3.0, None, True),
    }  # fmt: skip


@pytest.mark.parametrize(("n", "want", "expect"), [
    (5000, 1024, 1000), (20000, 16, 16), (5000, 16, 10), (100, 8, 5), (10, 16, 10),
    (10007, 1024, 1024),  # prime: no divisor in [512, 1024], one partial block at most
])  # fmt: skip
def test_block_size_divides_n_when_it_can(bench, n, want, expect):
    b = bench.block_size(n, want)
    assert b == expect and b <= want
    assert n % b == 0 or b == want
