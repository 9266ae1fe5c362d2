"""Small `train.<name>` configs for tests: every field a family needs, tiny widths, one epoch."""
from __future__ import annotations

from components.models import FAMILIES

COMMON = {"image_size": 28, "epochs": 1, "batch_size": 8, "lr": 1e-3, "seed": 0,
          "ema_decay": 0.0, "precision": "fp32", "channels_last": False, "compile": False}

TINY = {
    "vae": {"latent_dim": 4, "width": 4, "beta": 1.0},
    "ae": {"latent_dim": 4, "width": 4, "denoise_std": 0.0},
    "srresnet": {"scale": 4, "width": 4, "blocks": 1},
    "srgan": {"scale": 4, "width": 4, "blocks": 1, "ndf": 4, "beta1": 0.9, "perceptual_weight": 0.01,
              "adversarial_weight": 0.001, "warmup_steps": 0},
    "inpaint": {"width": 4, "ndf": 4, "adv_weight": 0.01, "beta1": 0.5,
                "masks": {"boxes": {"weight": 1.0, "size": [0.25, 0.5]},
                          "strokes": {"weight": 1.0, "count": [1, 3], "vertices": 4, "width": [0.08, 0.2],
                                      "length": [0.15, 0.4]},
                          "band": {"weight": 1.0, "width": [0.15, 0.35], "two_images": 0.5}}},
    "colorize": {"width": 4},
    "igpt": {"dim": 8, "depth": 1, "heads": 2, "mlp_ratio": 2, "beta2": 0.95},
    "cvae": {"latent_dim": 4, "width": 4, "beta": 1.0},
    "dcgan": {"latent_dim": 8, "ngf": 4, "ndf": 4, "beta1": 0.5, "spectral_norm": False},
    "cgan": {"latent_dim": 8, "ngf": 4, "ndf": 4, "beta1": 0.5, "spectral_norm": False, "text_dim": 8},
    "wgan_gp": {"latent_dim": 8, "ngf": 4, "ndf": 4, "n_critic": 2, "gp_lambda": 10.0, "beta1": 0.0, "beta2": 0.9,
                "spectral_norm": False},
    "progan": {"latent_dim": 8, "ngf": 4, "ndf": 4, "fade_images": 16, "stable_images": 16, "gp_lambda": 10.0,
               "drift": 0.001, "beta1": 0.0, "beta2": 0.99},
    "kl_ae": {"latent_channels": 2, "width": 4, "kl_weight": 0.01},
    "ldm": {"autoencoder": "kl_ae", "width": 4, "timesteps": 20, "uncond_prob": 0.2, "guidance": 2.0, "sample_steps": 4,
            "text_dim": 8, "beta1": 0.9, "beta2": 0.999},
}


def tiny_parts(cfg, channels: int = 1, num_classes: int = 10) -> dict | None:
    """Untrained tiny models that a family is built on, for build_model's `parts` (None when it is built on
    none): TINY's ldm names its autoencoder after the kl_ae family."""
    from components.models import build_model

    parts = {field: build_model(model_config(getattr(cfg, field)), channels, num_classes)
             for field in FAMILIES.get(cfg.family).parts}
    return parts or None


def model_fields(family: str, **overrides) -> dict:
    """The raw fields of a tiny config of `family` (what params.yaml would hold), with overrides."""
    return {"family": family, **COMMON, **TINY[family], **overrides}


def model_config(family: str, **overrides):
    return FAMILIES.get(family).config.model_validate(model_fields(family, **overrides))


WIDTH_FIELDS = ("width", "ngf", "ndf", "text_dim")


def shrink_every_model(params_file, batch_size: int, width: int) -> list[str]:
    """`--set` overrides that make every model of a params file tiny: one epoch, `batch_size`, every
    width field `width`. A model added to params.yaml is then small in every pipeline test too."""
    from components.config import read_params_raw

    overrides, raw = [], read_params_raw(params_file)
    for section in ("train", "latent"):
        for name, entry in raw[section].items():
            overrides += [f"{section}.{name}.epochs=1", f"{section}.{name}.batch_size={batch_size}"]
            overrides += [f"{section}.{name}.{field}={width}" for field in WIDTH_FIELDS if field in entry]
    return overrides

# The evaluate settings that tests constructing an EvaluateConfig by hand do not exercise.
EVALUATE_EXTRAS = {"inception": {"mode": "never", "samples": 10000, "cpu_samples": 0},
                   "augment": {"real_per_class": 5, "generated_per_class": 10},
                   "guidance": {"scales": [0.0, 2.0], "samples": 20}}
