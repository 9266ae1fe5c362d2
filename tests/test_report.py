"""The per-version HTML report (`genpipe report`): its pictures on cases with known answers, and the
whole report of a registered version, which must open in headless Chromium with every image loaded."""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model_configs import model_config
from test_registry import CFG, PROTOCOL
from test_requests import CLASSES, save_model_folder
from components.config import DataConfig
from components.models import build_model
from components.reporting.html import line_chart
from components.reporting.pictures import interpolation_strip, nearest_real, neighbour_rows, slerp

pytestmark = pytest.mark.usefixtures("one_thread")


# --- pictures, on known answers ------------------------------------------------------------------

def test_slerp_starts_and_ends_at_the_draws_and_keeps_their_norm():
    a, b = torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    path = slerp(a, b, torch.linspace(0, 1, 5))  # (2, 5, 2)
    assert torch.allclose(path[:, 0], a) and torch.allclose(path[:, -1], b, atol=1e-6)
    assert torch.allclose(path[0].norm(dim=1), torch.ones(5), atol=1e-6)  # a quarter circle, not a chord
    assert torch.allclose(path[0, 2], torch.tensor([0.5 ** 0.5, 0.5 ** 0.5]), atol=1e-6)
    assert torch.allclose(path[1], a[1].expand(5, 2))  # parallel draws: no division by sin 0


def test_nearest_real_finds_copies_at_distance_zero_across_chunks():
    real = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    picks = torch.tensor([3, 41, 17])
    samples = real[picks].clone()
    samples[2, 0, 0, 0] ^= 1  # one pixel off by one grey level: still nearest, distance 1/255
    indices, distances = nearest_real(samples, real, k=2, chunk=7)
    assert indices[:, 0].tolist() == picks.tolist()
    assert distances[0, 0] == 0 and distances[1, 0] == 0 and abs(distances[2, 0] - 1 / 255) < 1e-6
    assert (distances[:, 1] > distances[:, 0]).all()
    rows = neighbour_rows(samples, real, indices)
    assert rows.shape == (3 * 3, 1, 8, 8) and torch.equal(rows[3], samples[1]) and torch.equal(rows[4], real[41])


def spread_model(family: str):
    """A tiny untrained model whose weights are spread wide enough that its images differ."""
    model = build_model(model_config(family), 1, 10, CLASSES).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    return model


@pytest.mark.parametrize("family, kind", [("dcgan", "generate"), ("cvae", "generate"), ("ae", "reconstruct")])
def test_interpolation_rows_walk_from_one_image_to_another(family, kind):
    model = spread_model(family)
    reference = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    strip = interpolation_strip(model, kind, reference, rows=3, steps=5, seed=2)
    assert strip.shape == (15, 1, 28, 28) and strip.dtype == torch.uint8
    assert torch.equal(strip, interpolation_strip(model, kind, reference, rows=3, steps=5, seed=2))  # seeded
    rows = strip.view(3, 5, 1, 28, 28)
    assert not torch.equal(rows[:, 0], rows[:, -1])  # each row goes somewhere


def test_a_sampler_row_starts_and_ends_at_its_two_prior_draws():
    from components.images import to_uint8

    model = spread_model("dcgan")
    strip = interpolation_strip(model, "generate", torch.zeros(1, 1, 28, 28, dtype=torch.uint8), rows=2, steps=4,
                                seed=3)
    generator = torch.Generator().manual_seed(3)
    a, b = model.noise(2, generator), model.noise(2, generator)
    with torch.no_grad():
        ends = to_uint8(model.from_noise(torch.cat([a, b])))
    rows = strip.view(2, 4, 1, 28, 28)
    assert torch.equal(rows[:, 0], ends[:2]) and torch.equal(rows[:, -1], ends[2:])


def test_line_chart_draws_each_series_and_skips_non_finite_points():
    svg = line_chart({"loss_g": [(0, 1.0), (1, float("nan")), (2, 0.5)], "loss_d": [(0, 0.2), (2, 0.3)]})
    assert svg.count("<polyline") == 2 and "loss_g" in svg and "nan" not in svg.lower()


# --- the whole report ----------------------------------------------------------------------------

