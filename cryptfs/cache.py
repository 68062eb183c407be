"""Read caches: decrypted blocks in memory, ciphertext chunks on local disk.

Both are keyed by object version (file id and ETag), so blocks of two versions never mix.
Plaintext is only ever in memory; the disk cache holds ciphertext exactly as the bucket does.
Each class has one lock guarding its index; file I/O of the disk cache runs outside it.
"""

import hashlib
import os
import threading
from collections import OrderedDict

from cachetools import LRUCache

from . import localstate


class BlockCache:
    """Decrypted blocks, bounded by total bytes. Key: (file id, etag, block index)."""

    def __init__(self, max_bytes: int):
        self._lru: LRUCache = LRUCache(maxsize=max(max_bytes, 1), getsizeof=len)
        self._lock = threading.Lock()

    def get(self, key) -> bytes | None:
        with self._lock:
            return self._lru.get(key)

    @property
    def used(self) -> int:
        return int(self._lru.currsize)

    def put(self, key, block: bytes) -> None:
        with self._lock:
            if len(block) <= self._lru.maxsize:
                self._lru[key] = block


class DiskCache:
    """Ciphertext chunks on local disk, bounded by total bytes, least recently used evicted.

    Files are named by a hash of (object key, etag, chunk index); a chunk found on disk
    from an earlier mount is used after its length is checked (its blocks are authenticated
    when decrypted, so a damaged chunk is an authentication failure, then dropped).
    """

    def __init__(self, directory: str, max_bytes: int):
        self.dir = directory
        self.max_bytes = max_bytes
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._index: OrderedDict[str, int] = OrderedDict()
        self._total = 0
        self._lock = threading.Lock()
        for name in sorted(os.listdir(directory), key=lambda n: _mtime(os.path.join(directory, n))):
            if name.endswith(".tmp"):
                _unlink(os.path.join(directory, name))
                continue
            size = os.path.getsize(os.path.join(directory, name))
            self._index[name] = size
            self._total += size
        self._evict()

    @property
    def used(self) -> int:
        return self._total

    @staticmethod
    def _name(key) -> str:
        return hashlib.sha256(repr(key).encode()).hexdigest()

    def get(self, key, length: int) -> bytes | None:
        name = self._name(key)
        with self._lock:
            if name not in self._index:
                return None
            self._index.move_to_end(name)
        try:
            with open(os.path.join(self.dir, name), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        if len(data) != length:
            self.drop(key)
            return None
        return data

    def put(self, key, data: bytes) -> None:
        if self.max_bytes <= 0 or len(data) > self.max_bytes:
            return
        if not localstate.room_for(self.dir, len(data)):  # the disk's last free bytes are for staging
            with self._lock:
                self.max_bytes = min(self.max_bytes, max(0, self._total - len(data)))
                self._evict()
            return
        name = self._name(key)
        path = os.path.join(self.dir, name)
        tmp = f"{path}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:  # a full cache disk only costs cache hits
            _unlink(tmp)
            return
        with self._lock:
            self._total += len(data) - self._index.pop(name, 0)
            self._index[name] = len(data)
            self._evict()

    def drop(self, key) -> None:
        name = self._name(key)
        with self._lock:
            self._total -= self._index.pop(name, 0)
        _unlink(os.path.join(self.dir, name))

    def _evict(self) -> None:
        while self._total > self.max_bytes and self._index:
            name, size = self._index.popitem(last=False)
            self._total -= size
            _unlink(os.path.join(self.dir, name))


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
