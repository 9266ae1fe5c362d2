"""Seeds seed everything, across real processes: two runs of the same params end bit-identical, and
a run killed with SIGKILL mid-epoch, run again, ends bit-identical to one that was never killed."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_configs import model_fields
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

# One training process: tiny random data, a checkpoint after every step, and (when asked) a SIGKILL
# to itself as step KILL_AT is logged, i.e. after the checkpoint of step KILL_AT - 1.
CHILD = """
import json, os, signal, sys
from pathlib import Path
import torch
from components.models import FAMILIES, build_model
from components.training.checkpoint import save_weights
from components.training.trainer import Trainer

torch.set_num_threads(1)
fields, checkpoint, out, kill_at = json.loads(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
cfg = FAMILIES.get(fields["family"]).config.model_validate(fields)
data = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (48, 1, 28, 28), generator=data, dtype=torch.uint8)
labels = torch.randint(0, 4, (48,), generator=data)

def log_fn(values, step):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

model = build_model(cfg, 1, 4)
Trainer(model, cfg, log_every=1, checkpoint_every=1, checkpoint_path=Path(checkpoint) if checkpoint else None,
        log_fn=log_fn, progress=False).fit(images, labels)
save_weights(model, out)
"""

SMALL = {
    "vae": {"latent_dim": 4, "width": 8, "beta": 1.0},
    "dcgan": {"latent_dim": 8, "ngf": 8, "ndf": 8, "beta1": 0.5},
}


def train(family: str, out: Path, checkpoint: Path | None = None, kill_at: int = 0) -> subprocess.CompletedProcess:
    fields = model_fields(family, epochs=2, batch_size=16, lr=3e-3, seed=3, **SMALL[family])  # 3 steps per epoch, 6 in all
    return subprocess.run([sys.executable, "-c", CHILD, json.dumps(fields), str(checkpoint or ""), str(out),
                           str(kill_at)], cwd=REPO, capture_output=True, text=True, timeout=120)


def assert_bit_identical(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    differing = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differing, f"{len(differing)} of {len(wa)} tensors differ: {differing}"


@pytest.mark.parametrize("family", ["vae", "dcgan"])
def test_same_params_same_weights_and_a_killed_run_resumes_bit_identical(tmp_path, family):
    first, second = train(family, tmp_path / "first.safetensors"), train(family, tmp_path / "second.safetensors")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert_bit_identical(tmp_path / "first.safetensors", tmp_path / "second.safetensors")

    checkpoint = tmp_path / "last.pt"
    killed = train(family, tmp_path / "killed.safetensors", checkpoint, kill_at=5)  # mid-epoch 2
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "killed.safetensors").exists()
    assert torch.load(checkpoint, weights_only=True)["step"] == 4

    resumed = train(family, tmp_path / "resumed.safetensors", checkpoint)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 4 of 6" in resumed.stdout
    assert_bit_identical(tmp_path / "first.safetensors", tmp_path / "resumed.safetensors")
