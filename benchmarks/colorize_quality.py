"""Colorization against the grey baseline on a colour dataset made here (no colour demo data ships
offline): Fashion-MNIST with each class tinted its own colour (tab10's palette, gold for its grey), so
colour follows from what the garment is. Trains profiles/zoo.yaml's `colorize` model on the tinted
training split and scores it on tinted held-out images beside the grey input replicated: PSNR and SSIM
as the evaluation scores restorations (components.evaluation.restoration: per image, on uint8
outputs, pixels in [0, 1]).

    .venv/bin/python benchmarks/colorize_quality.py --per-class 1000 --set epochs=2

--set overrides a field of train.colorize, `<field>=<value>`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.config import apply_overrides, apply_profile, read_params_raw  # noqa: E402
from components.data.sources import SOURCES  # noqa: E402
from components.evaluation.grid import save_grid  # noqa: E402
from components.evaluation.restoration import MODEL, family_name, figure_tiles, restore  # noqa: E402
from components.models import build_model  # noqa: E402
from components.params import parse_params  # noqa: E402
from components.training.trainer import Trainer  # noqa: E402

# tab10's palette with its grey replaced by gold: a grey class would be its own baseline, exact.
PALETTE = torch.tensor([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                        [140, 86, 75], [227, 119, 194], [255, 215, 0], [188, 189, 34], [23, 190, 207]]).float()


def tinted(grey_u8: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """uint8 N×1×H×W grey images -> uint8 N×3×H×W, each image times its class's colour (brightest channel 1)."""
    tint = PALETTE / PALETTE.amax(1, keepdim=True)  # (10, 3)
    return (grey_u8.float() * tint[labels][:, :, None, None]).round().to(torch.uint8)


def balanced(images, labels, per_class: int):
    picks = torch.cat([torch.nonzero(labels == k).flatten()[:per_class] for k in range(10)])
    return images[picks], labels[picks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=1000, help="tinted training images per class")
    parser.add_argument("--test-per-class", type=int, default=200, help="tinted held-out images per class")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field of train.colorize, e.g. epochs=2")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=1234, help="the evaluation seed")
    parser.add_argument("--figure", type=Path, help="write the evaluation's figure (input, grey, model, original "
                                                    "with PSNR/SSIM) of a few held-out images to this PNG")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    raw = apply_profile(read_params_raw(ROOT / "params.yaml"), ROOT / "profiles" / "zoo.yaml")
    apply_overrides(raw, ["data.channels=1", *[f"train.colorize.{item}" for item in args.set]])
    params = parse_params(raw)  # the grey source, tinted here

    data = SOURCES.get(params.data.source)(params.data)
    split = lambda name: (torch.from_numpy(data.splits[name].images.copy()),  # noqa: E731
                          torch.from_numpy(data.splits[name].labels.copy()))
    images, labels = balanced(*split("train"), args.per_class)
    held_out, held_labels = balanced(*split("test"), args.test_per_class)
    images, held_out = tinted(images, labels), tinted(held_out, held_labels)

    cfg = params.model("colorize")
    model = build_model(cfg, 3, 10)
    trainer = Trainer(model, cfg, name="colorize", log_every=100, progress=False,
                      log_fn=lambda values, step: print(f"  step {step}: " + " ".join(
                          f"{k}={v:.3g}" for k, v in values.items()), flush=True))
    start = time.perf_counter()
    trainer.fit(images, labels)
    train_s = round(time.perf_counter() - start, 1)
    scores = restore(model, held_out, args.seed).scores()
    result = {"set": args.set, "train_images": images.shape[0], "held_out": held_out.shape[0], "steps": trainer.step,
              "train_s": train_s, "threads": args.threads}
    for name in scores.psnr:
        result[name] = {"psnr": round(float(scores.psnr[name].mean()), 2),
                        "ssim": round(float(scores.ssim[name].mean()), 4)}
    result["psnr_gain"] = round(result[MODEL]["psnr"] - result["grey"]["psnr"], 2)
    if args.figure is not None:
        picks = torch.arange(6) * args.test_per_class + torch.arange(6)  # one image each of classes 0..5
        tiles, nrow = figure_tiles(family_name(model), restore(model, held_out[picks], args.seed), rows=6)
        save_grid(tiles, args.figure, nrow=nrow)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
