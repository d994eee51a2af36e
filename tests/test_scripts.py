"""CPU smoke runs of the benchmark and recipe scripts (their full runs are documented in
docs/benchmarks.md); each must run end to end and write its JSON/checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> None:
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300
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
