"""Image tensors between their stored form (uint8 N×C×H×W) and a model's input (float in [-1, 1]
at the model's resolution): the one place training and evaluation convert images."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def resize(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """Float images N×C×H×W → N×C×image_size×image_size (unchanged when already that size)."""
    if x.shape[-1] == image_size:
        return x
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)


def to_model_input(batch_u8: torch.Tensor, image_size: int, device: torch.device | str) -> torch.Tensor:
    """uint8 N×C×H×W → float in [-1, 1] at the model's resolution."""
    return resize(batch_u8.to(device, non_blocking=True).float().div_(127.5).sub_(1.0), image_size)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] → uint8 in [0, 255], same shape."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
