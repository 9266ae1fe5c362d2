"""`genpipe`: the pipeline's stage commands (what dvc.yaml runs), the retrain flow, and tools to
look at results. Values come from params.yaml only; paths come from the command line."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


EXIT_BUSY = 75  # EX_TEMPFAIL: another retrain holds the workspace; try again later


class UsageError(ValueError):
    """A request the user can fix; printed without a traceback."""


PROFILES = Path("profiles")  # partial params files: `--profile zoo` merges profiles/zoo.yaml


def _params(overrides: list[str] | None = None, write: bool = False, profile: str | None = None):
    from components.config import apply_overrides, apply_profile, read_params_raw, write_params_raw
    from components.params import parse_params

    raw = read_params_raw()
    if profile:
        apply_profile(raw, PROFILES / f"{profile}.yaml")
    if overrides:
        apply_overrides(raw, overrides)
    params = parse_params(raw)  # validate before anything is written
    if (overrides or profile) and write:
        write_params_raw(raw)
    return params


def _sweep(*outputs: Path) -> None:
    """A stage command starts by removing what a killed run of it left beside its outputs."""
    from components.workspace import sweep_stale

    for stale in sweep_stale(outputs):
        print(f"removed {stale}, left by an interrupted run")


def cmd_ingest(args) -> None:
    from components.pipeline import ingest_stage

    _sweep(args.out, args.metrics)
    ingest_stage(_params(), args.out, args.metrics)


def cmd_classifier(args) -> None:
    from components.pipeline import classifier_stage

    _sweep(args.out, args.metrics)
    classifier_stage(_params(), args.data, args.out, args.metrics)


def cmd_train(args) -> None:
    from components.pipeline import train_stage
    from components.training.distributed import is_main_process, launch_env, torchrun_command

    world_size = launch_env()[0]
    if args.nproc < 1:
        raise UsageError(f"--nproc {args.nproc}: the number of training processes must be at least 1")
    if args.nproc > 1 and world_size == 1:  # relaunch this command as nproc processes; torchrun takes over
        # Without --nproc: the processes read WORLD_SIZE (and torchrun would take --nproc for its own option).
        argv = ["train", args.model, "--data", str(args.data), "--classifier", str(args.classifier),
                "--out", str(args.out), "--metrics", str(args.metrics)]
        argv += ["--autoencoder", str(args.autoencoder)] if args.autoencoder else []
        command = torchrun_command(args.nproc, "flows.cli", argv)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(command[0], command)
    if args.nproc > 1 and world_size != args.nproc:
        raise UsageError(f"--nproc {args.nproc}: torchrun started {world_size} processes (WORLD_SIZE); "
                         f"pass the same number, or leave --nproc out under torchrun")
    # The training run buffers its metrics through an MLflow outage and retries them itself;
    # MLflow's own retries (7, backing off up to 2 min) would stall the training loop instead.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    if is_main_process():  # rank 0 alone touches the outputs
        _sweep(args.out, args.metrics)
    train_stage(_params(), args.model, args.data, args.out, args.metrics, classifier_dir=args.classifier,
                autoencoder_dir=args.autoencoder)


def cmd_evaluate(args) -> None:
    from components.pipeline import evaluate_stage

    _sweep(args.out)
    evaluate_stage(_params(), args.model, args.data, args.classifier, args.model_dir, args.out, args.inception)


def cmd_inception(args) -> None:
    from components.pipeline import inception_stage

    _sweep(args.out)
    inception_stage(_params(), args.data, args.out)


def cmd_retrain(args) -> int:
    from components.config import PARAMS_FILE
    from components.workspace import retrain_lock

    with retrain_lock(args.wait):  # one retrain per workspace, from the params write to the last registration
        original = Path(PARAMS_FILE).read_text()
        _params(args.set, write=True, profile=args.profile)  # to params.yaml: DVC records what actually ran
        from components.versioning.worker_workspace import WorkspaceError
        from flows.retrain import RetrainFailed, retrain
        from flows.runtime import describe

        try:
            result = retrain()
        except BaseException as exc:
            if args.set or args.profile:  # a failed run must not leave its overrides behind for the next scheduled run
                Path(PARAMS_FILE).write_text(original)
                changes = [f"--set {item}" for item in args.set] + ([f"--profile {args.profile}"] if args.profile else [])
                print(f"genpipe: retrain failed; {PARAMS_FILE} restored without {' '.join(changes)}",
                      file=sys.stderr)
            if isinstance(exc, WorkspaceError):
                raise UsageError(str(exc)) from None
            if not isinstance(exc, Exception):
                raise  # Ctrl-C, exit
            if not isinstance(exc, RetrainFailed):  # Prefect logged the traceback above
                print(f"genpipe: retrain failed: {describe(exc)}", file=sys.stderr)
                return 1
            _print_result(exc.result)
            print(f"genpipe: {exc}", file=sys.stderr)
            return 1
    _print_result(result)
    return 0


def _print_result(result) -> None:
    print(f"stages run: {', '.join(result.stages_run) or 'none (everything up to date)'}")
    for r in result.registrations:
        print(f"{r.name}: version {r.version}, {r.decision} — {r.reason}")


def cmd_deploy(args) -> None:
    from flows.deploy import deploy

    for line in deploy(_params().deploy, Path.cwd()):
        print(line)


def cmd_serve(args) -> None:
    from flows.deploy import serve

    cfg = _params().deploy
    print(f"serving retrain on cron {cfg.cron!r} ({cfg.timezone}) until stopped (Ctrl-C)", flush=True)
    serve(cfg)


def cmd_params(args) -> None:
    import json

    params = _params(args.set, profile=args.profile)
    print(json.dumps(params.model_dump(mode="json"), indent=2))


def cmd_sample(args) -> None:
    import torch

    from components.evaluation.grid import save_grid

    labels = _parse_labels(args.labels)
    count = args.n if args.n is not None else len(labels) if labels is not None else 64
    if labels is not None and len(labels) != count:
        raise UsageError(f"--labels: {len(labels)} class id(s) for -n {count}; give one per image, or leave out -n")
    request = {"count": count, "seed": args.seed}
    if labels is not None:
        request["labels"] = labels
    if args.prompt is not None:
        request["prompt"] = args.prompt
    request.update({name: value for name in ("steps", "guidance") if (value := getattr(args, name)) is not None})
    model, uri = _load_registered(args.model, "generate", "not a sampler")
    images = _predict(model, request, "sample")
    save_grid(torch.from_numpy(images), Path(args.out))
    print(f"wrote {images.shape[0]} samples from {uri} to {args.out}")


def cmd_reconstruct(args) -> None:
    import numpy as np
    import torch

    from components.evaluation.grid import save_grid

    images = _read_images(args.input)
    if args.out.suffix not in (".png", ".npy") or (args.output == "latent" and args.out.suffix != ".npy"):
        allowed = ".npy" if args.output == "latent" else ".png (a grid) or .npy"
        raise UsageError(f"--out {args.out}: {args.output} output is written as {allowed}")
    model, uri = _load_registered(args.model, "reconstruct", "it does not reconstruct")
    result = _predict(model, {"images": images, "output": args.output}, "reconstruct")
    if args.out.suffix == ".npy":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp.npy")
        np.save(tmp, result)
        tmp.replace(args.out)
    else:  # each input image beside its reconstruction
        pairs = np.stack([images.astype(np.uint8), result], axis=1)  # (N, 2, C, H, W): input, reconstruction
        save_grid(torch.from_numpy(pairs.reshape(-1, *result.shape[1:])),
                  args.out, nrow=2 * min(4, images.shape[0]))
    print(f"wrote {args.output} of {images.shape[0]} image(s) from {uri} to {args.out}")


def cmd_translate(args) -> None:
    import torch

    from components.evaluation.grid import save_grid

    if args.out.suffix != ".png":
        raise UsageError(f"--out {args.out}: the translated image is written as a .png")
    for flag, path in (("--in", args.input), ("--mask", args.mask)):
        if path is not None and not path.is_file():
            raise UsageError(f"{flag} {path}: no such file")
    model, uri = _load_registered(args.model, "translate", "it does not translate images")
    schema = model.unwrap_python_model().schema
    if schema.takes_mask != (args.mask is not None):
        raise UsageError(f"--mask: this {schema.family} model " + (
            "fills in a masked region: give --mask mask.png, white where to fill in" if schema.takes_mask
            else "takes no mask; leave --mask out"))
    request = {"images": _decode_image_file(args.input, "--in", schema.sent_shape, schema.sent_note)[None]}  # 1×C×h×w
    if args.mask is not None:  # white (>= 128) marks where to fill in
        grey = _decode_image_file(args.mask, "--mask", (1, *schema.sent_shape[1:]))
        request["mask"] = (grey[None] >= 128).astype("uint8")  # 1×1×h×w
    result = _predict(model, request, "translate")
    save_grid(torch.from_numpy(result), args.out)  # one image: the image itself
    print(f"wrote the translation of {args.input} by {uri} to {args.out}")


def _decode_image_file(path: Path, flag: str, shape: tuple[int, int, int], note: str = ""):
    """uint8 C×H×W pixels of one image file of exactly that size, decoded and checked by the ingestion
    code; `note` says what that size means."""
    from components.data.validate import DecodeRules, ImageRejected, decode_image

    channels, height, width = shape
    data = path.read_bytes()
    size = _header_size(data)
    if size is not None and size != (width, height):  # before decoding: a larger image costs nothing
        raise UsageError(f"{flag} {path}: {size[0]}x{size[1]} pixels; the model takes {width}x{height} images{note}")
    try:  # the header gave the size: no more pixels than the model takes are ever decoded
        pixels, _ = decode_image(data, DecodeRules(max_pixels=height * width, channels=channels,
                                                   image_size=height, resize=False))
    except ImageRejected as exc:
        raise UsageError(f"{flag} {path}: {exc.reason}") from None
    return pixels


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an image file's header, or None when it has none that PIL reads (then
    decoding says what is wrong with the file)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:
        return None


def _parse_labels(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--labels: expected comma-separated class ids like 7,7,9, got {text!r}") from None


def _read_images(path: Path):
    """uint8 images N×C×H×W from a .npy file of them, or one image from a .png (1×C×H×W)."""
    import numpy as np
    from PIL import Image

    if not path.is_file():
        raise UsageError(f"--in {path}: no such file")
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise UsageError(f"--in {path}: not a plain .npy array ({exc})") from None
    if path.suffix == ".png":
        with Image.open(path) as im:
            array = np.asarray(im if im.mode in ("L", "RGB") else im.convert("RGB"))
        return (array[None, None] if array.ndim == 2 else array.transpose(2, 0, 1)[None]).copy()
    raise UsageError(f"--in {path}: expected a .npy array of uint8 N×C×H×W images or one .png image")


# The command for a model of each task kind, for an error telling a user they called another.
KIND_COMMANDS = {"generate": "draw samples with `genpipe sample --model {model} --out grid.png`",
                 "reconstruct": "reconstruct images with `genpipe reconstruct --model {model} --in images.npy --out out.png`",
                 "translate": "translate an image with `genpipe translate --model {model} --in in.png --out out.png`"}


def _load_registered(name_alias: str, kind: str, refusal: str):
    """The pyfunc of NAME@ALIAS (NAME alone: its latest version), and its URI; a model of another
    task kind than `kind` is refused with `refusal` ("not a sampler") and the command it answers."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    name, _, alias = name_alias.partition("@")
    uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/latest"
    try:
        model = mlflow.pyfunc.load_model(uri)
    except MlflowException as exc:
        raise UsageError(f"--model {name_alias}: {exc.message.rstrip('.')}. Registered: {_registered_models()}") from None
    found = getattr(model.unwrap_python_model(), "kind", "generate")  # models registered before task kinds sample
    if found != kind:
        raise UsageError(f"--model {name_alias}: a {found} model, {refusal}; "
                         + KIND_COMMANDS[found].format(model=name_alias))
    return model, uri


