#!/usr/bin/env python
r"""Issue 20 item 4: the cost of one flow pass, against this CPU's single-thread peak.

Two families, each at every ``--sizes`` extent ``L`` (default 16 and 32), one thread:

* ``coupling``: the ``default`` recipe's flow (momentum layer, odd zero-mode spline, zero-mode
  spectrum, 6 Z2-equivariant spline couplings with 12 bins, hidden (16, 16), kernel 3, 1x1 output
  layer, blur [0, 2]): the shipped ``phi4_L16_m2-4_lam4.25`` flow, carried to ``L`` by
  :func:`flowmc.flows.flow.transfer_state_dict` when ``L != 16`` (trained weights, so the splines
  are not the identity);
* ``cnf``: the ``cnf`` recipe's flow (momentum layer + one continuous flow, RK4 with 20 steps)
  with random non-zero kernel weights (``N(0, 0.01)``, seed 0).

For each configuration: **sampling** (``flow.sample(B)`` under ``torch.no_grad``, ``B =
--sample-batch``, default 256) and a **training step** (the reverse-KL loss of
:func:`flowmc.training.train.reverse_kl_loss` at ``--train-batch``, default 64, and its backward,
the continuous flow's penalty pass included), each ``--repeats`` times after one warm-up: CPU time
(``time.process_time``) and wall time per call (median and min), the profiler's top 10 operators
by self CPU time (share of the profiled total), and the achieved GFLOP/s.

**FLOPs** (analytic, the same count before and after any optimisation; dense linear algebra only:
convolutions, matmuls and FFTs; elementwise work, spline arithmetic and transcendentals are not
counted, the latter are reported as ``transcendentals``):

* a convolution with ``Cin -> Cout`` channels and kernel ``k`` in ``d`` dimensions on ``N``
  samples at ``S`` output sites: ``2 N S Cin Cout k^d``. A spline coupling's trunk runs at all
  ``V`` sites, on ``2B`` samples when Z2-equivariant (the conditioner sees ``+-x``); its output
  layer only needs the ``V/2`` transformed sites (``S = V/2``, the same ``2B`` samples);
* an FFT of ``n`` real points: ``2.5 n log2 n`` (half of the complex ``5 n log2 n``), the same
  for its inverse; a momentum-space layer costs one pair per sample, a blur one forward FFT and
  one inverse per width;
* a continuous-flow stage (``int_steps x 4`` of them): the feature contraction
  ``2 B V (F + 1) C``, ``C`` forward FFTs and one inverse per sample, and the ``k``-space product
  ``4 B C V_h`` (``V_h = V / L_d * (L_d/2 + 1)``); ``2 B V F`` transcendentals (sin, cos);
* a training step: 3 x the forward count (the backward of a dense op costs twice its forward);
  the continuous flow's penalty pass adds the same for ``penalty_batch`` samples at
  ``coprime_steps(int_steps)``.

With ``--ab`` each configuration is also timed against the code before this optimisation work
(``tests/flows/reference_impl.py``), the two interleaved in this process (speedups measured
under the same load); the flow in eval mode there, so the training step has no continuous-flow
penalty pass.

``GFLOP/s = FLOPs / CPU time``; the peak is the best of ``--peak-repeats`` float32 matmuls of
``--peak-size``^3 (default 2048) in the same process (``2 n^3`` FLOPs).

The JSON holds the torch version, the CPU model, the thread count, the load average before and
after, the peak, and per configuration the timings, FLOPs, GFLOP/s, % of peak and the profile.

Examples:
    python scripts/bench_flow_pass.py --quick --out /tmp/bfp.json       # smoke test, seconds
    OMP_NUM_THREADS=1 python scripts/bench_flow_pass.py --ab --out results/bench_flow_pass.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from flowmc.flows.cnf import ContinuousFlow, coprime_steps
from flowmc.flows.flow import Flow, build_flow, transfer_state_dict
from flowmc.flows.nets import Blur
from flowmc.flows.spectral import MomentumScaling, ZeroModeSpectrum
from flowmc.flows.splines import SplineCoupling
from flowmc.io.checkpoint import load_model
from flowmc.lattice.action import Phi4Action
from flowmc.training.recipes import get_recipe
from flowmc.training.train import reverse_kl_loss

SHIPPED = "phi4_L16_m2-4_lam4.25"
M2, LAM = -4.0, 4.25


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def timed(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    """CPU and wall time per call (ms), median and min over ``repeats`` after one warm-up, and
    the median number of minor page faults per call (fresh memory the allocator had to map:
    each costs about a microsecond, a noticeable share of a flow pass on some machines)."""
    fn()
    cpu, wall, faults = [], [], []
    for _ in range(repeats):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(1e3 * (time.process_time() - c0))
        wall.append(1e3 * (time.perf_counter() - w0))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {"cpu_ms": statistics.median(cpu), "cpu_ms_min": min(cpu),
            "wall_ms": statistics.median(wall), "wall_ms_min": min(wall),
            "page_faults": statistics.median(faults), "repeats": repeats}  # fmt: skip


def peak_gflops(n: int, repeats: int) -> dict[str, float]:
    """Single-thread float32 matmul rate: best CPU time of ``repeats`` products of ``n x n``."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    t = timed(lambda: a @ b, repeats)
    return {"size": n, "cpu_ms_min": t["cpu_ms_min"], "gflops": 2 * n**3 / t["cpu_ms_min"] / 1e6}


