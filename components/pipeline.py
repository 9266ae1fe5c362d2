"""The DVC stages' work, one function each: read inputs from explicit paths, call the pure
components, write outputs atomically. The `genpipe` CLI calls these; so does `dvc repro`."""
from __future__ import annotations

import contextlib

import hashlib
import json
from pathlib import Path

from components.config import Params, config_hash
from components.data.pack import dataset_version, load_split, read_manifest, staged_dir
from components.state import checkpoint_path, device
from components.training.checkpoint import load_weights, save_weights, write_json


def source_hash(*parts: str) -> str:
    """Hash of the Python sources of components packages and modules (e.g. "models", "images.py"):
    a checkpoint resumes only on the same code."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for part in parts:
        files = [root / part] if part.endswith(".py") else sorted((root / part).rglob("*.py"))
        for path in files:
            digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def ingest_stage(params: Params, out_dir: Path, metrics_path: Path) -> dict:
    from components.data.ingest import ingest

    summary = ingest(params.data, Path(out_dir))
    write_json(summary, Path(metrics_path))
    log_ingest_run(params, Path(out_dir), summary)
    return summary


def log_ingest_run(params: Params, data_dir: Path, summary: dict) -> None:
    """The ingest as an MLflow run of the `<data.name>-ingest` experiment: its counts, the data params
    and the report (report.json, contact sheet, every file left out). The report is also in the dataset
    folder (DVC), so an unreachable tracking server costs a warning, not the ingest."""
    import warnings

    from components.tracking.runs import client, ensure_experiment

    files = [data_dir / name for name in ("report.json", "contact_sheet.png", "rejected.jsonl")]
    run_id = None
    try:
        c = client()
        run_id = c.create_run(ensure_experiment(f"{params.data.name}-ingest"), run_name="ingest",
                              tags={"dataset_version": dataset_version(data_dir)}).info.run_id
        c.log_batch(run_id, params=_params_of(params.data.model_dump(mode="json")))
        for key, value in summary.items():
            c.log_metric(run_id, key, float(value))
        for path in files:
            if path.is_file():
                c.log_artifact(run_id, str(path), artifact_path="report")
        c.set_terminated(run_id)
    except Exception as exc:  # noqa: BLE001 - any tracking failure; the dataset itself is done
        warnings.warn(f"the ingest report was not logged to MLflow ({type(exc).__name__}: {exc}); it is in {data_dir}")
        if run_id is not None:
            with contextlib.suppress(Exception):  # not left RUNNING when the server still answers
                c.set_terminated(run_id, status="FAILED")


def _params_of(config: dict, prefix: str = "data.") -> list:
    from mlflow.entities import Param

    flat = []
    for key, value in config.items():
        if isinstance(value, dict):
            flat += _params_of(value, f"{prefix}{key}.")
        else:
            flat.append(Param(f"{prefix}{key}", str(value)))
    return flat


def classifier_stage(params: Params, data_dir: Path, out_dir: Path, metrics_path: Path) -> dict:
    from components.evaluation.classifier import accuracy, classifier_spec, train_classifier

    manifest = read_manifest(data_dir)
    images, labels = load_split(data_dir, "train")
    test_images, test_labels = load_split(data_dir, "test")
    num_classes = len(manifest["classes"])
    model = train_classifier(images, labels, num_classes, params.classifier, device())
    metrics = {"test_accuracy": accuracy(model, test_images, test_labels)}
    print(f"classifier test accuracy: {metrics['test_accuracy']:.4f}")
    with staged_dir(out_dir) as tmp:
        save_weights(model, tmp / "classifier.safetensors")
        write_json({**classifier_spec(params.classifier, images.shape[1], num_classes),
                    "dataset_version": dataset_version(data_dir)}, tmp / "classifier.json")
    write_json(metrics, Path(metrics_path))
    return metrics


def load_classifier(classifier_dir: Path):
    """The classifier stage's network of the arch its classifier.json records (none recorded: cnn)."""
    from components.evaluation.classifier import build_classifier

    spec = json.loads((Path(classifier_dir) / "classifier.json").read_text())
    return load_weights(build_classifier(spec), Path(classifier_dir) / "classifier.safetensors").to(device()).eval()


