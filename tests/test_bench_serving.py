"""benchmarks/bench_serving.py runs end to end: a real scoring server answers every normal request,
refuses every oversized one with 400, and the table has a row per run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/bench_serving.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def rows(table: str) -> dict[tuple[str, str], list[str]]:
    """(mode, concurrency) -> the row's cells."""
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
             if line.startswith("| ") and not line.startswith("| mode")]
    return {(c[0], c[1]): c for c in cells}


def test_bench_serving_loads_the_real_server_and_refuses_oversized_requests(tmp_path):
    # cgan takes labels: the faults run sends both a too-large count and a 100 000-label list.
    out = tmp_path / "serving.md"
    done = bench("--family", "cgan", "--requests", "12", "--images", "2", "--concurrency", "1", "2",
                 "--server-threads", "1", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    report = out.read_text()
    assert report == done.stdout
    table = rows(report)
    assert set(table) == {("in-process predict", "1"), ("served uint8", "1"), ("served uint8", "2"),
                          ("served png", "4"), ("faults: normal", "4"), ("faults: oversized", "4")}
    assert all(row[3] == "0" for row in table.values()), report  # errors
    assert table[("faults: oversized", "4")][2] == "3" and table[("faults: normal", "4")][2] == "9"  # i % 10 in (0, 5)
    assert table[("served uint8", "2")][2] == "12" and float(table[("served uint8", "2")][4]) > 0  # req/s
    assert float(table[("served png", "4")][9]) < float(table[("served uint8", "1")][9])  # KB/response
    assert "Oversized requests: 3/3 refused with 400 naming the field" in report
    assert "Serving overhead at concurrency 1 (p50): served" in report
    assert "Goal not checked: no served uint8 run at concurrency 4" in report
    assert "torch threads: in-process 1, server 1" in report


def test_bench_serving_refuses_a_family_that_does_not_generate():
    done = bench("--family", "ae", "--requests", "1")
    assert done.returncode != 0
    assert "--family ae: a reconstruct model; this benchmark sends generate requests" in done.stderr
