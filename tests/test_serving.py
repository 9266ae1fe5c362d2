"""The champion served over REST by MLflow's own scoring server (`mlflow models serve`), started for
real on a loopback port: every request shape MLflow clients send, bad requests answered 400 naming
the field, PNG responses, the registry entry's signature and example, and the Dockerfile MLflow
generates for the champion (validated, not built: there is no container engine here)."""
from __future__ import annotations

import base64
import io
import json
import re
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from servers import BIN, clean_env, scoring_server
from test_requests import images, register
from components.tracking.requests import MAX_COUNT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tracking store with a tiny cgan (labels and prompts) and ae (images in, images out), each
    its name's first version and champion; yields (root, tracking URI, {family: name})."""
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'home' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GENPIPE_HOME", str(root / "home"))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        (root / "home").mkdir()
        names = {family: register(root, family) for family in ("cgan", "ae")}
    yield root, uri, names


@pytest.fixture(scope="module")
def served(store):
    """Both champions behind their own scoring server; yields {family: URL}."""
    root, uri, names = store
    with scoring_server(root / "cgan-server", f"models:/{names['cgan']}@champion", uri) as cgan, \
            scoring_server(root / "ae-server", f"models:/{names['ae']}@champion", uri) as ae:
        yield {"cgan": cgan, "ae": ae}


def local_model(store, family: str):
    import mlflow

    root, uri, names = store
    mlflow.set_tracking_uri(uri)
    return mlflow.pyfunc.load_model(f"models:/{names[family]}@champion")


def post(url: str, body) -> httpx.Response:
    return httpx.post(f"{url}/invocations", content=json.dumps(body),
                      headers={"Content-Type": "application/json"}, timeout=60)


def predictions(response: httpx.Response):
    assert response.status_code == 200, response.text[:500]
    return response.json()["predictions"]


# --- every request shape -------------------------------------------------------------------------

GENERATE_SHAPES = {
    "inputs mapping": {"inputs": {"count": 3, "seed": 5, "labels": [1, 7, 9]}},
    "inputs with 1-element lists": {"inputs": {"count": [3], "seed": [5], "labels": [1, 7, 9]}},
    "inputs as a list of one record": {"inputs": [{"count": 3, "seed": 5, "labels": [1, 7, 9]}]},
    "instances": {"instances": [{"count": 3, "seed": 5, "labels": [1, 7, 9]}]},
    "dataframe_records": {"dataframe_records": [{"count": 3, "seed": 5, "labels": [1, 7, 9]}]},
    "dataframe_split": {"dataframe_split": {"columns": ["count", "seed", "labels"], "data": [[3, 5, [1, 7, 9]]]}},
    "params beside inputs": {"inputs": {"labels": [1, 7, 9]}, "params": {"count": 3, "seed": 5}},
    "params repeating an input": {"inputs": {"count": 3, "labels": [1, 7, 9]}, "params": {"count": 3, "seed": 5}},
}


def test_every_request_shape_answers_the_same_images_as_predict_in_python(store, served):
    expected = local_model(store, "cgan").predict({"count": 3, "seed": 5, "labels": [1, 7, 9]})
    assert expected.shape == (3, 1, 28, 28)
    for shape, body in GENERATE_SHAPES.items():
        got = np.asarray(predictions(post(served["cgan"], body)), dtype=np.uint8)
        assert np.array_equal(got, expected), f"{shape} answered other images"
    other_seed = np.asarray(predictions(post(served["cgan"], {"inputs": {"count": 3, "seed": 6, "labels": [1, 7, 9]}})))
    assert not np.array_equal(other_seed, expected)


def test_prompts_and_scalar_only_requests(store, served):
    model = local_model(store, "cgan")
    by_prompt = predictions(post(served["cgan"], {"inputs": {"count": 2, "seed": 1}, "params": {"prompt": "ankle boot"}}))
    assert np.array_equal(np.asarray(by_prompt), model.predict({"count": 2, "seed": 1, "prompt": "ankle boot"}))
    # The first try: a bare mapping of scalars, which the server hands over as 0-d arrays.
    scalars = predictions(post(served["cgan"], {"inputs": {"count": 2, "seed": 0}}))
    assert np.array_equal(np.asarray(scalars), model.predict({"count": 2, "seed": 0}))


def test_an_autoencoder_reconstructs_the_images_it_is_sent(store, served):
    pixels = images(3)
    expected = local_model(store, "ae").predict({"images": pixels})
    for body in ({"inputs": {"images": pixels.tolist()}},
                 {"inputs": {"images": pixels.tolist()}, "params": {"output": "reconstruction"}}):
        assert np.array_equal(np.asarray(predictions(post(served["ae"], body)), dtype=np.uint8), expected)
    codes = np.asarray(predictions(post(served["ae"], {"inputs": {"images": pixels.tolist(), "output": "latent"}})))
    assert codes.shape[0] == 3 and codes.dtype.kind == "f"


# --- PNG responses -------------------------------------------------------------------------------

