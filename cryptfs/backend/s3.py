"""S3 (and any S3-compatible endpoint) through boto3.

One boto3 client, which is thread-safe; botocore does the retries (standard or adaptive
mode, with backoff on throttling and 5xx). Errors become cryptfs errors in `_translate`.
"""

from __future__ import annotations

import concurrent.futures as cf
import email.utils
import logging
import threading
from typing import Iterator

import boto3
import botocore.config
import botocore.exceptions

from ..errors import (
    AccessDenied,
    BackendError,
    BucketNotFound,
    NoCredentials,
    NotFound,
    PreconditionFailed,
    Unreachable,
)
from .base import Backend, ObjectInfo, PendingUpload, read_exact

log = logging.getLogger(__name__)

PART_SIZE = 8 * 1024 * 1024
PARTS_IN_FLIGHT = 4
MAX_PARTS = 10000
COPY_LIMIT = 5 * 1024**3  # larger objects are copied in parts
COPY_PART = 1024**3


BOTO_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)


class RangeNotSatisfiable(BackendError):
    """A ranged GET that starts at or past the end of the object (S3's InvalidRange)."""


def _translate(exc: Exception, what: str) -> Exception:
    """A cryptfs error for a botocore error, named after what we were doing."""
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return NoCredentials(
            "no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "a profile with --profile, or an instance role)"
        )
    if isinstance(
        exc,
        (
            botocore.exceptions.EndpointConnectionError,
            botocore.exceptions.ConnectTimeoutError,
            botocore.exceptions.ConnectionClosedError,
        ),
    ):
        return Unreachable(f"cannot reach the S3 endpoint ({exc})")
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return BucketNotFound(f"bucket does not exist ({what})")
        if code in ("NoSuchKey", "NotFound", "404") or status == 404:
            return NotFound(f"{what}: not found")
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "412") or status in (409, 412):
            return PreconditionFailed(f"{what}: changed meanwhile")
        if code == "InvalidRange" or status == 416:
            return RangeNotSatisfiable(f"{what}: range past the end")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403") or status == 403:
            return AccessDenied(f"{what}: access denied ({code})")
        return BackendError(f"{what}: {code or status} {err.get('Message', '')}".strip())
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return BackendError(f"{what}: {exc}")
    return exc


def _server_time(resp: dict) -> float | None:
    date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        return email.utils.parsedate_to_datetime(date).timestamp() if date else None
    except (TypeError, ValueError):
        return None