def train_stage(params: Params, name: str, data_dir: Path, out_dir: Path, metrics_path: Path,
                classifier_dir: Path | None = None, autoencoder_dir: Path | None = None) -> dict:
    """Train train.<name>; with classifier_dir (the evaluator), a generate-kind model's samples are
    watched for mode collapse every tracking.sentinel_every steps, and a family that uses_evaluator
    (srgan) trains on its features (classifier_dir is then required). Under torchrun (WORLD_SIZE > 1)
    each process trains on its slice of every global batch; rank 0 alone logs, checkpoints and
    writes the outputs, and the others wait for it (components.training.distributed). A model of the
    latent section is built on its trained autoencoder (autoencoder_dir), which it holds frozen: its
    model.json records the autoencoder's own spec under `parts`, so the saved model loads alone."""
    from contextlib import nullcontext

    from components.models import FAMILIES, build_model
    from components.tracking.model_files import save_trained_model
    from components.tracking.runs import training_run
    from components.training.checkpoint import save_state
    from components.training.distributed import nothing_to_monitor, process_group
    from components.training.trainer import Trainer

    cfg = params.model(name)
    manifest = read_manifest(data_dir)
    images, labels = load_split(data_dir, "train")
    channels, classes = images.shape[1], manifest["classes"]
    parts, part_specs = trained_parts(params, name, autoencoder_dir)
    model = build_model(cfg, channels, len(classes), classes, parts=parts)  # initial weights from cfg.seed
    evaluator_key = ""
    if FAMILIES.get(cfg.family).uses_evaluator:  # e.g. srgan's perceptual loss on the evaluator's features
        if classifier_dir is None:
            raise ValueError(f"train.{name}: the {cfg.family} family trains on the evaluator classifier's "
                             f"features; pass its folder (genpipe train {name} --classifier artifacts/classifier)")
        model.set_evaluator(load_classifier(classifier_dir))
        weights = (Path(classifier_dir) / "classifier.safetensors").read_bytes()
        evaluator_key = "-" + hashlib.sha256(weights).hexdigest()[:16]
    registered_name = f"{params.data.name}-{name}"
    data_version = dataset_version(data_dir)
    tags = {"genpipe.stage": params.stage_of("train", name),
            "dataset_version": data_version,  # model.json's name and value
            "genpipe.model_params_hash": config_hash(cfg), "genpipe.family": cfg.family}
    checkpoint = checkpoint_path(registered_name)
    with process_group(device()) as workers:  # a plain run: one worker, no process group
        tags["genpipe.processes"] = str(workers.world_size)
        monitor = None
        if classifier_dir is not None and FAMILIES.get(cfg.family).kind == "generate":
            from components.training.sentinel import class_histogram_sentinel

            monitor = (class_histogram_sentinel(load_classifier(classifier_dir), len(classes)) if workers.is_main
                       else nothing_to_monitor)
        run = (training_run(registered_name, run_name=f"train-{name}", params=cfg.model_dump(), tags=tags)
               if workers.is_main else nullcontext())
        # A checkpoint resumes only under the same data, training code and rollback rule (and, for a
        # family trained on its features, the same evaluator).
        resume_key = (f"{data_version}-{source_hash('models', 'training', 'images.py')}-"
                      f"{config_hash(params.divergence)}{evaluator_key}{_parts_key(part_specs)}")
        with run as log_metrics:
            trainer = Trainer(model, cfg, name=name, section=params.section_of(name),
                              log_every=params.tracking.log_every,
                              checkpoint_every=params.tracking.checkpoint_every,
                              checkpoint_path=checkpoint, resume_key=resume_key, log_fn=log_metrics,
                              device=workers.device, divergence=params.divergence, monitor_fn=monitor,
                              sentinel_every=params.tracking.sentinel_every, progress=workers.is_main,
                              workers=workers)
            metrics = trainer.fit(images, labels)  # the model now holds the EMA weights (when ema_decay > 0)
            if workers.is_main:
                spec = {"family": cfg.family, "config": cfg.model_dump(mode="json"), "channels": channels,
                        "num_classes": len(classes), "classes": classes, "dataset": params.data.name,
                        "dataset_version": data_version, "steps": trainer.step,
                        **({"parts": part_specs} if part_specs else {})}
                with staged_dir(out_dir) as tmp:
                    save_trained_model(model, spec, tmp)
                    if cfg.ema_decay > 0:  # the weights before averaging, to measure what the EMA gains
                        save_state(trainer.live_state_dict(), tmp / "live.safetensors")
                    write_json({"run_id": log_metrics.run_id, "experiment": registered_name}, tmp / "run.json")
        if workers.is_main:
            write_json(metrics, Path(metrics_path))
            # The outputs are in place: the checkpoint has done its job. Its resume key covers the data and
            # the models/training code only, while DVC also reruns this stage for other changes (pipeline,
            # packing, config code); a finished checkpoint kept here would then be returned as the result.
            # Only a kill between the final checkpoint and the outputs reuses it.
            checkpoint.unlink(missing_ok=True)
        workers.barrier()  # the other ranks end once rank 0 has written the outputs
    return metrics


