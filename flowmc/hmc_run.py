r"""HMC runs written to HDF5 ensembles, resumable bit for bit: the local-update baseline.

A run of ``C`` chains (one batched tensor) proceeds in three phases:

1. **Start.** ``start="cold"`` (default) sets :math:`\phi = 0` in every chain, the symmetric
   point; the chains separate at the first trajectory (independent momenta) and, in the
   broken phase, each rolls into one of the vacua. ``start="random"`` draws i.i.d.
   :math:`\phi_x \sim N(0, 1)` per chain from the run's generator, a "hot" start far above
   the typical action: a chain can then stay stuck (every trajectory rejected, since
   :math:`\Delta H` grows with the energy) unless warm-up with step-size tuning first brings
   it down.
2. **Warm-up** (``warmup`` trajectories, discarded). If ``step_size`` is ``None`` the step
   size is adapted by dual averaging (:func:`flowmc.hmc.tune_step_size`) towards
   ``target_accept`` at fixed trajectory length ``traj_length`` and then **frozen**;
   otherwise the given step size is used throughout. Only after warm-up is the ensemble file
   created, with the tuned ``step_size`` and ``num_steps`` in its ``sampler`` attribute, and
   the post-warm-up state is committed with :meth:`EnsembleWriter.save_state` before any row.
3. **Sampling** with the frozen kernel (:func:`flowmc.hmc.build_kernel`), exact for any step
   size. Trajectory ``t`` (0-based, after warm-up) is recorded when ``(t + 1) % thin == 0``.
   Every ``chunk`` recorded rows the rows, the chunk's wall time (all trajectories since the
   previous commit, thinned ones included) and the state are committed together (see
   :mod:`flowmc.ensemble`).

Randomness comes from a single generator used sequentially (start, warm-up, then each
trajectory: momenta, accept uniforms, flip uniforms). Its state is saved with every commit
(state array ``rng``), together with the fields, actions and action gradients of all chains,
so a run killed at any moment (SIGKILL included) and resumed (``resume=True``, possibly to a
larger ``n``) produces exactly the same bytes as an uninterrupted run. A run killed during
warm-up leaves no file and simply starts again.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import flowmc
from flowmc import hmc
from flowmc.ensemble import EnsembleWriter, open_ensemble
from flowmc.sampler import _Bar

__all__ = ["HMCRunConfig", "run_hmc", "SCALARS", "START_KINDS"]

#: Per-configuration scalars of an HMC ensemble.
SCALARS = ("action", "accepted", "delta_h", "magnetization")
#: Accepted values of ``HMCRunConfig.start``.
START_KINDS = ("cold", "random")

# settings that must agree when resuming (the tuned step size is taken from the file)
_RESUME_KEYS = (
    "name", "integrator", "traj_length", "target_accept", "flip", "chains", "thin", "warmup",
    "start", "fixed_step_size", "dtype",
)


@dataclass(frozen=True)
class HMCRunConfig:
    """Settings of an HMC run (all stored in the ensemble's ``sampler`` attribute).

    Attributes:
        n: target number of recorded configurations per chain.
        chains: number of independent chains ``C`` (advanced together as one batch).
        traj_length: molecular-dynamics trajectory length :math:`\\tau`.
        integrator: ``"omelyan"`` (default; 2 force evaluations per step) or ``"leapfrog"``.
        target_accept: mean acceptance the warm-up tunes the step size to.
        warmup: warm-up trajectories per chain (discarded; step-size tuning happens here).
        step_size: a fixed step size (no tuning), or ``None`` to tune by dual averaging.
        flip: add the exact global :math:`\\mathbb{Z}_2` flip after each trajectory.
        thin: record every ``thin``-th trajectory.
        start: ``"cold"`` (:math:`\\phi = 0`) or ``"random"`` (i.i.d. N(0, 1) per site).
        chunk: recorded configurations per chain per commit to the file.
        seed: master seed.
    """

    n: int
    chains: int = 1
    traj_length: float = 1.0
    integrator: str = "omelyan"
    target_accept: float = 0.8
    warmup: int = 200
    step_size: float | None = None
    flip: bool = False
    thin: int = 1
    start: str = "cold"
    chunk: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n", "chains", "thin", "chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"Expected an integer {name} >= 1; got {v!r}")
        if isinstance(self.warmup, bool) or int(self.warmup) != self.warmup or self.warmup < 0:
            raise ValueError(f"Expected an integer warmup >= 0; got {self.warmup!r}")
        if not (math.isfinite(self.traj_length) and self.traj_length > 0):
            raise ValueError(f"Expected traj_length > 0; got {self.traj_length}")
        if not 0.0 < self.target_accept < 1.0:
            raise ValueError(f"Expected target_accept in (0, 1); got {self.target_accept}")
        hmc._check_integrator(self.integrator)
        if self.start not in START_KINDS:
            raise ValueError(f"Expected start in {START_KINDS}; got {self.start!r}")
        if self.step_size is not None:
            hmc._check_step_size(self.step_size)
        elif self.warmup < 1:
            raise ValueError(
                "Expected warmup >= 1 to tune the step size; got warmup=0 without a fixed "
                "step_size (give one, or allow warm-up trajectories)"
            )

    def steps_for(self, n_records: int) -> int:
        """Post-warm-up trajectories per chain needed to record ``n_records`` configurations."""
        return n_records * self.thin

    def sampler_attrs(self, dtype: str, step_size: float, num_steps: int) -> dict:
        """The ``sampler`` attribute: settings plus the tuned (frozen) step size."""
        d = asdict(self)
        for k in ("n", "seed", "chunk", "step_size"):
            d.pop(k)
        return {
            "name": "hmc",
            **d,
            "fixed_step_size": self.step_size,
            "step_size": float(step_size),
            "num_steps": int(num_steps),
            "dtype": dtype,
        }


def _initial_phi(
    config: HMCRunConfig, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    size = (config.chains, *shape)
    if config.start == "cold":
        return torch.zeros(size, dtype=dtype, device=device)
    return torch.randn(size, generator=gen, dtype=dtype, device=device)


def _warmup(
    action: object, config: HMCRunConfig, gen: torch.Generator, dtype: torch.dtype,
    device: torch.device,
) -> tuple[hmc.HMCState, float, int, dict]:
    """Start the chains and run the warm-up; returns the state, step size, steps and a record."""
    t0 = time.perf_counter()
    phi0 = _initial_phi(config, tuple(action.lattice_shape), gen, dtype, device)
    state = hmc.init(phi0, action)
    record: dict = {}
    if config.step_size is None:
        state, eps, num_steps, hist = hmc.tune_step_size(
            action, state, gen, traj_length=config.traj_length,
            target_accept=config.target_accept, num_warmup=config.warmup,
            integrator=config.integrator,
        )
        tail = hist["acceptance_rate"][-max(1, len(hist["acceptance_rate"]) // 4):]
        record["acceptance_last_quarter"] = float(np.mean(tail))
        record["step_size_first"] = hist["step_size"][0]
    else:
        eps = float(config.step_size)
        num_steps = max(1, math.ceil(config.traj_length / eps))
        kernel = hmc.build_kernel(
            action, integrator=config.integrator, step_size=eps, num_steps=num_steps,
            flip=config.flip,
        )
        acc = []
        for _ in range(config.warmup):
            state, info = kernel(state, gen)
            acc.append(float(info.acceptance_rate.mean()))
        if acc:
            record["acceptance_last_quarter"] = float(np.mean(acc[-max(1, len(acc) // 4):]))
    record["seconds"] = time.perf_counter() - t0
    record["trajectories"] = config.warmup
    return state, eps, num_steps, record


def _state_arrays(state: hmc.HMCState, gen: torch.Generator) -> dict:
    return {
        "phi": state.phi.cpu().numpy(),
        "action": state.action.cpu().numpy(),
        "grad": state.grad.cpu().numpy(),
        "rng": gen.get_state().cpu().numpy(),
    }


@torch.no_grad()
def run_hmc(
    action: object,
    out: str | Path,
    config: HMCRunConfig,
    *,
    resume: bool = False,
    force: bool = False,
    store_configs: bool = True,
    config_dtype: str = "float32",
    compression: str | None = None,
    progress: bool = True,
    meta: dict | None = None,
    command_line: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
) -> dict:
    """Run (or resume) an HMC ensemble into ``out``.

    Args:
        action: the action (e.g. :class:`flowmc.action.Phi4Action`); needs ``lattice_shape``
            and ``params()``; ``action.grad`` is used for the force if present.
        out: HDF5 ensemble path (written only after warm-up).
        config: run settings; ``config.n`` is the target length per chain.
        resume: continue the existing ``out``; its settings must match ``config`` (the tuned
            step size is read from the file, warm-up is not repeated).
        force: replace an existing ``out`` (without ``resume``).
        store_configs: keep configurations (else only per-config scalars).
        config_dtype: storage dtype of configurations.
        compression: ``None``, ``"gzip"`` or ``"lzf"``.
        progress: show a progress bar on stderr.
        meta: extra metadata (e.g. the resolved CLI config).
        command_line: recorded command line.
        device: torch device of the chains.
        dtype: floating-point type of the chains (float64 recommended: :math:`\\Delta H` is a
            difference of extensive numbers).

    Returns:
        A summary dict: ``path, n, chains, trajectories, acceptance, step_size, num_steps,
        n_divergent, seconds, warmup_seconds, samples_per_second, flowmc_version``.

    Raises:
        FileExistsError: if ``out`` exists and neither ``force`` nor ``resume`` is set.
        ValueError: on invalid settings or a resume mismatch.
    """
    device = torch.device(device)
    dtype_name = str(dtype).replace("torch.", "")
    lattice = tuple(int(s) for s in action.lattice_shape)
    C = config.chains
    gen = torch.Generator(device=device)
    warm: dict = {}

    if resume:
        with open_ensemble(out) as ens:
            stored = dict(ens.sampler)
        want = config.sampler_attrs(dtype_name, stored.get("step_size", 1.0),
                                    stored.get("num_steps", 1))
        for key in _RESUME_KEYS:
            if stored.get(key) != want.get(key):
                raise ValueError(
                    f"Cannot resume {str(out)!r}: sampler setting {key!r} mismatch: stored "
                    f"{stored.get(key)!r}, given {want.get(key)!r}"
                )
        writer = EnsembleWriter.resume(
            out,
            expect={
                "lattice_shape": lattice,
                "n_chains": C,
                "action": action.params(),
                "sampler": stored,
                "seed": config.seed,
                "store_configs": store_configs,
                "config_dtype": config_dtype,
                "compression": compression,
            },
        )
        try:
            arrays, attrs = writer.load_state()
        except BaseException:
            writer.close()
            raise
        state = hmc.HMCState(
            *(torch.as_tensor(arrays[k]).to(device=device, dtype=dtype)
              for k in ("phi", "action", "grad"))
        )
        gen.set_state(torch.as_tensor(arrays["rng"]))
        step_size, num_steps = float(stored["step_size"]), int(stored["num_steps"])
        steps_done = int(attrs["steps_done"])
        n_acc, n_div = int(attrs["n_accepted"]), int(attrs["n_divergent"])
    else:
        if os.path.lexists(out) and not force:
            raise FileExistsError(
                f"Refusing to overwrite existing file {str(out)!r}; pass --force (force=True) "
                "to replace it, or --resume to continue it"
            )
        gen.manual_seed(int(config.seed))
        state, step_size, num_steps, warm = _warmup(action, config, gen, dtype, device)
        writer = EnsembleWriter.create(
            out,
            lattice_shape=lattice,
            n_chains=C,
            scalar_names=SCALARS,
            action=action.params(),
            sampler=config.sampler_attrs(dtype_name, step_size, num_steps),
            model_sha256="",
            seed=config.seed,
            meta={"warmup": warm, **(meta or {})},
            store_configs=store_configs,
            config_dtype=config_dtype,
            compression=compression,
            force=force,
            command_line=command_line,
        )
        steps_done, n_acc, n_div = 0, 0, 0
        writer.save_state(
            _state_arrays(state, gen),
            {"steps_done": 0, "n_accepted": 0, "n_divergent": 0},
        )

    kernel = hmc.build_kernel(
        action, integrator=config.integrator, step_size=step_size, num_steps=num_steps,
        flip=config.flip,
    )
    target_steps = config.steps_for(config.n)
    start_steps = steps_done
    bar = _Bar(config.n, writer.n, progress)
    t_run = time.perf_counter()
    try:
        while steps_done < target_steps:
            t0 = time.perf_counter()
            take = min(config.chunk * config.thin, target_steps - steps_done)
            rows: dict[str, list] = {k: [] for k in (*SCALARS, "configs")}
            for _ in range(take):
                state, info = kernel(state, gen)
                n_acc += int(info.is_accepted.sum())
                n_div += int(info.is_divergent.sum())
                steps_done += 1
                if steps_done % config.thin == 0:
                    rows["action"].append(state.action.double().cpu())
                    rows["accepted"].append(info.is_accepted.cpu())
                    rows["delta_h"].append(info.delta_h.double().cpu())
                    rows["magnetization"].append(state.phi.flatten(1).sum(1).double().cpu())
                    if writer.store_configs:
                        rows["configs"].append(state.phi.cpu())
            if rows["action"]:
                scalars = {k: torch.stack(rows[k]).numpy() for k in SCALARS}
                configs = torch.stack(rows["configs"]).numpy() if writer.store_configs else None
                writer.append(
                    scalars=scalars,
                    configs=configs,
                    state=_state_arrays(state, gen),
                    state_attrs={
                        "steps_done": steps_done,
                        "n_accepted": n_acc,
                        "n_divergent": n_div,
                    },
                    wall_time=time.perf_counter() - t0,
                )
            bar.update(writer.n, n_acc / max(steps_done * C, 1))
        bar.close()
        seconds = time.perf_counter() - t_run
        n_final = writer.n
    finally:
        writer.close()
    new_steps = (steps_done - start_steps) * C
    return {
        "path": str(out),
        "n": n_final,
        "chains": C,
        "trajectories": steps_done,
        "acceptance": n_acc / max(steps_done * C, 1),
        "step_size": step_size,
        "num_steps": num_steps,
        "integrator": config.integrator,
        "n_divergent": n_div,
        "seconds": seconds,
        "warmup_seconds": warm.get("seconds", 0.0),
        "samples_per_second": new_steps / seconds if seconds > 0 else float("nan"),
        "flowmc_version": flowmc.__version__,
    }