def pack_toy_dataset(out: Path) -> Path:
    from components.data.pack import pack_dataset
    from components.data.sources import RawDataset, Split

    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 60), ("test", 40)):
        images = rng.integers(0, 256, (n, 1, 28, 28)).astype(np.uint8)
        splits[split] = Split(images, np.arange(n) % 10, [f"{split}#{i}" for i in range(n)])
    cfg = DataConfig(name="toy", source="fashion-mnist", path=".", image_size=28, channels=1, resize=False,
                     test_fraction=0.4, limit_per_split=None, max_pixels=50_000_000, max_file_bytes=10**9, shard_size=1000,
                     follow_symlinks=False, archive={"max_members": 1000, "max_bytes": 10**8})
    pack_dataset(RawDataset(CLASSES, splits), out, cfg, {"source": "toy"})
    return out


def training_run(family: str, seed: int) -> str:
    """A training run with a short loss history, as the trainer logs one."""
    from components.tracking.runs import client, ensure_experiment

    c = client()
    run_id = c.create_run(ensure_experiment(f"toy-{family}"), run_name=f"train-{seed}").info.run_id
    for step in range(5):
        c.log_metric(run_id, "loss_g", 2.0 - 0.3 * step, step=step)
        c.log_metric(run_id, "loss_d", 0.5 + 0.1 * step, step=step)
    c.set_terminated(run_id)
    return run_id


