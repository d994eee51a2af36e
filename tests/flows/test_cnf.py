"""Tests for the equivariant continuous flow (flowmc.flows.cnf): exact divergence, the log
determinant of the discrete map against autograd and its h^p convergence, symmetries, transfer,
conditioning, the training penalty and the exactness check that ``flowmc sample`` applies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowmc.flows.cnf import (
    TABLEAUS,
    ContinuousFlow,
    _Field,
    _khat,
    coprime_steps,
    displacement_orbits,
    exact_log_det,
    log_det_discrepancy,
)
from flowmc.flows.flow import FlowConfig, build_flow, check_integration, transfer_state_dict
from flowmc.lattice.action import Phi4Action
from flowmc.training.train import TrainConfig, Trainer

DT = torch.float64


def _layer(shape: tuple[int, ...] = (4, 4), scale: float = 0.3, seed: int = 0,
           **kw: object) -> ContinuousFlow:
    torch.manual_seed(seed)
    layer = ContinuousFlow(shape, **kw).to(DT)
    with torch.no_grad():
        layer.weight.normal_(0.0, scale)
    return layer


def _logdet_jacobian(layer: ContinuousFlow, z: torch.Tensor, steps: int,
                     integrator: str = "rk4") -> float:
    """Exact log|det J| of the discrete ``steps``-step map at one configuration ``z (*L)``."""
    old, layer.integrator = layer.integrator, integrator
    try:
        return float(exact_log_det(layer, z.unsqueeze(0), steps=steps)[0])
    finally:
        layer.integrator = old


def test_orbits_are_the_point_group_orbits() -> None:
    orbit, n = displacement_orbits((6, 6))
    assert n == 10 and orbit[0, 0] == 0  # folded (a, b), a <= b <= 3: 4 + 3 + 2 + 1
    for r in np.ndindex(6, 6):
        images = {(r[0], r[1]), (-r[0] % 6, r[1]), (r[0], -r[1] % 6), (r[1], r[0])}
        assert len({int(orbit[i]) for i in images}) == 1
    # unequal extents: the axes are not exchanged
    orbit, n = displacement_orbits((4, 6))
    assert orbit[1, 0] != orbit[0, 1] and n == 3 * 4
    assert displacement_orbits((4, 4, 4))[1] == 10


def test_divergence_is_the_trace_of_the_field_jacobian() -> None:
    layer = _layer((4, 6))
    phi = torch.randn(2, 4, 6, dtype=DT)
    v, div = layer.field(phi, 0.37)
    for b in range(2):
        jac = torch.autograd.functional.jacobian(
            lambda x: layer.field(x.view(1, 4, 6), 0.37)[0].flatten(), phi[b].flatten())
        assert float(torch.trace(jac)) == pytest.approx(float(div[b].detach()), abs=1e-12)


@pytest.mark.parametrize("shape", [(4, 4), (4, 5)])  # the last extent even and odd (rfft bins)
@pytest.mark.parametrize("per_sample", [False, True])
def test_field_backward_gradcheck(per_sample: bool, shape: tuple[int, int]) -> None:
    orbit, n = displacement_orbits(shape)
    orbit = torch.as_tensor(orbit)
    g = torch.Generator().manual_seed(1)
    phi = torch.randn(3, *shape, dtype=DT, generator=g, requires_grad=True)
    freq = torch.rand(5, dtype=DT, generator=g).requires_grad_()
    mix = torch.randn(3, 5, dtype=DT, generator=g).requires_grad_()
    lin = torch.randn(3, dtype=DT, generator=g).requires_grad_()
    w = torch.randn(3 if per_sample else 1, n, 3, dtype=DT, generator=g).requires_grad_()

    def fn(phi, freq, mix, lin, w):  # noqa: ANN001, ANN202
        khat = _khat(w[:, orbit].movedim(-1, 1), 2)  # the kernels' transforms, as integrate does
        return _Field.apply(phi, freq, mix, lin, khat, w[:, 0])

    assert torch.autograd.gradcheck(fn, (phi, freq, mix, lin, w))


def test_symmetries_of_the_integrated_map() -> None:
    """Translations, the point group (reflection, exchange of axes) and phi -> -phi commute
    with the map, and leave the log determinant unchanged."""
    layer = _layer((6, 6), int_steps=6)
    z = torch.randn(2, 6, 6, dtype=DT)
    phi, ld = layer(z)
    maps = [
        lambda x: torch.roll(x, (1, 3), (1, 2)),
        lambda x: x.flip(1),
        lambda x: x.transpose(1, 2),
        lambda x: -x,
    ]
    for g in maps:
        phi_g, ld_g = layer(g(z))
        assert torch.allclose(phi_g, g(phi), atol=1e-12)
        assert torch.allclose(ld_g, ld, atol=1e-12)


def test_zero_kernels_are_the_identity() -> None:
    layer = ContinuousFlow((4, 4)).to(DT)
    z = torch.randn(3, 4, 4, dtype=DT)
    phi, ld = layer(z)
    assert torch.equal(phi, z) and torch.equal(ld, torch.zeros(3, dtype=DT))


def _errors(integrator: str, steps: tuple[int, ...]) -> tuple[list[float], list[float]]:
    """Per step count: |l_N - l_ODE| (the ODE's value from 1024 steps) and |l_N - log|det J||
    (the exact log determinant of the N-step map, by autograd)."""
    layer = _layer((4, 4), scale=0.3)
    z = torch.randn(1, 4, 4, dtype=DT, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = float(layer.integrate(z, steps=1024, integrator=integrator)[1][0])
    to_ode, to_map = [], []
    for n in steps:
        with torch.no_grad():
            ell = float(layer.integrate(z, steps=n, integrator=integrator)[1][0])
        to_ode.append(abs(ell - ref))
        to_map.append(abs(ell - _logdet_jacobian(layer, z[0], n, integrator)))
    return to_ode, to_map


def _ratios(errs: list[float]) -> list[float]:
    return [a / b for a, b in zip(errs, errs[1:])]


def test_log_det_converges_as_h4() -> None:
    """RK4's carried log determinant converges as h^4 (halving h divides the error by ~16), and
    its difference from the exact log|det J| of the discrete N-step map vanishes at least as
    fast (measured: ~1e-6 at N = 32 on this field). Negative control: the midpoint method
    (order 2) divides its error by ~4, which the h^4 check rejects."""
    steps = (8, 16, 32)
    to_ode, to_map = _errors("rk4", steps)
    assert all(13 < r < 20 for r in _ratios(to_ode)), _ratios(to_ode)
    assert all(r > 13 for r in _ratios(to_map)), _ratios(to_map)
    assert to_map[-1] < 3e-6
    mid_ode, _ = _errors("midpoint", steps)
    assert not all(13 < r < 20 for r in _ratios(mid_ode))
    assert all(3.3 < r < 5 for r in _ratios(mid_ode)), _ratios(mid_ode)


def test_every_tableau_is_consistent() -> None:
    for name, tab in TABLEAUS.items():
        assert sum(tab.b) == pytest.approx(1.0), name
        for c, row in zip(tab.c, tab.a):
            assert sum(row) == pytest.approx(c), name


def test_inverse_is_the_backward_integration() -> None:
    """The backward integration inverts the N-step map up to O(h^4) (round trip and log
    determinant): halving h shrinks both by more than 10."""
    layer = _layer((4, 4))
    z = torch.randn(3, 4, 4, dtype=DT)
    trip, logdet = [], []
    for n in (8, 16, 32):
        layer.int_steps = n
        with torch.no_grad():
            phi, ld = layer(z)
            back, ld_inv = layer.inverse(phi)
        trip.append(float((back - z).abs().max()))
        logdet.append(float((ld_inv + ld).abs().max()))
    assert all(r > 10 for r in _ratios(trip)) and all(r > 10 for r in _ratios(logdet))
    assert trip[-1] < 1e-5 and logdet[-1] < 1e-5


def test_discrepancy_measures_the_integration_error() -> None:
    layer = _layer((4, 4))
    z = torch.randn(16, 4, 4, dtype=DT)
    coarse = log_det_discrepancy(layer, z, steps=4)
    fine = log_det_discrepancy(layer, z, steps=16)
    assert coarse.steps == 4 and coarse.n == 16
    assert fine.rms < coarse.rms / 50 and fine.sd < coarse.sd / 50 and fine.max <= coarse.max
    assert coarse.sd <= coarse.rms and abs(coarse.mean) <= coarse.rms
    # the Richardson estimate (16/15 of l_N - l_2N) is the error against the exact map's l
    _, ell = layer.integrate(z[:1], steps=16)
    exact = _logdet_jacobian(layer, z[0], 16)
    assert abs(float(ell[0].detach()) - exact) < 10 * fine.max + 1e-9


def test_coprime_steps() -> None:
    for n in (3, 10, 20, 30, 50):
        m = coprime_steps(n)
        assert 1 <= m < n and math.gcd(m, n) == 1


def test_conditional_kernels_per_sample() -> None:
    layer = _layer((4, 4), degree=2)
    z = torch.randn(3, 4, 4, dtype=DT)
    ctx = torch.tensor([-0.5, 0.1, 0.9], dtype=DT)
    phi, ld = layer(z, ctx)
    for i in range(3):
        p1, l1 = layer(z[i:i + 1], ctx[i:i + 1])
        assert torch.allclose(p1, phi[i:i + 1], atol=1e-12)
        assert torch.allclose(l1, ld[i:i + 1], atol=1e-12)
    with pytest.raises(ValueError, match="Expected a context"):
        layer(z)


def test_transfer_to_a_larger_lattice_keeps_short_range_kernels() -> None:
    """A kernel supported on |r_mu| <= 1 acts the same on a 4x4 configuration and on its 2x2
    tiling on 8x8, once carried over by resample_state."""
    small = _layer((4, 4))
    with torch.no_grad():
        orbit, _ = displacement_orbits((4, 4))
        keep = {int(orbit[r]) for r in [(0, 0), (1, 0), (1, 1)]}
        for o in range(small.weight.shape[0]):
            if o not in keep:
                small.weight[o] = 0.0
    big = ContinuousFlow((8, 8)).to(DT)
    big.load_state_dict(small.resample_state(small.state_dict(), (4, 4), (8, 8)))
    z = torch.randn(2, 4, 4, dtype=DT)
    phi, ld = small(z)
    phi_big, ld_big = big(z.repeat(1, 2, 2))
    assert torch.allclose(phi_big, phi.repeat(1, 2, 2), atol=1e-12)
    assert torch.allclose(ld_big, 4 * ld, atol=1e-10)


def test_flow_config_cnf_builds_trains_and_transfers(tmp_path) -> None:  # noqa: ANN001
    cfg = FlowConfig((4, 4), n_layers=1, coupling="cnf", momentum=True,
                     extra={"int_steps": 8, "n_freq": 4, "n_channels": 3, "penalty_batch": 4})
    flow = build_flow(cfg).to(DT)
    assert cfg.z2_equivariant and len(flow.continuous_layers) == 1
    action = Phi4Action(-4.0, 8.0, (4, 4))
    trainer = Trainer(flow, action, TrainConfig(n_steps=5, batch_size=16, lr=1e-2),
                      generator=torch.Generator().manual_seed(1))
    flow.train()
    loss, _, _ = trainer.model(16, torch.Generator().manual_seed(2))
    assert flow.auxiliary_loss() is None  # consumed by the loss
    flow.eval()
    trainer.run(progress=False)
    assert flow.continuous_layers[0].weight.abs().sum() > 0
    with torch.no_grad():
        phi, log_q = flow.sample(4, generator=torch.Generator().manual_seed(3))
        assert flow.auxiliary_loss() is None  # no penalty outside training
        # log_prob integrates backwards: equal to the sampling log q up to the integration error
        assert torch.allclose(flow.log_prob(phi), log_q, atol=1e-3)
    big = FlowConfig(**{**cfg.__dict__, "lattice_shape": (8, 8)})
    sd = transfer_state_dict(flow.state_dict(), cfg, big)
    build_flow(big).load_state_dict(sd)
    with pytest.raises(ValueError, match="Expected estimator 'reparam'"):
        Trainer(flow, action, TrainConfig(estimator="path"))


def test_free_theory_unbiased_z_and_its_negative_control() -> None:
    """Z_hat = mean e^{-S}/q is unbiased only if log q is the density of the map: true for a
    converged integration (N = 32), false for a coarse one (N = 1) of the same field."""
    action = Phi4Action(1.0, 0.0, (2, 2))
    log_z = action.free_theory().log_z()
    cfg = FlowConfig((2, 2), n_layers=1, coupling="cnf", extra={"n_freq": 4, "n_channels": 3})
    flow = build_flow(cfg).to(DT)
    with torch.no_grad():
        flow.continuous_layers[0].weight.normal_(0.0, 1.5, generator=torch.Generator()
                                                 .manual_seed(4))  # fmt: skip

    def z_error(steps: int) -> float:
        flow.set_int_steps(steps)
        with torch.no_grad():
            phi, log_q = flow.sample(20000, generator=torch.Generator().manual_seed(5))
            w = torch.exp(-action(phi) - log_q - log_z)
        return float((w.mean() - 1) / (w.std() / math.sqrt(len(w))))

    assert abs(z_error(32)) < 4
    assert abs(z_error(1)) > 4


def test_check_integration_refuses_a_coarse_flow() -> None:
    cfg = FlowConfig((4, 4), n_layers=1, coupling="cnf", extra={"n_freq": 4, "n_channels": 3})
    flow = build_flow(cfg).to(DT)
    with torch.no_grad():
        flow.continuous_layers[0].weight.normal_(0.0, 0.5)
    flow.set_int_steps(64)
    assert check_integration(flow, "fine.pt")[0].sd < 1e-3
    flow.set_int_steps(2)
    with pytest.raises(ValueError, match=r"coarse\.pt: its continuous flow's log density is not "
                       r"converged at 2 integration steps \(sd of l_N - l_2N"):
        check_integration(flow, "coarse.pt")
    with pytest.raises(ValueError, match="Expected an integer int_steps >= 1"):
        flow.set_int_steps(0)


def test_bad_settings_raise() -> None:
    with pytest.raises(ValueError, match="Expected an odd n_time"):
        ContinuousFlow((4, 4), n_time=4)
    with pytest.raises(ValueError, match="Expected integrator in"):
        ContinuousFlow((4, 4), integrator="rk5")
    with pytest.raises(ValueError, match="Expected an integer int_steps >= 1"):
        ContinuousFlow((4, 4), int_steps=0)
    layer = ContinuousFlow((4, 4))
    with pytest.raises(ValueError, match="Expected a weight with"):
        layer.resample_state({"weight": torch.zeros(3, 12, 7)}, (6, 6), (8, 8))


def test_continuous_flow_everywhere_a_flow_works(tmp_path) -> None:  # noqa: ANN001
    """The command surface with a conditional continuous flow on 4x4: train over a lam range,
    eval (the log q discrepancy is reported), flow MH and the hybrid at a lam, a scan with it,
    and a transfer to 8x8 with --init-from."""
    from flowmc.cli import main
    from flowmc.io.ensemble import open_ensemble

    model = tmp_path / "c.pt"
    common = ["--threads", "1", "--quiet"]
    assert main(["train", "--L", "4", "--m2", "-4", "--lam", "4:5", "--recipe", "cnf",
                 "--steps", "4", "--batch", "8", "--int-steps", "8", "--cnf-freq", "4",
                 "--cnf-channels", "3", "--out", str(model), *common]) == 0  # fmt: skip
    assert main(["eval", "--model", str(model), "--lam", "4.5", "--n", "64", "--batch", "32",
                 "--json", str(tmp_path / "e.json"), "--threads", "1"]) == 0  # fmt: skip
    import json
    integ = json.loads((tmp_path / "e.json").read_text())["integration"]
    assert integ[0]["steps"] == 8 and integ[0]["within"] is True
    for extra, name in (([], "mh.h5"), (["--hmc-traj", "1", "--warmup", "5"], "hy.h5")):
        assert main(["sample", "--model", str(model), "--lam", "4.5", "--n", "20",
                     "--batch", "4", "--out", str(tmp_path / name), *extra, *common]) == 0
        with open_ensemble(tmp_path / name) as ens:
            assert ens.n == 20 and ens.sampler["int_steps"] == 8
    assert main(["scan", "--model", str(model), "--L", "4", "--lam", "4:5:2", "--n", "20",
                 "--batch", "4", "--no-plots", "--out", str(tmp_path / "scan"),
                 *common]) == 0  # fmt: skip
    assert main(["train", "--init-from", str(model), "--L", "8", "--steps", "2",
                 "--batch", "8", "--out", str(tmp_path / "c8.pt"), *common]) == 0  # fmt: skip


def test_bench_cnf_script_smoke(tmp_path) -> None:  # noqa: ANN001
    """scripts/bench_cnf.py end to end on a 4x4 continuous flow (JSON with every section)."""
    import importlib.util
    import json
    from pathlib import Path

    from flowmc.cli import main

    model = tmp_path / "m.pt"
    assert main(["train", "--L", "4", "--m2", "-4", "--lam", "8", "--recipe", "cnf", "--steps",
                 "2", "--batch", "8", "--cnf-freq", "4", "--cnf-channels", "3", "--quiet",
                 "--threads", "1", "--out", str(model)]) == 0  # fmt: skip
    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_cnf.py"
    spec = importlib.util.spec_from_file_location("bench_cnf_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "b.json"
    assert mod.main(["--model", str(model), "--n", "64", "--eval-batch", "32",
                     "--n-discrepancy", "8", "--n-exact", "1", "--steps", "10", "--batch", "8",
                     "--repeats", "1", "--json", str(out)]) == 0  # fmt: skip
    rec = json.loads(out.read_text())["models"][0]
    assert [c["int_steps"] for c in rec["cost"]] == [10, 20]
    assert len(rec["discrepancy"]) == 2 and abs(rec["exact"][0]["delta"][0]) < 1e-3


def test_init_from_takes_the_ancestors_recipe(tmp_path) -> None:  # noqa: ANN001
    """``flowmc train --init-from`` continues with the ancestor's recipe's training settings
    (the cnf recipe's batch 64 and Adam betas, not the default recipe's batch 256); an explicit
    ``--recipe`` still wins."""
    from flowmc.cli import main
    from flowmc.io.checkpoint import load_checkpoint
    from flowmc.training.recipes import RECIPES

    common = ["--steps", "1", "--quiet", "--threads", "1", "--cnf-freq", "2", "--cnf-channels",
              "2", "--int-steps", "2"]  # fmt: skip
    small = tmp_path / "s.pt"
    assert main(["train", "--L", "4", "--m2", "-4", "--lam", "8", "--recipe", "cnf",
                 "--out", str(small), *common]) == 0  # fmt: skip
    big, other = tmp_path / "b.pt", tmp_path / "o.pt"
    grow = ["--L", "8", "--steps", "1", "--quiet", "--threads", "1"]
    assert main(["train", "--init-from", str(small), "--out", str(big), *grow]) == 0
    tc = load_checkpoint(big)["train_config"]
    assert tc["batch_size"] == RECIPES["cnf"]["train"]["batch_size"] == 64
    assert tuple(tc["betas"]) == (0.8, 0.9)
    assert main(["train", "--init-from", str(small), "--recipe", "default", "--out", str(other),
                 "--batch", "8", *grow]) == 0  # fmt: skip
    assert tuple(load_checkpoint(other)["train_config"]["betas"]) == (0.9, 0.999)


def test_export_checkpoint_sets_the_sampling_steps_only_if_converged(tmp_path) -> None:  # noqa: ANN001
    """``export_checkpoint`` writes a copy that samples with ``int_steps`` from then on, only if
    the flow passes the integration check there (negative control: 2 steps are refused and
    nothing is written), never over the source or a file that is not a checkpoint."""
    from flowmc.io.checkpoint import export_checkpoint, load_checkpoint, load_model, save_checkpoint

    cfg = FlowConfig((4, 4), n_layers=1, coupling="cnf",
                     extra={"n_freq": 4, "n_channels": 3, "int_steps": 2})  # fmt: skip
    flow = build_flow(cfg)
    with torch.no_grad():
        flow.continuous_layers[0].weight.normal_(0.0, 0.5, generator=torch.Generator()
                                                 .manual_seed(0))  # fmt: skip
    src = tmp_path / "trained.pt"
    save_checkpoint(src, flow, Phi4Action(-4.0, 8.0, (4, 4)), meta={"note": "kept"})
    with pytest.raises(ValueError, match=r"trained\.pt: its continuous flow's log density is "
                       r"not converged at 2 integration steps"):
        export_checkpoint(src, tmp_path / "coarse.pt")
    assert not (tmp_path / "coarse.pt").exists()
    info = export_checkpoint(src, tmp_path / "fine.pt", int_steps=64)
    assert info["int_steps_before"] == 2 and info["int_steps"] == 64
    assert info["discrepancy_sd"][0] < 1e-3
    assert load_model(tmp_path / "fine.pt").int_steps == 64
    assert load_model(src).int_steps == 2  # the source is untouched
    copy, orig = load_checkpoint(tmp_path / "fine.pt"), load_checkpoint(src)
    assert copy["meta"]["note"] == "kept" and "exported" not in orig["meta"]
    assert all(torch.equal(copy["model_state"][k], v) for k, v in orig["model_state"].items())
    with pytest.raises(ValueError, match="is the source itself"):
        export_checkpoint(src, src, int_steps=64)
    (tmp_path / "notes.pt").write_text("mine")
    with pytest.raises(FileExistsError):
        export_checkpoint(src, tmp_path / "notes.pt", int_steps=64, force=True)
    assert (tmp_path / "notes.pt").read_text() == "mine"


@pytest.mark.parametrize("name", ["phi4_L16_m2-4_lam4.25_cnf", "phi4_L32_m2-4_lam4.572"])
def test_shipped_continuous_flows_sample_converged(name: str) -> None:
    """The shipped continuous flows carry the sampling steps of their cards and pass the
    integration check ``flowmc sample`` applies; the steps they were trained with do not (the
    check is not vacuous on them)."""
    from flowmc.io.checkpoint import load_model
    from flowmc.io.shipped import shipped_models

    assert name in shipped_models()
    model = load_model(name)
    steps = {"phi4_L16_m2-4_lam4.25_cnf": 30, "phi4_L32_m2-4_lam4.572": 40}[name]
    assert model.int_steps == steps
    assert check_integration(model.proposal, name)[0].sd <= 1e-3
    model.flow.set_int_steps(20)
    with pytest.raises(ValueError, match="not converged at 20 integration steps"):
        check_integration(model.proposal, name)
