"""The benchmark scripts run: a configuration for every family, the GPU script's dry run on the CPU,
its FLOP count, and its clear refusal without CUDA."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_gpu  # noqa: E402
import bench_trainer  # noqa: E402
from components.models import FAMILIES, build_model  # noqa: E402
from components.params import load_params  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def run_script(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_every_registered_family_has_a_benchmark_config():
    params = load_params(ROOT / "params.yaml")
    for family in FAMILIES.names():
        cfg, source = bench_trainer.family_config(params, family)
        assert cfg.family == family and cfg.epochs == 1, source
        channels = FAMILIES.get(family).data_channels[0]  # the config builds a model (colorize: colour; ldm: on its parts)
        build_model(cfg, channels, 10, parts=bench_trainer.untrained_parts(params, cfg, channels, [f"c{i}" for i in range(10)]))


def test_unknown_trainer_option_is_refused_with_the_valid_ones():
    with pytest.raises(SystemExit, match="unknown option 'bf17'; valid: params, fp32, bf16"):
        bench_trainer.parse_options("bf16+bf17")
    assert bench_trainer.parse_options("bf16+channels_last") == {"precision": "bf16", "channels_last": True}


def test_bench_trainer_prints_and_writes_the_table(tmp_path):
    out = tmp_path / "table.md"
    done = run_script("benchmarks/bench_trainer.py", "--family", "vae", "--images", "128", "--batch-size", "32",
                      "--repeats", "1", "--data", "synthetic", "--threads", "1", "--markdown-out", str(out))
    assert done.returncode == 0, done.stderr
    table = out.read_text()
    assert table.startswith("Machine: ") and f"torch {torch.__version__}" in table
    row = next(line for line in table.splitlines() if line.startswith("| vae |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "params.yaml train.vae" and cells[2] == "32" and int(cells[3]) % 32 == 0
    trainer, bare, preloaded = float(cells[5]), float(cells[6]), float(cells[8])
    assert trainer > 0 and bare > 0 and preloaded > 0
    ratio = float(cells[7].split("×")[0])  # of the unrounded medians
    assert ratio == pytest.approx(trainer / bare, abs=0.01)


def test_dcgan64_training_image_costs_the_issues_flops():
    cfg = FAMILIES.get("dcgan").config.model_validate({**bench_gpu.SHARED, **bench_gpu.DCGAN64, "batch_size": 8,
                                                       "precision": "fp32", "channels_last": False, "compile": False})
    gflop = bench_gpu.flops_per_image(cfg, lambda c: build_model(c, bench_gpu.CHANNELS, 10), batch=2) / 1e9
    # D fwd+bwd three times, G fwd+bwd once: ≈ 2.5 GFLOP (issue 6, item 7)
    assert 2.3 < gflop < 2.7


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_gpu_without_cuda_fails_fast_and_says_what_to_do():
    done = run_script("benchmarks/bench_gpu.py", timeout=60)
    assert done.returncode == 2
    assert "CUDA is not available" in done.stderr and "--device cpu --dry-run" in done.stderr


def test_bench_gpu_refuses_cpu_timings_without_dry_run():
    done = run_script("benchmarks/bench_gpu.py", "--device", "cpu", timeout=60)
    assert done.returncode == 2 and "add --dry-run" in done.stderr


def test_bench_gpu_dry_run_on_cpu_runs_every_loop(tmp_path):
    out = tmp_path / "gpu.md"
    done = run_script("benchmarks/bench_gpu.py", "--device", "cpu", "--dry-run", "--batch-sizes", "2", "4",
                      "--steps", "1", "--bare-workers", "0", "--variants", "bf16", "bf16+channels_last",
                      "--markdown-out", str(out))
    assert done.returncode == 0, done.stderr
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "img/s" not in line]
    loops = {(r.split("|")[1].strip(), r.split("|")[2].strip(), r.split("|")[3].strip()) for r in rows}
    for batch in ("2", "4"):
        assert ("bare (pytorch/examples)", "fp32, 0 workers", batch) in loops
        assert ("preloaded (hand-written)", "bf16", batch) in loops
        assert ("trainer", "bf16", batch) in loops and ("trainer", "bf16+channels_last", batch) in loops
    assert all(float(r.split("|")[4]) > 0 for r in rows)  # img/s


def test_bench_modern_dry_run_times_each_model_of_the_gpu_profile(tmp_path):
    out = tmp_path / "modern.md"
    done = run_script("benchmarks/bench_modern.py", "--device", "cpu", "--dry-run", "--sample-count", "1",
                      "--warm", "1", "--steps", "1", "--markdown-out", str(out), timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line.split("|") for line in out.read_text().splitlines() if line.startswith(("| igpt", "| ldm"))]
    assert len(rows) == 2 and all(float(v) > 0 for row in rows for v in row[5:8]), rows  # steps/s, img/s, samples/s
    refused = run_script("benchmarks/bench_modern.py", "--device", "cpu", "--models", "nope", "--dry-run")
    assert refused.returncode == 2 and "--models ['nope']: not in the train or latent section" in refused.stderr


def test_step_options_times_each_variant():
    done = run_script("benchmarks/step_options.py", "--variants", "fp32", "bf16+inputs+t1", "--steps", "1",
                      "--repeats", "1", "--images", "256")
    assert done.returncode == 0, done.stderr
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert {"fp32", "bf16+inputs+t1"} <= set(rows) and "1.00×" in rows["fp32"]
    bad = run_script("benchmarks/step_options.py", "--variants", "bf17")
    assert bad.returncode != 0 and "unknown option(s) ['bf17']" in bad.stderr
