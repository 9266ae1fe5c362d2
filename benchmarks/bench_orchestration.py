"""Team-scale orchestration, measured against real servers on loopback (tests/stack.py: Prefect
server, MLflow server with S3 artefacts on moto, S3 DVC remote, process workers):

1. two models trained by one in-process `genpipe retrain` (the default, serial), with every core
   and with one worker's share of them, beside the same two models trained by `genpipe retrain`
   with `deploy.training_pool` set, one model per worker;
2. the unchanged scheduled run: the retrain deployment's run with nothing changed, from its creation
   to its completed state on the server's clock (what a schedule starts), and the CLI retrain alike.

    .venv/bin/python benchmarks/bench_orchestration.py [--limit 6000] [--epochs 1] [--models dcgan,cgan]

Both retrains start from the same fresh state (their own project checkout, data name and registry
entries); each includes ingest and the classifier, which run in the retrain process in both modes.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from stack import RETRAIN_POOL, TRAINING_POOL, BUCKET, genpipe, make_project, team  # noqa: E402



def timed(what: str, args: list[str], ws: Path, env: dict) -> float:
    started = time.monotonic()
    result = genpipe(args, ws, env, timeout=3600)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(f"{what} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=6000, help="images per split (data.limit_per_split)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--models", default="dcgan,cgan", help="two or more entries of params.yaml's train section")
    args = parser.parse_args()
    models = args.models.split(",")
    common = [f"data.limit_per_split={args.limit}", "classifier.epochs=1",
              *(f"train.{m}.epochs={args.epochs}" for m in models), "evaluate.num_samples=1000",
              "evaluate.kid_subset_size=500", f"deploy.work_pool={RETRAIN_POOL}"]
    cores = os.cpu_count()
    print(f"# bench_orchestration: {platform.processor() or platform.machine()}, {cores} cores, "
          f"models {', '.join(models)}, {args.limit} images per split, {args.epochs} epoch(s)")
    with tempfile.TemporaryDirectory(prefix="genpipe-bench-") as tmp:
        base = Path(tmp)
        parallel_ws = base / "parallel"
        per_worker = max(1, cores // 2)  # two workers together use what a serial run with every core uses
        with team(base / "servers", workers=2, retrain_worker_home=parallel_ws / ".genpipe",
                  threads_per_worker=per_worker) as crew:
            remote = {"endpoint": crew.s3}
            serial = {}
            for threads in sorted({cores, per_worker}, reverse=True):  # all the cores; one worker's share
                serial_ws = make_project(base / f"serial-{threads}", models, [*common, f"data.name=bench-serial-{threads}"],
                                         remote=f"s3://{BUCKET}/serial-{threads}", **remote)
                serial[threads] = timed("serial retrain", ["retrain"], serial_ws,
                                        crew.client_env(serial_ws / ".genpipe", OMP_NUM_THREADS=str(threads)))
            make_project(parallel_ws, models, [*common, "data.name=bench-parallel", f"deploy.training_pool={TRAINING_POOL}"],
                         remote=f"s3://{BUCKET}/parallel", **remote)
            parallel_env = crew.client_env(parallel_ws / ".genpipe", OMP_NUM_THREADS=str(cores))
            timed("deploy", ["deploy"], parallel_ws, parallel_env)
            parallel = timed("parallel retrain", ["retrain"], parallel_ws, parallel_env)
            for threads, seconds in serial.items():
                print(f"retrain of {len(models)} models, in-process serial, {threads} torch thread(s): {seconds:7.1f} s")
            print(f"retrain of {len(models)} models, two workers at once, {per_worker} thread(s) each: {parallel:7.1f} s")
            for threads, seconds in serial.items():
                print(f"  parallel / serial with {threads} thread(s): {parallel / seconds:.2f}x (goal <= 0.6x where the cores allow)")

            unchanged_cli = timed("unchanged retrain", ["retrain"], parallel_ws, parallel_env)
            created_to_end, start_to_end = scheduled_run(crew.api)
            print(f"unchanged run, `genpipe retrain` (process start to exit):   {unchanged_cli:5.1f} s")
            print(f"unchanged scheduled run, created to completed (server clock): {created_to_end:5.1f} s  (goal <= 10 s)")
            print(f"  of which the flow run itself (started to completed):       {start_to_end:5.1f} s")


def scheduled_run(api: str) -> tuple[float, float]:
    """Start the retrain deployment as its schedule would and wait; the server's timestamps of that
    run: created → completed (worker pick-up, process start, the run) and started → completed."""
    os.environ["PREFECT_API_URL"] = api
    from prefect.deployments import run_deployment

    flow_run = run_deployment("retrain/retrain", timeout=600, poll_interval=0.5, as_subflow=False)
    if not flow_run.state.is_completed():
        sys.exit(f"the retrain deployment's run ended {flow_run.state.name}: {flow_run.state.message}")
    return ((flow_run.end_time - flow_run.created).total_seconds(),
            (flow_run.end_time - flow_run.start_time).total_seconds())


if __name__ == "__main__":
    main()
