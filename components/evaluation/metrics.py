"""Metrics, found by name in METRICS. Each takes an EvalContext and returns a flat dict; the same
dict goes to metrics.json (DVC) and MLflow.

The evaluator classifier's features of the real and the generated images are extracted once per
evaluation (lazily, on first use) and shared by every metric; so are a reconstructing model's
reconstructions and the real set's k-NN radii.

Every stage command imports this registry (params.yaml's validation checks metric names), so the
metric maths (features, intervals, manifold) is imported where it is used: only the evaluate stage
depends on it (dvc.yaml), and a change to it reruns evaluations, not ingestion and training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Callable

import torch

from components.config import AugmentConfig, BootstrapConfig, ClassifierConfig
from components.evaluation.classifier import Classifier, accuracy, train_classifier
from components.images import to_model_input
from components.models.base import GenerativeModel
from components.registry import Registry

if TYPE_CHECKING:
    from components.evaluation import features as F
    from components.evaluation.inception import InceptionReference
    from components.evaluation.restoration import Restorations, RestorationScores

# A perfect reconstruction has PSNR +inf, and a non-finite metric fails the evaluation: each image's
# PSNR is capped here (an error below 1e-10 of the range, far under one 8-bit grey level's 1.5e-5).
PSNR_CAP_DB = 100.0


@dataclass
class EvalContext:
    model: GenerativeModel | None  # None when scoring stored samples: model-based metrics skip
    classifier: Classifier
    real: torch.Tensor  # held-out real images, float in [-1, 1]
    fake: torch.Tensor  # generated images, float in [-1, 1]
    kid_subset_size: int
    batch_size: int = 500
    nearest_k: int | None = None  # k of the k-NN manifolds; needed by precision_recall, density_coverage
    bootstrap: BootstrapConfig | None = None  # None: FID and KID without intervals
    seed: int = 0  # of the bootstrap resamples and the ELBO's latent draws
    real_labels: torch.Tensor | None = None  # class ids of `real`; conditional models' ELBO and CAS need them
    train_u8: torch.Tensor | None = None  # the real training images (uint8); fid_floor needs them
    classifier_config: ClassifierConfig | None = None  # the `classifier:` params; CAS and augment train with them
    train_labels: torch.Tensor | None = None  # class ids of train_u8; augment needs them
    augment: AugmentConfig | None = None  # the `evaluate.augment` params
    inception: InceptionReference | None = None  # the `inception` stage's real side; the inception metric needs it
    kind: str = "generate"  # the model's task kind: what its images to score are (grid.EVALUATION_IMAGES)
    restorations: Restorations | None = None  # translate: `real` degraded and restored (`fake` is the model's)

    @cached_property
    def real_features(self) -> F.FeatureSet:
        from components.evaluation import features as F
        
        return F.extract(self.classifier, self.real, self.batch_size)

    @cached_property
    def fake_features(self) -> F.FeatureSet:
        from components.evaluation import features as F
        
        return F.extract(self.classifier, self.fake, self.batch_size)

    @cached_property
    def manifold(self) -> dict[str, float]:
        from components.evaluation.manifold import knn_radii, manifold_scores
        
        if self.nearest_k is None:
            raise ValueError("precision_recall and density_coverage need evaluate.nearest_k (the k of the k-NN balls)")
        real = self.real_features.features
        return manifold_scores(real, self.fake_features.features, self.nearest_k, knn_radii(real, self.nearest_k))

    @cached_property
    @torch.no_grad()
    def reconstructions(self) -> torch.Tensor:
        """The model's reconstructions of `real`, in [-1, 1], on the CPU."""
        device = next(self.model.parameters()).device
        return torch.cat([self.model.reconstruct(x.to(device)).cpu() for x in self.real.split(self.batch_size)])

    @cached_property
    def restoration(self) -> RestorationScores:
        """A translate model's per-image PSNR and SSIM, and every baseline's, of `real` (restoration.py)."""
        return self.restorations.scores()

    def with_mean_interval(self, metric: str, per_image: torch.Tensor) -> dict[str, float]:
        """{metric: the mean of per-image scores (N,)}, with its bootstrap interval over images."""
        from components.evaluation.intervals import mean_interval

        out = {metric: float(per_image.double().mean())}
        if self.bootstrap is not None:
            low, high = mean_interval(per_image, self.bootstrap.samples, self.bootstrap.alpha, self.seed)
            out.update({f"{metric}_ci_low": low, f"{metric}_ci_high": high})
        return out

    def with_interval(self, metric: str, value: float) -> dict[str, float]:
        from components.evaluation.intervals import bootstrap_interval
        
        out = {metric: value}
        if self.bootstrap is not None:
            low, high = bootstrap_interval(metric, self.real_features.features, self.fake_features.features,
                                           self.bootstrap.samples, self.bootstrap.alpha, self.seed)
            out.update({f"{metric}_ci_low": low, f"{metric}_ci_high": high})
        return out


