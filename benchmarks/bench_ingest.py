"""Benchmark (not a test): ingesting a folder of small PNGs, genpipe beside a plain PIL loop.

    .venv/bin/python benchmarks/bench_ingest.py                    # 100k files, then 400k for memory
    .venv/bin/python benchmarks/bench_ingest.py --count 2000 --big 8000 --keep /tmp/ingest-bench

Generates N 28×28 grey PNGs (10 class folders, seeded noise) in a scratch folder, then, in one run:
- plain PIL loop: one process, sorted files, Image.open → convert("L") → numpy, all kept in a list
  (what a first ingest script does), then stacked;
- genpipe: `genpipe ingest`'s code (image-folder source: the walk, decoding in a process per core,
  duplicate and split checks, shards written as they fill), in a child process.
Each runs in its own child process, so its peak RSS (ru_maxrss) is its own; genpipe's decode
processes are reported apart (the largest one). The two alternate --repeat times and each keeps its
fastest run (a shared machine's noise only ever slows a run down). Then the folder grows to --big
files and both run again: genpipe's peak RSS should stay flat, the plain loop's grows with N.
Prints a markdown table: files/s, speed-up, peak RSS per N.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 10

PLAIN = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    import numpy as np
    from PIL import Image
    files = sorted(p for p in Path(sys.argv[1]).rglob("*.png"))
    start = time.perf_counter()
    images = []
    for path in files:
        with Image.open(path) as img:
            images.append(np.asarray(img.convert("L")))
    data = np.stack(images)
    seconds = time.perf_counter() - start
    print(json.dumps({"files": len(files), "seconds": seconds,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")

GENPIPE = textwrap.dedent("""
    import json, resource, sys, time
    sys.path.insert(0, sys.argv[3])
    from components.config import DataConfig
    from components.data.ingest import ingest
    cfg = DataConfig(name="bench", source="image-folder", path=sys.argv[1], image_size=28, channels=1,
                     resize=False, test_fraction=0.15, limit_per_split=None, max_pixels=50_000_000, max_file_bytes=10**8,
                     shard_size=20000, follow_symlinks=False, archive={"max_members": 1, "max_bytes": 1})
    start = time.perf_counter()
    summary = ingest(cfg, sys.argv[2], log=lambda line: None)
    seconds = time.perf_counter() - start
    print(json.dumps({"files": summary["items_train"] + summary["items_test"] + summary["rejected"],
                      "seconds": seconds, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
""")


def _write(args: tuple[Path, int, int]) -> None:
    folder, start, stop = args
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
        Image.fromarray(pixels, "L").save(folder / f"c{i % CLASSES}" / f"{i:07d}.png")


def generate(folder: Path, start: int, stop: int, processes: int = 2) -> None:
    for k in range(CLASSES):
        (folder / f"c{k}").mkdir(parents=True, exist_ok=True)
    step = max(1, (stop - start) // (processes * 8))
    jobs = [(folder, i, min(i + step, stop)) for i in range(start, stop, step)]
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_write, jobs))


def run(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--big", type=int, default=400_000, help="grow the folder to this many for the memory check")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side per size; the fastest is kept")
    parser.add_argument("--keep", type=Path, help="scratch folder to use and keep (default: a temporary one)")
    args = parser.parse_args()
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    images, packed = scratch / "images", scratch / "packed"
    rows = []
    try:
        have = 0
        for n in (args.count, args.big):
            print(f"generating {n - have} PNGs in {images} ...", file=sys.stderr)
            generate(images, have, n)
            have = n
            plains, ourses = [], []
            for _ in range(args.repeat):
                plains.append(run(PLAIN, str(images)))
                shutil.rmtree(packed, ignore_errors=True)
                ourses.append(run(GENPIPE, str(images), str(packed), str(ROOT)))
                assert plains[-1]["files"] == ourses[-1]["files"] == n, (plains[-1], ourses[-1])
            # The fastest run's time; the largest peak RSS of all runs.
            plain, ours = ({**min(runs, key=lambda r: r["seconds"]),
                            **{key: max(r[key] for r in runs) for key in runs[0] if key.endswith("rss_mb")}}
                           for runs in (plains, ourses))
            print(f"{n}: plain {[round(r['seconds'], 2) for r in plains]} s, genpipe "
                  f"{[round(r['seconds'], 2) for r in ourses]} s", file=sys.stderr)
            rows.append((n, plain, ours))
            print(f"{n}: plain {n / plain['seconds']:.0f} files/s, genpipe {n / ours['seconds']:.0f} files/s",
                  file=sys.stderr)
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print("| files | plain PIL loop, files/s | genpipe, files/s | speed-up | plain peak RSS | "
          "genpipe peak RSS (main / largest decoder) |")
    print("|---|---|---|---|---|---|")
    for n, plain, ours in rows:
        print(f"| {n:,} | {n / plain['seconds']:,.0f} | {n / ours['seconds']:,.0f} | "
              f"{plain['seconds'] / ours['seconds']:.2f}× | {plain['rss_mb']:.0f} MB | "
              f"{ours['rss_mb']:.0f} MB / {ours['worker_rss_mb']:.0f} MB |")
    (n1, _, small), (n2, _, large) = rows[0], rows[-1]
    print(f"\ngenpipe peak RSS from {n1:,} to {n2:,} files: ×{large['rss_mb'] / small['rss_mb']:.2f} (main process)")


if __name__ == "__main__":
    main()
