"""The `s3` file source: data.path `s3://bucket/prefix`, one sub-prefix per class.

The client comes from the environment alone, as for every AWS tool: credentials by boto3's chain
(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role), the endpoint from
AWS_ENDPOINT_URL (MinIO, moto; botocore reads it itself), AWS_MAX_ATTEMPTS to change the number of
tries. Nothing of it reaches the listing, messages or logs; credentials written into data.path
(s3://KEY:SECRET@bucket) are refused.

The policy for odd objects is the folder source's (components.data.items' reasons): a sub-prefix
named like an image is refused with all it holds, hidden keys, keys outside a class prefix,
unsupported extensions and objects larger than data.max_file_bytes (by their listed size) are
reported, and an empty class prefix is left out of the class list.

An object is read with If-Match its listed ETag: one that changed since the listing stops the
ingest (items.SourceUnavailable), as do refused credentials and a read that still fails, after
READ_RETRIES retries with backoff, for a reason that may pass (a connection reset, a timeout, a
5xx, throttling); botocore retries the request, but not the read of the body. A missing or
forbidden object is an OSError: that one file is reported.

Change detection is DVC's: the ingest stage lists `${data.path}` among its deps, and DVC tracks an
`s3://` dep by the ETags of the objects under it (listed, never downloaded), so a repro with no new
or changed object skips the stage.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import time
from urllib.parse import urlsplit

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, HTTPClientError, IncompleteReadError, NoCredentialsError,
                                 ParamValidationError, PartialCredentialsError)
from botocore.exceptions import ConnectionError as BotoConnectionError

from components.data.items import (EMPTY_CLASS, HIDDEN, IMAGE_NAMED_FOLDER, NOT_IN_CLASS, FileItem, Listing, Skipped,
                                   SourceUnavailable, has_image_extension, inside_image_named_folder, hash_order,
                                   too_large, unsupported_extension)

ATTEMPTS = 5  # tries per request (standard mode: exponential backoff with jitter); AWS_MAX_ATTEMPTS overrides
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
PAGE_SIZE = 1000  # keys per ListObjectsV2 request (S3's maximum)
READ_RETRIES = 3  # retries of an object read that failed for a reason that may pass
RETRY_BACKOFF_S = 0.25  # before the first retry; doubled before each next one, with jitter

# Error codes by which S3 refuses the credentials themselves, whatever the object.
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                     "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem"}
# Error codes by which S3 says "not with these credentials".
_ACCESS_CODES = {"AccessDenied", "403", *_CREDENTIAL_CODES}
_CREDENTIALS_HINT = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for an identity "
                     "allowed s3:ListBucket and s3:GetObject there")
_ENDPOINT_HINT = "set AWS_ENDPOINT_URL to a reachable S3 endpoint (e.g. http://minio:9000) or check the network"
# Error codes of a request that may pass when tried again (besides any 5xx and 429).
_MAY_PASS_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
                   "RequestTimeout", "InternalError", "ServiceUnavailable"}
EMPTY_KEY_PART = "empty name in the key ('//'): rename the object"


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` → ("bucket", "some/prefix/"); the prefix is "" for a whole bucket."""
    parts = urlsplit(url)
    # A bucket name holds neither '@' nor ':'; either one means KEY:SECRET@ (a secret may hold '/',
    # cutting the host short). The message repeats nothing of the URL.
    if "@" in parts.netloc or ":" in parts.netloc:
        raise ValueError("data.path: an s3:// URL must not hold credentials (KEY:SECRET@); remove them from "
                         "params.yaml and set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) "
                         "in the environment")
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


def _may_pass(err: Exception) -> bool:
    """Whether a failed request or body read may succeed when tried again."""
    if isinstance(err, ClientError):
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or status == 429 or _error_code(err) in _MAY_PASS_CODES
    # ResponseStreamingError and ReadTimeoutError (a body read cut off) are HTTPClientErrors.
    return isinstance(err, (BotoConnectionError, HTTPClientError, IncompleteReadError))


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
    """FileItem.read for one object, as listed (its ETag). It can be pickled into a worker process:
    the client stays behind (a boto3 client does not cross processes) and the worker builds its
    own, once, from its environment."""

    def __init__(self, client, bucket: str, key: str, etag: str):
        self.client, self.bucket, self.key, self.etag = client, bucket, key, etag

    def __getstate__(self) -> dict:
        return {**self.__dict__, "client": None}

    def __call__(self) -> bytes:
        client = self.client or _client_of_process(os.getpid())
        where = f"s3://{self.bucket}/{self.key}"
        for retry in range(READ_RETRIES + 1):
            if retry:
                time.sleep(RETRY_BACKOFF_S * 2 ** (retry - 1) * random.uniform(0.5, 1.0))
            try:
                return client.get_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)["Body"].read()
            except (ClientError, BotoCoreError) as err:
                code = _error_code(err)
                if code in ("PreconditionFailed", "412"):
                    raise SourceUnavailable(f"{where}: the object changed during the ingest (its ETag is no "
                                            f"longer the listed one); run again") from None
                if code in _CREDENTIAL_CODES or isinstance(err, (NoCredentialsError, PartialCredentialsError)):
                    # not this object's fault: every other read would fail alike
                    raise SourceUnavailable(f"{where}: the credentials were refused ({code}); "
                                            f"{_CREDENTIALS_HINT}") from None
                if not _may_pass(err):
                    raise OSError(f"{where}: cannot read the object ({code})") from None
        raise SourceUnavailable(f"{where}: cannot read the object ({code}), {READ_RETRIES + 1} tries; the ingest "
                                f"stops, leaving the previous dataset; run again later or check the S3 service")


