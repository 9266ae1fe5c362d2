"""The `s3` source against moto's S3 server (a real HTTP endpoint on loopback, started once for the
module and stopped by its process id), configured by the environment alone; and DVC's change
detection of an `s3://` dep of a stage against the same server. Failures moto cannot make (a 503
SlowDown, a body cut off) come from a small HTTP endpoint that answers by a script (_FlakyObject)."""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import pickle
import subprocess
import sys
import threading
import traceback

import numpy as np
import pytest
from PIL import Image
from servers import S3_CREDENTIALS, free_port, moto_s3, s3_client

from components.config import DataConfig
from components.data.ingest import ingest
from components.data.items import (EMPTY_CLASS, HIDDEN, IMAGE_NAMED_FOLDER, NOT_IN_CLASS, FileItem, Skipped,
                                   SourceUnavailable, inside_image_named_folder, too_large)
from components.data.pack import read_manifest, read_rejected
from components.data.s3 import ATTEMPTS, READ_RETRIES, ObjectBytes, make_client, parse_s3_url, walk_s3

BUCKET = "photos"
URL = f"s3://{BUCKET}/data"
# Objects under data/ (what the source judges) and beside it (what it must not list).
IMAGES = {"cat/1.png": b"cat-1", "cat/2.jpeg": b"cat-2", "cat/deep/3.jpg": b"cat-3",
          "dog/1.gif": b"dog-1", "dog/2.webp": b"dog-2", "dog/3.BMP": b"dog-3"}
# The reasons every file source gives (components.data.items); a key ending in "/" names a prefix.
SKIPPED = {"loose.png": NOT_IN_CLASS, ".hidden/x.png": HIDDEN, "cat/.DS_Store": HIDDEN,
           "cat/notes.txt": "unsupported extension '.txt'", "fish/readme.md": "unsupported extension '.md'",
           "cat/a.png/4.png": inside_image_named_folder("cat/a.png"), "cat/a.png/": IMAGE_NAMED_FOLDER,
           "pic.jpg/x.png": inside_image_named_folder("pic.jpg"), "pic.jpg/": IMAGE_NAMED_FOLDER,
           "bird/": EMPTY_CLASS, "fish/": EMPTY_CLASS}
MARKERS = ["data/", "data/cat/", "data/cat/deep/", "data/bird/", "data/cat/a.png/"]  # as consoles create them
ELSEWHERE = ["data-old/cat/1.png", "other/dog/1.png"]
SECRET = "s3cr3t-value-that-must-not-leak"
CAP = 10**7  # data.max_file_bytes where a test is not about it


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
    listing = walk_s3(URL, max_file_bytes=CAP)
    items = {e.origin: e for e in listing.entries if isinstance(e, FileItem)}
    skipped = {e.origin: e.reason for e in listing.entries if isinstance(e, Skipped)}

    assert listing.classes == ["cat", "dog"]
    assert set(items) == set(IMAGES)
    assert {o: i.label for o, i in items.items()} == {o: o.split("/")[0] for o in IMAGES}
    assert set(skipped) == set(SKIPPED)
    for origin, reason in SKIPPED.items():
        assert reason in skipped[origin], (origin, skipped[origin])
    # Sub-prefix markers of a class with images are folders, not findings; a trailing slash is optional.
    assert found(walk_s3(URL + "/", max_file_bytes=CAP)) == found(listing)


def test_entries_sorted_by_sha256_of_origin_and_stable(endpoint):
    origins = [e.origin for e in walk_s3(URL, max_file_bytes=CAP).entries]
    assert origins == sorted(origins, key=lambda o: hashlib.sha256(o.encode()).hexdigest())
    assert origins != sorted(origins)  # classes mixed, not grouped
    assert [e.origin for e in walk_s3(URL, max_file_bytes=CAP).entries] == origins


