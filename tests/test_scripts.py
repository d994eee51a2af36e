"""CPU smoke runs of the benchmark and recipe scripts (their full runs are documented in
docs/benchmarks.md); each must run end to end and write its JSON/checkpoint."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> None:
    # the scripts import this checkout's flowmc (not whichever one the interpreter has installed)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_gpu_l32_recipe_smoke_on_cpu(tmp_path):
    out = tmp_path / "l32.pt"
    _run([str(ROOT / "scripts" / "gpu_L32.py"), "--smoke", "--device", "cpu", "--out", str(out)],
         tmp_path)
    assert out.exists()


def test_bench_sample_quick(tmp_path):
    out = tmp_path / "bench_sample.json"
    _run([str(ROOT / "scripts" / "bench_sample.py"), "--quick", "--out", str(out)], tmp_path)
    res = json.loads(out.read_text())
    samplers = {r["sampler"] for r in res["runs"]}
    assert {"seed_loop", "flowmc_kernel", "flowmc_sample_hdf5"} <= samplers
    assert all(0 < r["acceptance"] <= 1 for r in res["runs"])



def test_bench_distributed_quick(tmp_path):
    """1 and 2 gloo processes (training, flow MH, HMC), and the GPU mode's smoke run on the CPU.

    Run in this process (its children are forked from it), to save two interpreter starts.
    """
    spec = importlib.util.spec_from_file_location("bench_distributed",
                                                  ROOT / "scripts" / "bench_distributed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out, gpu = tmp_path / "bench_distributed.json", tmp_path / "bench_gpu.json"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert bench.main(["--quick", "--out", str(out)]) == 0
        assert bench.main(["--gpu", "--quick", "--device", "cpu", "--out", str(gpu)]) == 0
    res = json.loads(out.read_text())
    assert [r["ranks"] for r in res["runs"]] == [1, 2]
    for r in res["runs"]:
        assert r["train"]["global_batch"] == 64 and r["train"]["steps_per_second"] > 0
        assert r["train"]["cpu_seconds_all_ranks"] > 0 and len(r["train"]["loadavg_before"]) == 3
        assert r["flow_mh"]["configs_per_second"] > 0 and r["hmc"]["configs_per_second"] > 0
    # the chains do not depend on the number of ranks
    assert res["same_results_for_every_W"]["hmc_step_size"]
    assert res["same_results_for_every_W"]["hmc_acceptance"]
    res = json.loads(gpu.read_text())
    assert res["mode"] == "gpu" and res["train"]["steps_per_second"] > 0
    assert 0 <= res["flow_mh"]["acceptance"] <= 1 and res["flow_mh"]["model"] == "trained here"
