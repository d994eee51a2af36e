"""Strong scaling of flowmc on torch.distributed: 1 and 2 CPU processes (gloo), and one GPU.

**CPU mode** (default). For each number of ranks ``W`` in ``--ranks`` (default ``1,2``) the script
starts ``W`` fresh processes (``torch.multiprocessing``, fork on Linux, each with the torchrun
environment: ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; ``W = 1`` runs one plain
process), each with ``--threads`` torch threads (default 1), and measures in them, through the
library calls the commands use:

* **training** — :func:`flowmc.training.workflow.train_flow`, recipe ``default`` at L = 8
  (m2 = -4, lam = 8), a FIXED global batch ``--batch`` (default 256, split ``B/W`` per rank) for
  ``--steps`` steps (default 40): steps/s = steps / optimizer seconds (rank 0's
  ``trainer.elapsed``: the step loop with its collectives), samples/s = steps x B / seconds;
* **flow-MH sampling** — :func:`flowmc.sampling.shards.run_sharded` with the shipped L = 8 flow
  (``data/phi4_L8_m2-4_lam8.pt``), a FIXED total of ``--chains`` chains (default 8) x ``--n``
  configurations (default 2048), ``--flow-batch`` proposals per chain per flow call (default
  1024), configurations stored: configurations/s = n x C / sampling seconds of the slowest rank;
* **HMC sampling** — the same driver, same action, ``--chains`` chains x ``--hmc-n``
  trajectories (default 400) after a tuned warm-up (``--hmc-warmup``, default 100; the tuned
  step size is the same for every ``W``, see docs/distributed.md): configurations/s likewise.

Beside each wall time: the CPU seconds (user + system) of all ranks summed, and the load average
(``/proc/loadavg``) before and after: on a shared machine the numbers are only as good as the load.

**GPU mode** (``--gpu``, one process, ``--device cuda``): at L = 32 (m2 = -4, lam = 4.572, the
point of ``scripts/gpu_L32.py``) training steps/s with ``--recipe`` (default ``large``) at batch
``--gpu-batch`` for ``--gpu-steps`` steps (timed with ``cuda.synchronize`` per step, the first 10 %
excluded as warm-up), then flow-MH samples/s and the acceptance with ``--model`` (a trained L = 32
flow, e.g. from ``scripts/gpu_L32.py``) or, without it, with the flow just trained for the timing
(an acceptance of a barely trained flow, labelled ``model: "trained here"``).

Outputs ``--out`` (JSON: machine, settings, every measurement, speed-ups) and prints the rows of the
scaling table of ``docs/distributed.md``.

Examples::

    OMP_NUM_THREADS=1 python scripts/bench_distributed.py --out bench_distributed.json
    python scripts/bench_distributed.py --quick --out /tmp/bench_dist_quick.json     # < 1 min
    python scripts/bench_distributed.py --gpu --model phi4_L32.pt --out bench_gpu.json
    python scripts/bench_distributed.py --gpu --quick --device cpu --out /tmp/gpu_smoke.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import shutil
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import flowmc
from flowmc import parallel
from flowmc.io.checkpoint import load_model
from flowmc.io.ensemble import file_sha256
from flowmc.io.shipped import default_model_path
from flowmc.lattice.action import Phi4Action
from flowmc.sampling.run import HMCSettings, RunConfig, run_ensemble
from flowmc.sampling.shards import run_sharded
from flowmc.training.workflow import train_flow

CPU_POINT = {"L": 8, "m2": -4.0, "lam": 8.0}
GPU_POINT = {"L": 32, "m2": -4.0, "lam": 4.572}
_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:  # pragma: no cover - not Linux
        return [float("nan")] * 3


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _sum_over_ranks(x: float) -> float:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, x)
    return float(sum(parts))


class _Timer:
    """Wall seconds, summed CPU seconds of all ranks and the load average around a block."""

    def __enter__(self) -> _Timer:
        self.load_before = loadavg()
        self.c0, self.t0 = cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        if exc[0] is None:
            self.cpu = _sum_over_ranks(cpu_seconds() - self.c0)
        self.load_after = loadavg()

    def record(self) -> dict:
        return {"wall_seconds": self.wall, "cpu_seconds_all_ranks": self.cpu,
                "loadavg_before": self.load_before, "loadavg_after": self.load_after}  # fmt: skip


# --------------------------------------------------------------------------- CPU scaling


def _measure_cpu(world: int, args: argparse.Namespace, tmp: Path) -> dict:
    """What one rank measures (all ranks take part; rank 0's dict is kept)."""
    p = CPU_POINT
    action = Phi4Action(p["m2"], p["lam"], (p["L"], p["L"]))
    out: dict = {"ranks": world, "threads_per_rank": torch.get_num_threads()}
    with parallel.process_group("cpu", timeout_s=600):
        with _Timer() as t:
            res = train_flow(
                action, recipe="default", seed=args.seed, dtype=torch.float32,
                train_overrides={"n_steps": args.steps, "batch_size": args.batch},
                symmetric=False, checkpoint_every=0, progress=False,
            )  # fmt: skip
        secs = res.trainer.elapsed
        # free the DDP wrapper while its process group lives: a DDP Reducer that outlives
        # destroy_process_group frees the group in its destructor with the GIL held, which
        # can deadlock against gloo's worker thread (seen on torch 2.13)
        del res
        gc.collect()
        out["train"] = {
            "recipe": "default", **p, "steps": args.steps, "global_batch": args.batch,
            "batch_per_rank": args.batch // world, "optimizer_seconds": secs,
            "steps_per_second": args.steps / secs, "samples_per_second": args.steps * args.batch
            / secs, **t.record(),
        }  # fmt: skip
        runs = {
            "flow_mh": (RunConfig(n=args.n, chains=args.chains, seed=args.seed,
                                  batch=args.flow_batch), {"model": default_model_path()}),
            "hmc": (RunConfig(n=args.hmc_n, chains=args.chains, seed=args.seed, start="random",
                              hmc=HMCSettings(warmup=args.hmc_warmup)), {"action": action}),
        }  # fmt: skip
        for name, (cfg, kw) in runs.items():
            with _Timer() as t:
                s = run_sharded(tmp / f"{name}-{world}.h5", cfg, progress=False, **kw)
            out[name] = {
                "chains": cfg.chains, "chains_per_rank": cfg.chains / world, "n": cfg.n,
                "configs": cfg.n * cfg.chains, "sampling_seconds": s["seconds"],
                "warmup_seconds": s["warmup_seconds"],
                "configs_per_second": cfg.n * cfg.chains / s["seconds"],
                "acceptance": s["acceptance"], **t.record(),
            }  # fmt: skip
            if name == "flow_mh":
                out[name]["flow_batch"] = cfg.batch
            else:
                out[name].update(step_size=s["step_size"], num_steps=s["num_steps"])
    return out


def _child(rank: int, world: int, port: int, args: argparse.Namespace, tmp: str) -> None:
    for k in _ENV:
        os.environ.pop(k, None)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                          RANK=str(rank), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(args.threads)
    try:
        res = _measure_cpu(world, args, Path(tmp))
        if rank == 0:
            (Path(tmp) / f"result-{world}.json").write_text(json.dumps(res))
    except BaseException:
        (Path(tmp) / f"error-{world}-{rank}.txt").write_text(traceback.format_exc())
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_scaling(args: argparse.Namespace) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    tmp = Path(tempfile.mkdtemp(prefix="bench_distributed-"))
    runs = []
    try:
        for world in args.ranks:
            print(f"== {world} rank(s) x {args.threads} thread(s)", file=sys.stderr)
            port = _free_port()
            procs = [ctx.Process(target=_child, args=(r, world, port, args, str(tmp)))
                     for r in range(world)]  # fmt: skip
            t0 = time.perf_counter()
            for p in procs:
                p.start()
            for p in procs:
                p.join(args.timeout)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
            errors = "".join(f.read_text() for f in tmp.glob(f"error-{world}-*.txt"))
            if any(p.exitcode != 0 for p in procs):
                raise RuntimeError(f"{world}-rank run failed (exit codes "
                                   f"{[p.exitcode for p in procs]}):\n{errors}")  # fmt: skip
            res = json.loads((tmp / f"result-{world}.json").read_text())
            res["process_seconds"] = time.perf_counter() - t0
            runs.append(res)
            for line in _rows([res], runs[0]):
                print(line, file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = runs[0]
    speedup = {
        f"{r['ranks']}_vs_{base['ranks']}": {
            "train_steps_per_second": r["train"]["steps_per_second"]
            / base["train"]["steps_per_second"],
            "flow_mh_configs_per_second": r["flow_mh"]["configs_per_second"]
            / base["flow_mh"]["configs_per_second"],
            "hmc_configs_per_second": r["hmc"]["configs_per_second"]
            / base["hmc"]["configs_per_second"],
        }
        for r in runs[1:]
    }
    # the same chains whatever W (per-chain streams, step size tuned over all chains)
    same = {
        "hmc_step_size": len({r["hmc"]["step_size"] for r in runs}) == 1,
        "hmc_acceptance": len({r["hmc"]["acceptance"] for r in runs}) == 1,
        "flow_mh_acceptance": len({r["flow_mh"]["acceptance"] for r in runs}) == 1,
    }
    return {"runs": runs, "speedup": speedup, "same_results_for_every_W": same}


def _rows(runs: list[dict], base: dict) -> list[str]:
    """Rows of the scaling table in docs/distributed.md."""
    rows = []
    for r in runs:
        tr, fm, hm = r["train"], r["flow_mh"], r["hmc"]
        sp = lambda a, b: a / b  # noqa: E731
        rows.append(
            f"| CPU, gloo, L = 8 | {r['ranks']} x {r['threads_per_rank']} thr | "
            f"{tr['global_batch']} | {tr['steps_per_second']:.2f} "
            f"(x{sp(tr['steps_per_second'], base['train']['steps_per_second']):.2f}) | "
            f"{fm['configs_per_second']:.0f} "
            f"(x{sp(fm['configs_per_second'], base['flow_mh']['configs_per_second']):.2f}) | "
            f"{hm['configs_per_second']:.0f} "
            f"(x{sp(hm['configs_per_second'], base['hmc']['configs_per_second']):.2f}) | "
            f"{tr['loadavg_before'][0]:.1f} |"
        )
    return rows


# --------------------------------------------------------------------------- one GPU


def gpu_bench(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.set_num_threads(args.threads)
    p = dict(GPU_POINT)
    if args.quick:
        p["L"] = 8
    action = Phi4Action(p["m2"], p["lam"], (p["L"], p["L"]))
    tmp = Path(tempfile.mkdtemp(prefix="bench_distributed_gpu-"))
    try:
        stamps: list[tuple[int, float]] = []

        def tick(tr) -> None:  # noqa: ANN001
            sync()
            stamps.append((tr.step_count, time.perf_counter()))

        with _Timer() as t:
            res = train_flow(
                action, recipe=args.recipe, seed=args.seed, device=device, dtype=torch.float32,
                train_overrides={"n_steps": args.gpu_steps, "batch_size": args.gpu_batch},
                symmetric=False, checkpoint_every=0, progress=False, callback=tick,
                callback_every=1, out=tmp / "trained.pt",
            )  # fmt: skip
        skip = max(1, len(stamps) // 10)
        (s0, t0), (s1, t1) = stamps[skip - 1], stamps[-1]
        train = {
            "recipe": args.recipe, **p, "steps": args.gpu_steps, "batch": args.gpu_batch,
            "optimizer_seconds": res.trainer.elapsed,
            "steps_per_second": (s1 - s0) / (t1 - t0) if t1 > t0 else float("nan"),
            "steps_per_second_all": args.gpu_steps / res.trainer.elapsed,
            "warmup_steps_excluded": skip, "final_loss": res.history["loss"][-1],
            "final_batch_ess": res.history["ess"][-1], **t.record(),
        }  # fmt: skip
        train["samples_per_second"] = train["steps_per_second"] * args.gpu_batch
        model_path = Path(args.model) if args.model else tmp / "trained.pt"
        model = load_model(model_path, device=device, dtype=torch.float32)
        cfg = RunConfig(n=args.gpu_n, chains=args.gpu_chains, seed=args.seed,
                        batch=args.gpu_flow_batch)  # fmt: skip
        with _Timer() as t:
            s = run_ensemble(tmp / "gpu.h5", cfg, model=model, progress=False)
        sample = {
            "model": str(model_path) if args.model else "trained here",
            "model_sha256": file_sha256(model_path), "action": model.action.params(),
            "symmetric": model.symmetric, "chains": cfg.chains, "n": cfg.n,
            "flow_batch": cfg.batch, "seconds": s["seconds"],
            "samples_per_second": s["samples_per_second"], "acceptance": s["acceptance"],
            "longest_rejection_run": s["longest_rejection_run"], **t.record(),
        }  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"train": train, "flow_mh": sample}
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
        out["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    print(f"| 1 GPU, L = {p['L']}, `{args.recipe}` | 1 | {args.gpu_batch} | "
          f"{train['steps_per_second']:.2f} | {train['samples_per_second']:.0f} | "
          f"{sample['samples_per_second']:.0f} (acc. {sample['acceptance']:.3f}) |",
          file=sys.stderr)  # fmt: skip
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench_distributed.json"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test (< 1 min)")
    ap.add_argument("--ranks", default="1,2", help="numbers of processes (CPU mode)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=40, help="training steps (CPU mode)")
    ap.add_argument("--batch", type=int, default=256, help="global training batch (CPU mode)")
    ap.add_argument("--chains", type=int, default=8, help="total chains (CPU mode)")
    ap.add_argument("--n", type=int, default=2048, help="flow-MH configurations per chain")
    ap.add_argument("--flow-batch", type=int, default=1024, help="proposals per chain per call")
    ap.add_argument("--hmc-n", type=int, default=400, help="HMC trajectories per chain")
    ap.add_argument("--hmc-warmup", type=int, default=100, help="HMC warm-up trajectories")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per W (CPU mode)")
    g = ap.add_argument_group("GPU mode")
    g.add_argument("--gpu", action="store_true", help="one process on --device at L = 32")
    g.add_argument("--device", default="cuda")
    g.add_argument("--recipe", default="large", help="training recipe (GPU mode)")
    g.add_argument("--gpu-steps", type=int, default=300, help="training steps (GPU mode)")
    g.add_argument("--gpu-batch", type=int, default=1024, help="training batch (GPU mode)")
    g.add_argument("--model", type=Path, default=None,
                   help="a trained flow to sample with (default: the one trained for the timing)")
    g.add_argument("--gpu-chains", type=int, default=16, help="flow-MH chains (GPU mode)")
    g.add_argument("--gpu-n", type=int, default=8192, help="flow-MH configurations per chain")
    g.add_argument("--gpu-flow-batch", type=int, default=1024,
                   help="proposals per chain per flow call (GPU mode)")
    args = ap.parse_args(argv)
    args.ranks = [int(w) for w in str(args.ranks).split(",") if w.strip()]
    if args.quick:
        args.steps, args.batch, args.chains = min(args.steps, 3), min(args.batch, 64), 4
        args.n, args.flow_batch, args.hmc_n, args.hmc_warmup = 64, 32, 8, 5
        args.gpu_steps, args.gpu_batch, args.gpu_chains = 5, 64, 2
        args.gpu_n, args.gpu_flow_batch = 64, 32
        args.timeout = min(args.timeout, 300)
    out = {
        "script": "scripts/bench_distributed.py",
        "flowmc_version": flowmc.__version__,
        "machine": {"platform": platform.platform(), "node": platform.node(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},  # fmt: skip
        "argv": sys.argv if argv is None else argv,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "mode": "gpu" if args.gpu else "cpu",
    }
    out.update(gpu_bench(args) if args.gpu else cpu_scaling(args))
    out["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=_jsonable))
    if not args.gpu:
        print("\n".join(_rows(out["runs"], out["runs"][0])))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _jsonable(x: object) -> object:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


if __name__ == "__main__":
    sys.exit(main())