METRICS: Registry[Callable[[EvalContext], dict[str, float]]] = Registry("metric")

# Metrics that mean nothing for a task kind, and why: the evaluation skips them and says so.
# (A metric that merely lacks its inputs, such as cas without labels, returns {} instead.)
NOT_FOR_KIND: dict[str, dict[str, str]] = {
    "translate": {
        "class_coverage": "a translate model restores the reference images, so its outputs' classes are the "
                          "reference's: coverage would measure the inputs, not the model",
        "inception_score": "the outputs' class spread is the reference's (restorations of it): the score would "
                           "measure the inputs, not the model",
        "cas": "a translate model draws no labelled samples to train a classifier on",
        "augment": "a translate model draws no labelled samples to add to scarce real data",
        "elbo": "a translate model declares no likelihood",
        "nll": "a translate model declares no likelihood",
        "recon_mse": "psnr measures a translate model's restoration error (inside the mask where there is one)",
    },
}


def skipped_for_kind(metrics: list[str], kind: str) -> dict[str, str]:
    """Which of `metrics` an evaluation of a `kind` model skips, and why."""
    reasons = NOT_FOR_KIND.get(kind, {})
    return {name: reasons[name] for name in metrics if name in reasons}


@METRICS.register("fid")
def fid_metric(ctx: EvalContext) -> dict[str, float]:
    from components.evaluation import features as F

    return ctx.with_interval("fid", F.fid(ctx.real_features.features, ctx.fake_features.features))


@METRICS.register("kid")
def kid_metric(ctx: EvalContext) -> dict[str, float]:
    from components.evaluation import features as F

    mean, std = F.kid(ctx.real_features.features, ctx.fake_features.features, ctx.kid_subset_size)
    return {**ctx.with_interval("kid", mean), "kid_std": std}


