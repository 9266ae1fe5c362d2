"""GPU benchmark (not a test): DCGAN-64 training img/s and model-FLOPs utilisation, in ≤ 5 minutes on one GPU.

    python benchmarks/bench_gpu.py                            # CUDA: batch 256/512/1024, bf16, eager and compiled
    python benchmarks/bench_gpu.py --peak-tflops 989 --markdown-out gpu-bench.md
    python benchmarks/bench_gpu.py --device cpu --dry-run     # tiny sizes on the CPU: every path but CUDA timing

Model: the dcgan family at 64×64×3 with the DCGAN paper's widths (latent 100, ngf = ndf = 64: G 512→256→
128→64 channels, D 64→128→256→512), synthetic uint8 images. Loops, each timed over --steps batches:
- trainer:   Trainer(model, cfg with the variant's precision/channels_last/compile).fit(images, labels) with
             the images preloaded on the GPU as uint8 (the trainer's own data path).
- preloaded: a hand-written loop over the same GPU tensor, bf16 autocast, the model's training_losses
             walked with zero_grad/backward/step, nothing else.
- bare:      the pytorch/examples dcgan loop: DataLoader over per-sample PIL → ToTensor → Normalize
             (--bare-workers workers, pin_memory), batches copied to the GPU, fp32 as the examples run it
             (cuDNN's default TF32 convolutions), loss.item() every batch.
Timed with the device synchronised before and after; compilation and cuDNN's algorithm search happen
in an untimed warm-up run of each loop.

FLOPs: counted, not assumed: torch.utils.flop_counter.FlopCounterMode over one training step of the
model (D on real and on fake, forward and backward; G forward, and backward through D), divided by the
batch; matrix products and convolutions only (elementwise work, batch norm and Adam are not counted).
MFU = img/s × FLOP per image / the GPU's dense bf16 peak (PEAK_TFLOPS by device name, or --peak-tflops).
The issue's estimate is ≈ 2.5 GFLOP per image (D forward+backward three times, G once).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch._dynamo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fail(message: str) -> None:
    print(f"bench_gpu.py: {message}", file=sys.stderr)
    raise SystemExit(2)


try:  # the project's code and what it needs (pydantic, torchvision, PIL): one clear line, not a traceback
    import numpy as np

    from baselines import preloaded_step, run_bare, run_preloaded, sync
    from components.models import FAMILIES, build_model
    from components.training.trainer import Trainer
except ImportError as exc:
    fail(f"the project's code does not import here ({exc}); install its dependencies (make setup) "
         f"or carry the missing packages as wheels")

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name(),
# from the vendors' datasheets; the first match wins, so longer names come first.
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H200": 989.0,
    "H100": 989.0,  # SXM
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}

DCGAN64 = {"latent_dim": 100, "ngf": 64, "ndf": 64}       # the paper's / pytorch/examples' widths
TINY = {"latent_dim": 16, "ngf": 8, "ndf": 8}             # --dry-run
SHARED = {"family": "dcgan", "image_size": 64, "epochs": 1, "lr": 2e-4, "beta1": 0.5, "seed": 0,
          "ema_decay": 0.0, "spectral_norm": False}
VARIANTS = {  # trainer options by name: (precision, channels_last, compile)
    "bf16": ("bf16", False, False),
    "bf16+channels_last": ("bf16", True, False),
    "bf16+channels_last+compile": ("bf16", True, True),
    "bf16+compile": ("bf16", False, True),
    "fp32": ("fp32", False, False),
}
CHANNELS = 3
WARM_STEPS = 3  # batches of the untimed warm-up run


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --dry-run)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", help="default 256 512 1024 (dry run: 4 8)")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                    default=["bf16", "bf16+channels_last", "bf16+channels_last+compile"],
                    help="trainer variants; eager ones run first, compiled ones after")
    ap.add_argument("--steps", type=int, help="timed batches per run (default 40; dry run 2)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per loop; the median is reported")
    ap.add_argument("--bare-workers", type=int, default=8, help="DataLoader workers of the bare loop (default 8)")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare DataLoader loop")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak; default: PEAK_TFLOPS by name")
    ap.add_argument("--budget-s", type=float, default=270.0,
                    help="runs not started by then are skipped and listed (default 270 s: the script's 5 minutes)")
    ap.add_argument("--no-cudnn-benchmark", action="store_true",
                    help="leave torch.backends.cudnn.benchmark off (default: on, for every loop)")
    ap.add_argument("--dry-run", action="store_true", help="tiny model, batches and steps: exercises the script")
    ap.add_argument("--markdown-out", type=Path, help="also write the table here")
    args = ap.parse_args(argv)
    args.batch_sizes = args.batch_sizes or ([4, 8] if args.dry_run else [256, 512, 1024])
    args.steps = args.steps or (2 if args.dry_run else 40)
    if min(args.batch_sizes) < 2 or args.steps < 1 or args.repeats < 1:
        fail("--batch-sizes must be >= 2 (batch norm), --steps and --repeats >= 1")
    return args


def check_device(name: str, dry_run: bool) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
             f"run this on a GPU machine, or `--device cpu --dry-run` to exercise the script on a CPU")
    if device.type != "cuda" and not dry_run:
        fail(f"--device {name}: timings are for a GPU; add --dry-run to exercise the script on {name}")
    return device


def peak_tflops(device: torch.device, given: float | None) -> tuple[float | None, str]:
    if given is not None:
        return given, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak for a CPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value, f"PEAK_TFLOPS[{key!r}]"
    return None, f"{name!r} is not in PEAK_TFLOPS; pass --peak-tflops"


# --- the loops -------------------------------------------------------------------------------------

def flops_per_image(cfg, build, batch: int = 8) -> float:
    """Matmul/conv FLOPs of one training step per image, counted on a CPU copy of the model in fp32."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build(cfg).train()
    optimizers = model.optimizers()
    x = torch.rand(batch, CHANNELS, cfg.image_size, cfg.image_size) * 2 - 1
    y = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        preloaded_step(model, optimizers, x, y, torch.Generator().manual_seed(0))
    return counter.get_total_flops() / batch


