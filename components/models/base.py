"""The interface every generative family offers the trainer, evaluator and registry."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from components.config import TaskKind
from components.registry import Registry


@dataclass
class StepOutput:
    """What one training phase returns: the loss to backpropagate and values worth logging."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


# What a registered model of a family does with a request; the trainer, evaluator, registry and
# pyfunc dispatch on this, never on a family's name.
#   generate:    {"count", "seed", + the family's conditions} → images; a family that `completes` also
#                takes {"images", "rows_given", "count" (per image), "seed"} → completions of the images
#   reconstruct: {"images", "output": "reconstruction" | "latent"} → images or latent codes
#   translate:   {"images" (the family's input_shape), + "mask" when it takes_mask} → images
# (TaskKind itself is declared in components/config.py, where registry.gating_metric is keyed by it.)


@dataclass(frozen=True)
class Family:
    name: str
    config: type  # a components.config.TrainConfig subclass
    build: Callable[..., "GenerativeModel"]  # (cfg, channels, classes: list of class names[, parts]) -> model
    kind: TaskKind = "generate"
    conditions: tuple[str, ...] = ()  # request fields a generate model takes besides count/seed: "labels", "prompt"
    # translate: (config, channels) -> C×H×W of the images a request sends (a 4x super-resolver: a quarter the size)
    input_shape: Callable[..., tuple[int, int, int]] | None = None
    takes_mask: bool = False  # translate: a request also sends "mask", uint8 N×1×H×W, 1 where to fill in
    # generate: a request may instead send "images" and "rows_given", and gets each image's other
    # rows drawn given its first rows_given (the model has `complete(images, rows_given, generator)`)
    completes: bool = False
    uses_evaluator: bool = False  # trained with the evaluator classifier's features (set_evaluator before fit)
    data_channels: tuple[int, ...] = (1, 3)  # the datasets (data.channels) it can learn from: colorize needs colour
    spatial_latent: bool = False  # encode/decode over a latent grid (latent_shape): what an ldm can be trained on
    parts: tuple[str, ...] = ()  # config fields naming other trained models this family is built on (ldm: "autoencoder")
    # generate: sampler settings a request may set, passed to sample() by name (ldm: "steps", "guidance")
    sampler_options: tuple[str, ...] = ()

    def unfit_for(self, channels: int) -> str | None:
        """Why a model of this family cannot learn from a dataset of `channels` channels, or None."""
        if channels in self.data_channels:
            return None
        kind = {1: "grey", 3: "colour"}.get
        need = " or ".join(f"{kind(c)} images (data.channels: {c})" for c in self.data_channels)
        return (f"the {self.name} family learns from {need}, and this dataset is {kind(channels, 'neither')} "
                f"(data.channels: {channels}); to train it, ingest {kind(self.data_channels[0])} images "
                f"with data.channels: {self.data_channels[0]}")


FAMILIES: Registry[Family] = Registry("model family")


