"""One self-contained HTML report per registered version: its scores, lineage and promotion
decision; its images at a fixed seed beside the champion's (or the challenger's) at the same seed;
an interpolation strip; the nearest training images of a few samples; the evaluation's pictures;
and the training curves. Built from the registry, the version's own files and the dataset."""
from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from components.evaluation.grid import png_bytes
from components.reporting.html import Picture, Section, render
from components.reporting.pictures import interpolation_strip, nearest_real, neighbour_rows, strip_kind

NEIGHBOUR_SAMPLES = 8   # samples whose nearest training images are shown
NEIGHBOURS = 3
CURVES = 8              # training metrics drawn, at most
REPORT_ARTIFACT = "report/report.html"  # where a registered version's report lies in its run


# The section of interpolation_strip's picture, by task kind: (title, what a row shows).
STRIP_TEXT = {
    "generate": ("Interpolation", "Each row walks between two latent points (spherical, between prior draws)."),
    "reconstruct": ("Interpolation", "Each row walks between two latent points (straight, between the codes of "
                                     "two held-out images)."),
    "translate": ("Restorations", "Each row: a held-out image's degraded input, each classical baseline, the "
                                  "model and the original, with PSNR (dB) and SSIM against the original (inside "
                                  "the hole for inpainting)."),
    "complete": ("Completions", "Each row: a held-out image's top half, completions of its bottom half drawn "
                                "pixel by pixel, and the original."),
}


class ReportError(ValueError):
    """The report cannot be made: an unknown model, version or alias, or missing data."""


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    model_aliases: dict[str, str]  # every alias of the registered model → the version it names
    tags: dict[str, str]
    run_id: str | None

    @property
    def aliases(self) -> tuple[str, ...]:
        """The aliases naming this version."""
        return tuple(sorted(a for a, v in self.model_aliases.items() if v == self.version))


def resolve(spec: str) -> Version:
    """NAME@ALIAS or NAME/VERSION → the registered version, with a clear error when absent."""
    from mlflow.exceptions import MlflowException

    from components.tracking.runs import client

    c = client()
    name, sep, alias = spec.partition("@")
    version = None
    if not sep:
        name, _, version = spec.partition("/")
    if not name or not (alias or version):
        raise ReportError(f"{spec}: name a registered version as NAME@ALIAS or NAME/VERSION, "
                          f"e.g. fashion-mnist-dcgan@champion")
    try:
        mv = c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, version)
        aliases = {a: str(v) for a, v in c.get_registered_model(name).aliases.items()}
    except MlflowException as exc:
        raise ReportError(f"{spec}: {exc.message}") from None
    return Version(name, str(mv.version), aliases, dict(mv.tags), mv.tags.get("training_run_id") or mv.run_id)


def _other(version: Version) -> tuple[str, str] | None:
    """(alias, version) to compare with: the champion, or for the champion itself its challenger."""
    for alias in ("champion", "challenger"):
        other = version.model_aliases.get(alias)
        if other is not None and other != version.version:
            return alias, other
    return None


def _load(version: Version, into: Path):
    """The version's model, rebuilt from its registered files with today's code, and its family's kind."""
    import json

    import mlflow.artifacts

    from components.models import FAMILIES
    from components.tracking.model_files import load_trained_model

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}",
                                                     dst_path=str(into)))
    specs = sorted(local.glob("artifacts/*/model.json"))
    if not specs:
        raise ReportError(f"{version.name} v{version.version}: its registered files hold no model.json")
    family = json.loads(specs[0].read_text())["family"]
    if problem := FAMILIES.problem("family", family):
        raise ReportError(f"{version.name} v{version.version}: {problem}")
    try:
        return load_trained_model(specs[0].parent), FAMILIES.get(family).kind
    except (ValueError, RuntimeError, KeyError) as exc:  # config or weights today's code cannot read
        raise ReportError(f"{version.name} v{version.version}: today's code cannot load it "
                          f"({type(exc).__name__}: {str(exc)[:300]})") from None


def _picture(caption: str, images_u8: torch.Tensor, nrow: int | None = None, scale: int = 2) -> Picture:
    png = png_bytes(images_u8, nrow)
    return Picture(caption, png, Image.open(io.BytesIO(png)).width * scale)


def _curves(run_id: str | None) -> list[tuple[str, dict[str, list[tuple[float, float]]]]]:
    from mlflow.exceptions import MlflowException

    from components.tracking.runs import client

    if not run_id:
        return []
    c = client()
    try:
        # Losses first: with many metrics logged, they are the curves people look for.
        keys = sorted((k for k in c.get_run(run_id).data.metrics if not k.startswith("eval.")),
                      key=lambda k: ("loss" not in k, k))[:CURVES]
        return [(key, {key: [(m.step, m.value) for m in c.get_metric_history(run_id, key)]}) for key in keys]
    except MlflowException:
        return []  # a training run of another store: the report says there are no curves