def fft_flops(shape: tuple[int, ...]) -> float:
    n = math.prod(shape)
    return 2.5 * n * math.log2(n)


def forward_flops(
    layers: list[torch.nn.Module], shape: tuple[int, ...], batch: int
) -> tuple[float, float]:
    """Analytic ``(flops, transcendentals)`` of one forward pass of ``batch`` samples through
    ``layers`` (see the module docstring)."""
    vol = math.prod(shape)
    vol_half = vol // shape[-1] * (shape[-1] // 2 + 1)
    flops = trans = 0.0
    for layer in layers:
        if isinstance(layer, (MomentumScaling, ZeroModeSpectrum)):
            flops += 2 * batch * fft_flops(shape)
        elif isinstance(layer, SplineCoupling):
            nb = 2 * batch if layer.equivariant else batch
            if isinstance(layer.blur, Blur):
                flops += batch * (1 + len(layer.blur.widths)) * fft_flops(shape)
            convs = [m for m in layer.net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
            for i, conv in enumerate(convs):
                sites = vol // 2 if i == len(convs) - 1 else vol
                k = math.prod(conv.kernel_size)
                flops += 2 * nb * sites * conv.in_channels * conv.out_channels * k
        elif isinstance(layer, ContinuousFlow):
            stages = layer.int_steps * 4  # rk4 (the recipe's integrator)
            c, f = layer.n_channels, layer.n_freq
            per = (2 * batch * vol * (f + 1) * c + batch * (c + 1) * fft_flops(shape)
                   + 4 * batch * c * vol_half)  # fmt: skip
            flops += stages * per
            trans += stages * 2 * batch * vol * f
    return flops, trans


def train_flops(flow: Flow, batch: int) -> float:
    shape = tuple(flow.lattice_shape)
    flops = 3 * forward_flops(list(flow.layers), shape, batch)[0]
    for layer in flow.continuous_layers:
        k = min(layer.penalty_batch, batch)
        if layer.penalty > 0 and k > 0:
            saved = layer.int_steps
            layer.int_steps = coprime_steps(saved)
            try:
                flops += 3 * forward_flops([layer], shape, k)[0]
            finally:
                layer.int_steps = saved
    return flops


def profile_top(fn: Callable[[], Any], top: int = 10) -> list[dict[str, Any]]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
             "share": round(e.self_cpu_time_total / total, 4), "calls": e.count}
            for e in events[:top]]  # fmt: skip


def coupling_flow(size: int) -> Flow:
    loaded = load_model(SHIPPED)
    flow = loaded.flow
    if tuple(flow.lattice_shape) == (size, size):
        return flow
    cfg, _ = get_recipe("default", (size, size))
    new = build_flow(cfg)
    new.load_state_dict(transfer_state_dict(flow.state_dict(), flow.config, cfg))
    return new


def cnf_flow(size: int) -> Flow:
    cfg, _ = get_recipe("cnf", (size, size))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        flow = build_flow(cfg)
        with torch.no_grad():
            for layer in flow.continuous_layers:
                layer.weight.normal_(0.0, 0.01)
    return flow


def reference_module() -> Any:
    """``tests/flows/reference_impl.py`` of this checkout: the flow passes as they were before
    issue 20 item 4 (for ``--ab``)."""
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from tests.flows import reference_impl

    return reference_impl


def ab_record(
    flow: Flow, action: Phi4Action, args: argparse.Namespace
) -> dict[str, Any]:
    """The pre-optimisation passes against the current ones, interleaved in this process.

    Both run ``z -> (phi, log|det|)`` from the same noise, the flow in eval mode (so the
    training step has no continuous-flow penalty pass: the reference has none), the training step
    the reverse-KL loss and its backward. CPU ms per call, median over ``--repeats``, and the
    GFLOP/s of each (the training step's FLOPs without a penalty pass: 3 x the forward's)."""
    ref = reference_module()
    variants = {"reference": lambda z: ref.forward(flow, z), "current": lambda z: flow(z)}
    flow.eval()
    out: dict[str, Any] = {}
    for mode, batch in (("sample", args.sample_batch), ("train", args.train_batch)):
        z = flow.prior.sample(batch, generator=torch.Generator().manual_seed(2))

        def call(fwd: Callable[[Tensor], tuple[Tensor, Tensor]], mode: str = mode,
                 z: Tensor = z) -> None:  # fmt: skip
            if mode == "sample":
                with torch.no_grad():
                    fwd(z)
                return
            flow.zero_grad(set_to_none=True)
            phi, log_det = fwd(z)
            ((flow.prior.log_prob(z) - log_det) + action(phi)).mean().backward()

        times: dict[str, list[float]] = {k: [] for k in variants}
        for fwd in variants.values():
            call(fwd)  # warm-up
        for _ in range(args.repeats):
            for name, fwd in variants.items():
                c0 = time.process_time()
                call(fwd)
                times[name].append(1e3 * (time.process_time() - c0))
        med = {k: statistics.median(v) for k, v in times.items()}
        flops = forward_flops(list(flow.layers), tuple(flow.lattice_shape), batch)[0]
        flops *= 1 if mode == "sample" else 3
        out[mode] = {"batch": batch, **{f"{k}_cpu_ms": v for k, v in med.items()},
                     **{f"{k}_gflops": flops / v / 1e6 for k, v in med.items()},
                     "speedup": med["reference"] / med["current"]}  # fmt: skip
    return out


