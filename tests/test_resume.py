"""Seeds seed everything, across real processes: two runs of the same params end bit-identical, and
a run killed with SIGKILL mid-epoch, run again, ends bit-identical to one that was never killed:
the model (with its EMA), the live weights beside it, bf16 autocast and channels_last included."""
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
from components.training.checkpoint import save_state, save_weights
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
trainer = Trainer(model, cfg, log_every=1, checkpoint_every=1,
                  checkpoint_path=Path(checkpoint) if checkpoint else None, log_fn=log_fn, progress=False)
trainer.fit(images, labels)
save_weights(model, out)  # the EMA in the ema_modules when there is one
save_state(trainer.live_state_dict(), out.with_name(f"live-{out.name}"))
"""

SMALL = {
    "vae": {"latent_dim": 4, "width": 8, "beta": 1.0},
    "dcgan": {"latent_dim": 8, "ngf": 8, "ndf": 8, "beta1": 0.5},
}
# Plain fp32 (the VAE), and everything the checkpoint must carry besides (the DCGAN: an EMA of the
# generator, bf16 autocast, channels_last). The plain DCGAN resumes in tests/test_trainer.py.
VARIANTS = {
    "vae": ("vae", {}),
    "dcgan-ema-bf16-channels_last": ("dcgan", {"ema_decay": 0.9, "precision": "bf16", "channels_last": True}),
}


def train(variant: str, out: Path, checkpoint: Path | None = None, kill_at: int = 0) -> subprocess.CompletedProcess:
    family, options = VARIANTS[variant]
    # 3 steps per epoch, 6 in all
    fields = model_fields(family, epochs=2, batch_size=16, lr=3e-3, seed=3, **SMALL[family], **options)
    return subprocess.run([sys.executable, "-c", CHILD, json.dumps(fields), str(checkpoint or ""), str(out),
                           str(kill_at)], cwd=REPO, capture_output=True, text=True, timeout=120)


def assert_bit_identical(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    differing = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differing, f"{len(differing)} of {len(wa)} tensors differ: {differing}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_params_same_weights_and_a_killed_run_resumes_bit_identical(tmp_path, variant):
    first, second = train(variant, tmp_path / "first.safetensors"), train(variant, tmp_path / "second.safetensors")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert_bit_identical(tmp_path / "first.safetensors", tmp_path / "second.safetensors")

    checkpoint = tmp_path / "last.pt"
    killed = train(variant, tmp_path / "killed.safetensors", checkpoint, kill_at=5)  # mid-epoch 2
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "killed.safetensors").exists()
    assert torch.load(checkpoint, weights_only=True)["step"] == 4
    assert [p.name for p in tmp_path.glob(".last.pt.tmp-*")] == []  # the checkpoint was never half-written

    resumed = train(variant, tmp_path / "resumed.safetensors", checkpoint)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 4 of 6" in resumed.stdout
    assert_bit_identical(tmp_path / "first.safetensors", tmp_path / "resumed.safetensors")
    assert_bit_identical(tmp_path / "live-first.safetensors", tmp_path / "live-resumed.safetensors")
    if VARIANTS[variant][1].get("ema_decay"):
        ema, live = load_file(str(tmp_path / "first.safetensors")), load_file(str(tmp_path / "live-first.safetensors"))
        assert any(not torch.equal(ema[k], live[k]) for k in ema if k.startswith("generator."))
