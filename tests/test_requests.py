"""Requests to a registered model, by its family's declared task kind and conditions: validation
errors that name the field, a real round trip through mlflow.pyfunc for conditional and
reconstructing families, the champion re-scorer's images, and the CLI's --labels/--prompt."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from model_configs import model_config
from test_registry import CFG, PROTOCOL
from components.data.sources import FASHION_MNIST_CLASSES
from components.models import FAMILIES, build_model
from components.tracking.requests import MAX_COUNT, RequestSchema, parse_request

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = list(FASHION_MNIST_CLASSES)


def spec_of(family: str, **extra) -> dict:
    return {"family": family, "channels": 1, "num_classes": 10, "classes": CLASSES, **extra}


def schema(family: str) -> RequestSchema:
    return RequestSchema.of(spec_of(family, config={"image_size": 28}))


def images(n: int, shape=(1, 28, 28), dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, *shape)).astype(dtype)


# --- validation, from the family's declaration -----------------------------------------------------

def test_schemas_follow_the_family_declarations():
    assert schema("dcgan").fields == ("count", "seed", "format")
    assert schema("cvae").fields == ("count", "seed", "format", "labels")
    assert schema("ae").fields == ("images", "output", "format")
    assert schema("cvae").classes[9] == "Ankle boot"


def test_a_diffusion_model_takes_steps_and_guidance_within_its_bounds():
    ldm = RequestSchema.of(spec_of("ldm", config={"image_size": 28, "timesteps": 50}))
    assert ldm.fields == ("count", "seed", "format", "labels", "prompt", "steps", "guidance")
    parsed = parse_request({"labels": [3, 4], "steps": np.int64(10), "guidance": 2}, ldm)
    assert (parsed["steps"], parsed["guidance"]) == (10, 2.0) and isinstance(parsed["guidance"], float)
    assert "steps" not in parse_request({"count": 2}, ldm)  # unset: the model's own sample_steps
    for request_, message in [({"steps": 51}, "steps: must be an integer in 1..50 (this model's diffusion timesteps), got 51"),
                              ({"steps": 2.5}, "steps: must be an integer in 1..50"),
                              ({"guidance": -0.5}, "guidance: must be a number in 0..20"),
                              ({"guidance": float("nan")}, "guidance: must be a number in 0..20"),
                              ({"guidance": "3"}, "guidance: must be a number in 0..20")]:
        with pytest.raises(ValueError) as error:
            parse_request({"count": 2, **request_}, ldm)
        assert message in str(error.value)


@pytest.mark.parametrize("family, request_, message", [
    ("dcgan", {"count": 2, "colour": "red"},
     "unknown request field(s) ['colour'] for this dcgan model (it generates images); valid: count, seed, format"),
    ("cvae", {"steps": 3}, "unknown request field(s) ['steps'] for this cvae model (it generates images); "
                           "valid: count, seed, format, labels"),
    ("ae", {"count": 4}, "unknown request field(s) ['count'] for this ae model (it reconstructs the images it "
                         "is sent, it does not sample); valid: images, output, format"),
    ("dcgan", {"labels": [1]}, "labels: this dcgan model does not take 'labels' (it is unconditional); "
                               "drop 'labels' from the request"),
    ("vae", {"prompt": "ankle boot"}, "prompt: this vae model does not take 'prompt' (it is unconditional)"),
    ("cvae", {"prompt": "ankle boot"}, "prompt: this cvae model does not take 'prompt' (it takes only labels)"),
    ("ae", {"labels": [1], "images": images(1)}, "labels: this ae model does not take 'labels' (it is unconditional)"),
])
def test_fields_a_model_does_not_take_are_named_with_what_it_takes(family, request_, message):
    with pytest.raises(ValueError) as error:
        parse_request(request_, schema(family))
    assert message in str(error.value)


@pytest.mark.parametrize("request_, message", [
    ({"count": 0}, f"count: must be an integer in 1..{MAX_COUNT}, got 0"),
    ({"count": MAX_COUNT + 1}, f"count: must be an integer in 1..{MAX_COUNT}, got {MAX_COUNT + 1}"),
    ({"count": True}, "count: must be an integer"),
    ({"count": 2.0}, "count: must be an integer"),
    ({"seed": -1}, "seed: must be an integer >= 0, got -1"),
    ({"count": 3, "labels": [1, 2]}, "labels: need one class id per image (3), got 2"),
    ({"labels": "7,7"}, "labels: must be a list of integer class ids, one per image, got '7,7'"),
    ({"labels": [1.5, 2]}, "labels: must be a list of integer class ids"),
    ({"labels": [True]}, "labels: must be a list of integer class ids"),
    ({"labels": [3, 12, -1]}, "labels: class ids must be in 0..9 (0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, "
                              "4 Coat, 5 Sandal, 6 Shirt, 7 Sneaker, 8 Bag, 9 Ankle boot), got [-1, 12]"),
])
def test_bad_generate_requests_name_the_field_and_the_rule(request_, message):
    with pytest.raises(ValueError) as error:
        parse_request(request_, schema("cvae"))
    assert message in str(error.value)


def test_labels_and_counts_are_normalised():
    cvae = schema("cvae")
    assert parse_request({}, cvae) == {"count": 16, "seed": 0, "format": "uint8"}
    assert parse_request({"labels": [7, 7, 9]}, cvae) == {"count": 3, "seed": 0, "labels": [7, 7, 9], "format": "uint8"}
    # What MLflow's scoring server and pandas hand over: 0-d arrays, 1-element lists, numpy ints.
    served = {"count": np.array(2), "seed": [5], "labels": np.array([0, 9])}
    assert parse_request(served, cvae) == {"count": 2, "seed": 5, "labels": [0, 9], "format": "uint8"}
    frame = pd.DataFrame([{"count": 2, "seed": 1, "labels": [4, 4]}])
    assert parse_request(frame, cvae) == {"count": 2, "seed": 1, "labels": [4, 4], "format": "uint8"}
    with pytest.raises(ValueError, match=r"send one request \(one row, one record\) per call, got 2"):
        parse_request(pd.DataFrame([{"count": 1}, {"count": 2}]), cvae)
    with pytest.raises(ValueError, match="request must be a mapping"):
        parse_request([1, 2], cvae)
    # {"inputs": [{...}]}: a list holding one request
    assert parse_request([{"count": 2}], cvae)["count"] == 2


def test_params_add_fields_and_must_agree_with_the_input():
    cvae = schema("cvae")
    # MLflow passes every declared param, None where the request left it out.
    parsed = parse_request({"count": np.array(2)}, cvae, params={"seed": 7, "format": "png", "count": None})
    assert parsed == {"count": 2, "seed": 7, "format": "png"}
    assert parse_request({}, cvae, params={"count": 3})["count"] == 3
    assert parse_request({"count": np.array(3)}, cvae, params={"count": 3})["count"] == 3  # the same value twice
    with pytest.raises(ValueError, match=r"^count: sent in both the input \(2\) and params \(3\); send it once"):
        parse_request({"count": np.array(2)}, cvae, params={"count": 3})


@pytest.mark.parametrize("family, request_, message", [
    ("cvae", {"format": "jpeg"}, "format: must be one of uint8, png, png_grid, got 'jpeg'"),
    ("ae", {"images": images(1), "output": "latent", "format": "png"},
     "format: 'png' encodes images; output 'latent' returns float codes, send format 'uint8'"),
    # A huge request is refused by its length, and the error does not echo it back.
    ("cvae", {"count": 2, "labels": list(range(100_000))}, "labels: need one class id per image (2), got 100000"),
    ("cvae", {"count": list(range(100_000))}, "characters)"),
    ("cvae", {"labels": [0] * (MAX_COUNT + 1)}, f"count (one per item of labels): must be an integer in 1..{MAX_COUNT}"),
    ("cvae", {"format": np.array(["png", "uint8"])}, "format: must be one of uint8, png, png_grid"),
    ("ae", {"images": images(1), "output": np.array(["latent", "code"])}, "output: must be one of"),
])
def test_bad_formats_and_huge_requests_name_the_field(family, request_, message):
    with pytest.raises(ValueError) as error:
        parse_request(request_, schema(family))
    assert message in str(error.value) and len(str(error.value)) < 500


def prompt_schema() -> RequestSchema:
    """A family declaring both conditions (cgan's declaration), with the same checks as a real one."""
    return RequestSchema(family="cgan", kind="generate", conditions=("labels", "prompt"), channels=1,
                         image_size=28, classes=tuple(CLASSES))


def test_prompts_one_for_all_or_one_per_image():
    s = prompt_schema()
    assert parse_request({"count": 3, "prompt": "ankle boot"}, s)["prompt"] == ["ankle boot"] * 3
    assert parse_request({"count": 2, "prompt": ["bag"]}, s)["prompt"] == ["bag", "bag"]
    assert parse_request({"prompt": ["bag", "a shirt"]}, s) == {"count": 2, "seed": 0, "prompt": ["bag", "a shirt"], "format": "uint8"}
    assert parse_request({"count": 2, "prompt": np.array("bag")}, s)["prompt"] == ["bag", "bag"]
    for request_, message in [
        ({"count": 3, "prompt": ["bag", "coat"]}, "prompt: need one string for all images or one per image (3), got 2"),
        ({"count": 1, "prompt": 7}, "prompt: must be one string for all images or a list of one string per image"),
        ({"count": 2, "prompt": ["bag", 3]}, "prompt: must be one string"),
        ({"count": 1, "prompt": "  "}, "prompt: must not be empty"),
        ({"count": 1, "prompt": "bag", "labels": [8]}, "labels, prompt: send one of them, not both"),
    ]:
        with pytest.raises(ValueError) as error:
            parse_request(request_, s)
        assert message in str(error.value)


@pytest.mark.parametrize("request_, message", [
    ({}, "images: missing; send uint8 images N×1×28×28 to this ae model"),
    ({"images": images(2).astype(np.float32)}, "images: must be uint8 pixels 0..255, got dtype float32"),
    ({"images": images(2).astype(np.int64) + 200}, "images: must be uint8 pixels 0..255, got dtype int64"),
    ({"images": images(1)[0]}, "images: must be 4-d N×C×H×W, got shape (1, 28, 28) (one image is 1×1×28×28)"),
    ({"images": images(2, (3, 28, 28))}, "images: this ae model takes N×1×28×28 images, got N×3×28×28"),
    ({"images": images(2, (1, 32, 32))}, "images: this ae model takes N×1×28×28 images, got N×1×32×32"),
    ({"images": np.zeros((0, 1, 28, 28), np.uint8)}, f"images: send 1..{MAX_COUNT} images per request, got 0"),
    ({"images": np.zeros((MAX_COUNT + 1, 1, 28, 28), np.uint8)}, f"images: send 1..{MAX_COUNT} images per request"),
    ({"images": images(1), "output": "recon"}, "output: must be one of reconstruction, latent, got 'recon'"),
])
def test_bad_reconstruct_requests_name_the_field_and_the_rule(request_, message):
    with pytest.raises(ValueError) as error:
        parse_request(request_, schema("ae"))
    assert message in str(error.value)


def test_reconstruct_requests_are_normalised():
    pixels = images(2)
    parsed = parse_request({"images": pixels.astype(np.int64)}, schema("ae"))  # JSON carries integers
    assert parsed["output"] == "reconstruction" and parsed["images"].dtype == np.uint8
    assert np.array_equal(parsed["images"], pixels)
    assert parse_request({"images": pixels, "output": np.array("latent")}, schema("ae"))["output"] == "latent"


# --- real registered models ------------------------------------------------------------------------

def save_model_folder(root: Path, family: str, seed: int = 0, **overrides) -> Path:
    from components.tracking.model_files import save_trained_model

    cfg = model_config(family, seed=seed, **overrides)
    model = build_model(cfg, 1, 10, CLASSES)
    with torch.no_grad():  # untrained weights draw near-constant images; spread them so images differ
        for param in model.parameters():
            param.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
    model_dir = root / f"{family}-{seed}"
    save_trained_model(model, spec_of(family, config=cfg.model_dump(mode="json"), dataset="toy",
                                      dataset_version="d1", steps=1), model_dir)
    return model_dir


def register(root: Path, family: str) -> str:
    """Register a tiny model of `family` as the pipeline does; returns its registered name."""
    from components.evaluation.grid import save_grid
    from components.tracking.registry import register_model
    from components.training.checkpoint import write_json

    model_dir, eval_dir = save_model_folder(root, family), root / f"eval-{family}"
    write_json({"fid": 50.0}, eval_dir / "metrics.json")
    write_json(PROTOCOL, eval_dir / "protocol.json")
    save_grid(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), eval_dir / "grid.png")
    lineage = {"dataset_version": "d1", "evaluator_md5": "e1", "model_md5": f"md5-{family}", "params_hash": "p",
               "git_commit": "c", "training_run_id": ""}
    name = f"toy-{family}"
    register_model(name, model_dir, eval_dir, lineage, CFG, lambda version, protocol: pytest.fail("no champion"))
    return name