def _eval_pictures(run_id: str | None, into: Path) -> list[Picture]:
    """The evaluation's grid and pictures logged with the version (latent traversals, projections)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    if not run_id:
        return []
    try:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="eval", dst_path=str(into)))
    except (MlflowException, OSError):
        return []
    pictures = []
    for path in sorted(local.rglob("*.png")):
        pictures.append(Picture(path.relative_to(local).as_posix(), path.read_bytes(), 2 * Image.open(path).width))
    return pictures


def build_report(spec: str, data_dir: Path, seed: int = 0, count: int = 64) -> str:
    """The HTML report of the registered version `spec` (NAME@ALIAS or NAME/VERSION); `data_dir` is
    the packed dataset it was trained on (its test split is the reference, its train split is
    searched for near copies)."""
    from components.data.pack import DataError, load_split
    from components.evaluation.evaluate import draw_images, evaluation_grid
    from components.evaluation.restoration import MODEL
    from components.tracking.champion_samples import registered_images, registered_translations

    if count < 1:
        raise ReportError(f"-n {count}: draw at least one image")
    version = resolve(spec)
    try:
        reference, _ = load_split(data_dir, "test")
        train, _ = load_split(data_dir, "train")
    except DataError as exc:
        raise ReportError(f"--data {data_dir}: {exc}") from None
    reference = reference[:count]
    with tempfile.TemporaryDirectory(prefix="genpipe-report-") as tmp:
        model, kind = _load(version, Path(tmp) / "model")
        images, restorations = draw_images(model, kind, reference, seed)
        shown, nrow = evaluation_grid(model, kind, images, reference, count, restorations, name=f"v{version.version}")
        sections = [_summary(version, kind)]
        pictures = [_picture(f"v{version.version} at seed {seed} (drawn with today's code)", shown, nrow)]
        other = _other(version)
        if other is not None:
            alias, other_version = other
            uri = f"models:/{version.name}/{other_version}"
            try:
                theirs_restored = None
                if restorations is not None:  # the very inputs (and masks) above, sent to its pyfunc
                    theirs_restored = registered_translations(uri, restorations)
                    theirs = theirs_restored.outputs[MODEL]
                else:
                    theirs = torch.from_numpy(registered_images(uri, reference.numpy(), seed)[0])
                theirs_shown, _ = evaluation_grid(model, kind, theirs, reference, count, theirs_restored,
                                                  name=f"v{other_version}")
                pictures.append(_picture(f"{alias} v{other_version} at seed {seed} (its own registered code)",
                                         theirs_shown, nrow))
            except RuntimeError as exc:  # RegisteredModelUnloadable, or another failure of its child process
                pictures.append(Picture(f"{alias} v{other_version} could not be drawn: {exc}"[:300],
                                        png_bytes(torch.zeros(1, 1, 8, 8, dtype=torch.uint8)), 16))
        sections.append(Section("Images at the same seed", "The same requests at the same seed; each version is "
                                "drawn as noted, so a difference is the models' unless their code differs.",
                                pictures=pictures))
        strip = interpolation_strip(model, kind, reference, seed=seed)
        title, text = STRIP_TEXT[strip_kind(model, kind)]
        sections.append(Section(title, text, pictures=[_picture(title.lower(), strip, nrow=strip.shape[0] // 4)]))
        sections.append(_neighbours(images[:NEIGHBOUR_SAMPLES], reference[:NEIGHBOUR_SAMPLES], train))
        evaluation = _eval_pictures(version.run_id, Path(tmp) / "eval")
        if evaluation:
            sections.append(Section("Evaluation pictures", "As logged by the evaluation.", pictures=evaluation))
        curves = _curves(version.run_id)
        sections.append(Section("Training curves", "" if curves else "No training metrics found for this version.",
                                charts=curves))
    return render(f"{version.name} v{version.version}", sections)


def _summary(version: Version, kind: str) -> Section:
    tags = version.tags
    rows = [("aliases", ", ".join(version.aliases) or "none"), ("task kind", kind)]
    rows += [(k.removeprefix("metric."), _number(v)) for k, v in sorted(tags.items()) if k.startswith("metric.")]
    rows += [(tag, tags[tag]) for tag in ("metrics_stale", "inception_stale") if tag in tags]  # stale_scores.py
    rows += [(k, v) for k, v in sorted(tags.items()) if k.startswith("promotion.")]
    rows += [(k, tags[k]) for k in ("dataset_version", "model_md5", "evaluator_md5", "params_hash", "git_commit",
                                    "training_run_id", "protocol_key", "inception_protocol") if k in tags]
    return Section("Scores, decision and lineage", table=rows)


def _number(text: str) -> str:
    """A stored metric as people read it: 4 significant digits."""
    try:
        return f"{float(text):.4g}"
    except ValueError:
        return text


def _neighbours(samples: torch.Tensor, real_test: torch.Tensor, train: torch.Tensor) -> Section:
    """Samples beside their nearest training images, with held-out real images as the scale: a
    sample much nearer its neighbour than a fresh real image is to its own is a near copy."""
    indices, distances = nearest_real(samples, train, NEIGHBOURS)
    _, real_distances = nearest_real(real_test, train, 1)
    note = (f"Each row: a sample, then its {NEIGHBOURS} nearest training images (pixel distance). Nearest "
            f"distances of these samples: {', '.join(f'{d:.2f}' for d in distances[:, 0].tolist())}; of "
            f"held-out real images, for scale: median {real_distances[:, 0].median():.2f}.")
    return Section("Nearest training images (memorisation check)", note,
                   pictures=[_picture("sample | nearest training images", neighbour_rows(samples, train, indices),
                                      nrow=NEIGHBOURS + 1)])


def log_report(name: str, version: str, data_dir: Path) -> str:
    """Build the version's report and log it with the version's run as `report/report.html`; returns
    the artifact's URI."""
    from components.tracking.runs import client

    page = build_report(f"{name}/{version}", data_dir)
    c = client()
    run_id = c.get_model_version(name, version).run_id
    c.log_text(run_id, page, REPORT_ARTIFACT)
    return f"runs:/{run_id}/{REPORT_ARTIFACT}"