def bench_config(family: str, size: int, args: argparse.Namespace) -> dict[str, Any]:
    flow = coupling_flow(size) if family == "coupling" else cnf_flow(size)
    flow.requires_grad_(True)  # a loaded flow comes frozen
    action = Phi4Action(M2, LAM, (size, size))
    g = torch.Generator().manual_seed(1)

    def sample() -> None:
        flow.eval()
        with torch.no_grad():
            flow.sample(args.sample_batch, generator=g)

    def train_step() -> None:
        flow.train()
        flow.zero_grad(set_to_none=True)
        loss, _, _ = reverse_kl_loss(flow, action, args.train_batch, generator=g)
        loss.backward()

    out: dict[str, Any] = {"family": family, "L": size,
                           "n_params": sum(p.numel() for p in flow.parameters())}  # fmt: skip
    for name, fn, flops, trans in (
        ("sample", sample, *forward_flops(list(flow.layers), (size, size), args.sample_batch)),
        ("train", train_step, train_flops(flow, args.train_batch), None),
    ):
        rec = {"batch": args.sample_batch if name == "sample" else args.train_batch,
               **timed(fn, args.repeats)}  # fmt: skip
        rec["gflop"] = flops / 1e9
        rec["gflops"] = flops / rec["cpu_ms"] / 1e6
        rec["gflops_best"] = flops / rec["cpu_ms_min"] / 1e6
        rec["percent_of_peak"] = 100 * rec["gflops_best"] / args.peak["gflops"]
        if trans is not None:
            rec["transcendentals"] = trans
        rec["profile"] = profile_top(fn)
        out[name] = rec
        if not args.quiet:
            print(f"{family:8s} L={size:<3d} {name:6s} cpu {rec['cpu_ms']:8.1f} ms "
                  f"(min {rec['cpu_ms_min']:.1f}) wall {rec['wall_ms']:8.1f} ms  "
                  f"{rec['gflop']:7.3f} GFLOP  {rec['gflops_best']:6.2f} GFLOP/s "
                  f"({rec['percent_of_peak']:.1f}% of peak)  top: "
                  + ", ".join(f"{p['op']} {100 * p['share']:.0f}%" for p in rec["profile"][:4]),
                  flush=True)  # fmt: skip
    if args.ab:
        out["ab"] = ab_record(flow, action, args)
        if not args.quiet:
            print(f"{family:8s} L={size:<3d} A/B (reference -> current, CPU ms): " + ", ".join(
                f"{m} {r['reference_cpu_ms']:.1f} -> {r['current_cpu_ms']:.1f} "
                f"({r['speedup']:.2f}x; {r['reference_gflops']:.1f} -> "
                f"{r['current_gflops']:.1f} GFLOP/s)" for m, r in out["ab"].items()),
                flush=True)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", default="bench_flow_pass.json", help="JSON output")
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 32])
    p.add_argument("--families", nargs="+", default=["coupling", "cnf"],
                   choices=["coupling", "cnf"])  # fmt: skip
    p.add_argument("--sample-batch", type=int, default=256)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak-size", type=int, default=2048)
    p.add_argument("--peak-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: L = 8, batches 16/8, one repeat, a 512^3 peak")  # fmt: skip
    p.add_argument("--ab", action="store_true",
                   help="also time the pre-optimisation passes (tests/flows/reference_impl.py) "
                        "interleaved with the current ones")  # fmt: skip
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.sample_batch, args.train_batch = [8], 16, 8
        args.repeats, args.peak_size, args.peak_repeats = 1, 512, 2
    torch.set_num_threads(args.threads)
    load_before = loadavg()
    args.peak = peak_gflops(args.peak_size, args.peak_repeats)
    if not args.quiet:
        print(f"peak (float32 matmul {args.peak_size}^3, 1 thread): "
              f"{args.peak['gflops']:.1f} GFLOP/s; load {load_before}", flush=True)  # fmt: skip
    configs = [bench_config(f, s, args) for f in args.families for s in args.sizes]
    res = {
        "flowmc_report": "bench-flow-pass",
        "torch": str(torch.__version__),
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "peak": args.peak,
        "settings": {"sizes": args.sizes, "sample_batch": args.sample_batch,
                     "train_batch": args.train_batch, "repeats": args.repeats,
                     "quick": args.quick, "ab": args.ab},  # fmt: skip
        "configs": configs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    if not args.quiet:
        print(f"load {res['loadavg_before']} -> {res['loadavg_after']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