def registered_store(root: Path, families: list[str]):
    """(root, {family: registered name}): a tracking store in root/home holding a tiny model of each
    family, registered as the pipeline does, with GENPIPE_HOME and MLflow pointed at it meanwhile."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GENPIPE_HOME", str(root / "home"))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'home' / 'mlflow.db'}")
        (root / "home").mkdir()
        yield root, {family: register(root, family) for family in families}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tracking store holding a tiny cvae, ae (and cgan, when that family exists), and their folders."""
    yield from registered_store(tmp_path_factory.mktemp("store"), [f for f in ("cvae", "ae", "cgan") if f in FAMILIES])


def use_store(home: Path) -> str:
    """Point MLflow at the store in `home`: registering sets MLflow's process-wide URI, which wins
    over the environment, so every test using the store sets it again."""
    import mlflow

    uri = f"sqlite:///{home / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return uri


def load(registered, family: str):
    import mlflow.pyfunc

    if family not in registered[1]:
        pytest.skip(f"family {family!r} is not in components/models yet")
    use_store(registered[0] / "home")
    return mlflow.pyfunc.load_model(f"models:/{registered[1][family]}/1")


def test_a_conditional_model_answers_labels_through_mlflow(registered):
    from components.evaluation.grid import sample_uint8
    from components.tracking.model_files import load_trained_model

    pyfunc = load(registered, "cvae")
    local = load_trained_model(registered[0] / "cvae-0")
    out = pyfunc.predict({"labels": [7, 7, 9], "seed": 3})
    assert out.dtype == np.uint8 and out.shape == (3, 1, 28, 28)
    expected = sample_uint8(local, 3, 3, torch.tensor([7, 7, 9])).numpy()
    assert np.array_equal(out, expected)
    assert not np.array_equal(out, pyfunc.predict({"labels": [1, 1, 1], "seed": 3}))
    # Without labels, classes come in turn: 0, 1, 2.
    assert np.array_equal(pyfunc.predict({"count": 3, "seed": 3}), sample_uint8(local, 3, 3, torch.arange(3)).numpy())
    with pytest.raises(ValueError, match=r"labels: class ids must be in 0\.\.9 \(0 T-shirt/top.*got \[10\]"):
        pyfunc.predict({"labels": [10]})
    with pytest.raises(ValueError, match="prompt: this cvae model does not take 'prompt'"):
        pyfunc.predict({"prompt": "ankle boot"})


