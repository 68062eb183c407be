"""A local directory as a backend: for tests, demos, USB drives and NAS shares.

Each object is one file: a 4 KiB metadata block (JSON, space padded) then the body, so a
size needs only stat. Writes go to a temp file, are fsynced, then renamed (or linked, for
create-only writes, which makes If-None-Match atomic). ETags come from inode, mtime and size.

Below the root no symlink is ever followed: every path is walked one component at a time
from directory descriptors (openat with O_NOFOLLOW), for reads, writes, listings and
deletes alike. A key whose directory is a symlink does not exist (reads, deletes) or is
refused (writes). A listing reports what sits where an object file should be but is not one
(a file shorter than the metadata block, a symlink, a special file) as an object of size 0,
whose head and get raise FormatError, so it is skipped and reported, never hidden. An empty
directory lists nothing, as an empty prefix on S3.

An If-Match write checks and replaces under `_lock` (threads) and an exclusive flock on the
object's directory (processes), so it is atomic against other conditional writers. `_lock`
also keeps a listing from taking a directory that a write is about to fill (or a delete to
remove) for a stray empty one; across processes that is best effort.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import json
import os
import stat
import threading
import uuid
from typing import Iterator

from ..errors import (AccessDenied, BackendError, BucketNotFound, FormatError, NoSpace, NotFound,
                      PreconditionFailed)
from .base import Backend, ObjectInfo, Readable

META_BLOCK = 4096
TMP_PREFIX = ".tmp-"
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# a missing key, or one below something that is not a directory (a file, a symlink)
_ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


class LocalBackend(Backend):
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.url = "file://" + self.root
        self._lock = threading.Lock()

    # ------------------------------------------------------------ paths

    @staticmethod
    def _parts(key: str) -> list[str]:
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise BackendError(f"invalid object key {key!r}")
        return parts

    @contextlib.contextmanager
    def _dirs(self, parts: list[str], create: bool = False):
        """Descriptors of the root and of each directory in `parts` below it, opened without
        following symlinks (made when `create`); closed on exit. Raises OSError."""
        fds = [os.open(self.root, _DIR & ~os.O_NOFOLLOW)]
        try:
            for name in parts:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, dir_fd=fds[-1])
                fds.append(os.open(name, _DIR, dir_fd=fds[-1]))
            yield fds
        finally:
            for fd in fds:
                os.close(fd)

    def check(self) -> None:
        if not os.path.isdir(self.root):
            raise BucketNotFound(f"directory {self.root} does not exist")

    # ------------------------------------------------------------ reads

    @staticmethod
    def _info(key: str, st: os.stat_result, meta: dict | None) -> ObjectInfo:
        regular = stat.S_ISREG(st.st_mode) and st.st_size >= META_BLOCK
        return ObjectInfo(key, st.st_size - META_BLOCK if regular else 0,
                          f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}", st.st_mtime, meta)

    def _open(self, key: str):
        """The object file under `key`, open for reading, and its metadata."""
        parts = self._parts(key)
        try:
            with self._dirs(parts[:-1]) as fds:
                try:
                    fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                                 dir_fd=fds[-1])
                except OSError as exc:
                    if exc.errno != errno.ELOOP:
                        raise
                    raise FormatError(f"{key}: a symlink, not an object file of the local backend") from None
        except OSError as exc:
            if exc.errno in _ABSENT:
                raise NotFound(f"no object {key}") from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise AccessDenied(f"{key}: permission denied in {self.root}") from None
            raise BackendError(f"reading {key}: {exc}") from None
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):  # a prefix, as on S3: no object under this key
            os.close(fd)
            raise NotFound(f"no object {key}")
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise FormatError(f"{key}: a special file, not an object file of the local backend")
        f = os.fdopen(fd, "rb")
        try:
            raw = f.read(META_BLOCK)
            try:
                if len(raw) != META_BLOCK:
                    raise ValueError("short")
                meta = json.loads(raw.decode())
                if not isinstance(meta, dict):
                    raise ValueError("not an object")
            except ValueError:
                raise FormatError(f"{key}: not an object file of the local backend "
                                  "(bad metadata block)") from None
            return f, self._info(key, st, meta)
        except BaseException:
            f.close()
            raise

    def head(self, key: str) -> ObjectInfo:
        f, info = self._open(key)
        f.close()
        return info

    def get(self, key, start=0, end=None, if_match=None):
        f, info = self._open(key)
        with f:
            if if_match is not None and if_match != info.etag:
                raise PreconditionFailed(f"{key} changed")
            end = info.size if end is None else min(end, info.size)
            f.seek(META_BLOCK + start)
            return f.read(max(0, end - start)), info

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = prefix.split("/")[:-1]  # whole directories; the rest is a name prefix
        out: builtins.list[ObjectInfo] = []
        try:
            with self._dirs(self._parts("/".join(base)) if base else []) as fds:
                self._scan(fds[-1], "".join(p + "/" for p in base), prefix, out)
        except OSError as exc:
            if exc.errno not in _ABSENT:
                raise BackendError(f"listing {prefix}: {exc}") from None
        out.sort(key=lambda i: i.key)
        return iter(out)

    def _scan(self, dir_fd: int, rel: str, prefix: str, out: builtins.list[ObjectInfo]) -> bool:
        """Add what lies under one directory to `out`; False if it is empty."""
        with os.scandir(dir_fd) as it:
            names = [e.name for e in it]
        for name in names:
            key = rel + name
            if name.startswith(TMP_PREFIX) or not (key.startswith(prefix) or prefix.startswith(key + "/")):
                continue
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    if key.startswith(prefix):
                        out.append(self._info(key, st, None))
                    continue
                fd = os.open(name, _DIR, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno in _ABSENT:
                    continue  # gone, or replaced, since it was listed
                raise
            try:
                self._scan(fd, key + "/", prefix, out)  # an empty directory lists nothing, as on S3
            finally:
                os.close(fd)
        return bool(names)

    # ------------------------------------------------------------ writes

    def _store(self, key: str, metadata: dict | None, source: bytes | Readable, if_none_match: bool,
               if_match: str | None, progress=None) -> str:
        parts = self._parts(key)
        meta_raw = json.dumps(metadata or {}).encode()
        if len(meta_raw) > META_BLOCK:
            raise BackendError("metadata larger than 4 KiB")
        tmp = TMP_PREFIX + uuid.uuid4().hex
        try:
            with contextlib.ExitStack() as stack:
                with self._lock:  # a listing never sees the new directories empty
                    dir_fd = stack.enter_context(self._dirs(parts[:-1], create=True))[-1]
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o666, dir_fd=dir_fd)
                stack.callback(_unlink, tmp, dir_fd)
                with os.fdopen(fd, "wb") as f:
                    f.write(meta_raw.ljust(META_BLOCK, b" "))
                    if isinstance(source, bytes):
                        f.write(source)
                    else:
                        while chunk := source.read(8 * 1024 * 1024):
                            f.write(chunk)
                            if progress:
                                progress(len(chunk))
                    f.flush()
                    os.fsync(f.fileno())
                with self._lock:
                    return self._commit(key, dir_fd, tmp, parts[-1], if_none_match, if_match)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"no space left in {self.root}") from None
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise BackendError(f"writing {key}: a path component is not a directory "
                                   "(symlinks are never followed)") from None
            raise BackendError(f"writing {key}: {exc}") from None

    def _commit(self, key: str, dir_fd: int, tmp: str, name: str, if_none_match: bool,
                if_match: str | None) -> str:
        """Put the written temp file in place (with _lock held); returns the new ETag."""
        if if_match is not None:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)  # released when the caller closes dir_fd
            try:
                current = self._info(key, os.stat(name, dir_fd=dir_fd, follow_symlinks=False), None).etag
            except FileNotFoundError:
                raise PreconditionFailed(f"{key} is gone") from None
            if current != if_match:
                raise PreconditionFailed(f"{key} changed")
        if if_none_match:
            try:
                os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            except FileExistsError:
                raise PreconditionFailed(f"{key} already exists") from None
        else:
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
        return self._info(key, os.stat(name, dir_fd=dir_fd, follow_symlinks=False), None).etag

    def put(self, key, data, metadata=None, if_none_match=False, if_match=None):
        return self._store(key, metadata, bytes(data), if_none_match, if_match)

    def upload(self, key, stream, size, metadata=None, if_none_match=False, if_match=None, progress=None,
               started=None):  # one temporary file renamed into place: nothing to abort
        return self._store(key, metadata, stream, if_none_match, if_match, progress)

    def copy(self, src, dst, metadata, if_match=None):
        f, info = self._open(src)
        with f:
            if if_match is not None and info.etag != if_match:
                raise PreconditionFailed(f"{src} changed")
            return self._store(dst, metadata, f, False, None)

    def delete(self, key):
        parts = self._parts(key)
        try:
            with self._lock, self._dirs(parts[:-1]) as fds:
                try:
                    _unlink(parts[-1], fds[-1])
                except IsADirectoryError:  # an empty one is a stray; one with objects, a prefix
                    with contextlib.suppress(OSError):
                        os.rmdir(parts[-1], dir_fd=fds[-1])
                for i in range(len(fds) - 1, 0, -1):  # drop emptied directories, as S3 has none
                    try:
                        os.rmdir(parts[i - 1], dir_fd=fds[i - 1])
                    except OSError:
                        break
        except OSError as exc:
            if exc.errno not in _ABSENT:
                raise BackendError(f"deleting {key}: {exc}") from None


def _unlink(name: str, dir_fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)
