"""Benchmark (not a test): a registered model behind MLflow's scoring server under load, beside
calling its `predict` in-process for the same requests.

    .venv/bin/python benchmarks/bench_serving.py                           # untrained dcgan from params.yaml
    .venv/bin/python benchmarks/bench_serving.py --family cgan --requests 200 --concurrency 1 4
    MLFLOW_TRACKING_URI=sqlite:///.genpipe/mlflow/mlflow.db \\
        .venv/bin/python benchmarks/bench_serving.py --model fashion-mnist-dcgan@champion
    .venv/bin/python benchmarks/bench_serving.py --server-threads 1 --out serving.md

By default an untrained model of --family (its params.yaml train.<name> config; speed does not
depend on training) is registered as the pipeline registers one, into a temporary SQLite store;
--model NAME@ALIAS benches a registered model of the store MLFLOW_TRACKING_URI names instead
(unset: genpipe's embedded store under GENPIPE_HOME, default ./.genpipe, as after `make run`).
`mlflow models serve` starts on loopback (tests/servers.py), and these runs follow, each of
--requests requests `{"inputs": {"count": --images, "seed": i}}`:
- in-process: mlflow.pyfunc.load_model(same URI).predict(request), one after another;
- served uint8: POSTed at each --concurrency, one thread and one keep-alive httpx.Client per slot;
- served png: the same with "format": "png", at concurrency 4;
- faults: at concurrency 4, every 10th request asks for MAX_COUNT + 1 images and every 10th + 5th
  sends 100 000 labels (a label-taking family) or asks for 10**9 images: each must be refused with
  400 naming the field, and the normal requests beside them are timed apart.
Timed: each request's round trip (send, server work, whole body read); a run's wall time from the
moment every client has connected to its last response. Not timed: one warm-up request per
format; decoding and checking the responses (after the run, so it takes no CPU from the server).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from bench_trainer import cpu_model, family_config  # noqa: E402
from components.models import FAMILIES  # noqa: E402
from components.tracking.requests import MAX_COUNT  # noqa: E402
from servers import log_tail, scoring_server  # noqa: E402

LOADED_CONCURRENCY = 4  # the png and faults runs, and the goal's concurrency
GOAL_RATIO = 3.0  # the goal: p99 <= 3x p50 at LOADED_CONCURRENCY, with zero errors
HUGE_LABELS = 100_000
TIMEOUT_S = 120.0
JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass
class Outcome:
    latency_ms: float
    status: int | None  # None: no response (connection refused, timeout)
    body: bytes


@dataclass
class Row:
    mode: str
    concurrency: int
    outcomes: list[Outcome]
    errors: int
    images: int  # images answered in this row
    wall_s: float  # the whole run's wall time (the faults run's two rows share one)
    over_http: bool = True

    @property
    def latencies(self) -> np.ndarray:
        return np.array([o.latency_ms for o in self.outcomes])

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q))

    def cells(self) -> list[str]:
        n, p50, p99 = len(self.outcomes), self.percentile(50), self.percentile(99)
        kb = f"{np.mean([len(o.body) for o in self.outcomes]) / 1024:.1f}" if self.over_http else "–"
        images = f"{self.images / self.wall_s:.0f}" if self.images else "–"
        return [self.mode, str(self.concurrency), str(n), str(self.errors), f"{n / self.wall_s:.1f}", images,
                f"{p50:.1f}", f"{p99:.1f}", f"{p99 / p50:.2f}", kb]


HEADER = ["mode", "concurrency", "requests", "errors", "req/s", "images/s", "p50 ms", "p99 ms", "p99/p50",
          "KB/response"]


# --- the model under test --------------------------------------------------------------------------

def register_untrained(family: str, home: Path) -> tuple[str, str]:
    """Register an untrained model of `family` (params.yaml's config) in a SQLite store under
    `home` as the pipeline does; returns (model URI, tracking URI)."""
    from components.data.sources import FASHION_MNIST_CLASSES
    from components.evaluation.grid import sample_uint8, save_grid
    from components.models import build_model
    from components.params import load_params
    from components.tracking.model_files import save_trained_model
    from components.tracking.registry import register_model
    from components.training.checkpoint import write_json

    tracking_uri = f"sqlite:///{home / 'mlflow.db'}"
    os.environ.update(GENPIPE_HOME=str(home), MLFLOW_TRACKING_URI=tracking_uri)  # artefacts under home too
    params = load_params(ROOT / "params.yaml")
    cfg, source = family_config(params, family)
    classes = list(FASHION_MNIST_CLASSES)
    model = build_model(cfg, params.data.channels, len(classes), classes)
    model_dir, eval_dir = home / "model", home / "eval"
    save_trained_model(model, {"family": family, "config": cfg.model_dump(mode="json"),
                               "channels": params.data.channels, "num_classes": len(classes), "classes": classes,
                               "dataset": "bench", "dataset_version": "untrained", "steps": 0}, model_dir)
    write_json({params.registry.metric_for("generate"): 1000.0}, eval_dir / "metrics.json")
    write_json({"evaluator": "none", "num_samples": 0, "seed": 0}, eval_dir / "protocol.json")
    save_grid(sample_uint8(model, 4, 0), eval_dir / "grid.png")
    lineage = {"dataset_version": "untrained", "evaluator_md5": "none", "model_md5": f"untrained-{family}",
               "params_hash": source, "git_commit": "bench", "training_run_id": ""}

    def no_rescore(version: str, protocol: dict) -> float:
        raise RuntimeError("a fresh store has no champion to re-score")

    name = f"bench-{family}"
    registration = register_model(name, model_dir, eval_dir, lineage, params.registry, no_rescore)
    print(f"registered untrained {family} ({source}) as {name} v{registration.version}", file=sys.stderr)
    return f"models:/{name}/{registration.version}", tracking_uri


def check_generates(what: str, kind: str, option: str) -> None:
    if kind != "generate":
        raise SystemExit(f"{option} {what}: a {kind} model; this benchmark sends generate requests (count, seed), "
                         f"pick a generating one")


def check_model_uri(spec: str) -> str:
    name, sep, alias = spec.partition("@")
    if not (name and sep and alias):
        raise SystemExit(f"--model {spec}: expected NAME@ALIAS, e.g. fashion-mnist-dcgan@champion")
    return f"models:/{spec}"


# --- requests ---------------------------------------------------------------------------------------

def normal_request(i: int, images: int, fmt: str = "uint8") -> dict:
    return {"count": images, "seed": i, **({"format": fmt} if fmt != "uint8" else {})}


def oversized_request(i: int, images: int, conditions: tuple[str, ...]) -> tuple[dict, str] | None:
    """(request, the field its 400 must name) for the faults run's i-th request, None for a normal one."""
    if i % 10 == 0:
        return {"count": MAX_COUNT + 1, "seed": i}, "count"
    if i % 10 == 5:
        if "labels" in conditions:
            return {"count": images, "seed": i, "labels": [0] * HUGE_LABELS}, "labels"
        return {"count": 10**9, "seed": i}, "count"
    return None


def body(request: dict) -> bytes:
    return json.dumps({"inputs": request}).encode()


def check_images(outcome: Outcome, fmt: str, count: int, shape: tuple[int, int, int]) -> str | None:
    """What is wrong with a normal request's response, or None."""
    if outcome.status != 200:
        return f"HTTP {outcome.status}: {outcome.body[:300]!r}"
    predictions = json.loads(outcome.body)["predictions"]
    if fmt == "png":
        from PIL import Image

        sizes = {Image.open(io.BytesIO(base64.b64decode(p))).size for p in predictions}
        if len(predictions) != count or sizes != {shape[1:][::-1]}:
            return f"png: expected {count} images of {shape[2]}×{shape[1]}, got {len(predictions)} of sizes {sizes}"
        return None
    array = np.asarray(predictions)
    if array.shape != (count, *shape) or array.min() < 0 or array.max() > 255:
        return f"uint8: expected {count}×{'×'.join(map(str, shape))} pixels 0..255, got shape {array.shape}"
    return None


def check_refusal(outcome: Outcome, field: str) -> str | None:
    if outcome.status != 400:
        return f"oversized ({field}): expected HTTP 400, got {outcome.status}: {outcome.body[:300]!r}"
    message = json.loads(outcome.body).get("message", "")
    # MLflow's scoring server prefixes the model's message: "Failed to predict data '…'. \nError: <message>"
    if not message.rpartition("\nError: ")[2].startswith(f"{field}:"):
        return f"oversized ({field}): the 400 does not name the field: {message[:300]!r}"
    return None


# --- load -------------------------------------------------------------------------------------------

def answers_ping(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ping", timeout=5, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def send_all(url: str, bodies: list[bytes], concurrency: int) -> tuple[list[Outcome], float]:
    """POST every body, `concurrency` at a time; (outcomes in order, wall seconds)."""
    outcomes: list[Outcome | None] = [None] * len(bodies)
    spans: list[tuple[float, float]] = []
    connected = threading.Barrier(concurrency)

    def slot(k: int) -> None:
        with httpx.Client(base_url=url, timeout=TIMEOUT_S, trust_env=False) as client:
            client.get("/ping")  # open the keep-alive connection before the clock starts
            connected.wait()
            began = time.perf_counter()
            for i in range(k, len(bodies), concurrency):
                start = time.perf_counter()
                try:
                    response = client.post("/invocations", content=bodies[i], headers=JSON_HEADERS)
                    status, content = response.status_code, response.content
                except httpx.HTTPError as exc:
                    status, content = None, repr(exc).encode()
                outcomes[i] = Outcome((time.perf_counter() - start) * 1000, status, content)
            spans.append((began, time.perf_counter()))

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(slot, range(concurrency)))
    return outcomes, max(end for _, end in spans) - min(start for start, _ in spans)


def in_process(model, requests: list[dict], shape: tuple[int, int, int]) -> tuple[Row, list[str]]:
    outcomes, problems = [], []
    began = time.perf_counter()
    for request in requests:
        start = time.perf_counter()
        images = model.predict(request)
        outcomes.append(Outcome((time.perf_counter() - start) * 1000, 200, b""))
        if images.shape != (request["count"], *shape):
            problems.append(f"in-process: expected {request['count']}×{shape}, got {images.shape}")
    wall = time.perf_counter() - began
    images = sum(r["count"] for r in requests)
    return Row("in-process predict", 1, outcomes, len(problems), images, wall, over_http=False), problems


def served(url: str, mode: str, requests: list[dict], fmt: str, concurrency: int,
           shape: tuple[int, int, int]) -> tuple[Row, list[str]]:
    outcomes, wall = send_all(url, [body(r) for r in requests], concurrency)
    problems = [p for o, r in zip(outcomes, requests) if (p := check_images(o, fmt, r["count"], shape))]
    return Row(mode, concurrency, outcomes, len(problems), sum(r["count"] for r in requests), wall), problems


def faults(url: str, n: int, images: int, conditions: tuple[str, ...],
           shape: tuple[int, int, int]) -> tuple[Row, Row, list[str]]:
    """The faults run: normal requests mixed with oversized ones; (normal row, oversized row, problems)."""
    plan = [oversized_request(i, images, conditions) for i in range(n)]
    requests = [p[0] if p else normal_request(i, images) for i, p in enumerate(plan)]
    outcomes, wall = send_all(url, [body(r) for r in requests], LOADED_CONCURRENCY)
    normal = [(o, r) for o, r, p in zip(outcomes, requests, plan) if p is None]
    refused = [(o, p[1]) for o, p in zip(outcomes, plan) if p is not None]
    problems = [p for o, r in normal if (p := check_images(o, "uint8", r["count"], shape))]
    problems_refused = [p for o, field in refused if (p := check_refusal(o, field))]
    normal_row = Row("faults: normal", LOADED_CONCURRENCY, [o for o, _ in normal], len(problems),
                     sum(r["count"] for _, r in normal), wall)
    refused_row = Row("faults: oversized", LOADED_CONCURRENCY, [o for o, _ in refused], len(problems_refused), 0,
                      wall)
    return normal_row, refused_row, problems + problems_refused


# --- report -----------------------------------------------------------------------------------------

def table(rows: list[Row]) -> list[str]:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    return lines + ["| " + " | ".join(row.cells()) + " |" for row in rows]


def findings(rows: list[Row], server_threads: str) -> list[str]:
    by_mode = {(r.mode, r.concurrency): r for r in rows}
    base, one = by_mode[("in-process predict", 1)], by_mode.get(("served uint8", 1))
    lines = []
    if one is not None:
        overhead = one.percentile(50) - base.percentile(50)
        lines.append(f"Serving overhead at concurrency 1 (p50): served {one.percentile(50):.1f} ms − in-process "
                     f"{base.percentile(50):.1f} ms = {overhead:.1f} ms "
                     f"({one.percentile(50) / base.percentile(50):.1f}× in-process).")
    loaded = by_mode.get(("served uint8", LOADED_CONCURRENCY))
    if loaded is None:
        lines.append(f"Goal not checked: no served uint8 run at concurrency {LOADED_CONCURRENCY} "
                     f"(add it to --concurrency).")
    else:
        ratio = loaded.percentile(99) / loaded.percentile(50)
        held = loaded.errors == 0 and ratio <= GOAL_RATIO
        verdict = "met" if held else "NOT met"
        detail = f"{loaded.errors} errors, p99/p50 = {ratio:.2f}"
        if ratio > GOAL_RATIO:
            detail += f", {ratio / GOAL_RATIO:.2f}× the bound"
        lines.append(f"Goal (zero errors, p99 ≤ {GOAL_RATIO:g}× p50 at concurrency {LOADED_CONCURRENCY}): "
                     f"{verdict} ({detail}).")
    normal = by_mode[("faults: normal", LOADED_CONCURRENCY)]
    refused = by_mode[("faults: oversized", LOADED_CONCURRENCY)]
    answered_400 = len(refused.outcomes) - refused.errors  # 400, and the message names the field
    clean = (f" vs {loaded.percentile(50):.1f} / {loaded.percentile(99):.1f} ms in the clean run"
             if loaded is not None else "")
    lines.append(f"Oversized requests: {answered_400}/{len(refused.outcomes)} refused with 400 naming the field, "
                 f"p50 {refused.percentile(50):.1f} ms, p99 {refused.percentile(99):.1f} ms; the normal requests "
                 f"beside them p50 / p99 {normal.percentile(50):.1f} / {normal.percentile(99):.1f} ms{clean}.")
    lines.append(machine_line(server_threads))
    return lines


def machine_line(server_threads: str) -> str:
    import mlflow
    import torch

    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch threads: in-process {torch.get_num_threads()}, "
            f"server {server_threads}; torch {torch.__version__}, mlflow {mlflow.__version__}; {date}.")


