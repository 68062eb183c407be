"""From a URL to a backend, the volume root inside it, and a path inside the volume.

s3://bucket/prefix/path     the volume root is the longest prefix holding a volume config
file:///dir/path            the volume root is the nearest directory holding one
"""

import os
from dataclasses import dataclass

from . import volume
from .backend.base import Backend
from .backend.faults import from_environment
from .backend.local import LocalBackend
from .config import VolumeSettings
from .errors import UsageError, VolumeNotFound


@dataclass
class Target:
    backend: Backend
    prefix: str          # volume prefix inside the backend
    parts: list[bytes]   # path inside the volume, as components

    @property
    def display(self) -> str:
        return self.backend.url + "/" + self.prefix + b"/".join(self.parts).decode(errors="replace")


def split_url(url: str) -> tuple[str, str, str]:
    """(scheme, bucket or host, path), taken literally: names may hold '%', '?' or '#'."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise UsageError(f"{url}: not a URL (use s3://bucket/prefix or file:///dir)")
    netloc, _, path = rest.partition("/")
    return scheme.lower(), netloc, "/" + path


def make_backend(url: str, settings: VolumeSettings, root: str | None = None) -> tuple[Backend, str]:
    """(backend, path below the backend's root) for a URL."""
    scheme, netloc, path = split_url(url)
    if scheme == "s3":
        if not netloc:
            raise UsageError(f"{url}: no bucket name")
        from .backend.s3 import S3Backend
        backend = S3Backend(netloc, endpoint_url=settings.endpoint_url, region=settings.region,
                            profile=settings.profile, path_style=settings.path_style,
                            verify_tls=settings.verify_tls, retry_mode=settings.retry_mode,
                            max_attempts=settings.max_attempts, workers=settings.workers)
        return backend, path.lstrip("/")
    if scheme == "file":
        return LocalBackend(root or local_path(url)), ""
    raise UsageError(f"{url}: unsupported URL scheme (use s3://bucket/prefix or file:///dir)")


def local_path(url: str) -> str:
    """The absolute local path of a file:// URL."""
    _, netloc, path = split_url(url)
    if netloc not in ("", "localhost"):
        raise UsageError(f"{url}: file URLs name a local path (file:///dir)")
    return os.path.abspath(path)


def _split(path: str) -> list[bytes]:
    return [os.fsencode(p) for p in path.split("/") if p and p != "."]


def locate(url: str, settings: VolumeSettings) -> Target:
    """The volume a URL points into, and the path inside it (fails if there is no volume)."""
    scheme, _, path = split_url(url)
    if scheme == "file":
        path = root = local_path(url)
        while not (os.path.exists(os.path.join(root, volume.CONFIG_NAME))
                   or os.path.exists(os.path.join(root, volume.BACKUP_NAME))):
            if root == os.path.dirname(root):
                raise VolumeNotFound(f"no cryptfs volume at {path} or any parent of it")
            root = os.path.dirname(root)
        backend, _ = make_backend(url, settings, root=root)
        return Target(from_environment(backend), "", _split(os.path.relpath(path, root)))
    backend, path = make_backend(url, settings)
    backend.check()
    backend = from_environment(backend)
    prefix = volume.find_prefix(backend, path)
    return Target(backend, prefix, _split(path[len(prefix):]))


def for_init(url: str, settings: VolumeSettings) -> tuple[Backend, str]:
    backend, path = make_backend(url, settings)
    if isinstance(backend, LocalBackend):
        os.makedirs(backend.root, exist_ok=True)
    return backend, path
