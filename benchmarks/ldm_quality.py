"""Latent diffusion on Fashion-MNIST: trains the autoencoder (train.kl_ae) and then the ldm on its
latents (latent.ldm) as the pipeline would, on the real training split, and reports the guidance
trade-off the issue asks for: for each guidance scale, --samples samples asked for the classes in
turn, and

- agreement: the share the evaluator classifier labels as the asked class;
- domain FID: the evaluator's features of the samples against as many held-out test images
  (FID rises as the count falls: compare FIDs of equal counts only);
- sampling speed (images/s at the ldm's sample_steps, or --steps);

beside the training seconds of both models, the autoencoder's own ceiling (the agreement and FID
of its reconstructions of the test images) and other real test images' (the evaluator's accuracy).

    .venv/bin/python benchmarks/ldm_quality.py --threads 1 --samples 500 --json /tmp/ldm.jsonl

Settings come from params.yaml merged with --profile (default profiles/modern.yaml; repeat the flag
to merge more files), then --set (full keys: train.kl_ae.width=32, latent.ldm.guidance=3). The
trained models are cached in --cache by their configs, so a rerun with other --guidance or --steps,
or other settings of the ldm alone, trains only what changed; the evaluator is the classifier
stage's model, cached there as benchmarks/sample_quality.py does.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.config import GuidanceSweepConfig, apply_overrides, apply_profile, read_params_raw  # noqa: E402
from components.data.sources import SOURCES  # noqa: E402
from components.evaluation.features import extract, fid  # noqa: E402
from components.evaluation.grid import reconstruct_uint8, sample_uint8, save_grid  # noqa: E402
from components.evaluation.guidance import guidance_sweep  # noqa: E402
from components.models import build_model  # noqa: E402
from components.params import parse_params  # noqa: E402
from components.training.checkpoint import load_weights, save_weights  # noqa: E402
from sample_quality import evaluator, fit_timed  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)


def trained(cfg, name: str, images, labels, classes, cache: Path, parts=None):
    """The model of `cfg` (built on `parts`) trained on the images, from the cache when these configs
    trained before: (model in eval mode, its training seconds)."""
    configs = [cfg.model_dump(mode="json")] + [part.cfg.model_dump(mode="json") for part in (parts or {}).values()]
    key = hashlib.sha256(json.dumps(configs, sort_keys=True).encode()).hexdigest()[:16]
    path, seconds = cache / f"{name}-{key}.safetensors", cache / f"{name}-{key}.json"
    model = build_model(cfg, images.shape[1], len(classes), classes, parts=parts)
    if path.is_file() and seconds.is_file():
        print(f"{name}: trained before, loading {path}", flush=True)
        return load_weights(model, path).eval(), json.loads(seconds.read_text())["train_s"]
    _, train_s = fit_timed(model, cfg, name, images, labels, log_every=100)
    save_weights(model, path)
    seconds.write_text(json.dumps({"train_s": train_s}))
    return model.eval(), train_s


def scores(classifier, real_features, images_u8: torch.Tensor, asked: torch.Tensor) -> dict[str, float]:
    """Agreement with the asked classes and domain FID against the real features."""
    found = extract(classifier, images_u8.float() / 127.5 - 1)
    agreement = float((found.probs.argmax(dim=1).cpu() == asked).float().mean())
    return {"agreement": round(agreement, 4), "fid": round(fid(real_features, found.features), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ldm", help="an entry of the latent section")
    parser.add_argument("--profile", type=Path, action="append",
                        help="params files merged into params.yaml in turn (default profiles/modern.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.MODEL.FIELD=VALUE",
                        help="override a field, e.g. latent.ldm.epochs=2 or train.kl_ae.width=32")
    parser.add_argument("--guidance", default="0,1,2,3,5", help="comma-separated guidance scales")
    parser.add_argument("--steps", type=int, help="DDIM steps (default: the ldm's sample_steps)")
    parser.add_argument("--samples", type=int, default=1000, help="samples per guidance scale")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cache", type=Path, default=ROOT / ".genpipe" / "bench")
    parser.add_argument("--figure", type=Path, help="write a grid here (PNG): a row of classes per guidance scale")
    parser.add_argument("--json", type=Path, help="append the result as one JSON line to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    raw = read_params_raw(ROOT / "params.yaml")
    for profile in args.profile or [ROOT / "profiles" / "modern.yaml"]:
        apply_profile(raw, profile)
    apply_overrides(raw, args.set)
    params = parse_params(raw)
    cfg = params.model(args.model)
    ae_cfg = params.model(cfg.autoencoder)

    data = SOURCES.get(params.data.source)(params.data)
    train, test = data.splits["train"], data.splits["test"]
    images, labels = torch.from_numpy(train.images.copy()), torch.from_numpy(train.labels.copy())
    test_images, test_labels = torch.from_numpy(test.images.copy()), torch.from_numpy(test.labels.copy())
    args.cache.mkdir(parents=True, exist_ok=True)
    classifier = evaluator(params, images, labels, len(data.classes), args.cache)
    n = min(args.samples, test_images.shape[0] // 2)  # the real baseline takes the next n
    real_features = extract(classifier, test_images[:n].float() / 127.5 - 1).features

    autoencoder, ae_s = trained(ae_cfg, cfg.autoencoder, images, labels, data.classes, args.cache)
    reconstructions = reconstruct_uint8(autoencoder, test_images[:n])  # the ceiling of what the ldm can draw
    result: dict = {"set": args.set, "threads": args.threads, "autoencoder_train_s": round(ae_s, 1),
                    # the scale: other real images (the evaluator's accuracy; FID of real against real at n)
                    "real": scores(classifier, real_features, test_images[n:2 * n], test_labels[n:2 * n].long()),
                    "reconstructions": scores(classifier, real_features, reconstructions, test_labels[:n].long())}
    print(json.dumps(result), flush=True)
    model, train_s = trained(cfg, args.model, images, labels, data.classes, args.cache, {"autoencoder": autoencoder})
    result.update({"train_s": round(train_s, 1), "latent_scale": round(float(model.latent_scale), 4),
                   "unet_parameters": sum(p.numel() for p in model.unet.parameters()),
                   "steps": args.steps or cfg.sample_steps, "by_guidance": {}})
    if args.steps:
        model.cfg = model.cfg.model_copy(update={"sample_steps": args.steps})
    scales = [float(v) for v in args.guidance.split(",")]
    sweep = params.evaluate.model_copy(update={"guidance": GuidanceSweepConfig(scales=scales, samples=n)})
    for row in guidance_sweep(model, classifier, test_images, sweep):  # the evaluate stage's own measurement
        result["by_guidance"][str(row["guidance"])] = {"agreement": round(row["agreement"], 4),
                                                      "fid": round(row["fid"], 2),
                                                      "images_per_s": round(row["samples_per_s"], 1)}
        print(f"guidance {row['guidance']:g}: {result['by_guidance'][str(row['guidance'])]}", flush=True)
    asked = torch.arange(len(data.classes))  # the figure: the first samples of each scale, a class per column
    rows = [sample_uint8(model, len(asked), params.evaluate.seed, labels=asked, guidance=g) for g in scales]
    print(json.dumps(result), flush=True)
    if args.figure is not None:
        save_grid(torch.cat(rows), args.figure, nrow=len(data.classes))
    if args.json is not None:
        with args.json.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