def run_trainer(cfg, build, images, labels, device, log_every: int):
    model = build(cfg)
    sync(device)
    start = time.perf_counter()
    Trainer(model, cfg, log_every=log_every, device=device, progress=False).fit(images, labels)
    sync(device)
    return images.shape[0] // cfg.batch_size * cfg.batch_size / (time.perf_counter() - start)


# --- main --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    device = check_device(args.device, args.dry_run)
    began = time.perf_counter()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    # One static graph per batch size, as a training run at one batch size compiles it, and room for
    # them all (D alone compiles per batch size for real, detached-fake and fake inputs).
    dynamo = torch._dynamo.config
    dynamo.automatic_dynamic_shapes = False
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # older torch
    setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
    widths = TINY if args.dry_run else DCGAN64
    config_class = FAMILIES.get("dcgan").config

    def config(batch: int, variant: str = "fp32"):
        precision, channels_last, compiled = VARIANTS[variant]
        return config_class.model_validate({**SHARED, **widths, "batch_size": batch, "precision": precision,
                                            "channels_last": channels_last, "compile": compiled})

    def build(cfg):
        return build_model(cfg, CHANNELS, 10)

    gflop = flops_per_image(config(8), build) / 1e9
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"{device_name}; torch {torch.__version__}; DCGAN-64 {'(tiny, dry run) ' if args.dry_run else ''}"
          f"{widths}; {gflop:.3f} GFLOP per training image (counted); peak "
          f"{f'{peak:g} TFLOP/s bf16 ({peak_source})' if peak else f'unknown: {peak_source}'}", flush=True)

    most = max(args.batch_sizes) * args.steps
    rng = np.random.default_rng(0)
    images_np = rng.integers(0, 256, (most, CHANNELS, 64, 64), dtype=np.uint8)
    labels_np = rng.integers(0, 10, most).astype(np.int64)
    images_dev = torch.from_numpy(images_np).to(device)  # preloaded on the training device, uint8
    labels_dev = torch.from_numpy(labels_np).to(device)

    def bare(cfg):
        return lambda n: run_bare(cfg, build, images_np[:n], labels_np[:n], device, args.bare_workers)

    def preloaded(cfg):
        return lambda n: run_preloaded(cfg, build, images_dev[:n], labels_dev[:n], device, bf16=True)

    def trainer(cfg):
        return lambda n: run_trainer(cfg, build, images_dev[:n], labels_dev[:n], device, log_every=args.steps)

    # (loop, precision/options, batch, run(number of images) -> img/s): eager first, compiled last (slow to warm up)
    runs = []
    for batch in args.batch_sizes:
        if not args.no_bare:
            runs.append(("bare (pytorch/examples)", f"fp32, {args.bare_workers} workers", batch, bare(config(batch))))
        runs.append(("preloaded (hand-written)", "bf16", batch, preloaded(config(batch))))
        runs += [("trainer", v, batch, trainer(config(batch, v))) for v in args.variants if not VARIANTS[v][2]]
    runs += [("trainer", v, batch, trainer(config(batch, v)))
             for v in args.variants if VARIANTS[v][2] for batch in args.batch_sizes]

    rows, skipped, failed = [], [], []
    for label, options, batch, run in runs:
        if time.perf_counter() - began > args.budget_s:
            skipped.append(f"{label} {options} batch {batch}")
            continue
        started = time.perf_counter()
        try:
            run(WARM_STEPS * batch)  # untimed: compilation, cuDNN's algorithm search, lazy init
            warm_s = time.perf_counter() - started
            rate = statistics.median(run(args.steps * batch) for _ in range(args.repeats))
        except Exception as exc:  # one broken loop (a compile error, out of memory) must not cost the others
            traceback.print_exc()
            first_line = (str(exc).splitlines() or [""])[0][:200]
            failed.append(f"{label} {options} batch {batch}: {type(exc).__name__}: {first_line}")
            continue
        tflops = rate * gflop / 1e3
        mfu = f"{100 * tflops / peak:.1f} %" if peak else "n/a"
        rows.append((label, options, batch, rate, 1e3 * batch / rate, tflops, mfu, warm_s))
        print(f"  {label:<25} {options:<27} batch {batch:>5}: {rate:>9.0f} img/s {tflops:8.2f} TFLOP/s "
              f"MFU {mfu:>7}  (warm-up {warm_s:.1f} s)", flush=True)

    lines = [
        f"{device_name}, torch {torch.__version__}, cudnn.benchmark "
        f"{torch.backends.cudnn.benchmark if device.type == 'cuda' else 'n/a'}. DCGAN-64 "
        f"({', '.join(f'{k} {v}' for k, v in widths.items())}), 3×64×64 synthetic images; "
        f"{gflop:.3f} GFLOP per training image counted with FlopCounterMode (matmul/conv, D fwd+bwd on real "
        f"and fake, G fwd+bwd through D); MFU against "
        f"{f'{peak:g} TFLOP/s dense bf16 ({peak_source})' if peak else f'no peak ({peak_source})'}; "
        f"{args.steps} timed batches per run, median of {args.repeats}.",
        "",
        "| loop | precision, options | batch | img/s | ms/step | TFLOP/s | MFU | warm-up s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {label} | {options} | {batch} | {rate:.0f} | {ms:.2f} | {tflops:.1f} | {mfu} | {warm:.1f} |"
              for label, options, batch, rate, ms, tflops, mfu, warm in rows]
    if skipped:
        lines += ["", f"Skipped past the {args.budget_s:g} s budget: {'; '.join(skipped)}."]
    if failed:
        lines += ["", "Failed (traceback above): " + "; ".join(failed) + "."]
    table = "\n".join(lines)
    print("\n" + table + f"\n\ntotal {time.perf_counter() - began:.0f} s")
    if args.markdown_out:
        args.markdown_out.write_text(table + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