def trained_parts(params: Params, name: str, autoencoder_dir: Path | None) -> tuple[dict, dict]:
    """The trained models a model of the latent section is built on, by config field, and their specs
    (each one's model.json with its training run and weights' hash, the lineage a registered ldm carries);
    ({}, {}) for a model of train."""
    from components.models import FAMILIES
    from components.tracking.model_files import load_trained_model

    cfg = params.model(name)
    fields = FAMILIES.get(cfg.family).parts
    if not fields:
        if autoencoder_dir is not None:
            raise ValueError(f"--autoencoder: train.{name} ({cfg.family}) is not trained on another model; leave it out")
        return {}, {}
    if autoencoder_dir is None:
        raise ValueError(f"latent.{name}: the {cfg.family} family is trained on an autoencoder's latents; pass its "
                         f"trained model (genpipe train {name} --autoencoder artifacts/models/{cfg.autoencoder})")
    folder = Path(autoencoder_dir)
    model = load_trained_model(folder)
    spec = json.loads((folder / "model.json").read_text())
    expected = params.model(cfg.autoencoder).model_dump(mode="json")
    if spec["config"] != expected:
        raise ValueError(f"--autoencoder {folder}: trained with other settings than train.{cfg.autoencoder}, which "
                         f"latent.{name}.autoencoder names; retrain it first (genpipe retrain, or dvc repro "
                         f"train@{cfg.autoencoder})")
    run_file = folder / "run.json"
    spec["training_run_id"] = json.loads(run_file.read_text())["run_id"] if run_file.is_file() else ""
    spec["weights_sha256"] = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    return {"autoencoder": model}, {"autoencoder": spec}


def _parts_key(part_specs: dict) -> str:
    """A checkpoint resumes only on the same trained parts (a retrained autoencoder starts the ldm again)."""
    return "".join(f"-{spec['weights_sha256'][:16]}" for _, spec in sorted(part_specs.items()))


