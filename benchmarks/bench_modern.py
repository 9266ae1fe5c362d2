"""Training steps/s and sampling img/s of the modern generators under a params profile, in ≤ 5 minutes on one GPU.

    python benchmarks/bench_modern.py                                    # CUDA, profiles/gpu.yaml's settings
    python benchmarks/bench_modern.py --models igpt --steps 50 --markdown-out modern.md
    python benchmarks/bench_modern.py --device cpu --dry-run             # tiny widths: exercises every path

For each model (an entry of params.yaml's train or latent section after merging --profile): the Trainer on
synthetic uint8 images preloaded on the device, with the entry's precision/channels_last/compile;
an untimed warm-up run (compilation, allocator, cuDNN's search), then --steps timed steps with the
device synchronised before and after. Then `sample_uint8` of --sample-count images (iGPT: the
KV-cache sampler, one token per step; ldm: DDIM at its sample_steps with guidance, over an untrained
autoencoder, which costs what a trained one does), timed the same way. Bare-loop comparisons live in
benchmarks/bench_trainer.py (the CPU); this script answers what a GPU worker gets from the profile.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from baselines import sync, untrained_parts  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)
from components.config import apply_overrides, apply_profile, read_params_raw  # noqa: E402
from components.evaluation.grid import sample_uint8  # noqa: E402
from components.models import build_model  # noqa: E402
from components.params import parse_params  # noqa: E402
from components.training.trainer import Trainer  # noqa: E402

DRY_RUN = {"igpt": ["dim=8", "depth=1", "heads=2", "batch_size=4"],  # per family: tiny overrides
           "ldm": ["width=16", "batch_size=4", "sample_steps=2"]}


def fail(message: str) -> None:
    print(f"bench_modern.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", type=Path, default=ROOT / "profiles" / "gpu.yaml")
    ap.add_argument("--models", nargs="+", default=["igpt", "ldm"], help="entries of the merged train or latent section")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --dry-run)")
    ap.add_argument("--steps", type=int, help="timed training steps per model (default 30; dry run 2)")
    ap.add_argument("--warm", type=int, default=5, help="untimed warm-up steps (default 5)")
    ap.add_argument("--sample-count", type=int, help="images sampled and timed (default 256; dry run 2)")
    ap.add_argument("--dry-run", action="store_true", help="tiny widths, steps and samples")
    ap.add_argument("--markdown-out", type=Path, help="also write the table here")
    args = ap.parse_args(argv)
    args.steps = args.steps or (2 if args.dry_run else 30)
    args.sample_count = args.sample_count or (2 if args.dry_run else 256)
    return args


def load_params(args):
    """params.yaml with --profile merged (and, for a dry run, each model's family made tiny)."""
    raw = read_params_raw(ROOT / "params.yaml")
    apply_profile(raw, args.profile)
    params = parse_params(raw)
    unknown = [m for m in args.models if m not in params.models]
    if unknown:
        fail(f"--models {unknown}: not in the train or latent section of params.yaml + {args.profile.name}; "
             f"known: {', '.join(params.models)}")
    if args.dry_run:
        apply_overrides(raw, [f"{params.section_of(m)}.{m}.{o}" for m in args.models
                              for o in DRY_RUN.get(params.models[m].family, [])])
        params = parse_params(raw)
    return params


def timed(device: torch.device, fn) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def bench(name: str, params, device: torch.device, args) -> dict:
    cfg = params.models[name]

    def build(c):  # an ldm on its untrained autoencoder of the profile
        return build_model(c, 1, 10, parts=untrained_parts(c, params.models.__getitem__, 1, 10)).to(device)

    images = torch.randint(0, 256, ((args.steps + args.warm) * cfg.batch_size, 1, cfg.image_size, cfg.image_size),
                           dtype=torch.uint8, device=device)
    labels = torch.zeros(images.shape[0], dtype=torch.long, device=device)

    def train(steps: int):
        short = cfg.model_copy(update={"epochs": steps * cfg.batch_size / images.shape[0]})
        model = build(short)
        return model, lambda: Trainer(model, short, progress=False, device=device).fit(images, labels)

    timed(device, train(args.warm)[1])  # compile, allocator, cuDNN
    model, fit = train(args.steps)
    seconds = timed(device, fit)
    model.eval()
    sample_s = timed(device, lambda: sample_uint8(model, args.sample_count, seed=0))
    return {"model": name, "family": cfg.family, "batch": cfg.batch_size, "options": cfg.precision
            + ("+compile" if cfg.compile else ""), "steps_per_s": args.steps / seconds,
            "img_per_s": args.steps * cfg.batch_size / seconds, "samples_per_s": args.sample_count / sample_s}


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("CUDA is not available; run this on a GPU machine, or `--device cpu --dry-run` to exercise it")
    if device.type != "cuda" and not args.dry_run:
        fail(f"--device {args.device}: timings are for a GPU; add --dry-run to exercise the script here")
    params = load_params(args)
    rows = [bench(name, params, device, args) for name in args.models]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    lines = [f"{name}; torch {torch.__version__}; profile {args.profile.name}; {args.steps} timed steps", "",
             "| model | family | batch | options | train steps/s | train img/s | sample img/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['family']} | {r['batch']} | {r['options']} | {r['steps_per_s']:.2f} | "
              f"{r['img_per_s']:.0f} | {r['samples_per_s']:.1f} |" for r in rows]
    print("\n".join(lines))
    if args.markdown_out is not None:
        args.markdown_out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
