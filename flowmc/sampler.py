"""Flow Metropolis–Hastings runs written to HDF5 ensembles, resumable bit for bit.

Randomness is organised so that a run can be interrupted at *any* flush and resumed to any new
target length with a result identical to an uninterrupted run:

* the initial state of the chains comes from a generator seeded by ``(seed, "init")``;
* proposal block ``b`` (steps ``b*K .. b*K+K-1`` of every chain: one flow call for ``K*C``
  proposals, then ``K*C`` uniforms) uses a generator seeded by ``(seed, b)``;
* after each block the records, the chain state (configuration, action, log q per chain) and the
  number of steps done are committed together (see :mod:`flowmc.ensemble`).

A resumed run regenerates the block it stopped in from its seed and skips the steps already done.
Step ``s`` (0-based) is recorded when ``s >= therm`` and ``(s - therm + 1) % thin == 0``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import flowmc
from flowmc import imh
from flowmc.checkpoint import LoadedModel
from flowmc.ensemble import EnsembleWriter, file_sha256

__all__ = ["FlowMHConfig", "run_flow_mh", "SCALARS", "block_generator"]

SCALARS = ("action", "log_q", "log_weight", "accepted", "magnetization")


@dataclass(frozen=True)
class FlowMHConfig:
    """Settings of a flow MH run (all stored in the ensemble's ``sampler`` attribute).

    Attributes:
        n: target number of recorded configurations per chain.
        chains: number of independent chains ``C``.
        batch: proposals per chain per flow call ``K``.
        thin: record every ``thin``-th step.
        therm: steps discarded at the start of each chain.
        seed: master seed.
    """

    n: int
    chains: int = 1
    batch: int = 1024
    thin: int = 1
    therm: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n", "chains", "batch", "thin"):
            if getattr(self, name) < 1:
                raise ValueError(f"Expected {name} >= 1; got {getattr(self, name)}")
        if self.therm < 0:
            raise ValueError(f"Expected therm >= 0; got {self.therm}")

    def steps_for(self, n_records: int) -> int:
        """Steps per chain needed to record ``n_records`` configurations."""
        return self.therm + n_records * self.thin

    def sampler_attrs(self, symmetric: bool, dtype: str) -> dict:
        d = asdict(self)
        d.pop("n")
        d.pop("seed")
        return {"name": "flow-imh", "symmetric": bool(symmetric), "dtype": dtype, **d}


def block_generator(seed: int, block: int | str, device: torch.device) -> torch.Generator:
    """The generator of proposal block ``block`` (or ``"init"``) of a run with ``seed``."""
    key = [int(seed), 0 if block == "init" else 1, 0 if block == "init" else int(block)]
    state = np.random.SeedSequence(key).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


class _Bar:
    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total, self.start, self.enabled = total, start, enabled and total > start
        self.t0 = time.perf_counter()
        self.last = 0.0

    def update(self, done: int, acc: float) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.5 and done < self.total):
            return
        self.last = now
        frac = done / max(self.total, 1)
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        bar = "#" * int(25 * frac) + "-" * (25 - int(25 * frac))
        sys.stderr.write(
            f"\r[{bar}] {done}/{self.total} acc {acc:.3f} {rate:9.0f} samples/s (per chain)"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


@torch.no_grad()
def run_flow_mh(
    model: LoadedModel,
    out: str | Path,
    config: FlowMHConfig,
    *,
    resume: bool = False,
    force: bool = False,
    store_configs: bool = True,
    config_dtype: str = "float32",
    compression: str | None = None,
    progress: bool = True,
    meta: dict | None = None,
    command_line: str | None = None,
) -> dict:
    """Run (or resume) a flow independence-MH ensemble into ``out``.

    Args:
        model: the loaded flow (its ``proposal`` is used; symmetrised if the checkpoint says so).
        out: HDF5 ensemble path.
        config: run settings; ``config.n`` is the target length per chain.
        resume: continue the existing ``out`` (which must match model, action and settings).
        force: replace an existing ``out`` (without ``resume``).
        store_configs: keep configurations (else only per-config scalars).
        config_dtype: storage dtype of configurations.
        compression: ``None``, ``"gzip"`` or ``"lzf"``.
        progress: show a progress bar on stderr.
        meta: extra metadata (e.g. the resolved CLI config).
        command_line: recorded command line.

    Returns:
        A summary dict: ``n, chains, acceptance, steps, seconds, samples_per_second, path,
        n_nonfinite, longest_rejection_run``.
    """
    proposal, action = model.proposal, model.action
    param = next(model.flow.parameters())
    device, dtype = param.device, param.dtype
    dtype_name = str(dtype).replace("torch.", "")
    sampler = config.sampler_attrs(model.symmetric, dtype_name)
    sha = file_sha256(model.path)
    lattice = tuple(action.lattice_shape)
    C, K = config.chains, config.batch

    if resume:
        writer = EnsembleWriter.resume(
            out,
            expect={
                "lattice_shape": lattice,
                "n_chains": C,
                "action": action.params(),
                "sampler": sampler,
                "model_sha256": sha,
                "seed": config.seed,
                "store_configs": store_configs,
                "config_dtype": config_dtype,
                "compression": compression,
            },
        )
        arrays, attrs = writer.load_state()
        state = imh.IMHState(
            torch.as_tensor(arrays["phi"], device=device, dtype=dtype),
            torch.as_tensor(arrays["action"], device=device, dtype=dtype),
            torch.as_tensor(arrays["log_q"], device=device, dtype=dtype),
        )
        steps_done = int(attrs["steps_done"])
        n_acc, n_nonfinite = int(attrs["n_accepted"]), int(attrs["n_nonfinite"])
        max_run, cur_run = (np.asarray(arrays[k], dtype=np.int64) for k in ("max_run", "cur_run"))
    else:
        writer = EnsembleWriter.create(
            out,
            lattice_shape=lattice,
            n_chains=C,
            scalar_names=SCALARS,
            action=action.params(),
            sampler=sampler,
            model_sha256=sha,
            seed=config.seed,
            meta={"model_path": str(model.path), **(meta or {})},
            store_configs=store_configs,
            config_dtype=config_dtype,
            compression=compression,
            force=force,
            command_line=command_line,
        )
        phi0, log_q0 = proposal.sample(C, generator=block_generator(config.seed, "init", device))
        state = imh.init(phi0, action(phi0), log_q0)
        steps_done, n_acc, n_nonfinite = 0, 0, 0
        max_run, cur_run = np.zeros(C, np.int64), np.zeros(C, np.int64)

    target_steps = config.steps_for(config.n)
    start_steps = steps_done
    bar = _Bar(config.n, writer.n, progress)
    t_run = time.perf_counter()
    try:
        while steps_done < target_steps:
            t0 = time.perf_counter()
            block, offset = divmod(steps_done, K)
            gen = block_generator(config.seed, block, device)
            phi, s, log_q = imh.propose(proposal, action, K, C, generator=gen)
            log_u = torch.rand((K, C), generator=gen, device=device, dtype=torch.float64).log()
            take = min(K - offset, target_steps - steps_done)
            sl = slice(offset, offset + take)
            before = state
            state, info = imh.accept_reject(state, phi[sl], s[sl], log_q[sl], log_u[sl])
            steps = np.arange(steps_done, steps_done + take)
            rec = (steps >= config.therm) & ((steps - config.therm + 1) % config.thin == 0)
            rows = torch.as_tensor(np.nonzero(rec)[0])
            acc = info.is_accepted.numpy()
            for k in range(take):  # longest run of rejections, per chain (scalars only)
                cur_run = np.where(acc[k], 0, cur_run + 1)
                max_run = np.maximum(max_run, cur_run)
            n_acc += int(acc.sum())
            n_nonfinite += int(info.is_nonfinite.sum())
            steps_done += take
            chain_s = imh.gather(before.action, s[sl], info.index)[rows]
            chain_lq = imh.gather(before.log_q, log_q[sl], info.index)[rows]
            scalars = {
                "action": chain_s.double().cpu().numpy(),
                "log_q": chain_lq.double().cpu().numpy(),
                "log_weight": info.log_weight[rows].numpy(),
                "accepted": acc[rows.numpy()],
                "magnetization": None,
            }
            configs = imh.gather(before.phi, phi[sl], info.index)[rows.to(device)]
            scalars["magnetization"] = configs.flatten(2).sum(2).double().cpu().numpy()
            writer.append(
                scalars=scalars,
                configs=configs.cpu().numpy() if writer.store_configs else None,
                state={
                    "phi": state.phi.cpu().numpy(),
                    "action": state.action.cpu().numpy(),
                    "log_q": state.log_q.cpu().numpy(),
                    "max_run": max_run,
                    "cur_run": cur_run,
                },
                state_attrs={
                    "steps_done": steps_done,
                    "n_accepted": n_acc,
                    "n_nonfinite": n_nonfinite,
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
        "steps": steps_done,
        "acceptance": n_acc / max(steps_done * C, 1),
        "n_nonfinite": n_nonfinite,
        "longest_rejection_run": int(max_run.max()) if max_run.size else 0,
        "seconds": seconds,
        "samples_per_second": new_steps / seconds if seconds > 0 else float("nan"),
        "flowmc_version": flowmc.__version__,
    }
