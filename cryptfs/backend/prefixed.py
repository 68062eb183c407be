"""A volume's view of a backend: keys relative to the volume's root.

The one place that adds the volume's prefix to a key and strips it from the keys a listing
returns, so that no other code builds a volume's object keys by hand.
"""

from __future__ import annotations

import builtins
from dataclasses import replace
from typing import Iterator

from .base import Backend, ObjectInfo, PendingUpload


class PrefixedBackend:
    """Backend's contract on volume-relative keys; what takes no key is the inner backend's."""

    def __init__(self, inner: Backend, prefix: str):
        self.inner = inner
        self.prefix = prefix  # "" or "some/prefix/"

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def full_key(self, key: str) -> str:
        """The key as the bucket names it (for messages and the local databases)."""
        return self.prefix + key

    def get(self, key, start=0, end=None, if_match=None):
        return self.inner.get(self.prefix + key, start, end, if_match=if_match)

    def head(self, key):
        return self.inner.head(self.prefix + key)

    def put(self, key, data, metadata=None, if_none_match=False, if_match=None):
        return self.inner.put(self.prefix + key, data, metadata, if_none_match=if_none_match, if_match=if_match)

    def upload(self, key, stream, size, metadata=None, if_none_match=False, if_match=None, progress=None, started=None):
        return self.inner.upload(
            self.prefix + key,
            stream,
            size,
            metadata,
            if_none_match=if_none_match,
            if_match=if_match,
            progress=progress,
            started=started,
        )

    def copy(self, src, dst, metadata, if_match=None):
        return self.inner.copy(self.prefix + src, self.prefix + dst, metadata, if_match=if_match)

    def delete(self, key):
        self.inner.delete(self.prefix + key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        cut = len(self.prefix)
        for info in self.inner.list(self.prefix + prefix):
            yield replace(info, key=info.key[cut:])

    def pending_uploads(self, prefix: str) -> builtins.list[PendingUpload]:
        cut = len(self.prefix)
        return [replace(u, key=u.key[cut:]) for u in self.inner.pending_uploads(self.prefix + prefix)]

    def abort_upload(self, upload: PendingUpload) -> None:
        self.inner.abort_upload(replace(upload, key=self.prefix + upload.key))

    def multipart_conditions(self, key: str) -> bool:
        return self.inner.multipart_conditions(self.prefix + key)
