"""4x super-resolution against bicubic, as the lecture's figure compares them: trains the
super-resolution models of params.yaml on the real training split and scores them on the held-out
reference (the evaluate stage's subset of evaluate.num_samples test images) beside bicubic upscaling
of the same low-resolution inputs: PSNR and SSIM (torchmetrics, per image, data range [0, 1], on
uint8 outputs as a registered model returns them), the evaluator FID of the outputs against the
real images, and edge_ratio, the outputs' mean neighbouring-pixel difference over the real images'
(a sharpness measure that, unlike FID, does not use the features srgan's perceptual loss compares).
The numbers behind the srresnet (zoo profile) and srgan (params.yaml) settings; ~2.5 minutes on 2 cores.

    .venv/bin/python benchmarks/sr_quality.py --models srresnet srgan --set srgan.perceptual_weight=0.1

--models names entries of params.yaml's train section (translate-kind super-resolution families);
--set overrides a field of one, `<model>.<field>=<value>`. The evaluator is the classifier stage's
model under params.yaml's classifier section, trained once and cached in --cache (default
.genpipe/bench), as benchmarks/sample_quality.py does.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.config import apply_overrides, apply_profile, read_params_raw  # noqa: E402
from components.data.sources import SOURCES  # noqa: E402
from components.evaluation.evaluate import reference_subset  # noqa: E402
from components.evaluation.features import extract, fid  # noqa: E402
from components.evaluation.grid import save_grid  # noqa: E402
from components.evaluation.restoration import MODEL, Restorations, figure_tiles, restore  # noqa: E402
from components.models import build_model  # noqa: E402
from components.params import parse_params  # noqa: E402
from components.training.trainer import Trainer  # noqa: E402
from sample_quality import evaluator  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)


@torch.no_grad()
def scores(restored: Restorations, method: str, real_features: torch.Tensor, classifier) -> dict:
    """PSNR (dB) and SSIM as the evaluate stage measures them (restoration.pixel_scores), the
    evaluator FID of the uint8 outputs against the real images, and the edge ratio."""
    per_image = restored.scores()
    outputs = restored.outputs[method]
    fake_features = extract(classifier, outputs.float() / 127.5 - 1).features
    return {"psnr": round(float(per_image.psnr[method].mean()), 3), "ssim": round(float(per_image.ssim[method].mean()), 4),
            "fid": round(fid(real_features, fake_features), 2),
            "edge_ratio": round(edge_energy(outputs.float() / 255) / edge_energy(restored.clean.float() / 255), 3)}


def edge_energy(images: torch.Tensor) -> float:
    """Mean absolute difference between neighbouring pixels: how sharp images are, judged by no network
    (1.0 in edge_ratio: as sharp as the real images; blur falls below it)."""
    return float((images.diff(dim=-1).abs().mean() + images.diff(dim=-2).abs().mean()) / 2)


def lecture_figure(restored: dict[str, Restorations], path: Path) -> None:
    """The lecture's figure: per held-out image its input, bicubic, each model (in --models order) and
    the original, with PSNR/SSIM under each."""
    *first, last = restored
    final = restored[last]
    columns = {MODEL: final.outputs[MODEL], "bicubic": final.outputs["bicubic"],
               **{name: restored[name].outputs[MODEL] for name in first}}
    tiles, nrow = figure_tiles(last, replace(final, outputs=columns), rows=final.clean.shape[0])
    save_grid(tiles, path, nrow=nrow)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["srresnet", "srgan"],
                        help="entries of params.yaml's train section, or of profiles/zoo.yaml's (srresnet)")
    parser.add_argument("--set", action="append", default=[], metavar="MODEL.FIELD=VALUE",
                        help="override a field of train.<model>, e.g. srgan.warmup_steps=200")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cache", type=Path, default=ROOT / ".genpipe" / "bench")
    parser.add_argument("--json", type=Path, help="append the result as one JSON line to this file")
    parser.add_argument("--figure", type=Path, help="write the lecture's figure of the first --rows held-out "
                                                    "images here (PNG): input, bicubic, each model, original")
    parser.add_argument("--rows", type=int, default=4, choices=range(1, 65), metavar="1..64")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    raw = read_params_raw(ROOT / "params.yaml")
    apply_profile(raw, ROOT / "profiles" / "zoo.yaml")  # srresnet lives there
    apply_overrides(raw, [f"train.{item}" for item in args.set])
    params = parse_params(raw)

    data = SOURCES.get(params.data.source)(params.data)
    train, test = data.splits["train"], data.splits["test"]
    images, labels = torch.from_numpy(train.images.copy()), torch.from_numpy(train.labels.copy())
    real = reference_subset(torch.from_numpy(test.images.copy()), params.evaluate)
    args.cache.mkdir(parents=True, exist_ok=True)
    classifier = evaluator(params, images, labels, len(data.classes), args.cache)
    real_features = extract(classifier, real.float() / 127.5 - 1).features

    result: dict = {"set": args.set, "threads": args.threads, "num_samples": real.shape[0]}
    figure: dict[str, Restorations] = {}
    for name in args.models:
        cfg = params.model(name)
        model = build_model(cfg, images.shape[1], len(data.classes), data.classes)
        if hasattr(model, "set_evaluator"):
            model.set_evaluator(classifier)
        trainer = Trainer(model, cfg, name=name, log_every=200, progress=False,
                          log_fn=lambda values, step: print(f"  {name} step {step}: " + " ".join(
                              f"{k}={v:.3g}" for k, v in values.items()), flush=True))
        start = time.perf_counter()
        trainer.fit(images, labels)
        train_s = round(time.perf_counter() - start, 1)
        restored = restore(model, real, params.evaluate.seed)  # 8-bit inputs and outputs, as served
        figure[name] = restored.head(args.rows)
        result[name] = {"train_s": train_s, **scores(restored, MODEL, real_features, classifier)}
        result.setdefault("bicubic", scores(restored, "bicubic", real_features, classifier))
        print(f"{name}: {result[name]}  bicubic: {result['bicubic']}", flush=True)
    print(json.dumps(result))
    if args.figure is not None:
        lecture_figure(figure, args.figure)
    if args.json is not None:
        with args.json.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