def test_listing_walks_every_page(endpoint, moto_dir):
    before = list_requests(moto_dir)
    small_pages = walk_s3(URL, page_size=2, max_file_bytes=CAP)
    objects = len(IMAGES) + sum(not origin.endswith("/") for origin in SKIPPED) + len(MARKERS)
    assert small_pages.source_info["objects"] == objects
    assert list_requests(moto_dir) - before == -(-objects // 2)  # ceil: one request per page
    assert found(small_pages) == found(walk_s3(URL, max_file_bytes=CAP))


def test_read_returns_the_bytes_also_in_another_process(endpoint):
    items = [e for e in walk_s3(URL, max_file_bytes=CAP).entries if isinstance(e, FileItem)]
    assert {i.origin: i.read() for i in items} == IMAGES
    # A worker process gets the reader pickled, without the parent's client.
    reader = pickle.loads(pickle.dumps(items[0].read))
    assert reader.client is None and reader() == IMAGES[items[0].origin]


def test_read_of_a_vanished_object_is_an_oserror_naming_it(endpoint):
    client = s3_client(endpoint)
    client.put_object(Bucket=BUCKET, Key="data/cat/gone.png", Body=b"soon gone")
    item = next(e for e in walk_s3(URL, max_file_bytes=CAP).entries if e.origin == "cat/gone.png")
    client.delete_object(Bucket=BUCKET, Key="data/cat/gone.png")
    with pytest.raises(OSError, match=r"s3://photos/data/cat/gone.png: .*NoSuchKey"):
        item.read()


def test_objects_larger_than_max_file_bytes_are_refused_by_their_listed_size(endpoint):
    client = s3_client(endpoint)
    for origin, size in {"cat/small.png": 5, "cat/large.png": 6, "dog/huge.png": 9}.items():
        client.put_object(Bucket=BUCKET, Key=f"sizes/{origin}", Body=b"x" * size)
    listing = walk_s3(f"s3://{BUCKET}/sizes", max_file_bytes=5)
    assert found(listing) == sorted(found(listing), key=lambda entry: hashlib.sha256(entry[0].encode()).digest())
    assert dict(found(listing)) == {"cat/small.png": "cat", "cat/large.png": too_large(5, 6),
                                    "dog/huge.png": too_large(5, 9), "dog/": EMPTY_CLASS}
    assert listing.classes == ["cat"]


def test_an_object_changed_since_the_listing_stops_the_ingest(endpoint):
    client = s3_client(endpoint)
    client.put_object(Bucket=BUCKET, Key="changing/cat/1.png", Body=b"before")
    (item,) = [e for e in walk_s3(f"s3://{BUCKET}/changing", max_file_bytes=CAP).entries]
    client.put_object(Bucket=BUCKET, Key="changing/cat/1.png", Body=b"after")  # a new ETag
    with pytest.raises(SourceUnavailable, match=r"s3://photos/changing/cat/1.png: the object changed during "
                                                r"the ingest .*run again"):
        item.read()


def test_a_stopped_endpoint_stops_the_ingest_after_the_retries(endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore tries each request once: the retries are ours
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    with moto_s3(tmp_path) as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        client = s3_client(url)
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key="data/cat/1.png", Body=b"1")
        (item,) = [e for e in walk_s3(URL, max_file_bytes=CAP).entries]
    with pytest.raises(SourceUnavailable, match=r"s3://photos/data/cat/1.png: cannot read the object "
                                                r"\(EndpointConnectionError\), 4 tries") as err:
        item.read()
    _no_secret_in(err.value)


class _FlakyObject(http.server.BaseHTTPRequestHandler):
    """One S3 object behind an endpoint that answers GETs by its server's `script`, one step per
    request: "slowdown" (503 SlowDown), "cut" (the body breaks off), then the whole object."""

    def do_GET(self):
        self.server.if_match.append(self.headers.get("If-Match"))
        step = self.server.script.pop(0) if self.server.script else "ok"
        if step == "slowdown":
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
        else:
            body = FLAKY_BODY
            self.send_response(200)
            self.send_header("ETag", FLAKY_ETAG)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:3] if step == "cut" else body)  # the connection then closes (HTTP/1.0)

    def log_message(self, *args):
        pass


FLAKY_BODY = b"the object's bytes"
FLAKY_ETAG = '"0123456789abcdef"'


@pytest.fixture
def flaky_object(endpoint, monkeypatch):
    """ObjectBytes for the object of a _FlakyObject server; the test writes its script."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyObject)
    server.script, server.if_match = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore tries each request once: the retries are ours
    try:
        yield server, ObjectBytes(make_client(), BUCKET, "data/cat/1.png", FLAKY_ETAG)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_read_that_may_pass_is_retried_with_the_listed_etag(flaky_object):
    server, read = flaky_object
    server.script += ["slowdown", "cut", "slowdown"]
    assert read() == FLAKY_BODY
    assert server.if_match == [FLAKY_ETAG] * 4


def test_a_read_failing_past_the_retries_stops_the_ingest(flaky_object):
    server, read = flaky_object
    server.script += ["cut"] * (READ_RETRIES + 1)
    with pytest.raises(SourceUnavailable, match=r"s3://photos/data/cat/1.png: cannot read the object "
                                                r"\(ResponseStreamingError\), 4 tries; the ingest stops"):
        read()
    assert len(server.if_match) == READ_RETRIES + 1 and not server.script


def without_credentials(monkeypatch, tmp_path) -> None:
    """No keys, no shared files and no instance metadata service: boto3's chain ends at once."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_a_read_without_credentials_stops_the_ingest(endpoint, monkeypatch, tmp_path):
    without_credentials(monkeypatch, tmp_path)
    read = ObjectBytes(make_client(), BUCKET, "data/cat/1.png", '"any-etag"')  # no request is signed
    with pytest.raises(SourceUnavailable, match=r"s3://photos/data/cat/1.png: the credentials were refused "
                                                r"\(NoCredentialsError\).*AWS_ACCESS_KEY_ID"):
        read()