def adam(params, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """The Adam every family uses: one place to choose its implementation (foreach/fused) for speed.

    Fused (one kernel for all of a group's tensors) on a GPU, where per-tensor launches cost; on the
    CPU foreach, which measured the same as fused and as the for-loop (Adam is ~3 % of a DCGAN-28
    step there; see benchmarks/README.md). Call it once the parameters are on their device.
    """
    params = list(params)
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    on_gpu = bool(tensors) and all(t.is_cuda for t in tensors)
    return torch.optim.Adam(params, lr=lr, betas=betas, **({"fused": True} if on_gpu else {"foreach": True}))


class GenerativeModel(nn.Module):
    """A model that trains in named phases and samples images in [-1, 1].

    The trainer only walks `training_losses`: for each (phase, output) it yields, the trainer
    zeroes that phase's optimizer, backpropagates output.loss and steps. A generator function lets
    a GAN reuse one batch of fakes for its D and G phases, with D updated before G's loss is built.
    All training noise is drawn from `generator` (the trainer's, on x's device, checkpointed with
    it), never from the global RNG: a resumed run draws the same noise as an uninterrupted one.
    """

    conditional = False
    # The submodules that make the images (a GAN's generator, a VAE's encoder and decoder): the
    # trainer keeps an exponential moving average of their weights, and that average is what is
    # evaluated and registered.
    ema_modules: tuple[str, ...] = ()
    # Submodules a multi-process trainer must not wrap in DistributedDataParallel (one differentiated
    # twice, as by a gradient penalty, which DDP does not support): their gradients are averaged
    # with an all_reduce after each backward instead (components.training.distributed).
    allreduce_modules: tuple[str, ...] = ()
    image_size: int
    channels: int
    latent_dim: int

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def training_losses(self, x: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator | None = None) -> Iterator[tuple[str, StepOutput]]:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None,
               prompts: list[str] | None = None) -> torch.Tensor:
        """n images in [-1, 1], (n, C, H, W). Conditional families take class ids `labels` (n,)
        (None: classes in turn, 0, 1, …, so every class is drawn) or text `prompts` (n strings)."""
        return self.from_noise(self.noise(n, generator), labels=labels, prompts=prompts)

    @torch.no_grad()
    def from_noise(self, z: torch.Tensor, labels: torch.Tensor | None = None,
                   prompts: list[str] | None = None) -> torch.Tensor:
        """The images of given prior draws z (n, latent_dim), as `sample` makes them: walking z
        between two draws interpolates between their images."""
        raise NotImplementedError

    def check_labels(self, labels, n: int) -> torch.Tensor:
        """For conditional families (which set `classes` and `num_classes`): class ids (n,) as int64
        on the model's device; None → classes in turn, 0, 1, …, 0, 1, …"""
        device = next(self.parameters()).device
        if labels is None:
            return torch.arange(n, device=device) % self.num_classes
        labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.shape != (n,):
            raise ValueError(f"labels: expected {n} integer class ids, one per image, "
                             f"got dtype {labels.dtype} and shape {tuple(labels.shape)}")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"labels: class ids must be in 0..{self.num_classes - 1} "
                             f"({', '.join(self.classes)}), got {sorted(set(bad.tolist()))}")
        return labels.to(device=device, dtype=torch.long)

    def noise(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator)  # drawn on the CPU: same seed, same images on any device
        return z.to(device)


class TranslationModel(GenerativeModel):
    """An image-to-image model (task kind "translate"), trained and judged as restoration: `degrade`
    makes its input from a clean image by the family's documented degradation (a 4x bicubic
    downscale, a mask, the grey of a colour image), `translate` maps such an input back to an image,
    and `baselines` are the classical methods it must beat (bicubic upscaling; mean and nearest
    fill; grey). PSNR, SSIM and the domain FID score `reconstruct` = translate(degrade(x)) against x,
    with the degradation's randomness (masks) drawn from a seeded generator; for a family that takes
    a mask, PSNR and SSIM are measured inside the mask."""

    def degrade(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Clean images in [-1, 1] (N, C, H, W) → the model's inputs: {"images": (N, *input_shape)} in
        [-1, 1], and {"mask": (N, 1, H, W) of 0/1, 1 where to fill in} for families that take a mask."""
        raise NotImplementedError

    def translate(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's inputs (as degrade makes them) → images in [-1, 1] (N, C, H, W)."""
        raise NotImplementedError

    def baselines(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What each classical method makes of the same inputs, by name ("bicubic"), in [-1, 1] (N, C, H, W)."""
        raise NotImplementedError

    def degradation(self) -> dict:
        """What `degrade` does, as the settings that define it (JSON-able): two versions' PSNR and SSIM
        compare only when these (and the family module's source) are equal (the score protocol holds them)."""
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.translate(self.degrade(x, generator))

    def sample(self, n, generator=None, labels=None, prompts=None):
        raise TypeError(f"the {self.cfg.family!r} family translates images, it does not sample: "
                        f"use translate(degrade(images)) or a request with images")