def test_a_prompted_model_answers_prompts_through_mlflow(registered):
    pyfunc = load(registered, "cgan")
    out = pyfunc.predict({"count": 2, "prompt": "ankle boot", "seed": 1})
    assert out.dtype == np.uint8 and out.shape == (2, 1, 28, 28)
    assert np.array_equal(out, pyfunc.predict({"prompt": ["ankle boot", "ankle boot"], "seed": 1}))
    assert not np.array_equal(out, pyfunc.predict({"prompt": ["bag", "bag"], "seed": 1}))
    with pytest.raises(ValueError, match="^prompt:"):  # the model's own words for what it does not understand
        pyfunc.predict({"count": 1, "prompt": "a purple elephant"})


def test_an_autoencoder_answers_images_through_mlflow(registered):
    from components.evaluation.grid import encode_latents, reconstruct_uint8
    from components.tracking.model_files import load_trained_model

    pyfunc = load(registered, "ae")
    local = load_trained_model(registered[0] / "ae-0")
    pixels = images(5)
    recon = pyfunc.predict({"images": pixels})
    assert recon.dtype == np.uint8 and recon.shape == pixels.shape
    assert np.array_equal(recon, reconstruct_uint8(local, torch.from_numpy(pixels)).numpy())
    codes = pyfunc.predict({"images": pixels, "output": "latent"})
    assert codes.dtype == np.float32 and codes.shape == (5, local.latent_dim)
    assert np.allclose(codes, encode_latents(local, torch.from_numpy(pixels)).numpy())
    with pytest.raises(ValueError, match=r"unknown request field\(s\) \['count', 'seed'\] for this ae model"):
        pyfunc.predict({"count": 4, "seed": 0})