def test_fingerprint_changes_with_one_new_object_only(endpoint):
    client = s3_client(endpoint)
    info = walk_s3(URL, max_file_bytes=CAP).source_info
    assert info["bucket"] == BUCKET and info["prefix"] == "data/"
    assert set(info) == {"bucket", "prefix", "objects", "listing_sha256"}
    # Rewriting an object with the same bytes keeps its ETag: nothing new to ingest.
    client.put_object(Bucket=BUCKET, Key="data/cat/1.png", Body=IMAGES["cat/1.png"])
    client.put_object(Bucket=BUCKET, Key="other/cat/new.png", Body=b"not under data/")
    assert walk_s3(URL, max_file_bytes=CAP).source_info == info

    client.put_object(Bucket=BUCKET, Key="data/dog/new.png", Body=b"new")
    grown = walk_s3(URL, max_file_bytes=CAP).source_info
    assert grown["objects"] == info["objects"] + 1
    assert grown["listing_sha256"] != info["listing_sha256"]
    client.delete_object(Bucket=BUCKET, Key="data/dog/new.png")
    assert walk_s3(URL, max_file_bytes=CAP).source_info == info


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
        "resize": False, "test_fraction": 0.3, "limit_per_split": None, "max_pixels": 10_000, "max_file_bytes": 10**7,
        "shard_size": 4,
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


@pytest.mark.parametrize("url", [f"s3://AKIAKEY:{SECRET}@photos/data", "s3://AKIAKEY@photos/data",
                                 "s3://AKIAKEY:s3cr3t/with/slashes@photos/data"])
def test_credentials_in_data_path_are_refused_without_echo(url):
    with pytest.raises(ValueError, match=r"data.path: an s3:// URL must not hold credentials.*AWS_ACCESS_KEY_ID") \
            as err:
        walk_s3(url, max_file_bytes=CAP)
    assert "AKIAKEY" not in str(err.value) and "s3cr3t" not in str(err.value) and "photos" not in str(err.value)


def _no_secret_in(err: BaseException) -> None:
    text = "".join(traceback.format_exception(err))
    assert SECRET not in text and "test-secret" not in text


def test_missing_bucket_and_empty_prefix_are_clear(endpoint, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # moto accepts any
    with pytest.raises(ValueError, match=r"data.path 's3://no-such-bucket/x'.*does not exist.*AWS_ENDPOINT_URL") as err:
        walk_s3("s3://no-such-bucket/x", max_file_bytes=CAP)
    _no_secret_in(err.value)
    with pytest.raises(ValueError, match=r"data.path 's3://photos/nothing-here': no object under this prefix"):
        walk_s3(f"s3://{BUCKET}/nothing-here", max_file_bytes=CAP)


def test_wrong_credentials_are_refused_clearly_without_the_secret(endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")  # this moto server checks every signature
    with moto_s3(tmp_path) as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGKEY")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        with pytest.raises(PermissionError, match=r"data.path 's3://photos/data'.*access refused "
                                                  r"\(InvalidAccessKeyId\).*AWS_ACCESS_KEY_ID") as err:
            walk_s3(URL, max_file_bytes=CAP)
    _no_secret_in(err.value)


def test_no_credentials_at_all_is_clear(endpoint, monkeypatch, tmp_path):
    without_credentials(monkeypatch, tmp_path)
    with pytest.raises(PermissionError, match=r"data.path 's3://photos/data'.*no usable AWS credentials"):
        walk_s3(URL, max_file_bytes=CAP)


def test_unreachable_endpoint_is_a_connection_error(endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the environment's setting wins: fail at once
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    with pytest.raises(ConnectionError,
                       match=r"data.path 's3://photos/data'.*cannot reach S3.*AWS_ENDPOINT_URL") as err:
        walk_s3(URL, max_file_bytes=CAP)
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
