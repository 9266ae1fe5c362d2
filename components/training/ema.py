"""An exponential moving average of the weights that make the images, as for GAN generators in
Karras et al., 2018, "Progressive Growing of GANs", and Yazıcı et al., 2019, "The Unusual
Effectiveness of Averaging in GAN Training"."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from components.images import to_model_input
from components.models.base import GenerativeModel


class EMA:
    """The average of the parameters of `model.ema_modules`, updated after every training step.

    Update t (0-based) uses decay min(decay, (1 + t) / (10 + t)): a warm-up, so that in a short run
    the average is not dominated by the random initial weights (TensorFlow's
    ExponentialMovingAverage with num_updates). Buffers (batch-norm running statistics) are copied
    from the live model at each update (for checkpoints and the sentinel); at the end of training
    they are measured again for the averaged weights (recalibrate_batch_norm).
    """

    def __init__(self, model: GenerativeModel, decay: float):
        if not model.ema_modules:
            raise ValueError(f"ema_decay={decay}: the {type(model).__name__} model declares no ema_modules "
                             f"to average; set ema_decay: 0.0")
        self.decay = decay
        params, buffers = {}, {}
        for name in model.ema_modules:
            module = getattr(model, name)
            params.update({f"{name}.{k}": v for k, v in module.named_parameters()})
            buffers.update({f"{name}.{k}": v for k, v in module.named_buffers()})
        self._live = {**params, **buffers}  # the model's own tensors, updated in place by its optimizers
        self._param_names, self._buffer_names = list(params), list(buffers)
        self.shadow = {k: v.detach().clone() for k, v in self._live.items()}

    @torch.no_grad()
    def update(self, t: int) -> None:
        """Fold in the live weights after update number t (0-based)."""
        decay = min(self.decay, (1 + t) / (10 + t))
        if self._param_names:
            torch._foreach_lerp_([self.shadow[k] for k in self._param_names],
                                 [self._live[k].detach() for k in self._param_names], 1.0 - decay)
        for k in self._buffer_names:
            self.shadow[k].copy_(self._live[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
            raise ValueError(f"EMA tensors differ: missing {missing[:3]}, unexpected {extra[:3]}")
        for k, v in state.items():
            self.shadow[k].copy_(v)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Put the averaged weights into the model's ema_modules (the live ones are overwritten)."""
        for k, v in self.shadow.items():
            self._live[k].copy_(v)

    @torch.no_grad()
    def recalibrate_batch_norm(self, model: GenerativeModel, seed: int, kind: str = "generate",
                               data_u8: torch.Tensor | None = None, images: int = 4096,
                               batch_size: int = 256) -> None:
        """Batch-norm statistics measured for the averaged weights (in the model, after copy_to_model):
        the statistics copied from the live weights do not fit them, which made the average lose
        to the live weights (DCGAN: FID 146 vs 134). Runs the model in train mode over `images`
        images, all randomness from its own seeded generator: a sampler (task `kind` "generate")
        draws samples; another kind reconstructs training images drawn from `data_u8` (uint8
        N×C×H×W), a translate model degrading them first. A model without batch norm in its
        ema_modules is left as it is."""
        norms = [m for name in model.ema_modules for m in getattr(model, name).modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not norms:
            return
        was_training = model.training
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below, not an exponential one
        model.eval()
        for m in norms:
            m.train()
        generator = torch.Generator().manual_seed(seed)
        for _ in range(images // batch_size):
            if kind == "generate":
                model.sample(batch_size, generator=generator)
                continue
            if data_u8 is None:
                raise ValueError(f"recalibrating a {kind} model's batch norm needs its training images")
            pick = torch.randint(data_u8.shape[0], (batch_size,), generator=generator)
            x = to_model_input(data_u8[pick], model.image_size, next(model.parameters()).device)
            if kind == "translate":  # degraded as evaluation degrades (a band within one image)
                model.reconstruct(x, generator)
            else:
                model.reconstruct(x)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
        buffers = dict(model.named_buffers())
        for k in self._buffer_names:  # the shadow follows, so a checkpointed EMA holds them too
            self.shadow[k].copy_(buffers[k])

    @contextmanager
    def in_model(self) -> Iterator[None]:
        """The averaged weights in the model for the duration of the block, the live ones after it."""
        with torch.no_grad():
            live = {k: v.detach().clone() for k, v in self._live.items()}
            self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in live.items():
                    self._live[k].copy_(v)
