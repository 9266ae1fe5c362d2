"""dvc.yaml's deps list the code each stage really runs: every stage command is run for real (tiny
data, one subprocess each, as DVC would run it) and every genpipe module it imported must lie
under one of that stage's deps; a code dep that no imported module lies under is too broad."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from components.config import apply_overrides, read_params_raw, write_params_raw
from fashion import needs_fashion_mnist
from model_configs import shrink_every_model

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"components", "flows"}  # what pyproject installs: the code a stage can import from here
TINY = [
    "data.limit_per_split=64",
    "classifier.epochs=1", "classifier.batch_size=32",
    *shrink_every_model(REPO / "params.yaml", batch_size=32, width=8),
    "evaluate.num_samples=32", "evaluate.kid_subset_size=16", "evaluate.grid_size=4", "evaluate.guidance.samples=20",
]
# A model trained on another (the modern profile's ldm on kl_ae): its train_latent@ and evaluate_latent@ stages
ON_A_MODEL = ["train.kl_ae.epochs=1", "train.kl_ae.batch_size=32", "train.kl_ae.width=8", "latent.ldm.epochs=1",
              "latent.ldm.batch_size=32", "latent.ldm.width=16", "latent.ldm.sample_steps=2"]
# Runs one stage command through the CLI, then records which of genpipe's modules it imported.
RUN_AND_LIST = """
import json, sys
from pathlib import Path
from flows.cli import main
rc = main(sys.argv[3:])
root = Path(sys.argv[1])
files = set()
for module in list(sys.modules.values()):
    path = Path(getattr(module, "__file__", None) or "/").resolve()
    if path.is_relative_to(root) and path.relative_to(root).parts[0] in {packages!r}:
        files.add(path.relative_to(root).as_posix())
Path(sys.argv[2]).write_text(json.dumps(sorted(files)))
sys.exit(rc)
""".format(packages=PACKAGES)

pytestmark = [pytest.mark.slow, needs_fashion_mnist]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Every stage of dvc.yaml run once in a scratch workspace: address → (deps, imported files)."""
    ws = tmp_path_factory.mktemp("deps")
    for name in ["dvc.yaml", "params.yaml", ".dvcignore"]:
        shutil.copy(REPO / name, ws / name)
    shutil.copytree(REPO / ".dvc", ws / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    params = ws / "params.yaml"
    raw, modern = read_params_raw(params), read_params_raw(REPO / "profiles" / "modern.yaml")
    raw["train"]["kl_ae"], raw["latent"] = modern["train"]["kl_ae"], modern["latent"]
    write_params_raw(apply_overrides(raw, TINY + ON_A_MODEL), params)
    subprocess.run(["git", "init", "-q"], cwd=ws, check=True)

    from components.versioning import dvc_pipeline as dvc

    repo = dvc.open_repo(ws)
    env = {**os.environ, "GENPIPE_HOME": str(ws / ".genpipe"), "PYTHONPATH": str(REPO),
           "MLFLOW_TRACKING_URI": f"sqlite:///{ws / '.genpipe' / 'mlflow.db'}", "GENPIPE_DEVICE": "cpu"}
    found = {}
    for addressing in dvc.stage_order(repo):
        stage = next(s for s in repo.index.stages if s.addressing == addressing)
        addressing = stage.name  # the address above is relative to this process's cwd
        command = shlex.split(stage.cmd)
        assert command[0] == "genpipe", f"{addressing}: stage commands are genpipe sub-commands"
        listing = ws / f"{addressing}.json"
        done = subprocess.run([sys.executable, "-c", RUN_AND_LIST, str(REPO), str(listing), *command[1:]],
                              cwd=ws, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{addressing} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        deps = [Path(d.def_path).as_posix() for d in stage.deps]
        found[addressing] = (deps, json.loads(listing.read_text()))
    return found


def _covers(dep: str, file: str) -> bool:
    return file == dep or file.startswith(dep.rstrip("/") + "/")


def test_every_module_a_stage_imports_is_one_of_its_deps(stages):
    missing = {addressing: [f for f in files if not any(_covers(d, f) for d in deps)]
               for addressing, (deps, files) in stages.items()}
    assert not {a: m for a, m in missing.items() if m}, f"imported but not in dvc.yaml deps: {missing}"


def test_no_code_dep_is_broader_than_what_the_stage_imports(stages):
    unused = {}
    for addressing, (deps, files) in stages.items():
        code_deps = [d for d in deps if Path(d).parts[0] in PACKAGES]
        unused[addressing] = [d for d in code_deps if not any(_covers(d, f) for f in files)]
    assert not {a: u for a, u in unused.items() if u}, f"deps no module of the stage lies under: {unused}"
