"""A local directory as a backend: for tests, demos, USB drives and NAS shares.

Each object is one file: a 4 KiB metadata block (JSON, space padded) then the body, so a
size needs only stat. Writes go to a temp file, are fsynced, then renamed (or linked, for
create-only writes, which makes If-None-Match atomic). ETags come from inode, mtime and size.
`_lock` makes If-Match checks atomic within one process; across processes they are best effort.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import uuid
from typing import BinaryIO, Iterator

from ..errors import (AccessDenied, BackendError, BucketNotFound, FormatError, NoSpace, NotFound,
                      PreconditionFailed)
from .base import Backend, ObjectInfo

META_BLOCK = 4096
TMP_PREFIX = ".tmp-"


class LocalBackend(Backend):
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.url = "file://" + self.root
        self._lock = threading.Lock()

    # ------------------------------------------------------------ paths

    def _path(self, key: str) -> str:
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise BackendError(f"invalid object key {key!r}")
        return os.path.join(self.root, *parts)

    def check(self) -> None:
        if not os.path.isdir(self.root):
            raise BucketNotFound(f"directory {self.root} does not exist")

    # ------------------------------------------------------------ reads

    def _info(self, key: str, path: str, st: os.stat_result, meta: dict | None) -> ObjectInfo:
        return ObjectInfo(key, st.st_size - META_BLOCK, f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}",
                          st.st_mtime, meta)

    def _open(self, key: str):
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"no object {key}") from None
        except PermissionError:
            raise AccessDenied(f"{key}: permission denied in {self.root}") from None

    def _read_meta(self, f) -> dict:
        raw = f.read(META_BLOCK)
        try:
            if len(raw) != META_BLOCK:
                raise ValueError("short")
            meta = json.loads(raw.decode())
            if not isinstance(meta, dict):
                raise ValueError("not an object")
            return meta
        except ValueError:
            raise FormatError(f"{f.name}: not an object file of the local backend "
                              "(bad metadata block)") from None

    def head(self, key: str) -> ObjectInfo:
        with self._open(key) as f:
            meta = self._read_meta(f)
            return self._info(key, f.name, os.fstat(f.fileno()), meta)

    def get(self, key, start=0, end=None, if_match=None):
        with self._open(key) as f:
            info = self._info(key, f.name, os.fstat(f.fileno()), self._read_meta(f))
            if if_match is not None and if_match != info.etag:
                raise PreconditionFailed(f"{key} changed")
            end = info.size if end is None else min(end, info.size)
            f.seek(META_BLOCK + start)
            return f.read(max(0, end - start)), info

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base_dir = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not prefix.endswith("/") and prefix:
            base_dir = os.path.dirname(base_dir)
        out = []
        for dirpath, dirnames, filenames in os.walk(base_dir):
            for name in filenames:
                if name.startswith(TMP_PREFIX):
                    continue
                path = os.path.join(dirpath, name)
                key = os.path.relpath(path, self.root).replace(os.sep, "/")
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                if st.st_size >= META_BLOCK:
                    out.append(self._info(key, path, st, None))
        out.sort(key=lambda i: i.key)
        return iter(out)

    # ------------------------------------------------------------ writes

    def _write_tmp(self, key: str, metadata: dict | None, stream: BinaryIO | None, data: bytes | None,
                   progress=None) -> str:
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), TMP_PREFIX + uuid.uuid4().hex)
        meta_raw = json.dumps(metadata or {}).encode()
        if len(meta_raw) > META_BLOCK:
            raise BackendError("metadata larger than 4 KiB")
        try:
            with open(tmp, "wb") as f:
                f.write(meta_raw.ljust(META_BLOCK, b" "))
                if data is not None:
                    f.write(data)
                else:
                    while chunk := stream.read(8 * 1024 * 1024):
                        f.write(chunk)
                        if progress:
                            progress(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            _unlink(tmp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"no space left in {self.root}") from None
            raise BackendError(f"writing {key}: {exc}") from None
        return tmp

    def _commit(self, key: str, tmp: str, if_none_match: bool, if_match: str | None) -> str:
        path = self._path(key)
        with self._lock:
            try:
                if if_match is not None:
                    try:
                        current = self.head(key).etag
                    except NotFound:
                        raise PreconditionFailed(f"{key} is gone") from None
                    if current != if_match:
                        raise PreconditionFailed(f"{key} changed")
                if if_none_match:
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        raise PreconditionFailed(f"{key} already exists") from None
                    os.unlink(tmp)
                else:
                    os.replace(tmp, path)
            finally:
                _unlink(tmp)
            _fsync_dir(os.path.dirname(path))
            return self.head(key).etag

    def put(self, key, data, metadata=None, if_none_match=False, if_match=None):
        return self._commit(key, self._write_tmp(key, metadata, None, bytes(data)), if_none_match, if_match)

    def upload(self, key, stream, size, metadata=None, if_none_match=False, if_match=None, progress=None):
        return self._commit(key, self._write_tmp(key, metadata, stream, None, progress),
                            if_none_match, if_match)

    def copy(self, src, dst, metadata, if_match=None):
        with self._open(src) as f:
            st = os.fstat(f.fileno())
            self._read_meta(f)
            if if_match is not None and self._info(src, f.name, st, None).etag != if_match:
                raise PreconditionFailed(f"{src} changed")
            tmp = self._write_tmp(dst, metadata, f, None)
        return self._commit(dst, tmp, False, None)

    def delete(self, key):
        path = self._path(key)
        _unlink(path)
        # drop emptied directories, as S3 has none
        d = os.path.dirname(path)
        while d != self.root and d.startswith(self.root):
            try:
                os.rmdir(d)
            except OSError:
                break
            d = os.path.dirname(d)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
