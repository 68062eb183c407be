"""The mount's layers in-process (no kernel): a real Mount over a volume, with a FaultPlan at
the one door to storage, and helpers that call the FUSE operations as the kernel would
(lookup before create, open/read/write/flush/release, errors as OSError)."""

from __future__ import annotations

import errno
import os
import stat

from cryptfs import volume
from cryptfs.backend.faults import FaultPlan, FaultyBackend
from cryptfs.config import VolumeSettings
from cryptfs.mount import Mount
from cryptfs.store import Store
from cryptfs.target import locate


def open_mount(ref, cache_dir: str, plan: FaultPlan | None = None, **settings) -> Mount:
    """A Mount of the volume `ref` (a conftest VolumeRef) with its journal recovered."""
    target = locate(ref.url, ref.settings())
    backend = FaultyBackend(target.backend, plan or FaultPlan())
    vol = volume.open_volume(backend, target.prefix, ref.passphrase.encode())
    opts = dict(url=ref.url, endpoint_url=ref.endpoint, cache_dir=cache_dir, writeback_delay=0.05,
                attr_ttl=0.2)
    opts.update(settings)
    mount = Mount(Store(vol), VolumeSettings(**opts))
    mount.recover()
    return mount


def close_mount(mount: Mount) -> None:
    """Unmount: upload everything pending, then stop."""
    mount.fs.destroy("/")
    mount.ns.close()
    mount.reader.close()


class Ops:
    """The kernel's side of the FUSE protocol, for one in-process mount."""

    def __init__(self, fs):
        self.fs = fs

    def exists(self, path: str) -> bool:
        try:
            self.fs.getattr(path)
            return True
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return False
            raise

    def stat(self, path: str, fh=None) -> dict:
        return self.fs.getattr(path, fh)

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        """open(2): create when absent and O_CREAT is given, as the kernel decides after a lookup."""
        if flags & os.O_CREAT:
            if self.exists(path):
                if flags & os.O_EXCL:
                    raise OSError(errno.EEXIST, path)
                return self.fs.open(path, flags & ~(os.O_CREAT | os.O_EXCL))
            return self.fs.create(path, stat.S_IFREG | mode, flags)
        return self.fs.open(path, flags)

    def close(self, path: str, fh: int) -> None:
        try:
            self.fs.flush(path, fh)
        finally:
            self.fs.release(path, fh)

    def write_file(self, path: str, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> None:
        fh = self.open(path, flags)
        try:
            offset = self.fs.getattr(path, fh)["st_size"] if flags & os.O_APPEND else 0
            if data:
                self.fs.write(path, data, offset, fh)
        finally:
            self.close(path, fh)

    def append(self, path: str, data: bytes) -> None:
        self.write_file(path, data, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def read_file(self, path: str) -> bytes:
        fh = self.fs.open(path, os.O_RDONLY)
        try:
            size = self.fs.getattr(path, fh)["st_size"]
            return self.fs.read(path, size + 1, 0, fh) if size else b""
        finally:
            self.fs.release(path, fh)

    def listdir(self, path: str) -> list[str]:
        fh = self.fs.opendir(path)
        try:
            return sorted(n for n, _, _ in self.fs.readdir(path, fh) if n not in (".", ".."))
        finally:
            self.fs.releasedir(path, fh)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        self.fs.rename(old, new, flags)

    def unlink(self, path: str) -> None:
        self.fs.unlink(path)

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        self.fs.mkdir(path, stat.S_IFDIR | mode)

    def rmdir(self, path: str) -> None:
        self.fs.rmdir(path)