def floor_subset(train_u8: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` real training images, a seeded random subset, to set the FID floor against a reference
    of that size."""
    if train_u8.shape[0] < count:
        raise ValueError(f"fid_floor needs {count} training images (evaluate.num_samples), the train split has "
                         f"{train_u8.shape[0]}; lower evaluate.num_samples or drop fid_floor from evaluate.metrics")
    return train_u8[torch.randperm(train_u8.shape[0], generator=torch.Generator().manual_seed(seed))[:count]]


@METRICS.register("fid_floor")
def fid_floor(ctx: EvalContext) -> dict[str, float]:
    """FID of real training images against the reference, as many and through the same protocol
    (compared at the reference's size): what a perfect model of the data would score, the dataset's
    floor beside every FID. Skipped without the training images."""
    from components.evaluation import features as F

    if ctx.train_u8 is None:
        return {}
    device = next(ctx.classifier.parameters()).device
    train = to_model_input(floor_subset(ctx.train_u8, ctx.real.shape[0], ctx.seed), ctx.real.shape[-1], device)
    return {"fid_floor": F.fid(F.extract(ctx.classifier, train, ctx.batch_size).features, ctx.real_features.features)}


@METRICS.register("inception")
def inception(ctx: EvalContext) -> dict[str, float]:
    """Standard FID and KID: Inception-v3 features under the published protocol (inception.py) of the
    model's images against the `inception` stage's reference, as many as it holds, at the evaluation
    seed; with the dataset's Inception FID floor. Skipped without the model or a reference, or with an
    empty one (evaluate.inception decided so on the stage's machine, and said why)."""
    ref = ctx.inception
    if ctx.model is None or ref is None or len(ref) < 2:
        return {}
    from components.evaluation import features as F
    from components.evaluation.grid import evaluation_images
    from components.evaluation.inception import inception_features

    device = str(next(ctx.model.parameters()).device)
    fake = inception_features(evaluation_images(ctx.model, ctx.kind, ref.images, ctx.seed), device)  # (N, 2048)
    with torch.random.fork_rng(devices=[]):  # KID's subsets from the seed alone, whatever metrics ran before
        torch.manual_seed(ctx.seed)
        mean, std = F.kid(ref.features, fake, ctx.kid_subset_size)
    out = {"inception_fid": F.fid(ref.features, fake), "inception_kid": mean, "inception_kid_std": std}
    if "inception_fid_floor" in ref.info:
        out["inception_fid_floor"] = ref.info["inception_fid_floor"]
    return out


@METRICS.register("class_coverage")
def class_coverage(ctx: EvalContext) -> dict[str, float]:
    """How many classes the samples cover (each ≥ half its fair share) and how confidently."""
    probs = ctx.fake_features.probs
    k = probs.shape[1]
    share = torch.bincount(probs.argmax(dim=1), minlength=k).float() / probs.shape[0]
    return {"classes_covered": int((share >= 0.5 / k).sum()), "sample_confidence": float(probs.max(dim=1).values.mean())}


def inception_score(probs: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) ‖ p(y))) over the whole set (Salimans et al., 2016), with the evaluator
    classifier's p(y|x): 1 when every sample gets the same prediction, K for confident predictions
    spread evenly over K classes."""
    probs = probs.double()
    marginal = probs.mean(dim=0, keepdim=True)  # p(y)
    kl = (torch.special.xlogy(probs, probs) - torch.special.xlogy(probs, marginal)).sum(dim=1)
    return float(kl.mean().exp())


@METRICS.register("inception_score")
def inception_score_metric(ctx: EvalContext) -> dict[str, float]:
    return {"inception_score": inception_score(ctx.fake_features.probs)}


@METRICS.register("precision_recall")
def precision_recall(ctx: EvalContext) -> dict[str, float]:
    return {key: ctx.manifold[key] for key in ("precision", "recall")}


@METRICS.register("density_coverage")
def density_coverage(ctx: EvalContext) -> dict[str, float]:
    return {key: ctx.manifold[key] for key in ("density", "coverage")}


@METRICS.register("recon_mse")
def recon_mse(ctx: EvalContext) -> dict[str, float]:
    """Mean squared reconstruction error in [0, 1] pixel units; only models that reconstruct."""
    if not hasattr(ctx.model, "reconstruct"):
        return {}
    return {"recon_mse": float(((ctx.reconstructions - ctx.real.cpu()) / 2).pow(2).mean())}


def _unit_range(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().cpu() + 1) / 2).clamp(0, 1)


@METRICS.register("psnr")
def psnr(ctx: EvalContext) -> dict[str, float]:
    """Mean per-image PSNR (dB, data range [0, 1]) of reconstructions, each capped at PSNR_CAP_DB.
    A translate model's (restoration.py): `psnr` with its interval, `psnr_<baseline>` for each
    classical baseline of the same inputs, and `psnr_gain` (with its interval, paired per image) over
    the best baseline; inside the mask for a family that takes one."""
    if ctx.kind == "translate":
        return _translate_psnr(ctx)
    if not hasattr(ctx.model, "reconstruct"):
        return {}
    from torchmetrics.functional.image import peak_signal_noise_ratio

    per_image = peak_signal_noise_ratio(_unit_range(ctx.reconstructions), _unit_range(ctx.real), data_range=1.0,
                                        reduction="none", dim=(1, 2, 3))
    return {"psnr": float(per_image.clamp(max=PSNR_CAP_DB).mean())}


def _translate_scores(ctx: EvalContext, metric: str) -> dict[str, float]:
    """A translate model's per-image `metric` ("psnr", "ssim"): its mean with an interval, and each
    classical baseline's mean as `<metric>_<baseline>`."""
    from components.evaluation.restoration import MODEL

    scores = getattr(ctx.restoration, metric)
    out = ctx.with_mean_interval(metric, scores[MODEL])
    out.update({f"{metric}_{name}": float(values.double().mean()) for name, values in scores.items() if name != MODEL})
    return out


def _translate_psnr(ctx: EvalContext) -> dict[str, float]:
    from components.evaluation.restoration import MODEL

    if ctx.restorations is None:
        return {}
    out = _translate_scores(ctx, "psnr")
    best = ctx.restoration.best_baseline()
    if best is not None:
        scores = ctx.restoration.psnr
        out.update(ctx.with_mean_interval("psnr_gain", scores[MODEL] - scores[best]))
    return out


@METRICS.register("ssim")
def ssim(ctx: EvalContext) -> dict[str, float]:
    """Mean SSIM (Wang et al., 2004; 11-px Gaussian window, data range [0, 1]) of reconstructions.
    A translate model's (restoration.py): `ssim` with its interval and `ssim_<baseline>` for each
    classical baseline; inside the mask for a family that takes one."""
    if ctx.kind == "translate":
        return _translate_ssim(ctx)
    if not hasattr(ctx.model, "reconstruct"):
        return {}
    from torchmetrics.functional.image import structural_similarity_index_measure

    recon, real = _unit_range(ctx.reconstructions), _unit_range(ctx.real)
    per_image = torch.cat([structural_similarity_index_measure(r, x, data_range=1.0, reduction="none")
                           for r, x in zip(recon.split(ctx.batch_size), real.split(ctx.batch_size))])
    return {"ssim": float(per_image.mean())}


def _translate_ssim(ctx: EvalContext) -> dict[str, float]:
    return {} if ctx.restorations is None else _translate_scores(ctx, "ssim")


@METRICS.register("elbo")
@torch.no_grad()
def elbo(ctx: EvalContext) -> dict[str, float]:
    """ELBO (nats per image) of the held-out images and its bits/dim, −ELBO / (C·H·W · ln 2), for
    models that declare a `likelihood` (VAE families: Bernoulli decoder on pixel intensities in
    [0, 1], as they are trained). One latent draw per image from a seeded generator. The β weight
    is left out: this is the true bound, recon + KL, whatever β trained the model. Conditional
    models need the real images' labels (ctx.real_labels) and are skipped without them."""
    model = ctx.model
    if getattr(model, "likelihood", None) is None or (model.conditional and ctx.real_labels is None):
        return {}
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(ctx.seed)
    # Unconditional models ignore the labels their training step is given.
    labels = ctx.real_labels if ctx.real_labels is not None else torch.zeros(ctx.real.shape[0], dtype=torch.long)
    total, was_training = 0.0, model.training
    model.eval()  # batch norm with its running statistics, and none of them updated by this pass
    try:
        with torch.no_grad():
            for x, y in zip(ctx.real.split(ctx.batch_size), labels.split(ctx.batch_size)):
                logs = {k: v for _, out in model.training_losses(x.to(device), y.to(device), generator)
                        for k, v in out.logs.items()}
                total += float(logs["recon"] + logs["kl"]) * x.shape[0]  # both are means per image
    finally:
        model.train(was_training)
    negative_elbo = total / ctx.real.shape[0]
    dims = math.prod(ctx.real.shape[1:])
    return {"elbo": -negative_elbo, "bits_per_dim": negative_elbo / (dims * math.log(2))}


@METRICS.register("nll")
@torch.no_grad()
def nll(ctx: EvalContext) -> dict[str, float]:
    """The exact negative log-likelihood of the held-out 8-bit images in bits/dim, `nll_bits_per_dim`
    (a discrete likelihood, comparable with published 8-bit ones, unlike the VAE's continuous bound in
    `bits_per_dim`), for models that have one (autoregressive families: `nats_per_image`), beside a
    per-pixel histogram's: each pixel's 256 values counted over the training images (plus one,
    Laplace), as if pixels were independent. A model that beats the histogram has learnt how pixels
    depend on each other. The histogram needs training images of the reference's size."""
    model = ctx.model
    if model is None or not hasattr(model, "nats_per_image"):
        return {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:  # small batches: the logits of one 784-pixel image are 784×256 floats
        nats = torch.cat([model.nats_per_image(x.to(device)).double().cpu() for x in ctx.real.split(50)])
    finally:
        model.train(was_training)
    dims = math.prod(ctx.real.shape[1:])
    out = {"nll_bits_per_dim": float(nats.mean()) / (dims * math.log(2))}
    if ctx.train_u8 is not None and ctx.train_u8.shape[1:] == ctx.real.shape[1:]:
        out["histogram_bits_per_dim"] = histogram_bits_per_dim(ctx.train_u8, ctx.real)
    return out


def histogram_bits_per_dim(train_u8: torch.Tensor, real: torch.Tensor) -> float:
    """bits/dim of `real` (float in [-1, 1] holding 8-bit values) under one histogram per pixel
    position of train_u8 (uint8 N×C×H×W), Laplace-smoothed."""
    dims = train_u8[0].numel()
    offsets = torch.arange(dims) * 256  # pixel d's value v is bin d·256 + v
    counts = torch.ones(dims * 256, dtype=torch.float64)  # Laplace: one of each value at every pixel
    for chunk in train_u8.split(2000):  # a chunk at a time: the whole split as int64 would be GBs
        counts += torch.bincount((chunk.flatten(1).long() + offsets).flatten(), minlength=dims * 256)
    counts = counts.view(dims, 256)
    log_p = (counts / counts.sum(1, keepdim=True)).log()
    values = ((real.flatten(1).double() + 1) * 127.5).round().long()  # (M, D)
    return float(-log_p.gather(1, values.t().contiguous()).mean()) / math.log(2)


@METRICS.register("cas")
def classification_accuracy_score(ctx: EvalContext) -> dict[str, float]:
    """Classification accuracy score (Ravuri & Vinyals, 2019): the evaluator's architecture trained
    with the `classifier:` params on the model's labelled samples (as many as the reference holds,
    classes in turn, at the evaluation seed), then tested on the labelled reference. Only for
    conditional models with the real labels; otherwise skipped."""
    model = ctx.model
    if model is None or not model.conditional or ctx.real_labels is None:
        return {}
    if ctx.classifier_config is None:
        raise ValueError("the cas metric needs the `classifier:` params (EvalContext.classifier_config)")
    from components.evaluation.grid import sample_uint8

    n = ctx.real.shape[0]
    labels = torch.arange(n) % model.num_classes  # the evaluation's own draw when num_classes divides its batch
    fake_u8 = sample_uint8(model, n, ctx.seed, labels=labels)  # (n, C, size, size)
    device = next(ctx.classifier.parameters()).device
    # train_classifier seeds the global RNG; fork it so the metrics listed after this one (KID's
    # subsets) draw what they would without it.
    with torch.random.fork_rng(devices=[]):
        judge = train_classifier(fake_u8, labels, model.num_classes, ctx.classifier_config, device, progress=False)
    return {"cas": accuracy(judge, ctx.real, ctx.real_labels.to(torch.long).cpu())}


@METRICS.register("augment")
def augment(ctx: EvalContext) -> dict[str, float]:
    """Accuracy gain of a classifier trained on scarce real data when the model's samples are added."""
    from components.evaluation.augment import augment_scores

    return augment_scores(ctx)