def test_the_champion_rescorer_reconstructs_the_reference_with_the_models_own_code(registered):
    from components.evaluation.grid import reconstruct_uint8
    from components.tracking.champion_samples import registered_images
    from components.tracking.model_files import load_trained_model

    if "ae" not in registered[1]:
        pytest.skip("family 'ae' is not in components/models yet")
    reference = images(7)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", use_store(registered[0] / "home"))
        out, code = registered_images(f"models:/{registered[1]['ae']}/1", reference, seed=0)
    expected = reconstruct_uint8(load_trained_model(registered[0] / "ae-0"), torch.from_numpy(reference))
    assert np.array_equal(out, expected.numpy())
    assert Path(code).resolve().parent != Path(__file__).resolve().parents[1] / "components"


def test_a_snapshot_without_task_kinds_still_gives_samples(tmp_path, monkeypatch):
    """A champion registered by code from before task kinds (no evaluation_images, no `kind` on its
    pyfunc) is re-scored through its own sample_uint8."""
    import mlflow

    from components.evaluation.grid import sample_uint8
    from components.tracking.champion_samples import registered_images
    from components.tracking.model_files import load_trained_model
    from components.tracking.registry import pip_requirements

    monkeypatch.setenv("MLFLOW_TRACKING_URI", use_store(tmp_path))
    today = Path(__file__).resolve().parents[1] / "components"
    old = tmp_path / "old" / "components"
    shutil.copytree(today, old, ignore=shutil.ignore_patterns("__pycache__"))
    grid = old / "evaluation" / "grid.py"
    grid.write_text(grid.read_text().replace("def evaluation_images(", "def _not_yet_written("))
    pyfunc = old / "tracking" / "pyfunc_model.py"
    pyfunc.write_text(pyfunc.read_text().replace("self.kind = ", "_no_kind = "))
    model_dir = save_model_folder(tmp_path, "dcgan")
    # Artefacts under tmp_path: the default experiment would put them in ./mlruns of the cwd.
    experiment = mlflow.create_experiment("old-snapshot", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(old / "tracking" / "pyfunc_entry.py"),
                                       artifacts={"model_dir": str(model_dir)}, code_paths=[str(old)],
                                       pip_requirements=pip_requirements())
    mlflow.register_model(info.model_uri, "toy-old")
    out, code = registered_images("models:/toy-old/1", images(6), seed=4)
    assert Path(code).parent.name == "components" and Path(code).resolve().parent != today
    assert np.array_equal(out, sample_uint8(load_trained_model(model_dir), 6, seed=4).numpy())