def _predict(model, request: dict, what: str):
    try:
        return model.predict(request)
    except ValueError as exc:
        raise UsageError(f"{what} request: {exc}") from None


def _registered_models() -> str:
    from components.tracking.champion_lock import is_lock_model
    from components.tracking.runs import client

    models = [m for m in client().search_registered_models() if not is_lock_model(m.name)]
    listed = [f"{m.name} (aliases: {', '.join(sorted(m.aliases)) or 'none'})" for m in models]
    return "; ".join(listed) or "none yet, run `genpipe retrain`"


def cmd_promote(args) -> None:
    from components.tracking.registry import RegistryRequestError, promote

    try:
        record = promote(args.name, args.version, args.reason)
    except RegistryRequestError as exc:
        raise UsageError(str(exc)) from None
    print(f"{args.name}: champion v{record['from'] or '-'} -> v{record['to']} (promoted by {record['who']})")


def cmd_rollback(args) -> None:
    from components.tracking.registry import RegistryRequestError, rollback

    try:
        record = rollback(args.name, args.reason)
    except RegistryRequestError as exc:
        raise UsageError(str(exc)) from None
    print(f"{args.name}: champion v{record['from']} -> v{record['to']} (rolled back by {record['who']})")


def cmd_history(args) -> None:
    from components.tracking.audit import table
    from components.tracking.registry import RegistryRequestError, history

    try:
        records = history(args.name)
    except RegistryRequestError as exc:
        raise UsageError(str(exc)) from None
    print(table(records) if records else f"{args.name}: no champion moves recorded yet")


