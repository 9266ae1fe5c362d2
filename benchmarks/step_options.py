"""Experiment (not a test): what each option does to one family's training step on this CPU.

    .venv/bin/python benchmarks/step_options.py                       # DCGAN-28 from params.yaml
    .venv/bin/python benchmarks/step_options.py --variants fp32 bf16 cl bf16+cl compile fused forloop t1

A hand-written loop over a preloaded uint8 tensor (gather, float conversion, the model's own
training_losses walked with zero_grad/backward/step), so the trainer's bookkeeping is not in it.
Each variant is a '+'-joined set of options applied to a fresh model built alike:
  fp32 (nothing) | bf16 (autocast of the step, fp32 master weights) | cl (channels_last weights and
  input) | compile (torch.compile of each submodule) | forloop / foreach / fused (Adam's
  implementation; default: what components.models.base.adam() picks) | inputs (each phase's backward
  computes only its own optimizer's gradients: loss.backward(inputs=...), so G's phase skips D's weight
  gradients) | t<N> (torch threads).
Variants are timed in turn, chunk by chunk, --repeats times, so machine load drifts over all alike;
the median and the spread (min–max) of img/s are printed, and each variant's ratio to the first.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.models import build_model  # noqa: E402
from components.params import load_params  # noqa: E402

NUM_CLASSES = 10
ADAM_IMPL = {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


class Variant:
    def __init__(self, spec: str, cfg, channels: int):
        self.spec = spec
        opts = set(spec.split("+"))
        self.threads = next((int(o[1:]) for o in opts if o[0] == "t" and o[1:].isdigit()), None)
        self.bf16, self.cl, compiled, self.inputs = "bf16" in opts, "cl" in opts, "compile" in opts, "inputs" in opts
        unknown = opts - {"fp32", "bf16", "cl", "compile", "inputs", *ADAM_IMPL} - {f"t{self.threads}"}
        if unknown:
            raise SystemExit(f"--variants {spec}: unknown option(s) {sorted(unknown)}; "
                             f"valid: fp32 bf16 cl compile inputs {' '.join(ADAM_IMPL)} t<N>")
        self.model = build_model(cfg, channels, NUM_CLASSES)
        if self.cl:
            self.model.to(memory_format=torch.channels_last)
        self.optimizers = self.model.optimizers()
        impl = next((ADAM_IMPL[o] for o in opts if o in ADAM_IMPL), None)
        if impl is not None:  # same Adam, another implementation: rebuild each with the same hyperparameters
            self.optimizers = {k: torch.optim.Adam(o.param_groups[0]["params"], lr=o.defaults["lr"],
                                                   betas=o.defaults["betas"], **impl)
                               for k, o in self.optimizers.items()}
        if compiled:
            for name, child in list(self.model.named_children()):
                setattr(self.model, name, torch.compile(child))
        self.params = {k: [p for g in o.param_groups for p in g["params"]] for k, o in self.optimizers.items()}
        self.model.train()
        self.noise = torch.Generator().manual_seed(0)
        self.batch_size, self.image_size = cfg.batch_size, cfg.image_size
        self.times: list[float] = []

    def steps(self, images: torch.Tensor, labels: torch.Tensor, n: int) -> int:
        threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()  # reusable
        try:
            for _ in range(n):
                idx = torch.randint(images.shape[0], (self.batch_size,))
                x = images[idx].float().div_(127.5).sub_(1.0)  # (B, C, H, W) in [-1, 1]
                if self.cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                phases = self.model.training_losses(x, labels[idx], self.noise)
                while True:
                    with autocast:  # the forward passes only, as the trainer does
                        item = next(phases, None)
                    if item is None:
                        break
                    phase, out = item
                    opt = self.optimizers[phase]
                    opt.zero_grad(set_to_none=True)
                    out.loss.backward(inputs=self.params[phase] if self.inputs else None)
                    opt.step()
        finally:
            torch.set_num_threads(threads)
        return n * self.batch_size


def main() -> int:
    params = load_params(ROOT / "params.yaml")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dcgan", help="a train.<name> of params.yaml (default dcgan)")
    ap.add_argument("--variants", nargs="+", default=["fp32", "bf16", "cl", "bf16+cl", "compile", "fused",
                                                      "forloop", "t1"])
    ap.add_argument("--steps", type=int, default=15, help="steps per timed chunk")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--images", type=int, default=4096, help="synthetic uint8 images the batches are drawn from")
    args = ap.parse_args()
    cfg = params.model(args.model)
    channels = params.data.channels
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, channels, cfg.image_size, cfg.image_size), dtype=torch.uint8,
                           generator=g)
    labels = torch.randint(0, NUM_CLASSES, (args.images,), generator=g)

    variants = [Variant(spec, cfg, channels) for spec in args.variants]
    for v in variants:  # warm-up: lazy init, allocator, compilation
        start = time.perf_counter()
        v.steps(images, labels, 3)
        print(f"warm-up {v.spec}: {time.perf_counter() - start:.1f} s", flush=True)
    for r in range(args.repeats):
        for v in variants:
            start = time.perf_counter()
            seen = v.steps(images, labels, args.steps)
            v.times.append(seen / (time.perf_counter() - start))
        print(f"repeat {r + 1}: " + "  ".join(f"{v.spec} {v.times[-1]:.0f}" for v in variants), flush=True)

    ref = statistics.median(variants[0].times)
    print(f"\n{args.model}: {cfg.family} {cfg.image_size}px batch {cfg.batch_size}; torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, capability {torch.backends.cpu.get_cpu_capability()}; "
          f"median of {args.repeats} × {args.steps} steps")
    print(f"| variant | img/s (median) | min–max | vs {variants[0].spec} |\n|---|---:|---:|---:|")
    for v in variants:
        med = statistics.median(v.times)
        print(f"| {v.spec} | {med:.0f} | {min(v.times):.0f}–{max(v.times):.0f} | {med / ref:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