def _list_objects(client, url: str, bucket: str, prefix: str, page_size: int) -> list[tuple[str, str, int]]:
    """(key, ETag, size) of every object under the prefix, page by page."""
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size})
    try:
        return [(obj["Key"], obj["ETag"], obj["Size"]) for page in pages for obj in page.get("Contents", [])]
    except (ClientError, BotoCoreError) as err:
        raise _listing_error(err, url, bucket, _endpoint(client)) from None


def _image_named_folder(folders: list[str]) -> str | None:
    """The outermost of these nested folders named like an image, as a path ("cat/a.png"); None if none."""
    depth = next((depth for depth, name in enumerate(folders) if has_image_extension(name)), None)
    return None if depth is None else "/".join(folders[:depth + 1])


class _Judge:
    """Judges the objects one by one, as the folder walk judges files, and keeps the prefixes seen."""

    def __init__(self, max_file_bytes: int):
        self.max_file_bytes = max_file_bytes
        self.class_prefixes: set[str] = set()  # first-level sub-prefixes seen: class candidates
        self.image_named: set[str] = set()  # sub-prefixes named like an image, each reported once

    def __call__(self, origin: str, size: int) -> str | None:
        """Why the object at `origin` (its key relative to the prefix) is refused; None for a candidate
        image. A folder marker (a key ending in '/') only shows its prefixes exist: never a candidate."""
        marker = origin.endswith("/")
        parts = origin.rstrip("/").split("/")
        folders = parts if marker else parts[:-1]
        if folders and folders[0] and not folders[0].startswith(".") and not has_image_extension(folders[0]):
            self.class_prefixes.add(folders[0])
        if any(part.startswith(".") for part in parts):
            return HIDDEN
        if "" in parts:
            return EMPTY_KEY_PART
        folder = _image_named_folder(folders)
        if folder is not None:
            self.image_named.add(folder)
            return None if marker else inside_image_named_folder(folder)
        if marker:
            return None
        if not folders:
            return NOT_IN_CLASS
        if not has_image_extension(origin):
            return unsupported_extension(origin)
        return too_large(self.max_file_bytes, size) if size > self.max_file_bytes else None


def walk_s3(url: str, *, max_file_bytes: int, page_size: int = PAGE_SIZE) -> Listing:
    """List every object under the prefix: images under PREFIX/<class>/ (sub-prefixes included)
    become FileItems, anything else a Skipped with its reason. Entries come in items.hash_order:
    the same order on every run, classes mixed. Sub-prefixes are written with their trailing '/'."""
    bucket, prefix = parse_s3_url(url)
    client = make_client()
    objects = _list_objects(client, url, bucket, prefix, page_size)
    if not objects:
        raise ValueError(f"data.path {url!r}: no object under this prefix; upload one sub-prefix per "
                         f"class (PREFIX/<class>/<image>) or correct data.path")
    judge = _Judge(max_file_bytes)
    entries: list[FileItem | Skipped] = []
    for key, etag, size in objects:
        origin = key[len(prefix):]
        if not origin:
            continue  # the folder marker of the prefix itself
        reason = judge(origin, size)
        if reason is not None:
            entries.append(Skipped(origin, reason))
        elif not origin.endswith("/"):
            entries.append(FileItem(origin, origin.split("/", 1)[0], ObjectBytes(client, bucket, key, etag)))
    classes = sorted({e.label for e in entries if isinstance(e, FileItem)})
    entries += [Skipped(f"{folder}/", IMAGE_NAMED_FOLDER) for folder in judge.image_named]
    entries += [Skipped(f"{name}/", EMPTY_CLASS) for name in judge.class_prefixes - set(classes)]
    entries = [entries[i] for i in hash_order([e.origin for e in entries])]
    fingerprint = sorted(objects)
    return Listing(classes, entries, {
        "bucket": bucket, "prefix": prefix, "objects": len(objects),
        "listing_sha256": hashlib.sha256(json.dumps(fingerprint).encode()).hexdigest()})