def cmd_report(args) -> None:
    from components.reporting.report import ReportError, build_report
    from components.workspace import write_text_atomic

    try:
        page = build_report(args.model, args.data, seed=args.seed, count=args.n)
    except ReportError as exc:
        raise UsageError(str(exc)) from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, page)
    print(f"wrote the report of {args.model} to {args.out} ({len(page) // 1024} KB, self-contained)")


def cmd_ui(args) -> None:
    from components.state import mlflow_artifact_root, mlflow_tracking_uri, redact_uri

    uri = mlflow_tracking_uri()
    if uri.startswith(("http:", "https:")):  # a tracking server serves its own UI
        print(f"MLflow UI: open {redact_uri(uri)} (the tracking server serves it)")
        return
    # The store URI (it may hold a database password) goes by environment, not argv, so `ps` shows no secret.
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": uri}
    command = [sys.executable, "-m", "mlflow", "ui", "--host", args.host, "--port", str(args.port)]
    if mlflow_artifact_root():
        command += ["--default-artifact-root", mlflow_artifact_root()]
    print(f"MLflow UI for {redact_uri(uri)}\n  open http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    os.execve(sys.executable, command, env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genpipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, func, help_text):
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(func=func)
        return p

    p = add("ingest", cmd_ingest, "validate and pack the configured data source (stage 'ingest')")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--metrics", type=Path, required=True)
    p = add("classifier", cmd_classifier, "train the evaluator classifier (stage 'classifier')")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--metrics", type=Path, required=True)
    p = add("train", cmd_train, "train one model of params.yaml's train or latent section "
                                "(stage 'train@NAME' or 'train_latent@NAME')")
    p.add_argument("model")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--classifier", type=Path, required=True,
                   help="the evaluator classifier, for the mode-collapse sentinel of generate-kind models")
    p.add_argument("--autoencoder", type=Path, metavar="DIR",
                   help="a latent model's trained autoencoder (artifacts/models/<its autoencoder>)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--metrics", type=Path, required=True)
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train in N processes under torchrun (one per GPU, or CPU processes with gloo); "
                        "train.<name>.batch_size stays the global batch. Started by torchrun itself, "
                        "the stage reads WORLD_SIZE instead")
    p = add("evaluate", cmd_evaluate, "score one trained model and draw its grid "
                                      "(stage 'evaluate@NAME' or 'evaluate_latent@NAME')")
    p.add_argument("model")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--classifier", type=Path, required=True)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--inception", type=Path, metavar="DIR",
                   help="the inception stage's reference (artifacts/inception), for the inception metric")
    p = add("inception", cmd_inception, "Inception features of the held-out reference, for the standard FID/KID "
                                        "(stage 'inception')")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    for name, func, text in [("retrain", cmd_retrain, "run the whole pipeline as a Prefect flow, then register"),
                             ("params", cmd_params, "validate params.yaml (with overrides) and print it resolved")]:
        p = add(name, func, text)
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a parameter, e.g. train.dcgan.epochs=1 (retrain writes it to params.yaml)")
        p.add_argument("--profile", metavar="NAME",
                       help="merge profiles/NAME.yaml first, e.g. `zoo` adds every family (retrain writes it to params.yaml)")
        if name == "retrain":
            p.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                           help="when another retrain holds this workspace, wait this long for it (default: exit)")
    add("deploy", cmd_deploy, "create or update the scheduled retrain deployment (params.yaml deploy:) "
                              "on a Prefect server (PREFECT_API_URL)")
    add("serve", cmd_serve, "run retrain on the deploy: schedule in this process, no worker needed (single host)")
    p = add("sample", cmd_sample, "generate a grid from a registered model")
    p.add_argument("--model", required=True, help="NAME@ALIAS, e.g. fashion-mnist-dcgan@champion")
    p.add_argument("-n", type=int, help="number of images (default: one per --labels entry, else 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", help="comma-separated class ids, one per image, e.g. 7,7,9 (conditional models)")
    p.add_argument("--prompt", help='text naming a class for every image, e.g. "ankle boot" (prompted models)')
    p.add_argument("--steps", type=int, help="sampler steps (diffusion models; default: the model's sample_steps)")
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance scale (diffusion models; 0 unconditional, 1 conditional)")
    p.add_argument("--out", type=Path, required=True)
    p = add("reconstruct", cmd_reconstruct, "reconstruct or encode images with a registered autoencoder")
    p.add_argument("--model", required=True, help="NAME@ALIAS, e.g. fashion-mnist-ae@champion")
    p.add_argument("--in", dest="input", type=Path, required=True,
                   help=".npy of uint8 N×C×H×W images, or one .png image")
    p.add_argument("--output", choices=["reconstruction", "latent"], default="reconstruction")
    p.add_argument("--out", type=Path, required=True, help=".png grid (input beside reconstruction) or .npy array")
    p = add("translate", cmd_translate, "make a new image of one image file with a registered translate model "
                                        "(super-resolution, inpainting)")
    p.add_argument("--model", required=True, help="NAME@ALIAS, e.g. fashion-mnist-srresnet@champion")
    p.add_argument("--in", dest="input", type=Path, required=True,
                   help="an image file (PNG, JPEG, ...) of the model's input size: for super-resolution the "
                        "low-resolution image")
    p.add_argument("--mask", type=Path, help="an image file of the same size, white where to fill in (inpainting models)")
    p.add_argument("--out", type=Path, required=True, help=".png of the translated image")
    p = add("promote", cmd_promote, "make a registered version the champion, recorded in the audit trail")
    p.add_argument("name", metavar="NAME", help="registered model, e.g. fashion-mnist-dcgan")
    p.add_argument("version", metavar="VERSION")
    p.add_argument("--reason", required=True, help="why, for the audit trail")
    p = add("rollback", cmd_rollback, "give `champion` back to the previous champion of the audit trail")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--reason", required=True, help="why, for the audit trail")
    p = add("history", cmd_history, "print the champion's audit trail, oldest first")
    p.add_argument("name", metavar="NAME")
    p = add("report", cmd_report, "write one self-contained HTML report of a registered version")
    p.add_argument("model", metavar="NAME@ALIAS", help="or NAME/VERSION, e.g. fashion-mnist-dcgan@champion")
    p.add_argument("--out", type=Path, default=Path("report.html"))
    p.add_argument("--data", type=Path, default=Path("artifacts/dataset"),
                   help="the packed dataset (its test split is the reference, its train split is searched "
                        "for near copies of samples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-n", type=int, default=64, help="images in the grids")
    p = add("ui", cmd_ui, "serve the MLflow UI over genpipe's tracking store")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from components.config import ConfigError
    from components.data.sources import DataError
    from components.state import configure_environment
    from components.workspace import LockBusy

    configure_environment()
    # Stage commands run by DVC must find this same `genpipe`.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        return args.func(args) or 0
    except (ConfigError, DataError, UsageError, FileNotFoundError) as exc:
        print(f"genpipe: {exc}", file=sys.stderr)
        return 2
    except LockBusy as exc:
        print(f"genpipe: {exc}", file=sys.stderr)
        return EXIT_BUSY


if __name__ == "__main__":
    sys.exit(main())