def decode_png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text)), formats=["PNG"]))


def test_png_answers_one_picture_per_image_with_the_same_pixels(served):
    uint8 = np.asarray(predictions(post(served["cgan"], {"inputs": {"count": 5, "seed": 2}})), dtype=np.uint8)
    pngs = predictions(post(served["cgan"], {"inputs": {"count": 5, "seed": 2, "format": "png"}}))
    assert isinstance(pngs, list) and len(pngs) == 5
    decoded = np.stack([decode_png(p) for p in pngs])
    assert decoded.shape == (5, 28, 28) and decoded.dtype == np.uint8
    assert np.array_equal(decoded, uint8[:, 0])


def test_png_grid_answers_one_picture_of_all_images(served):
    (grid,) = predictions(post(served["cgan"], {"inputs": {"count": 4, "seed": 2}, "params": {"format": "png_grid"}}))
    # 2 × 2 images of 28 pixels with 2-pixel borders
    assert decode_png(grid).shape == (2 + 2 * 30, 2 + 2 * 30)
    (recon,) = predictions(post(served["ae"], {"inputs": {"images": images(1).tolist(), "format": "png_grid"}}))
    assert decode_png(recon).shape == (28, 28)


# --- bad requests --------------------------------------------------------------------------------

BAD_REQUESTS = [
    ("cgan", {"inputs": {"count": 0}}, f"count: must be an integer in 1..{MAX_COUNT}, got 0"),
    ("cgan", {"inputs": {"count": MAX_COUNT + 1}}, f"count: must be an integer in 1..{MAX_COUNT}, got {MAX_COUNT + 1}"),
    ("cgan", {"inputs": {"count": 2.5}}, "count: must be an integer"),
    ("cgan", {"inputs": {"count": "two"}}, "count: must be an integer"),
    ("cgan", {"inputs": {"seed": -1}}, "seed: must be an integer >= 0, got -1"),
    ("cgan", {"inputs": {"cuont": 2}}, "unknown request field(s) ['cuont'] for this cgan model"),
    ("cgan", {"inputs": {"count": 2, "labels": [1, 99]}}, "labels: class ids must be in 0..9"),
    ("cgan", {"inputs": {"count": 3, "labels": [1, 2]}}, "labels: need one class id per image (3), got 2"),
    ("cgan", {"inputs": {"count": 2, "labels": list(range(100_000))}}, "labels: need one class id per image (2), got 100000"),
    ("cgan", {"inputs": {"labels": [1], "prompt": "bag"}}, "labels, prompt: send one of them, not both"),
    ("cgan", {"inputs": {"count": 1, "prompt": " "}}, "prompt: must not be empty"),
    ("cgan", {"inputs": {"count": 1, "prompt": "a bicycle"}}, "prompt: 'a bicycle' names no class this model knows"),
    ("cgan", {"inputs": {"count": 2}, "params": {"prompt": "a bag and a coat"}}, "prompt: 'a bag and a coat' names 2"),
    ("cgan", {"inputs": {"count": 2, "format": "jpeg"}}, "format: must be one of uint8, png, png_grid, got 'jpeg'"),
    ("cgan", {"inputs": {"count": 2, "format": ["png", "uint8"]}}, "format: must be one of uint8, png, png_grid"),
    ("cgan", {"inputs": {"count": 2}, "params": {"count": 3}}, "count: sent in both the input (2) and params (3)"),
    ("cgan", {"dataframe_records": [{"count": 1}, {"count": 2}]}, "send one request (one row, one record) per call, got 2"),
    ("cgan", {"dataframe_records": []}, "send one request (one row, one record) per call, got 0"),
    ("cgan", {"dataframe_records": [{"count": 2, "labels": [1, 10]}]}, "labels: class ids must be in 0..9"),
    ("cgan", {"dataframe_split": {"columns": ["count", "seed"], "data": [[2, -3]]}}, "seed: must be an integer >= 0"),
    # params are type-checked by MLflow against the signature's params schema, naming the param
    ("cgan", {"inputs": {}, "params": {"count": 2.5}}, "count"),
    ("ae", {"inputs": {"count": 2}}, "unknown request field(s) ['count'] for this ae model"),
    ("ae", {"inputs": {"images": images(1, (1, 14, 14)).tolist()}}, "images: this ae model takes N×1×28×28 images"),
    ("ae", {"inputs": {"images": (images(1).astype(np.int64) + 300).tolist()}}, "images: must be uint8 pixels 0..255"),
    ("ae", {"inputs": {"images": images(1).tolist(), "output": "code"}}, "output: must be one of reconstruction, latent"),
    ("ae", {"inputs": {"images": images(1).tolist(), "output": ["latent", "code"]}}, "output: must be one of"),
    ("ae", {"inputs": {"images": images(1).tolist(), "output": "latent", "format": "png"}},
     "format: 'png' encodes images; output 'latent' returns float codes"),
]