def run_all(model_uri: str, tracking_uri: str, args, server_env: dict, workdir: Path):
    """Every run, in-process then served; (rows, problems, the model's request schema)."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from components.state import redact_uri

    mlflow.set_tracking_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as exc:
        raise SystemExit(f"{model_uri}: cannot load it from {redact_uri(tracking_uri)} (MLFLOW_TRACKING_URI): "
                         f"{exc.message}") from None
    schema = model.unwrap_python_model().schema
    check_generates(args.model or args.family, schema.kind, "--model")
    shape = (schema.channels, schema.image_size, schema.image_size)
    requests = [normal_request(i, args.images) for i in range(args.requests)]
    model.predict(requests[0])  # warm-up
    row, problems = in_process(model, requests, shape)
    rows = [row]
    with scoring_server(workdir, model_uri, tracking_uri, env=server_env) as url:
        for fmt in ("uint8", "png"):  # warm-up: lazy imports, first allocations
            outcomes, _ = send_all(url, [body(normal_request(0, args.images, fmt))], 1)
            problems += filter(None, [check_images(outcomes[0], fmt, args.images, shape)])
        png = [normal_request(i, args.images, "png") for i in range(args.requests)]
        runs = [("served uint8", requests, "uint8", c) for c in args.concurrency]
        for mode, batch, fmt, concurrency in [*runs, ("served png", png, "png", LOADED_CONCURRENCY)]:
            row, found = served(url, mode, batch, fmt, concurrency, shape)
            rows.append(row)
            problems += found
        normal_row, refused_row, found = faults(url, args.requests, args.images, schema.conditions, shape)
        problems += found
        if problems and not answers_ping(url):
            problems.append("the scoring server no longer answers /ping: it stopped during the runs (its log below)")
    if problems:
        print(f"the scoring server's log:\n{log_tail(workdir / 'scoring-server.log')}", file=sys.stderr)
    return [*rows, normal_row, refused_row], problems, schema


# --- main -------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="dcgan",
                        help="family of the untrained model to register (its params.yaml config)")
    parser.add_argument("--model", help="NAME@ALIAS: bench this registered model of MLFLOW_TRACKING_URI's store")
    parser.add_argument("--requests", type=int, default=500, help="requests per run")
    parser.add_argument("--images", type=int, default=16, help="images per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="served uint8 runs")
    parser.add_argument("--server-threads", type=int,
                        help="torch threads of the server (OMP_NUM_THREADS) and of the in-process baseline; "
                             "default: torch's own (one per core)")
    parser.add_argument("--out", type=Path, help="also write the table and findings here (Markdown)")
    args = parser.parse_args()
    if args.requests < 1 or not 1 <= args.images <= MAX_COUNT or min(args.concurrency) < 1:
        raise SystemExit(f"--requests and --concurrency must be >= 1 and --images in 1..{MAX_COUNT}")
    if not args.model:
        if problem := FAMILIES.problem("--family", args.family):
            raise SystemExit(problem)
        check_generates(args.family, FAMILIES.get(args.family).kind, "--family")

    import torch

    server_env, server_threads = {}, "default"
    if args.server_threads is not None:
        torch.set_num_threads(args.server_threads)
        server_env = {"OMP_NUM_THREADS": str(args.server_threads), "MKL_NUM_THREADS": str(args.server_threads)}
        server_threads = str(args.server_threads)
    with tempfile.TemporaryDirectory(prefix="genpipe-bench-serving-") as tmp:
        if args.model:
            from components.state import mlflow_tracking_uri

            model_uri, tracking_uri = check_model_uri(args.model), mlflow_tracking_uri()
        else:
            (Path(tmp) / "home").mkdir()
            model_uri, tracking_uri = register_untrained(args.family, Path(tmp) / "home")
        rows, problems, schema = run_all(model_uri, tracking_uri, args, server_env, Path(tmp) / "server")

    report = [f"Model: {model_uri} ({schema.family}{'' if args.model else ', untrained'}), {args.images} images "
              f"{schema.image_shape} per request, {args.requests} requests per run.", "",
              *table(rows), "", *findings(rows, server_threads)]
    print("\n".join(report))
    if args.out:
        args.out.write_text("\n".join(report) + "\n")
    if problems:
        print(f"{len(problems)} unexpected response(s); the first:\n  " + "\n  ".join(problems[:5]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
