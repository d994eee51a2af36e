"""Smoke run of scripts/bench_flow_pass.py (issue 20 item 4): it must run end to end and write
its JSON with every configuration's timings, FLOPs and profile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_flow_pass_quick(tmp_path: Path) -> None:
    out = tmp_path / "bfp.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_flow_pass.py"), "--quick", "--quiet", "--ab",
         "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["flowmc_report"] == "bench-flow-pass" and res["threads"] == 1
    assert res["peak"]["gflops"] > 0 and len(res["loadavg_before"]) == 3
    assert [(c["family"], c["L"]) for c in res["configs"]] == [("coupling", 8), ("cnf", 8)]
    for c in res["configs"]:
        for mode in ("sample", "train"):
            rec = c[mode]
            assert rec["cpu_ms"] > 0 and rec["wall_ms"] > 0 and rec["gflop"] > 0
            assert rec["gflops"] > 0 and 0 < rec["percent_of_peak"]
            assert 0 < len(rec["profile"]) <= 10
            assert all(0 < p["share"] <= 1 for p in rec["profile"])
        ab = c["ab"]
        for mode in ("sample", "train"):
            assert ab[mode]["reference_cpu_ms"] > 0 and ab[mode]["current_cpu_ms"] > 0
            assert ab[mode]["speedup"] > 0 and ab[mode]["current_gflops"] > 0