def evaluate_stage(params: Params, name: str, data_dir: Path, classifier_dir: Path, model_dir: Path,
                   out_dir: Path, inception_dir: Path | None = None) -> dict:
    from components.evaluation.evaluate import evaluate_model
    from components.evaluation.metrics import skipped_for_kind
    from components.models import FAMILIES
    from components.evaluation.pictures import write_pictures
    from components.evaluation.protocol import (INCEPTION_PROTOCOL_FILE, PROTOCOL_FILE, degradation_protocol,
                                                folder_hash, score_protocol)
    from components.tracking.model_files import load_trained_model

    model = load_trained_model(Path(model_dir), device=str(device()))
    classifier = load_classifier(classifier_dir)
    real, real_labels = load_split(data_dir, "test")
    train, train_labels = load_split(data_dir, "train")  # fid_floor's real side, augment's scarce data
    kind = FAMILIES.get(params.model(name).family).kind
    protocol = score_protocol(params.evaluate, evaluator=folder_hash(classifier_dir),
                              dataset_version=dataset_version(data_dir), image_size=model.image_size,
                              degradation=degradation_protocol(model) if kind == "translate" else None)
    for metric, why in skipped_for_kind(params.evaluate.metrics, kind).items():
        print(f"{metric}: skipped for a {kind} model ({why})")
    inception, inception_info = inception_reference(params, inception_dir, real, dataset_version(data_dir))
    with staged_dir(out_dir) as tmp:
        metrics = evaluate_model(model, classifier, real, params.evaluate, grid_path=tmp / "grid.png", kind=kind,
                                 real_labels=real_labels, train_u8=train, train_labels=train_labels,
                                 classifier_config=params.classifier, inception=inception)
        metrics.update(live_weight_scores(model, Path(model_dir), classifier, real, params, kind))
        write_pictures(model, real, real_labels, read_manifest(data_dir)["classes"], tmp / "pictures",
                       seed=params.evaluate.seed)
        if "guidance" in FAMILIES.get(params.model(name).family).sampler_options:
            metrics["class_agreement"] = write_guidance_sweep(model, classifier, real, params, name, tmp / "pictures")
        write_json(metrics, tmp / "metrics.json")
        write_json(protocol, tmp / PROTOCOL_FILE)  # what these scores can be compared with
        write_json(inception_info, tmp / INCEPTION_PROTOCOL_FILE)  # the Inception scores' protocol, or why none
    print("  ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics


def write_guidance_sweep(model, classifier, real_u8, params: Params, name: str, out_dir: Path) -> float:
    """The guidance trade-off (guidance.json, guidance.png) in out_dir; returns the agreement at the model's
    default guidance: the share of samples the evaluator labels as the class they were asked for."""
    from components.evaluation.guidance import guidance_sweep, save_tradeoff_plot

    rows = guidance_sweep(model, classifier, real_u8, params.evaluate)
    write_json({"samples_per_scale": params.evaluate.guidance.samples, "steps": model.cfg.sample_steps,
                "reference": "as many held-out images, seeded as every score's reference (evaluate.seed)",
                "scales": rows}, out_dir / "guidance.json")
    save_tradeoff_plot(rows, out_dir / "guidance.png", f"{name}: classifier-free guidance, "
                                                       f"{params.evaluate.guidance.samples} samples per scale")
    for r in rows:
        print(f"guidance {r['guidance']:g}: agreement {r['agreement']:.3f}, FID {r['fid']:.1f}")
    return next(r["agreement"] for r in rows if r["default"])


def inception_stage(params: Params, data_dir: Path, out_dir: Path) -> dict:
    """The Inception features of the held-out reference, once per dataset version (the `inception` stage)."""
    from components.evaluation.inception import write_reference

    off = None if "inception" in params.evaluate.metrics else "off (inception is not in evaluate.metrics)"
    test, _ = load_split(data_dir, "test")
    train, _ = load_split(data_dir, "train")
    with staged_dir(out_dir) as tmp:
        info = write_reference(test, train, params.evaluate.inception, params.evaluate.seed,
                               dataset_version(data_dir), str(device()), tmp, off=off)
    print(f"inception reference: {info['why']}" + (f", {info['seconds']} s" if info["num_samples"] else ""))
    return info


def inception_reference(params: Params, inception_dir: Path | None, real, version: str):
    """(the inception stage's reference or None, what the Inception scores are measured under or why
    there are none), for the evaluation's inception.json."""
    why = None
    if "inception" not in params.evaluate.metrics:
        why = "off (inception is not in evaluate.metrics)"
    elif inception_dir is None:
        why = "skipped: no reference given (genpipe evaluate --inception artifacts/inception)"
    if why is not None:
        return None, {"num_samples": 0, "why": why}
    from components.evaluation.features import KID_SUBSETS
    from components.evaluation.inception import read_reference

    reference = read_reference(inception_dir, real, version)
    if len(reference) < 2:
        print(f"inception: {reference.info['why']}")
        return reference, reference.info
    scoring = {"kid_subset_size": params.evaluate.kid_subset_size, "kid_subsets": KID_SUBSETS,
               "sample_seed": params.evaluate.seed}  # how the samples were drawn and KID's subsets
    return reference, {**reference.info, "scoring": scoring}


def live_weight_scores(model, model_dir: Path, classifier, real, params: Params, kind: str) -> dict:
    """The gating metric of the live (not averaged) weights, `<metric>_live`, for a model trained with
    an EMA: what the average bought. The model is left holding the EMA weights it came with."""
    from safetensors.torch import load_file

    from components.evaluation.evaluate import evaluate_model

    live_path = model_dir / "live.safetensors"
    if not live_path.is_file():
        return {}
    from components.evaluation.gating import measured_by

    metric = params.registry.metric_for(kind)
    averaged = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(load_file(str(live_path)))
    try:  # the value is all it needs: no interval
        cfg = params.evaluate.model_copy(update={"metrics": [measured_by(metric)], "bootstrap": None})
        scores = evaluate_model(model, classifier, real, cfg, kind=kind)
    finally:
        model.load_state_dict(averaged)
    return {f"{metric}_live": scores[metric]}


def rescore_registered(model_uri: str, metric: str, protocol: dict, data_dir: Path, classifier_dir: Path,
                       model_dir: Path) -> dict:
    """`metric` (and its interval, `<metric>_ci_low/high`) of a registered model under `protocol`: its
    samples or reconstructions, made by the model's own registered code (in a subprocess), scored here
    with today's evaluator and held-out data. A translate model is sent, through its pyfunc, the very
    inputs (and masks) the model in `model_dir` (the challenger) was evaluated on, degraded by today's
    code: its PSNR/SSIM are then paired with the same originals and baselines as the challenger's."""
    import torch

    from components.evaluation.evaluate import NonFiniteMetric, reference_subset, score_samples
    from components.evaluation.gating import measured_by
    from components.evaluation.grid import NonFiniteSamples
    from components.evaluation.protocol import evaluate_config
    from components.tracking.champion_samples import (RegisteredModelUnloadable, registered_images,
                                                      registered_translations)
    from components.tracking.registry import ChampionUnscorable, model_kind

    real, _ = load_split(data_dir, "test")
    cfg = evaluate_config(protocol, [measured_by(metric)])
    reference = reference_subset(real, cfg)
    today = None
    if model_kind(model_dir) == "translate":  # outside the try: the challenger's failure is not the champion's
        from components.evaluation.restoration import MODEL, restore
        from components.tracking.model_files import load_trained_model

        today = restore(load_trained_model(Path(model_dir), device=str(device())), reference, cfg.seed)
    try:
        restorations = None
        if today is not None:
            restorations = registered_translations(model_uri, today)
            fake = restorations.outputs[MODEL]
        else:
            fake = torch.from_numpy(registered_images(model_uri, reference.numpy(), cfg.seed)[0])
        scores = score_samples(fake, real, load_classifier(classifier_dir), cfg, protocol["image_size"],
                               kind=model_kind(model_dir), restorations=restorations)
    except (RegisteredModelUnloadable, NonFiniteSamples, NonFiniteMetric) as exc:
        raise ChampionUnscorable(str(exc)) from exc
    return {k: v for k, v in scores.items() if k in (metric, f"{metric}_ci_low", f"{metric}_ci_high")}
