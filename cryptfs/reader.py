"""Reading blocks of uploaded objects: memory cache, disk cache, coalesced GETs, prefetch.

Blocks are cached in chunks of CHUNK_BLOCKS blocks; missing neighbouring chunks are
fetched together, up to MAX_RUN chunks in one ranged GET (If-Match on the ETag), since a
request costs far more than its bytes. A sequential reader gets a prefetch window that
doubles up to MAX_WINDOW chunks, fetched as several runs in parallel.
`_lock` guards the in-flight table; caches have their own locks.
"""

import concurrent.futures as cf
import functools
import logging
import threading

from . import format as fmt
from .cache import BlockCache, DiskCache
from .store import Entry, Store

log = logging.getLogger(__name__)

CHUNK_BLOCKS = 16  # 1 MiB of plaintext per chunk with 64 KiB blocks
MAX_RUN = 16  # chunks in one GET
MAX_WINDOW = 64  # chunks prefetched ahead of a sequential reader


class BlockReader:
    def __init__(self, store: Store, blocks: BlockCache, disk: DiskCache | None, workers: int = 8):
        self.store = store
        self.blocks = blocks
        self.disk = disk
        self.bs = store.block_size
        self._pool = cf.ThreadPoolExecutor(workers, thread_name_prefix="fetch")
        self._inflight: dict[tuple, cf.Future] = {}
        self._lock = threading.Lock()
        # for `cryptfs status`: blocks read from memory or not; chunks found on disk or not
        self.memory_hits = self.memory_misses = self.disk_hits = self.disk_misses = 0

    def _chunk_key(self, entry: Entry, chunk: int) -> tuple:
        return (entry.key, entry.etag, chunk)

    def _span(self, entry: Entry, chunk: int) -> tuple[int, int, int, int]:
        """(first block, block count, start, end) of a chunk in the object."""
        first = chunk * CHUNK_BLOCKS
        count = min(CHUNK_BLOCKS, fmt.block_count(entry.size, self.bs) - first)
        return (first, count) + self.store.layout.blocks_extent(first, first + count, entry.size)

    def _fetch_run(self, entry: Entry, fk: fmt.FileKey, header: bytes, chunks: list[int]) -> None:
        """Chunks (consecutive) from the disk cache, or all of them in one ranged GET. The GET
        of the first chunk also brings the stored header, checked here; that of the last
        brings the tag table."""
        spans = [self._span(entry, c) for c in chunks]
        raws = [
            self.disk.get(self._chunk_key(entry, c), s[3] - s[2]) if self.disk else None
            for c, s in zip(chunks, spans, strict=True)
        ]
        missed = sum(r is None for r in raws)
        self.disk_hits += len(raws) - missed
        self.disk_misses += missed
        if missed:
            start, end = spans[0][2], spans[-1][3]
            with_header = chunks[0] == 0
            with_table = self.store.layout.has_table and spans[-1][0] + spans[-1][1] == fmt.block_count(
                entry.size, self.bs
            )
            lo = 0 if with_header else start
            hi = self.store.layout.table_extent(entry.size)[1] if with_table else end
            data = self.store.get_range(entry.key, lo, hi, entry.etag)
            if with_header:
                self.store.check_header(entry, fk, data[: fmt.HEADER_SIZE])
            if with_table:
                self.store.tag_table(entry, fk, header, data[end - lo :])
            for i, (c, s) in enumerate(zip(chunks, spans, strict=True)):
                if raws[i] is None:
                    got = raws[i] = data[s[2] - lo : s[3] - lo]
                    if self.disk:
                        self.disk.put(self._chunk_key(entry, c), got)
        for c, s, raw in zip(chunks, spans, raws, strict=True):
            assert raw is not None  # every chunk came from the disk cache or the GET above
            try:
                plains = self.store.decrypt_range(entry, fk, header, s[0], raw)
            except Exception:
                if self.disk:
                    self.disk.drop(self._chunk_key(entry, c))
                raise
            for i, plain in enumerate(plains):
                self.blocks.put((entry.obj_id, entry.etag, s[0] + i), plain)

    def _ensure(self, entry: Entry, fk, header, chunks: list[int]) -> list[cf.Future]:
        """Futures for chunks, starting one fetch for the consecutive ones not yet in flight."""
        with self._lock:
            futures, todo = {}, []
            for c in chunks:
                key = self._chunk_key(entry, c)
                if key in self._inflight:
                    futures[c] = self._inflight[key]
                else:
                    todo.append(c)
            runs: list[list[int]] = []
            run: list[int] = []
            for c in todo:
                if run and (c != run[-1] + 1 or c % MAX_RUN == 0):
                    runs.append(run)
                    run = []
                run.append(c)
            if run:
                runs.append(run)
            started = []
            for run in runs:
                fut = self._pool.submit(self._fetch_run, entry, fk, header, run)
                keys = [self._chunk_key(entry, c) for c in run]
                for c, key in zip(run, keys, strict=True):
                    self._inflight[key] = fut
                    futures[c] = fut
                started.append((fut, keys))
        for fut, keys in started:  # outside the lock: a finished future calls back at once
            fut.add_done_callback(functools.partial(self._done, keys))
        return [futures[c] for c in chunks]

    def _done(self, keys: list, _fut: cf.Future | None = None) -> None:
        with self._lock:
            for key in keys:
                self._inflight.pop(key, None)

    def block(self, entry: Entry, fk: fmt.FileKey, header: bytes, index: int) -> bytes:
        """Plaintext of block `index` of an uploaded object version."""
        ck = (entry.obj_id, entry.etag, index)
        for attempt in range(3):
            hit = self.blocks.get(ck)
            if attempt == 0:
                self.memory_hits += hit is not None
                self.memory_misses += hit is None
            if hit is not None:
                return hit
            for fut in self._ensure(entry, fk, header, [index // CHUNK_BLOCKS]):
                fut.result()
        return self.store.read_blocks(entry, fk, header, index, 1)[0]  # memory cache too small

    def prefetch(self, entry: Entry, fk, header, from_block: int, chunks: int) -> None:
        """Start fetching `chunks` chunks from `from_block` on, in whole MAX_RUN-aligned runs,
        so that a reader advancing a little at a time still causes few, large GETs."""
        first = from_block // CHUNK_BLOCKS
        end = min(-(-(first + chunks) // MAX_RUN) * MAX_RUN, self._chunks(entry))
        for fut in set(self._ensure(entry, fk, header, self._missing(entry, range(first, end)))):
            fut.add_done_callback(_log_failure)

    def fetch_all(self, entry: Entry, fk, header) -> None:
        """Every chunk of an object version into the caches, waiting for them: later reads of
        that version need nothing from the bucket (PreconditionFailed: it was replaced)."""
        for fut in set(self._ensure(entry, fk, header, self._missing(entry, range(self._chunks(entry))))):
            fut.result()

    def _chunks(self, entry: Entry) -> int:
        return -(-fmt.block_count(entry.size, self.bs) // CHUNK_BLOCKS)

    def _missing(self, entry: Entry, chunks: range) -> list[int]:
        """The chunks whose first block is not in the memory cache."""
        return [c for c in chunks if self.blocks.get((entry.obj_id, entry.etag, c * CHUNK_BLOCKS)) is None]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _log_failure(fut: cf.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("prefetch failed: %s", fut.exception())


class SequentialDetector:
    """Grows a prefetch window while reads stay near where the previous ones ended
    (the kernel's read-ahead sends them slightly out of order, from several threads)."""

    SLACK = 4 * 1024 * 1024

    def __init__(self):
        self.next_offset = 0
        self.window = 0

    def observe(self, offset: int, size: int) -> int:
        """Chunks to prefetch after a read at offset (0 for random access)."""
        if abs(offset - self.next_offset) <= self.SLACK:
            self.window = min(max(1, self.window * 2), MAX_WINDOW)
            self.next_offset = max(self.next_offset, offset + size)
        else:
            self.window = 0
            self.next_offset = offset + size
        return self.window
