"""The `s3` source against moto's S3 server (a real HTTP endpoint on loopback, started once for the
module and stopped by its process id), configured by the environment alone; and DVC's change
detection of an `s3://` dep of a stage against the same server."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
import traceback

import numpy as np
import pytest
from PIL import Image
from servers import S3_CREDENTIALS, free_port, moto_s3, s3_client

from components.config import DataConfig
from components.data.ingest import ingest
from components.data.items import FileItem, Skipped
from components.data.pack import read_manifest, read_rejected
from components.data.s3 import ATTEMPTS, make_client, parse_s3_url, walk_s3

BUCKET = "photos"
URL = f"s3://{BUCKET}/data"
# Objects under data/ (what the source judges) and beside it (what it must not list).
IMAGES = {"cat/1.png": b"cat-1", "cat/2.jpeg": b"cat-2", "cat/deep/3.jpg": b"cat-3",
          "cat/a.png/4.png": b"cat-4", "dog/1.gif": b"dog-1", "dog/2.webp": b"dog-2", "dog/3.BMP": b"dog-3"}
SKIPPED = {"loose.png": "not inside a class prefix", ".hidden/x.png": "hidden", "cat/.DS_Store": "hidden",
           "cat/notes.txt": "unsupported extension '.txt'", "fish/readme.md": "unsupported extension '.md'",
           "bird/": "empty class prefix", "fish/": "empty class prefix"}
MARKERS = ["data/", "data/cat/", "data/cat/deep/", "data/bird/"]  # folder markers, as consoles create them
ELSEWHERE = ["data-old/cat/1.png", "other/dog/1.png"]
SECRET = "s3cr3t-value-that-must-not-leak"


@pytest.fixture(scope="module")
def moto_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("moto")


@pytest.fixture(scope="module")
def endpoint(moto_dir):
    with moto_s3(moto_dir) as url, pytest.MonkeyPatch.context() as env:
        for name in [n for n in os.environ if n.startswith("AWS_")]:
            env.delenv(name)
        for name, value in {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": url}.items():
            env.setenv(name, value)
        client = s3_client(url)
        client.create_bucket(Bucket=BUCKET)
        for origin, body in {**IMAGES, **{k: b"x" for k in SKIPPED if not k.endswith("/")}}.items():
            client.put_object(Bucket=BUCKET, Key=f"data/{origin}", Body=body)
        for key in MARKERS:
            client.put_object(Bucket=BUCKET, Key=key, Body=b"")
        for key in ELSEWHERE:
            client.put_object(Bucket=BUCKET, Key=key, Body=b"x")
        yield url


def found(listing) -> list[tuple[str, str]]:
    """(origin, label or reason) of each entry, in order."""
    return [(e.origin, e.label if isinstance(e, FileItem) else e.reason) for e in listing.entries]


def list_requests(moto_dir) -> int:
    """ListObjectsV2 requests moto has served so far, from its log."""
    return (moto_dir / "moto-s3.log").read_text().count("list-type=2")


def test_classes_items_and_every_refusal_with_its_reason(endpoint):
    listing = walk_s3(URL)
    items = {e.origin: e for e in listing.entries if isinstance(e, FileItem)}
    skipped = {e.origin: e.reason for e in listing.entries if isinstance(e, Skipped)}

    assert listing.classes == ["cat", "dog"]
    assert set(items) == set(IMAGES)
    assert {o: i.label for o, i in items.items()} == {o: o.split("/")[0] for o in IMAGES}
    assert set(skipped) == set(SKIPPED)
    for origin, words in SKIPPED.items():
        assert words in skipped[origin], (origin, skipped[origin])
    # Sub-prefix markers of a class with images are folders, not findings; a trailing slash is optional.
    assert found(walk_s3(URL + "/")) == found(listing)


def test_entries_sorted_by_sha256_of_origin_and_stable(endpoint):
    origins = [e.origin for e in walk_s3(URL).entries]
    assert origins == sorted(origins, key=lambda o: hashlib.sha256(o.encode()).hexdigest())
    assert origins != sorted(origins)  # classes mixed, not grouped
    assert [e.origin for e in walk_s3(URL).entries] == origins


def test_listing_walks_every_page(endpoint, moto_dir):
    before = list_requests(moto_dir)
    small_pages = walk_s3(URL, page_size=2)
    objects = len(IMAGES) + len(SKIPPED) - 2 + len(MARKERS)  # two of SKIPPED are markers' findings
    assert small_pages.source_info["objects"] == objects
    assert list_requests(moto_dir) - before == -(-objects // 2)  # ceil: one request per page
    assert found(small_pages) == found(walk_s3(URL))


def test_read_returns_the_bytes_also_in_another_process(endpoint):
    items = [e for e in walk_s3(URL).entries if isinstance(e, FileItem)]
    assert {i.origin: i.read() for i in items} == IMAGES
    # A worker process gets the reader pickled, without the parent's client.
    reader = pickle.loads(pickle.dumps(items[0].read))
    assert reader.client is None and reader() == IMAGES[items[0].origin]


def test_read_of_a_vanished_object_is_an_oserror_naming_it(endpoint):
    client = s3_client(endpoint)
    client.put_object(Bucket=BUCKET, Key="data/cat/gone.png", Body=b"soon gone")
    item = next(e for e in walk_s3(URL).entries if e.origin == "cat/gone.png")
    client.delete_object(Bucket=BUCKET, Key="data/cat/gone.png")
    with pytest.raises(OSError, match=r"s3://photos/data/cat/gone.png: .*NoSuchKey"):
        item.read()


def test_fingerprint_changes_with_one_new_object_only(endpoint):
    client = s3_client(endpoint)
    info = walk_s3(URL).source_info
    assert info["bucket"] == BUCKET and info["prefix"] == "data/"
    assert set(info) == {"bucket", "prefix", "objects", "listing_sha256"}
    # Rewriting an object with the same bytes keeps its ETag: nothing new to ingest.
    client.put_object(Bucket=BUCKET, Key="data/cat/1.png", Body=IMAGES["cat/1.png"])
    client.put_object(Bucket=BUCKET, Key="other/cat/new.png", Body=b"not under data/")
    assert walk_s3(URL).source_info == info

    client.put_object(Bucket=BUCKET, Key="data/dog/new.png", Body=b"new")
    grown = walk_s3(URL).source_info
    assert grown["objects"] == info["objects"] + 1
    assert grown["listing_sha256"] != info["listing_sha256"]
    client.delete_object(Bucket=BUCKET, Key="data/dog/new.png")
    assert walk_s3(URL).source_info == info


def test_the_ingest_packs_an_s3_prefix_of_real_images(endpoint, tmp_path):
    client = s3_client(endpoint)
    png = {}
    for k in range(2):
        for i in range(6):
            out = io.BytesIO()
            Image.fromarray(np.random.default_rng(10 * k + i).integers(0, 256, (8, 8), dtype=np.uint8)).save(out, "PNG")
            png[f"c{k}/{i}.png"] = out.getvalue()
    png["c1/copy.png"] = png["c0/0.png"]
    for origin, body in png.items():
        client.put_object(Bucket=BUCKET, Key=f"real/{origin}", Body=body)
    cfg = DataConfig.model_validate({
        "name": "photos", "source": "s3", "path": f"s3://{BUCKET}/real", "image_size": 8, "channels": 1,
        "resize": False, "test_fraction": 0.3, "limit_per_split": None, "max_pixels": 10_000, "shard_size": 4,
        "follow_symlinks": False, "archive": {"max_members": 10, "max_bytes": 1000}})
    lines = []
    summary = ingest(cfg, tmp_path / "ds", log=lines.append)
    manifest = read_manifest(tmp_path / "ds")
    assert manifest["classes"] == ["c0", "c1"] and manifest["source"]["bucket"] == BUCKET
    assert summary["items_train"] + summary["items_test"] == 12 and summary["rejected"] == 1
    (duplicate,) = read_rejected(tmp_path / "ds")  # the first of the two in the source's order is kept
    assert {duplicate["origin"], duplicate["duplicate_of"]} == {"c0/0.png", "c1/copy.png"}
    assert "labelled" in duplicate["reason"]  # the same image under two classes: a person should look
    assert SECRET not in "\n".join(lines) and S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in "\n".join(lines)


def test_client_retries_with_backoff_by_default(endpoint):
    retries = make_client().meta.config.retries
    assert retries == {"mode": "standard", "total_max_attempts": ATTEMPTS}


@pytest.mark.parametrize("url", ["photos/data", "s3://", "s3:///data", "http://photos/data", "s3://photos/d?x=1"])
def test_bad_url_names_data_path(url):
    with pytest.raises(ValueError, match=r"data.path .*s3://BUCKET"):
        parse_s3_url(url)


def _no_secret_in(err: BaseException) -> None:
    text = "".join(traceback.format_exception(err))
    assert SECRET not in text and "test-secret" not in text


def test_missing_bucket_and_empty_prefix_are_clear(endpoint, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # moto accepts any
    with pytest.raises(ValueError, match=r"data.path 's3://no-such-bucket/x'.*does not exist.*AWS_ENDPOINT_URL") as err:
        walk_s3("s3://no-such-bucket/x")
    _no_secret_in(err.value)
    with pytest.raises(ValueError, match=r"data.path 's3://photos/nothing-here': no object under this prefix"):
        walk_s3(f"s3://{BUCKET}/nothing-here")


def test_wrong_credentials_are_refused_clearly_without_the_secret(endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")  # this moto server checks every signature
    with moto_s3(tmp_path) as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGKEY")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        with pytest.raises(PermissionError, match=r"data.path 's3://photos/data'.*access refused "
                                                  r"\(InvalidAccessKeyId\).*AWS_ACCESS_KEY_ID") as err:
            walk_s3(URL)
    _no_secret_in(err.value)


def test_no_credentials_at_all_is_clear(endpoint, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    # No shared files and no instance metadata service: the chain ends at once.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(PermissionError, match=r"data.path 's3://photos/data'.*no usable AWS credentials"):
        walk_s3(URL)


def test_unreachable_endpoint_is_a_connection_error(endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the environment's setting wins: fail at once
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    with pytest.raises(ConnectionError,
                       match=r"data.path 's3://photos/data'.*cannot reach S3.*AWS_ENDPOINT_URL") as err:
        walk_s3(URL)
    _no_secret_in(err.value)


def _dvc_repro(repo) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_dvc_reruns_a_stage_with_an_s3_dep_only_when_an_object_is_new(endpoint, tmp_path):
    """The issue's "done when": DVC, given only AWS_ENDPOINT_URL and credentials in the environment,
    tracks `s3://bucket/prefix` in a stage's deps by the objects' ETags (dvc.yaml's ingest stage
    lists ${data.path})."""
    client = s3_client(endpoint)
    client.create_bucket(Bucket="dvc-dep")
    client.put_object(Bucket="dvc-dep", Key="data/cat/1.png", Body=b"1")
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    command = f"{sys.executable} -c \"open('runs', 'a').write('x')\""
    (repo / "dvc.yaml").write_text(f"stages:\n  ingest:\n    cmd: {command}\n    deps:\n      - s3://dvc-dep/data\n")

    assert "Running stage 'ingest'" in _dvc_repro(repo)
    assert "s3://dvc-dep/data" in (repo / "dvc.lock").read_text()
    client.put_object(Bucket="dvc-dep", Key="data/cat/1.png", Body=b"1")  # same bytes, same ETag
    assert "Stage 'ingest' didn't change, skipping" in _dvc_repro(repo)
    client.put_object(Bucket="dvc-dep", Key="data/cat/2.png", Body=b"2")
    assert "Running stage 'ingest'" in _dvc_repro(repo)
    assert (repo / "runs").read_text() == "xx"