class S3Backend(Backend):
    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        path_style: bool = False,
        verify_tls: bool = True,
        retry_mode: str = "standard",
        max_attempts: int = 5,
        workers: int = 8,
    ):
        self.bucket = bucket
        self.url = f"s3://{bucket}"
        self.workers = workers
        try:
            session = boto3.session.Session(profile_name=profile) if profile else boto3.session.Session()
        except botocore.exceptions.ProfileNotFound as exc:
            raise NoCredentials(str(exc)) from None
        config = botocore.config.Config(
            retries={"mode": retry_mode, "max_attempts": max_attempts},
            s3={"addressing_style": "path" if path_style else "auto"},
            max_pool_connections=max(16, workers * 2),
            connect_timeout=10,
            read_timeout=60,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        try:
            self.client = session.client(
                "s3", endpoint_url=endpoint_url, region_name=region or "us-east-1", verify=verify_tls, config=config
            )
        except botocore.exceptions.ProfileNotFound as exc:
            raise NoCredentials(str(exc)) from None
        self._pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3-part")

    def on_retries(self, callback) -> None:
        """callback(n) after each answered request that botocore retried n times."""

        def seen(parsed=None, **_):
            attempts = (parsed or {}).get("ResponseMetadata", {}).get("RetryAttempts", 0)
            if attempts:
                callback(attempts)

        self.client.meta.events.register("after-call.s3", seen)

    def _call(self, what: str, fn, **kwargs):
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except BOTO_ERRORS as exc:
            raise _translate(exc, what) from None

    def check(self) -> None:
        try:
            self._call(f"bucket {self.bucket}", self.client.head_bucket)
        except NotFound:
            raise BucketNotFound(f"bucket {self.bucket} does not exist") from None

    @staticmethod
    def _info(key: str, resp: dict, size: int) -> ObjectInfo:
        lm = resp.get("LastModified")
        return ObjectInfo(
            key, size, resp.get("ETag", ""), lm.timestamp() if lm else 0.0, resp.get("Metadata"), _server_time(resp)
        )

    def head(self, key):
        resp = self._call(key, self.client.head_object, Key=key)
        return self._info(key, resp, resp["ContentLength"])

    def get(self, key, start=0, end=None, if_match=None):
        kwargs = {"Key": key}
        if start or end is not None:
            if end is not None and end <= start:
                info = self.head(key)
                if if_match is not None and info.etag != if_match:
                    raise PreconditionFailed(f"{key}: changed meanwhile")
                return b"", info
            kwargs["Range"] = f"bytes={start}-" + ("" if end is None else str(end - 1))
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        try:
            resp = self._call(key, self.client.get_object, **kwargs)
        except RangeNotSatisfiable:  # a range starting at or past the end
            return b"", self.head(key)
        try:
            data = resp["Body"].read()
        except BOTO_ERRORS as exc:
            raise _translate(exc, key) from None
        size = resp["ContentLength"]
        if "ContentRange" in resp:
            size = int(resp["ContentRange"].rsplit("/", 1)[1])
        return data, self._info(key, resp, size)

    def put(self, key, data, metadata=None, if_none_match=False, if_match=None):
        kwargs = {"Key": key, "Body": bytes(data), "Metadata": metadata or {}}
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        return self._call(key, self.client.put_object, **kwargs)["ETag"]

    def upload(self, key, stream, size, metadata=None, if_none_match=False, if_match=None, progress=None, started=None):
        part = max(PART_SIZE, -(-size // MAX_PARTS))
        if size <= part:
            data = read_exact(stream, size)
            etag = self.put(key, data, metadata, if_none_match, if_match)
            if progress:
                progress(len(data))
            return etag
        upload_id = self._call(key, self.client.create_multipart_upload, Key=key, Metadata=metadata or {})["UploadId"]
        try:
            if started:
                started(upload_id)
            parts = self._upload_parts(key, upload_id, stream, size, part, progress)
            kwargs = {"Key": key, "UploadId": upload_id, "MultipartUpload": {"Parts": parts}}
            if if_none_match:
                kwargs["IfNoneMatch"] = "*"
            if if_match is not None:
                kwargs["IfMatch"] = if_match
            return self._call(key, self.client.complete_multipart_upload, **kwargs)["ETag"]
        except BaseException:
            self._abort_quietly(key, upload_id)
            raise

    def _upload_parts(self, key, upload_id, stream, size, part, progress) -> list[dict]:
        # At most PARTS_IN_FLIGHT parts in memory at once, whatever the object's size.
        slots = threading.BoundedSemaphore(min(self.workers, PARTS_IN_FLIGHT))
        futures = []

        def send(number: int, data: bytes) -> dict:
            try:
                resp = self._call(
                    key, self.client.upload_part, Key=key, UploadId=upload_id, PartNumber=number, Body=data
                )
                if progress:
                    progress(len(data))
                return {"PartNumber": number, "ETag": resp["ETag"]}
            finally:
                slots.release()

        number, sent = 1, 0
        while sent < size:
            data = read_exact(stream, min(part, size - sent))
            if not data:
                raise BackendError(f"{key}: source ended after {sent} of {size} bytes")
            slots.acquire()
            futures.append(self._pool.submit(send, number, data))
            sent += len(data)
            number += 1
            done = [f for f in futures if f.done()]
            for f in done:
                f.result()  # fail early
        return [f.result() for f in futures]

    def copy(self, src, dst, metadata, if_match=None):
        source = {"Bucket": self.bucket, "Key": src}
        size = self.head(src).size
        if size <= COPY_LIMIT:
            kwargs = {"Key": dst, "CopySource": source, "Metadata": metadata, "MetadataDirective": "REPLACE"}
            if if_match is not None:
                kwargs["CopySourceIfMatch"] = if_match
            return self._call(f"copy {src}", self.client.copy_object, **kwargs)["CopyObjectResult"]["ETag"]
        upload_id = self._call(dst, self.client.create_multipart_upload, Key=dst, Metadata=metadata)["UploadId"]
        try:

            def send(number: int, start: int) -> dict:
                kwargs = {
                    "Key": dst,
                    "UploadId": upload_id,
                    "PartNumber": number,
                    "CopySource": source,
                    "CopySourceRange": f"bytes={start}-{min(start + COPY_PART, size) - 1}",
                }
                if if_match is not None:
                    kwargs["CopySourceIfMatch"] = if_match
                resp = self._call(f"copy {src}", self.client.upload_part_copy, **kwargs)
                return {"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]}

            futures = [self._pool.submit(send, i + 1, start) for i, start in enumerate(range(0, size, COPY_PART))]
            parts = [f.result() for f in futures]
            return self._call(
                dst,
                self.client.complete_multipart_upload,
                Key=dst,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )["ETag"]
        except BaseException:
            self._abort_quietly(dst, upload_id)
            raise

    def delete(self, key):
        try:
            self._call(key, self.client.delete_object, Key=key)
        except NotFound:
            pass

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"], obj["Size"], obj["ETag"], obj["LastModified"].timestamp(), None)
        except BOTO_ERRORS as exc:
            raise _translate(exc, f"list {prefix or '/'}") from None

    def pending_uploads(self, prefix):
        resp = self._call("list uploads", self.client.list_multipart_uploads, Prefix=prefix)
        return [PendingUpload(u["Key"], u["UploadId"], u["Initiated"].timestamp()) for u in resp.get("Uploads", [])]

    def _abort_quietly(self, key: str, upload_id: str) -> None:
        """After a failed multipart upload: abort it, or say that it stays behind."""
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except BOTO_ERRORS as exc:
            log.warning(
                "%s: multipart upload %s not aborted (%s); the next attempt or fsck --repair aborts it",
                key,
                upload_id,
                exc,
            )

    single_put_max = PART_SIZE

    def multipart_conditions(self, key):
        return all(
            self._multipart_refused(key, condition)
            for condition in ({"IfNoneMatch": "*"}, {"IfMatch": '"00000000000000000000000000000000"'})
        )

    def _multipart_refused(self, key: str, condition: dict) -> bool:
        """Whether completing a one-part upload to `key` (which exists) fails under `condition`."""
        upload_id = self._call(key, self.client.create_multipart_upload, Key=key)["UploadId"]
        try:
            part = self._call(key, self.client.upload_part, Key=key, UploadId=upload_id, PartNumber=1, Body=b"probe")
            parts = {"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]}
            self._call(
                key,
                self.client.complete_multipart_upload,
                Key=key,
                UploadId=upload_id,
                MultipartUpload=parts,
                **condition,
            )
        except PreconditionFailed:
            self._abort_quietly(key, upload_id)
            return True
        except BaseException:
            self._abort_quietly(key, upload_id)
            raise
        return False  # completed over the object: the condition was ignored

    def abort_upload(self, upload):
        self._call(upload.key, self.client.abort_multipart_upload, Key=upload.key, UploadId=upload.upload_id)

    def close(self):
        self._pool.shutdown(wait=False)