# --- the CLI -----------------------------------------------------------------------------------------

@pytest.fixture
def cli(registered, monkeypatch, capsys):
    """Run `genpipe ...` in this process against the registered store; returns (exit code, stdout, stderr)."""
    from flows.cli import main

    home = registered[0] / "home"
    for key, value in {"GENPIPE_HOME": str(home), "MLFLOW_TRACKING_URI": use_store(home),
                       "PREFECT_HOME": str(home / "prefect"), "PATH": ""}.items():
        monkeypatch.setenv(key, value)  # main() sets these; monkeypatch puts them back

    def run(*args: str):
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.mark.parametrize("args, message", [
    (["--labels", "7,x,9"], "--labels: expected comma-separated class ids like 7,7,9, got '7,x,9'"),
    (["--labels", "7,7,9", "-n", "5"], "--labels: 3 class id(s) for -n 5; give one per image, or leave out -n"),
])
def test_sample_refuses_bad_labels_text(cli, tmp_path, args, message):
    code, _, err = cli("sample", "--model", "toy-cvae", *args, "--out", str(tmp_path / "grid.png"))
    assert code == 2 and message in err
    assert not (tmp_path / "grid.png").exists()


def test_sample_draws_the_labels_asked_for(cli, tmp_path):
    from PIL import Image

    code, out, err = cli("sample", "--model", "toy-cvae", "--labels", "7,7,9", "--out", str(tmp_path / "g.png"))
    assert code == 0, err
    assert "wrote 3 samples from models:/toy-cvae/latest" in out
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (2 * 30 + 2, 2 * 30 + 2)  # 3 samples: a 2×2 grid of 28 px + 2 px padding
    code, _, err = cli("sample", "--model", "toy-cvae", "--prompt", "ankle boot", "-n", "2",
                       "--out", str(tmp_path / "p.png"))
    assert code == 2 and "sample request: prompt: this cvae model does not take 'prompt'" in err