def register_version(root: Path, family: str, seed: int, fid: float, **overrides) -> None:
    from components.evaluation.grid import save_grid
    from components.tracking.registry import register_model
    from components.training.checkpoint import write_json

    model_dir, eval_dir = save_model_folder(root, family, seed, **overrides), root / f"eval-{family}-{seed}"
    write_json({"fid": fid}, eval_dir / "metrics.json")
    write_json(PROTOCOL, eval_dir / "protocol.json")
    save_grid(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), eval_dir / "grid.png")
    lineage = {"dataset_version": "d1", "evaluator_md5": "e1", "model_md5": f"md5-{family}-{seed}",
               "params_hash": "p", "git_commit": "c", "training_run_id": training_run(family, seed)}
    register_model(f"toy-{family}", model_dir, eval_dir, lineage, CFG, lambda version, protocol: 50.0)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Reports of a dcgan's and an inpainter's challengers (beside their champions) and of an
    autoencoder, from a real store."""
    from components.reporting.report import build_report

    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GENPIPE_HOME", str(root / "home"))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'home' / 'mlflow.db'}")
        (root / "home").mkdir()
        data = pack_toy_dataset(root / "dataset")
        register_version(root, "dcgan", seed=0, fid=50.0)
        register_version(root, "dcgan", seed=1, fid=60.0)  # kept: v1 stays champion
        register_version(root, "ae", seed=0, fid=40.0)
        from model_configs import model_fields

        holes = model_fields("inpaint")["masks"]
        boxes_only = {**holes, "strokes": {**holes["strokes"], "weight": 0.0}, "band": {**holes["band"], "weight": 0.0}}
        register_version(root, "inpaint", seed=0, fid=50.0, masks=boxes_only)  # the champion: other holes
        register_version(root, "inpaint", seed=1, fid=60.0)
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{root / 'home' / 'mlflow.db'}")
        pages = {"dcgan": build_report("toy-dcgan@challenger", data, count=16),
                 "ae": build_report("toy-ae/1", data, count=16),
                 "inpaint": build_report("toy-inpaint@challenger", data, count=15)}
        for key, page in pages.items():
            (root / f"{key}.html").write_text(page)
        yield root, pages


def embedded_pngs(page: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
            for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_a_challengers_report_compares_it_with_the_champion_at_the_same_seed(reports):
    _, pages = reports
    page = pages["dcgan"]
    assert "<title>toy-dcgan v2</title>" in page
    for section in ("Scores, decision and lineage", "Images at the same seed", "Interpolation",
                    "Nearest training images (memorisation check)", "Evaluation pictures", "Training curves"):
        assert f"<h2>{section}</h2>" in page
    assert "v2 at seed 0" in page and "champion v1 at seed 0 (its own registered code)" in page
    assert "promotion.decision</th><td>kept" in page and "<th>fid</th><td>60</td>" in page
    pictures = embedded_pngs(page)
    ours, champions = pictures[0], pictures[1]
    assert ours.shape == champions.shape == (2 + 4 * 30, 2 + 4 * 30)  # 16 samples, 4 × 4, 2-pixel borders
    assert not np.array_equal(ours, champions)  # two different models at the same seed
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # self-contained: nothing fetched


def test_a_translate_challenger_and_its_champion_restore_the_very_same_inputs(reports):
    """The champion (its own registered code) is sent this report's inputs and masks, although it
    was trained on holes of another kind: the input and baseline columns of the two figures are the
    same pixels, only the models' columns differ."""
    page = reports[1]["inpaint"]
    assert "v2 at seed 0" in page and "champion v1 at seed 0 (its own registered code)" in page
    ours, champions = embedded_pngs(page)[:2]
    assert ours.shape == champions.shape
    tile = 2 + 28 * 4  # a 28 px image zoomed 4x to reach FIGURE_SIDE, and the grid's border
    column = lambda image, k: image[:, 2 + k * tile: (k + 1) * tile]  # noqa: E731
    for k, name in enumerate(["input", "mean_fill", "nearest_fill"]):
        assert np.array_equal(column(ours, k), column(champions, k)), name
    assert not np.array_equal(column(ours, 3), column(champions, 3))  # two models
    assert np.array_equal(column(ours, 4), column(champions, 4))  # the originals
    # Both keep every known pixel: where this version's restoration is the original (outside the
    # hole both were sent), the champion's is too. Sent holes of its own kind, it would differ there.
    band = 2 * 12 + 2  # a tile's caption band, below its image
    rows = [slice(2 + r * (tile + band), 2 + r * (tile + band) + tile - 2) for r in range(ours.shape[0] // (tile + band))]
    original, mine, theirs = (np.concatenate([column(image, k)[r] for r in rows])
                              for image, k in ((ours, 4), (ours, 3), (champions, 3)))
    known = mine == original
    assert known.mean() > 0.5 and (theirs[known] == original[known]).mean() > 0.99


def test_the_report_draws_the_training_curves_of_the_versions_run(reports):
    _, pages = reports
    charts = re.findall(r"<figure><svg.*?</svg><figcaption>(.*?)</figcaption>", pages["dcgan"])
    assert charts == ["loss_d", "loss_g"]
    assert "No training metrics found" not in pages["dcgan"]


def test_genpipe_report_writes_the_file(reports, tmp_path, capsys):
    from flows.cli import main

    root, _ = reports
    out = tmp_path / "nested" / "report.html"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'home' / 'mlflow.db'}")
        assert main(["report", "toy-dcgan@champion", "--out", str(out), "--data", str(root / "dataset"), "-n", "9"]) == 0
        assert "<title>toy-dcgan v1</title>" in out.read_text() and "wrote the report" in capsys.readouterr().out
        assert main(["report", "toy-dcgan@nope", "--out", str(out), "--data", str(root / "dataset")]) == 2
        assert "toy-dcgan@nope" in capsys.readouterr().err


def test_an_autoencoders_report_shows_reconstructions_and_walks_between_codes(reports):
    _, pages = reports
    page = pages["ae"]
    assert "(straight, between the codes of two held-out images)" in page
    assert "task kind</th><td>reconstruct" in page


def test_the_report_refuses_an_unknown_version_with_a_clear_error(reports, tmp_path):
    from components.reporting.report import ReportError, build_report

    root, _ = reports
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'home' / 'mlflow.db'}")
        with pytest.raises(ReportError, match="toy-dcgan@nope"):
            build_report("toy-dcgan@nope", root / "dataset")
        with pytest.raises(ReportError, match="name a registered version as NAME@ALIAS or NAME/VERSION"):
            build_report("toy-dcgan", root / "dataset")
        with pytest.raises(ReportError, match=r"--data .*no packed dataset"):
            build_report("toy-dcgan/1", tmp_path)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Appended to a copy of the report: on load, the title says how many images decoded.
LOAD_PROBE = ("<script>window.addEventListener('load', () => { const imgs = [...document.images]; "
              "document.title = 'loaded ' + imgs.filter(i => i.complete && i.naturalWidth > 0).length + "
              "' of ' + imgs.length; });</script>")


@pytest.mark.parametrize("key", ["dcgan", "ae"])
def test_the_report_opens_in_headless_chromium_with_every_image_loaded(reports, tmp_path, key):
    if CHROMIUM is None:
        missing = "chromium missing: apt-get install chromium (.ci/run installs it)"
        if os.environ.get("GENPIPE_REQUIRE_CHROMIUM"):  # CI sets it: there the check must run
            pytest.fail(missing)
        pytest.skip(missing)
    root, pages = reports
    probe = tmp_path / f"{key}.html"
    probe.write_text(pages[key].replace("</body>", LOAD_PROBE + "</body>"))
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    title = re.search(r"<title>(.*?)</title>", done.stdout).group(1)
    total = pages[key].count("<img ")
    assert total >= 4 and title == f"loaded {total} of {total}", title
