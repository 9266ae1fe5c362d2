"""The `s3` file source: data.path `s3://bucket/prefix`, one sub-prefix per class.

The client comes from the environment alone, as for every AWS tool: credentials by boto3's chain
(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role), the endpoint from
AWS_ENDPOINT_URL (MinIO, moto; botocore reads it itself), AWS_MAX_ATTEMPTS to change the number of
tries. Nothing of it reaches the listing, messages or logs.

Change detection is DVC's: the ingest stage lists `${data.path}` among its deps, and DVC tracks an
`s3://` dep by the ETags of the objects under it (listed, never downloaded), so a repro with no new
or changed object skips the stage.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, HTTPClientError, NoCredentialsError,
                                 ParamValidationError, PartialCredentialsError)
from botocore.exceptions import ConnectionError as BotoConnectionError

from components.data.items import FileItem, Listing, Skipped, has_image_extension, is_hidden, unsupported_extension

if TYPE_CHECKING:
    from components.config import DataConfig

ATTEMPTS = 5  # tries per request (standard mode: exponential backoff with jitter); AWS_MAX_ATTEMPTS overrides
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
PAGE_SIZE = 1000  # keys per ListObjectsV2 request (S3's maximum)

# Error codes by which S3 says "not with these credentials".
_ACCESS_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                 "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem", "403"}
_CREDENTIALS_HINT = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for an identity "
                     "allowed s3:ListBucket and s3:GetObject there")
_ENDPOINT_HINT = "set AWS_ENDPOINT_URL to a reachable S3 endpoint (e.g. http://minio:9000) or check the network"


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` → ("bucket", "some/prefix/"); the prefix is "" for a whole bucket."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"data.path {url!r}: the s3 source needs s3://BUCKET or s3://BUCKET/PREFIX")
    prefix = parts.path.strip("/")
    return parts.netloc, f"{prefix}/" if prefix else ""


def make_client():
    """An S3 client configured by the environment, with retries and timeouts."""
    session = botocore.session.get_session()
    attempts = session.get_config_variable("max_attempts") or ATTEMPTS
    config = Config(retries={"mode": "standard", "total_max_attempts": attempts},
                    connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S)
    return boto3.session.Session(botocore_session=session).client("s3", config=config)


@functools.cache
def _client_of_process(pid: int):  # by pid: a forked worker inherits this cache, not its parent's sockets
    return make_client()


def _endpoint(client) -> str:
    """scheme://host[:port] of the client's endpoint: never user info, a path or a query."""
    parts = urlsplit(client.meta.endpoint_url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}"


def _error_code(err: Exception) -> str:
    if isinstance(err, ClientError):
        return str(err.response.get("Error", {}).get("Code") or err.response.get("ResponseMetadata", {})
                   .get("HTTPStatusCode", "unknown"))
    return type(err).__name__


def _listing_error(err: Exception, url: str, bucket: str, endpoint: str) -> OSError | ValueError:
    """What went wrong in words, with what to do; never the credentials."""
    code = _error_code(err)
    where = f"data.path {url!r} (S3 endpoint {endpoint})"
    if code in {"NoSuchBucket", "404"}:
        return ValueError(f"{where}: bucket {bucket!r} does not exist; create it, correct data.path, "
                          f"or set AWS_ENDPOINT_URL to the S3 service that holds it")
    if code in _ACCESS_CODES:
        return PermissionError(f"{where}: access refused ({code}); {_CREDENTIALS_HINT}")
    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return PermissionError(f"{where}: no usable AWS credentials in the environment; {_CREDENTIALS_HINT}")
    if isinstance(err, (BotoConnectionError, HTTPClientError)):
        return ConnectionError(f"{where}: cannot reach S3 ({code}); {_ENDPOINT_HINT}")
    if isinstance(err, ParamValidationError):
        return ValueError(f"data.path {url!r}: not a valid S3 bucket or key ({code}); correct data.path")
    return OSError(f"{where}: listing failed ({code}); retry later, or check the endpoint and bucket")


class ObjectBytes:
    """FileItem.read for one object. It can be pickled into a worker process: the client stays
    behind (a boto3 client does not cross processes) and the worker builds its own, once, from
    its environment."""

    def __init__(self, client, bucket: str, key: str):
        self.client, self.bucket, self.key = client, bucket, key

    def __getstate__(self) -> dict:
        return {"client": None, "bucket": self.bucket, "key": self.key}

    def __call__(self) -> bytes:
        client = self.client or _client_of_process(os.getpid())
        try:
            return client.get_object(Bucket=self.bucket, Key=self.key)["Body"].read()
        except (ClientError, BotoCoreError) as err:
            raise OSError(f"s3://{self.bucket}/{self.key}: cannot read the object ({_error_code(err)})") from None


def _list_objects(client, url: str, bucket: str, prefix: str, page_size: int) -> list[dict]:
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size})
    try:
        return [obj for page in pages for obj in page.get("Contents", [])]
    except (ClientError, BotoCoreError) as err:
        raise _listing_error(err, url, bucket, _endpoint(client)) from None


def _classify(origin: str, client, bucket: str, key: str) -> FileItem | Skipped | None:
    """One object, by its key relative to the prefix; None for a folder marker (judged later)."""
    if is_hidden(origin):
        return Skipped(origin, "hidden (a name starts with '.'): left out")
    if "" in origin.rstrip("/").split("/"):
        return Skipped(origin, "empty name in the key ('//'): rename the object")
    if origin.endswith("/"):
        return None
    if "/" not in origin:
        return Skipped(origin, "not inside a class prefix: move it under PREFIX/<class>/")
    if not has_image_extension(origin):
        return Skipped(origin, unsupported_extension(origin))
    return FileItem(origin, origin.split("/", 1)[0], ObjectBytes(client, bucket, key))


def walk_s3(url: str, page_size: int = PAGE_SIZE) -> Listing:
    """List every object under the prefix: images under PREFIX/<class>/ (sub-prefixes included)
    become FileItems, anything else a Skipped with its reason. Entries come sorted by the sha256
    of their origin: the same order on every run, classes mixed."""
    bucket, prefix = parse_s3_url(url)
    client = make_client()
    objects = _list_objects(client, url, bucket, prefix, page_size)
    if not objects:
        raise ValueError(f"data.path {url!r}: no object under this prefix; upload one sub-prefix per "
                         f"class (PREFIX/<class>/<image>) or correct data.path")
    entries: list[FileItem | Skipped] = []
    prefixes: set[str] = set()  # first-level sub-prefixes seen: class candidates
    for obj in objects:
        origin = obj["Key"][len(prefix):]
        if not origin:
            continue  # the folder marker of the prefix itself
        entry = _classify(origin, client, bucket, obj["Key"])
        top = origin.split("/", 1)[0]
        if "/" in origin and top and not is_hidden(origin):
            prefixes.add(top)
        if entry is not None:
            entries.append(entry)
    classes = sorted({e.label for e in entries if isinstance(e, FileItem)})
    entries += [Skipped(f"{name}/", "empty class prefix: left out of the class list")
                for name in sorted(prefixes - set(classes))]
    entries.sort(key=lambda e: hashlib.sha256(e.origin.encode()).hexdigest())
    fingerprint = sorted((obj["Key"], obj["ETag"], obj["Size"]) for obj in objects)
    return Listing(classes, entries, {
        "bucket": bucket, "prefix": prefix, "objects": len(objects),
        "listing_sha256": hashlib.sha256(json.dumps(fingerprint).encode()).hexdigest()})
