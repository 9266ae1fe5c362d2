"""Model families, found by name through FAMILIES (filled by each family module's decorator)."""
import torch

from components.models.base import FAMILIES, Family, GenerativeModel, StepOutput
from components.models import dcgan, vae  # noqa: F401  (registers the families)

__all__ = ["FAMILIES", "Family", "GenerativeModel", "StepOutput", "build_model"]


def build_model(cfg, channels: int, num_classes: int) -> GenerativeModel:
    """Build the model a `train.<name>` config describes, its initial weights drawn from cfg.seed
    alone (the caller's global RNG is neither read nor advanced)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return FAMILIES.get(cfg.family).build(cfg, channels, num_classes)
