"""Model families, found by name through FAMILIES (filled by each family module's decorator)."""
import torch

from components.models.base import FAMILIES, Family, GenerativeModel, StepOutput
from components.models import ae, cgan, colorize, cvae, dcgan, igpt, inpaint, sr, vae, wgan_gp  # noqa: F401  (registers the families)
from components.models import progan  # noqa: F401  (registers the family)
from components.models import kl_ae, ldm  # noqa: F401  (registers the families)

__all__ = ["FAMILIES", "Family", "GenerativeModel", "StepOutput", "build_model", "class_names"]


def class_names(num_classes: int, classes: list[str] | None = None) -> list[str]:
    """The classes' names: the data's own when it has them, else "class 0", "class 1", …"""
    return list(classes) if classes else [f"class {i}" for i in range(num_classes)]


def build_model(cfg, channels: int, num_classes: int, classes: list[str] | None = None,
                parts: dict[str, GenerativeModel] | None = None) -> GenerativeModel:
    """Build the model a `train.<name>` config describes, its initial weights drawn from cfg.seed
    alone (the caller's global RNG is neither read nor advanced). `classes` names the classes
    (text-conditioned families build their vocabulary from them); default "class 0", "class 1", …
    `parts`: for a family built on other trained models (Family.parts, e.g. an ldm's "autoencoder"),
    those models by config field; the family's build then takes them as a fourth argument."""
    classes = class_names(num_classes, classes)
    if len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for {num_classes} classes")
    family = FAMILIES.get(cfg.family)
    given = dict(parts or {})
    if set(given) != set(family.parts):
        missing, extra = sorted(set(family.parts) - set(given)), sorted(set(given) - set(family.parts))
        if missing:
            raise ValueError(f"{', '.join(missing)}: the {cfg.family} family is trained on another trained model "
                             f"(named by its config field {', '.join(missing)}); build it with "
                             f"parts={{{', '.join(repr(m) + ': <that model>' for m in missing)}}}")
        raise ValueError(f"parts {extra}: the {cfg.family} family is built on "
                         f"{list(family.parts) or 'no other model'}; pass only those")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if family.parts:
            return family.build(cfg, channels, classes, given)
        return family.build(cfg, channels, classes)
