"""Benchmark (not a test): our Trainer's img/s per model family beside two loops a user would write.

    .venv/bin/python benchmarks/bench_trainer.py                          # every registered family
    .venv/bin/python benchmarks/bench_trainer.py --threads 1 --options params bf16   # on a busy machine
    .venv/bin/python benchmarks/bench_trainer.py --family dcgan --options params fp32 bf16 bf16+channels_last
    .venv/bin/python benchmarks/bench_trainer.py --markdown-out benchmarks/results.md

Three loops on the same model config, images and number of images, in one process:
- trainer:   Trainer(model, cfg with epochs=1 and --options, log_every from params.yaml tracking)
             .fit(uint8 images, labels), preloaded in memory.
- bare:      the loop pytorch/examples writes (baselines.py): per-sample PIL → ToTensor → Normalize in a
             DataLoader with 2 workers, plain fp32, loss.item() every batch.
- preloaded: a hand-written loop over the preloaded uint8 tensor (baselines.py): gather, float
             conversion, the model's training_losses walked with zero_grad/backward/step; plain fp32.
Timed, for each: optimizer creation and one epoch over the same N images (drop_last: N // batch * batch),
N sized per family so that the fastest loop's epoch takes about --seconds (at most --images). The
bare loop's time includes creating the DataLoader and starting its workers, as a user pays them.
Not timed: model construction, data loading from disk, one untimed warm-up run of each loop per
family (lazy init, allocator, the first fork, torch.compile's first compilation). Each run builds a
fresh model seeded alike. Runs are interleaved (bare, preloaded, trainer per --options, then again)
--repeats times; img/s is the median, and the ratio's range over repeats is the spread.

The model config of a family is the first train.<name> entry of params.yaml with that family (the one
named after the family if there is one), otherwise a small built-in one (BUILT_IN below).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import baselines  # noqa: E402
from baselines import run_bare, run_preloaded  # noqa: E402
from components.config import TrainConfig  # noqa: E402
from components.data.sources import SOURCES  # noqa: E402
from components.evaluation.classifier import Classifier  # noqa: E402
from components.models import FAMILIES, build_model  # noqa: E402
from components.params import load_params  # noqa: E402
from components.training.trainer import Trainer  # noqa: E402

NUM_CLASSES = 10

# A family's own fields when params.yaml configures no model of it; the fields every family shares
# come from params.yaml's first model (fp32, no options), so this stays the size of the defaults.
BUILT_IN: dict[str, dict] = {
    "vae": {"latent_dim": 8, "width": 32, "beta": 1.0, "lr": 1e-3},
    "ae": {"latent_dim": 8, "width": 32, "denoise_std": 0.0, "lr": 1e-3},
    "cvae": {"latent_dim": 8, "width": 32, "beta": 1.0, "lr": 1e-3},
    "colorize": {"width": 32, "lr": 1e-3},
    "igpt": {"dim": 64, "depth": 4, "heads": 4, "mlp_ratio": 4, "beta2": 0.95, "lr": 1e-3},
    "srresnet": {"scale": 4, "width": 32, "blocks": 4, "lr": 1e-3},
    "srgan": {"scale": 4, "width": 32, "blocks": 4, "ndf": 32, "beta1": 0.9, "perceptual_weight": 0.01,
              "adversarial_weight": 0.001, "warmup_steps": 300, "lr": 1e-3},
    "inpaint": {"width": 16, "ndf": 16, "adv_weight": 0.003, "beta1": 0.5, "lr": 2e-3,
                "masks": {"boxes": {"weight": 0.4, "size": [0.25, 0.5]},
                          "strokes": {"weight": 0.4, "count": [1, 3], "vertices": 4, "width": [0.08, 0.2],
                                      "length": [0.15, 0.4]},
                          "band": {"weight": 0.2, "width": [0.15, 0.35], "two_images": 0.5}}},
    "dcgan": {"latent_dim": 64, "ngf": 64, "ndf": 64, "beta1": 0.5, "spectral_norm": False, "lr": 2e-4},
    "cgan": {"latent_dim": 64, "ngf": 64, "ndf": 64, "beta1": 0.5, "spectral_norm": False, "text_dim": 32,
             "lr": 2e-4},
    "wgan_gp": {"latent_dim": 64, "ngf": 64, "ndf": 64, "n_critic": 2, "gp_lambda": 10.0, "beta1": 0.0,
                "beta2": 0.9, "spectral_norm": False, "lr": 2e-4},
    # profiles/modern.yaml's model grown after 64 images, so timed at 28×28 where its training spends most time
    # (a --batch-size above 16 needs fade_images and stable_images raised to it)
    "progan": {"latent_dim": 64, "ngf": 16, "ndf": 16, "fade_images": 16, "stable_images": 16, "batch_size": 16,
               "gp_lambda": 10.0, "drift": 0.001, "beta1": 0.0, "beta2": 0.99, "lr": 0.012},
    # profiles/modern.yaml's latent diffusion and its autoencoder (an untrained one: a step costs the same)
    "kl_ae": {"latent_channels": 4, "width": 32, "kl_weight": 0.001, "lr": 2e-3},
    "ldm": {"autoencoder": "kl_ae", "width": 64, "timesteps": 1000, "uncond_prob": 0.1, "guidance": 2.0,
            "sample_steps": 25, "text_dim": 32, "beta1": 0.9, "beta2": 0.999, "lr": 1e-3},
}

# --options: each a '+'-joined set applied to the trainer's config; "params" keeps params.yaml's.
OPTIONS: dict[str, dict] = {
    "params": {},
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
}


def parse_options(spec: str) -> dict:
    update: dict = {}
    for name in spec.split("+"):
        if name not in OPTIONS:
            raise SystemExit(f"--options {spec}: unknown option {name!r}; valid: {', '.join(OPTIONS)}, "
                             f"joined with '+' (e.g. bf16+channels_last)")
        update.update(OPTIONS[name])
    return update


def options_label(cfg: TrainConfig) -> str:
    used = [cfg.precision] + [name for name in ("channels_last", "compile") if getattr(cfg, name)]
    return "+".join(used) + (f", ema {cfg.ema_decay:g}" if cfg.ema_decay > 0 else "")


def run_trainer(cfg, build, images: torch.Tensor, labels: torch.Tensor, log_every: int) -> float:
    model = build(cfg)
    start = time.perf_counter()
    Trainer(model, cfg, log_every=log_every, progress=False).fit(images, labels)
    return images.shape[0] // cfg.batch_size * cfg.batch_size / (time.perf_counter() - start)


# --- configs, data, machine ------------------------------------------------------------------------

def family_config(params, family: str) -> tuple[TrainConfig, str]:
    """(config with epochs=1, where it came from) for one family."""
    configured = [name for name, cfg in params.models.items() if cfg.family == family]
    if configured:
        name = family if family in configured else configured[0]
        return params.models[name].model_copy(update={"epochs": 1}), f"params.yaml {params.section_of(name)}.{name}"
    if family not in BUILT_IN:
        raise SystemExit(f"family {family!r}: no train.<name> with family: {family} in params.yaml and no "
                         f"BUILT_IN config in {Path(__file__).name}; add one of them")
    first = next(iter(params.train.values()))
    family_class = FAMILIES.get(family).config
    shared = {k: v for k, v in first.model_dump().items() if k in TrainConfig.model_fields}
    shared.update(family=family, epochs=1, precision="fp32", channels_last=False, compile=False, ema_decay=0.0)
    cfg = family_class.model_validate({**shared, **BUILT_IN[family]})
    return cfg, "built-in"


def untrained_parts(params, cfg: TrainConfig, channels: int, classes: list[str]) -> dict | None:
    """The untrained models a family is built on (baselines.untrained_parts): each the params.yaml model its
    config names, else the built-in config of the family of that name (BUILT_IN's ldm names kl_ae)."""
    def config_of(name: str) -> TrainConfig:
        return params.models[name] if name in params.models else family_config(params, name)[0]

    return baselines.untrained_parts(cfg, config_of, channels, NUM_CLASSES, classes)


def load_images(kind: str, data_cfg, n: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if kind == "fashion-mnist":
        raw = SOURCES.get("fashion-mnist")(data_cfg.model_copy(update={"limit_per_split": n}))
        split = raw.splits["train"]
        return split.images.copy(), split.labels, raw.classes  # the idx reader's arrays are read-only views
    rng = np.random.default_rng(0)
    shape = (n, data_cfg.channels, data_cfg.image_size, data_cfg.image_size)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    return images, rng.integers(0, NUM_CLASSES, n).astype(np.int64), [f"class {i}" for i in range(NUM_CLASSES)]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_line(threads: int) -> str:
    flags = cpu_flags()
    has = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return (f"{cpu_model()}, {os.cpu_count()} cores, torch threads {threads}, torch {torch.__version__} "
            f"(cpu capability {torch.backends.cpu.get_cpu_capability()}), "
            f"bf16 hardware: {', '.join(has) if has else 'none (no avx512_bf16, no amx_bf16)'}")


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}–{max(values):.2f}"


# --- main --------------------------------------------------------------------------------------------

def main() -> int:
    params = load_params(ROOT / "params.yaml")
    has_fmnist = Path(params.data.path).is_dir()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", nargs="+", choices=FAMILIES.names(), help="default: every registered family")
    ap.add_argument("--options", nargs="+", default=["params"],
                    help=f"trainer variants, each '+'-joined from {', '.join(OPTIONS)} (params: as params.yaml "
                         f"says); default: params")
    ap.add_argument("--images", type=int, default=12800, help="at most this many images per epoch (default 12800)")
    ap.add_argument("--seconds", type=float, default=2.5,
                    help="size each family's epoch so that its fastest loop takes about this long (default 2.5)")
    ap.add_argument("--batch-size", type=int, help="default: the config's batch_size")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each loop; the median is reported")
    ap.add_argument("--data", choices=["fashion-mnist", "synthetic"],
                    default="fashion-mnist" if has_fmnist else "synthetic")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--markdown-out", type=Path, help="also write the table (with the machine line) here")
    args = ap.parse_args()
    variants = [(spec, parse_options(spec)) for spec in args.options]
    torch.set_num_threads(args.threads)

    images, labels, classes = load_images(args.data, params.data, args.images)
    images_t, labels_t = torch.from_numpy(images), torch.from_numpy(labels)
    channels = images.shape[1]
    log_every = params.tracking.log_every
    rows = []
    for family in args.family or FAMILIES.names():
        cfg, source = family_config(params, family)
        if args.batch_size:
            cfg = cfg.model_copy(update={"batch_size": args.batch_size})
        cfg = FAMILIES.get(family).config.model_validate(cfg.model_dump())  # re-checked after the updates
        trainer_cfgs = [cfg.model_copy(update=update) for _, update in variants]

        def build(c):  # every run's model starts from the same weights (build_model seeds with cfg.seed)
            model = build_model(c, channels, NUM_CLASSES, classes, parts=untrained_parts(params, c, channels, classes))
            if FAMILIES.get(family).uses_evaluator:  # srgan: an untrained evaluator costs what a trained one does
                torch.manual_seed(0)
                model.set_evaluator(Classifier(channels, NUM_CLASSES, params.classifier.width).eval())
            return model

        warm = 3 * cfg.batch_size
        started = time.perf_counter()
        run_bare(cfg, build, images[:warm], labels[:warm])
        rates = [run_preloaded(cfg, build, images_t[:warm], labels_t[:warm])]
        rates += [run_trainer(tcfg, build, images_t[:warm], labels_t[:warm], log_every) for tcfg in trainer_cfgs]
        steps = max(4, min(len(images) // cfg.batch_size, round(max(rates) * args.seconds / cfg.batch_size)))
        n = steps * cfg.batch_size
        print(f"{family} ({source}, batch {cfg.batch_size}): warm-up {time.perf_counter() - started:.1f} s, "
              f"{n} images per run", flush=True)
        bare, pre, ours = [], [], [[] for _ in variants]
        for r in range(args.repeats):  # interleaved, so drift in machine load hits all loops alike
            bare.append(run_bare(cfg, build, images[:n], labels[:n]))
            pre.append(run_preloaded(cfg, build, images_t[:n], labels_t[:n]))
            for k, tcfg in enumerate(trainer_cfgs):
                ours[k].append(run_trainer(tcfg, build, images_t[:n], labels_t[:n], log_every))
            print(f"  repeat {r + 1}: bare {bare[-1]:.0f}, preloaded {pre[-1]:.0f}, trainer "
                  + ", ".join(f"[{spec}] {o[-1]:.0f}" for (spec, _), o in zip(variants, ours)) + " img/s", flush=True)
        for tcfg, o in zip(trainer_cfgs, ours):
            rows.append({
                "family": family, "source": source, "batch": cfg.batch_size, "images": n,
                "options": options_label(tcfg),
                "trainer": statistics.median(o), "bare": statistics.median(bare), "pre": statistics.median(pre),
                "vs_bare": [a / b for a, b in zip(o, bare)], "vs_pre": [a / b for a, b in zip(o, pre)],
            })

    lines = [
        f"Machine: {machine_line(torch.get_num_threads())}.",
        f"Data: {args.data}; one epoch of N images per run; median of {args.repeats} interleaved repeats; "
        f"ratio = trainer / baseline of the medians (its range over the repeats in brackets).",
        "",
        "| family | config | batch | N | trainer options | trainer img/s | bare img/s | trainer / bare "
        "| preloaded img/s | trainer / preloaded |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['family']} | {row['source']} | {row['batch']} | {row['images']} | {row['options']} "
            f"| {row['trainer']:.0f} "
            f"| {row['bare']:.0f} | {row['trainer'] / row['bare']:.2f}× ({spread(row['vs_bare'])}) "
            f"| {row['pre']:.0f} | {row['trainer'] / row['pre']:.2f}× ({spread(row['vs_pre'])}) |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.markdown_out:
        args.markdown_out.write_text(table + "\n")
        print(f"\nwrote {args.markdown_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