@pytest.mark.parametrize("family, body, message", BAD_REQUESTS, ids=[m.split(":")[0] + f"-{i}" for i, (_, _, m)
                                                                      in enumerate(BAD_REQUESTS)])
def test_a_bad_request_answers_400_naming_the_field(served, family, body, message):
    response = post(served[family], body)
    assert response.status_code == 400, response.text[:300]
    error = response.json()
    assert error["error_code"] == "INVALID_PARAMETER_VALUE"  # the model's message, not an unexpected-error trace
    assert message in error["message"]
    # MLflow prefixes the data it was sent, which numpy cuts short (1000 values at most per array)
    assert "stack_trace" not in error and len(response.content) < 20_000


# --- the registry entry says how to call it ----------------------------------------------------

def test_each_version_carries_a_params_signature_an_example_and_a_description(store):
    from mlflow import MlflowClient
    from mlflow.models import get_model_info, validate_serving_input

    root, uri, names = store
    local_model(store, "cgan")  # sets the tracking URI
    for family, params, example_fields in [("cgan", {"count", "seed", "format", "prompt"}, {"count", "seed", "labels"}),
                                           ("ae", {"output", "format"}, {"images"})]:
        model_uri = f"models:/{names[family]}@champion"
        info = get_model_info(model_uri)
        assert info.signature.inputs is None  # the model checks its own inputs, naming the field
        assert {p.name for p in info.signature.params.params} == params
        assert all(p.default is None for p in info.signature.params.params)
        assert info.saved_input_example_info["serving_input_path"] == "serving_input_example.json"
        example = json.loads(Path(_download(model_uri, "serving_input_example.json")).read_text())
        assert set(example["inputs"]) == example_fields
        answer = np.asarray(validate_serving_input(model_uri, example))
        assert answer.dtype == np.uint8 and answer.shape[1:] == (1, 28, 28)
        description = MlflowClient(uri).get_model_version(names[family], "1").description
        assert all(f"`{field}`" in description for field in params | example_fields), description
        assert "HTTP 400" in description


def _download(model_uri: str, path: str) -> str:
    import mlflow

    return mlflow.artifacts.download_artifacts(f"{model_uri}/{path}")


# --- the champion's Dockerfile, as MLflow generates it -------------------------------------------

def test_the_generated_dockerfile_serves_the_champion_with_its_own_code_and_pins(store, tmp_path):
    import mlflow
    import yaml
    from mlflow.models import validate_serving_input

    from components.tracking.registry import pip_requirements

    root, uri, names = store
    out = tmp_path / "docker"
    subprocess.run([str(BIN / "mlflow"), "models", "generate-dockerfile", "-m", f"models:/{names['cgan']}@champion",
                    "-d", str(out), "--env-manager", "local"], check=True, capture_output=True,
                   env=clean_env(MLFLOW_TRACKING_URI=uri), timeout=300)
    dockerfile = (out / "Dockerfile").read_text()
    instructions = [line.split()[0] for line in dockerfile.splitlines() if line and not line.startswith("#")
                    and not line.startswith((" ", "\t"))]
    assert set(instructions) <= {"FROM", "RUN", "WORKDIR", "COPY", "ENV", "ENTRYPOINT", "EXPOSE", "LABEL", "ARG"}
    assert instructions[0] == "FROM" and instructions[-1] == "ENTRYPOINT"
    model_dir = out / "model_dir"
    copied = re.findall(r"^COPY (\S+) (\S+)$", dockerfile, re.M)
    assert copied, "the Dockerfile copies the model in"
    for source, _ in copied:
        assert (out / source).exists(), f"COPY {source}: not in the build context"
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    python = mlmodel["flavors"]["python_function"]["python_version"]
    assert re.search(rf"^FROM python:{re.escape(python)}\b", dockerfile, re.M), "the image's Python is the model's"
    assert f"mlflow=={mlflow.__version__}" in dockerfile
    requirements = (model_dir / "requirements.txt").read_text().split()
    assert set(pip_requirements()) <= set(requirements)
    assert (model_dir / "code" / "components" / "tracking" / "pyfunc_model.py").is_file()
    # What the container would load and answer: the model folder it copies, with its example.
    example = (model_dir / "serving_input_example.json").read_text()
    answer = np.asarray(validate_serving_input(str(model_dir), example))
    assert answer.shape == (4, 1, 28, 28) and answer.dtype == np.uint8


def test_the_readme_client_snippet_runs_against_a_served_champion(store, served):
    """The README's serving snippet, as written but for the server's URL and the model's name."""
    import sys

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (snippet,) = [s for s in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "/invocations" in s]
    root, uri, names = store
    code = snippet.replace("http://127.0.0.1:5001", served["cgan"]).replace("fashion-mnist-cgan", names["cgan"])
    check = "\nimport numpy\nassert numpy.array_equal(numpy.stack([numpy.asarray(i) for i in images]), pixels[:, 0])\nprint('ok')\n"
    result = subprocess.run([sys.executable, "-c", code + check], env=clean_env(MLFLOW_TRACKING_URI=uri),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
