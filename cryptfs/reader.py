"""Reading blocks of uploaded objects: memory cache, disk cache, coalesced GETs, prefetch.

Fetches go in chunks of CHUNK_BLOCKS blocks (one ranged GET each, If-Match on the ETag);
a sequential reader gets a prefetch window that doubles up to MAX_WINDOW chunks.
`_lock` guards the in-flight table; caches have their own locks.
"""

import concurrent.futures as cf
import logging
import threading

from . import format as fmt
from .cache import BlockCache, DiskCache
from .store import Entry, Store

log = logging.getLogger(__name__)

CHUNK_BLOCKS = 16          # 1 MiB of plaintext per GET with 64 KiB blocks
MAX_WINDOW = 16            # chunks prefetched ahead of a sequential reader


class BlockReader:
    def __init__(self, store: Store, blocks: BlockCache, disk: DiskCache | None, workers: int = 8):
        self.store = store
        self.blocks = blocks
        self.disk = disk
        self.bs = store.block_size
        self._pool = cf.ThreadPoolExecutor(workers, thread_name_prefix="fetch")
        self._inflight: dict[tuple, cf.Future] = {}
        self._lock = threading.Lock()

    def _chunk_key(self, entry: Entry, chunk: int) -> tuple:
        return (entry.key, entry.etag, chunk)

    def _fetch_chunk(self, entry: Entry, fk: fmt.FileKey, header: bytes, chunk: int) -> None:
        first = chunk * CHUNK_BLOCKS
        nblocks = fmt.block_count(entry.size, self.bs)
        count = min(CHUNK_BLOCKS, nblocks - first)
        start = fmt.block_offset(first, self.bs)
        end = fmt.block_offset(first + count - 1, self.bs) + fmt.BLOCK_OVERHEAD + \
            fmt.block_plain_len(first + count - 1, entry.size, self.bs)
        key = self._chunk_key(entry, chunk)
        raw = self.disk.get(key, end - start) if self.disk else None
        from_disk = raw is not None
        if raw is None:
            raw, _ = self.store.backend.get(self.store.abs_key(entry.key), start, end, if_match=entry.etag)
        try:
            plains = self.store.decrypt_range(entry, fk, header, first, raw)
        except Exception:
            if from_disk:
                self.disk.drop(key)
            raise
        if self.disk and not from_disk:
            self.disk.put(key, raw)
        for i, plain in enumerate(plains):
            self.blocks.put((entry.obj_id, entry.etag, first + i), plain)

    def _ensure(self, entry: Entry, fk, header, chunk: int) -> cf.Future | None:
        key = self._chunk_key(entry, chunk)
        with self._lock:
            fut = self._inflight.get(key)
            if fut is None:
                fut = self._pool.submit(self._fetch_chunk, entry, fk, header, chunk)
                self._inflight[key] = fut
                fut.add_done_callback(lambda _f, k=key: self._done(k))
        return fut

    def _done(self, key) -> None:
        with self._lock:
            self._inflight.pop(key, None)

    def block(self, entry: Entry, fk: fmt.FileKey, header: bytes, index: int) -> bytes:
        """Plaintext of block `index` of an uploaded object version."""
        ck = (entry.obj_id, entry.etag, index)
        for _ in range(3):
            hit = self.blocks.get(ck)
            if hit is not None:
                return hit
            self._ensure(entry, fk, header, index // CHUNK_BLOCKS).result()
        hit = self.blocks.get(ck)
        if hit is None:  # evicted as soon as fetched: memory cache too small; read it directly
            return self.store.read_blocks(entry, fk, header, index, 1)[0]
        return hit

    def prefetch(self, entry: Entry, fk, header, from_block: int, chunks: int) -> None:
        nchunks = -(-fmt.block_count(entry.size, self.bs) // CHUNK_BLOCKS)
        first = from_block // CHUNK_BLOCKS
        for chunk in range(first, min(first + chunks, nchunks)):
            if self.blocks.get((entry.obj_id, entry.etag, chunk * CHUNK_BLOCKS)) is None:
                fut = self._ensure(entry, fk, header, chunk)
                fut.add_done_callback(_log_failure)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _log_failure(fut: cf.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("prefetch failed: %s", fut.exception())


class SequentialDetector:
    """Grows a prefetch window while reads continue where the previous one ended."""

    def __init__(self):
        self.next_offset = -1
        self.window = 0

    def observe(self, offset: int, size: int) -> int:
        """Chunks to prefetch after a read at offset (0 for random access)."""
        if offset == self.next_offset or offset == 0 and self.next_offset == -1:
            self.window = min(max(1, self.window * 2), MAX_WINDOW)
        else:
            self.window = 0
        self.next_offset = offset + size
        return self.window
