"""The storage interface every backend implements; backends know nothing of cryptography.

Keys are strings relative to the backend's root (a bucket, or a local directory).
Every method is safe to call from several threads at once.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from typing import Iterator, Protocol

MAX_OBJECT_SIZE = 5 * 1024**4  # S3's limit for one object; every backend keeps to it


@dataclass
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: float  # seconds since the epoch
    metadata: dict[str, str] | None = field(default=None)  # None when a listing did not carry it
    server_time: float | None = None  # the server's clock when it answered (HTTP Date), if it said


@dataclass
class PendingUpload:
    key: str
    upload_id: str
    initiated: float


class Readable(Protocol):
    """What uploads read from: a file, or a stream that produces bytes on demand."""

    def read(self, n: int = -1, /) -> bytes: ...


class Backend:
    """Contract:

    - get(key, start, end, if_match) -> (bytes, ObjectInfo with metadata): bytes [start, end)
      (end None = to the object's end); NotFound when absent; PreconditionFailed when
      if_match is given and the ETag differs.
    - head(key) -> ObjectInfo with metadata; NotFound when absent.
    - put(key, data, metadata, if_none_match, if_match) -> ETag: whole object, atomic
      (readers see the old or the new object, never a mix). if_none_match: fail with
      PreconditionFailed when the key exists. if_match: when its ETag differs.
    - upload(key, stream, size, metadata, ...) -> ETag: like put, from a readable stream of
      exactly `size` bytes; large objects go in parallel parts; memory stays bounded.
      started(upload_id) is called when a multipart upload begins, before any part is sent,
      so the caller can journal the id and abort the upload should it die half-way.
    - copy(src, dst, metadata, if_match) -> ETag: server-side, replacing the metadata.
    - delete(key): absent keys are not an error.
    - list(prefix) -> ObjectInfo without metadata, every key under prefix, sorted.
    - pending_uploads(prefix) / abort_upload(...): unfinished multipart uploads.
    """

    url: str = ""

    def get(
        self, key: str, start: int = 0, end: int | None = None, if_match: str | None = None
    ) -> tuple[bytes, ObjectInfo]:
        raise NotImplementedError

    def head(self, key: str) -> ObjectInfo:
        raise NotImplementedError

    def put(
        self,
        key: str,
        data: bytes,
        metadata: dict[str, str] | None = None,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        raise NotImplementedError

    def upload(
        self,
        key: str,
        stream: Readable,
        size: int,
        metadata: dict[str, str] | None = None,
        if_none_match: bool = False,
        if_match: str | None = None,
        progress=None,
        started=None,
    ) -> str:
        raise NotImplementedError

    def copy(self, src: str, dst: str, metadata: dict[str, str], if_match: str | None = None) -> str:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        raise NotImplementedError

    def pending_uploads(self, prefix: str) -> builtins.list[PendingUpload]:
        return []

    def abort_upload(self, upload: PendingUpload) -> None:
        pass

    def check(self) -> None:
        """Fail fast (BucketNotFound, NoCredentials, Unreachable, AccessDenied) before real work."""

    def multipart_conditions(self, key: str) -> bool:
        """Whether completing a multipart upload honours If-None-Match and If-Match (a probe
        on `key`, which exists).
        Backends whose large uploads are as atomic and conditional as put say True."""
        return True

    single_put_max: int = MAX_OBJECT_SIZE  # the largest object upload() sends in one put

    def close(self) -> None:
        pass


def read_exact(stream: Readable, n: int) -> bytes:
    """Read n bytes (fewer only at end of stream) from a stream that may return short reads."""
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