def test_sample_and_reconstruct_point_to_each_other(cli, tmp_path):
    code, _, err = cli("sample", "--model", "toy-ae", "--out", str(tmp_path / "g.png"))
    assert code == 2
    assert "--model toy-ae: a reconstruct model, not a sampler" in err and "genpipe reconstruct --model toy-ae" in err
    code, _, err = cli("reconstruct", "--model", "toy-cvae", "--in", str(tmp_path / "x.npy"),
                       "--out", str(tmp_path / "r.png"))
    assert code == 2 and f"--in {tmp_path / 'x.npy'}: no such file" in err
    np.save(tmp_path / "x.npy", images(3))
    code, _, err = cli("reconstruct", "--model", "toy-cvae", "--in", str(tmp_path / "x.npy"),
                       "--out", str(tmp_path / "r.png"))
    assert code == 2 and "--model toy-cvae: a generate model, it does not reconstruct" in err


def test_reconstruct_writes_a_grid_and_latents(cli, tmp_path):
    from PIL import Image

    np.save(tmp_path / "x.npy", images(3))
    code, out, err = cli("reconstruct", "--model", "toy-ae", "--in", str(tmp_path / "x.npy"),
                         "--out", str(tmp_path / "r.png"))
    assert code == 0, err
    with Image.open(tmp_path / "r.png") as im:
        assert im.size == (6 * 30 + 2, 30 + 2)  # one row: each input beside its reconstruction
    code, _, err = cli("reconstruct", "--model", "toy-ae", "--in", str(tmp_path / "x.npy"), "--output", "latent",
                       "--out", str(tmp_path / "z.npy"))
    assert code == 0, err
    assert np.load(tmp_path / "z.npy").shape == (3, 4)
    code, _, err = cli("reconstruct", "--model", "toy-ae", "--in", str(tmp_path / "x.npy"), "--output", "latent",
                       "--out", str(tmp_path / "z.png"))
    assert code == 2 and "latent output is written as .npy" in err
    Image.fromarray(images(1, (28, 28))[0]).save(tmp_path / "one.png")
    code, _, err = cli("reconstruct", "--model", "toy-ae", "--in", str(tmp_path / "one.png"), "--out",
                       str(tmp_path / "one-r.npy"))
    assert code == 0, err
    assert np.load(tmp_path / "one-r.npy").shape == (1, 1, 28, 28)
