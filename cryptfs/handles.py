"""Open files: byte ranges to blocks, read-modify-write, dirty blocks, the ciphertext staging file.

A FileState is one file while it is open or waiting to upload. Its blocks come from four
places, newest first: dirty plaintext blocks in memory (bounded), blocks encrypted into the
staging file (laid out byte for byte as the object will be), blocks of the uploaded object
it was opened from (the basis, same data key), and holes (zeros, encrypted only at upload).
`prepare()` turns that into an upload plan; no plaintext is ever written to disk.

`lock` (an RLock) guards every field but `handles` (the namespace's lock guards that);
`parent_id` and `name` change only with both held. getattr reads `size` and `attrs`
without it. The lock is held for a whole upload, so anything that must see the file
either before or after an upload (rename, unlink, chmod) simply takes it.
"""

import errno
import os
import threading
import time
import uuid
from dataclasses import replace

from . import format as fmt
from . import localstate
from .errors import NoSpace
from .reader import BlockReader, SequentialDetector
from .store import Entry, Store, entry_attrs

MAX_DIRTY_BLOCKS = 64  # per file: 4 MiB of plaintext with 64 KiB blocks


class FileState:
    def __init__(
        self,
        store: Store,
        reader: BlockReader,
        staging_dir: str,
        parent_id: bytes,
        name: bytes,
        attrs: fmt.Attrs,
        basis: Entry | None,
        fk: fmt.FileKey,
        wrapped: bytes | None,
    ):
        self.store, self.reader, self.staging_dir = store, reader, staging_dir
        self.bs = store.block_size
        self.layout = store.layout
        self.lock = threading.RLock()
        self.uid = uuid.uuid4().hex
        self.parent_id, self.name = parent_id, name
        self.attrs = attrs
        self.fk, self.wrapped = fk, wrapped
        self.header = fmt.make_header(fk, self.layout)
        self.basis = basis
        self.size = basis.size if basis else 0
        self.basis_blocks = fmt.block_count(basis.size, self.bs) if basis else 0
        self.dirty: dict[int, bytearray] = {}
        self.staged: dict[int, tuple[bool, int]] = {}  # block -> (encrypted as last, plaintext length)
        self.fd: int | None = None
        self.unsynced = False  # staged blocks written since the last fsync
        self.modified = False  # differs from the bucket: an upload is owed
        self.journaled = False
        self.changes = 0  # bumped by every change; journaled_at says which one is on disk
        self.pending_since: float | None = None  # when the first change not yet uploaded was made
        self.journaled_at = -1
        self.handles = 0
        self.unlinked = False
        self.error: Exception | None = None  # a failed upload, reported on the next fsync/close
        self.failed = False  # a write met a full cache disk: ENOSPC until the last close drops it
        self.seq = SequentialDetector()
        self.remote_at_key = basis is not None  # an object (ours or an older one) sits under our key
        self.seen = basis.etag if basis is not None else None  # the version under our key we last saw
        self.standalone = False  # (--shared) never build an upload on the basis: another mount may replace it
        self.inode_key = basis.key if basis is not None and basis.link_key else None  # hard-linked

    # ------------------------------------------------------------ identity

    @classmethod
    def open_existing(cls, store, reader, staging_dir, entry: Entry) -> "FileState":
        return cls(
            store,
            reader,
            staging_dir,
            entry.parent_id,
            entry.name,
            entry_attrs(entry),
            entry,
            store.file_key(entry),
            entry.wrapped_key,
        )

    @classmethod
    def create(cls, store, reader, staging_dir, parent_id, name, attrs, file_id=None) -> "FileState":
        fk, wrapped = store.new_file_key(file_id)
        state = cls(store, reader, staging_dir, parent_id, name, attrs, None, fk, wrapped)
        state.modified = True
        return state

    @property
    def key(self) -> str:
        """Where the file's object goes: its name's key, or a hard-linked file's own key."""
        return self.inode_key or self.store.entry_key(self.parent_id, self.name)

    @property
    def link_key(self) -> str | None:
        """A hard-linked file: the key of the link entry of the name it is bound to."""
        return None if self.inode_key is None else self.store.entry_key(self.parent_id, self.name)

    @property
    def staging_path(self) -> str:
        return os.path.join(self.staging_dir, self.uid + ".obj")

    def touch(self, ctime_only: bool = False) -> None:
        self.changes += 1
        if self.pending_since is None and not ctime_only:
            self.pending_since = time.time()
        now = time.time_ns()
        self.attrs = (
            replace(self.attrs, ctime_ns=now) if ctime_only else replace(self.attrs, mtime_ns=now, ctime_ns=now)
        )

    def accessed(self) -> None:
        """relatime: a read moves atime when it is not newer than mtime/ctime, or a day old.
        Kept here, and carried into the bucket by the file's next upload or attribute change."""
        a, now = self.attrs, time.time_ns()
        atime = a.mtime_ns if a.atime_ns is None else a.atime_ns
        if atime <= max(a.mtime_ns, a.ctime_ns) or now - atime > 86_400 * 10**9:
            self.attrs = replace(a, atime_ns=now)

    # ------------------------------------------------------------ block sources

    def _open_staging(self) -> int:
        if self.fd is None:
            self.fd = os.open(self.staging_path, os.O_RDWR | os.O_CREAT, 0o600)
            _pwrite(self.fd, self.header, 0)
        return self.fd

    def _stored_plain(self, i: int) -> bytes:
        """Block i as last written, before size adjustments."""
        if i in self.dirty:
            return bytes(self.dirty[i])
        if i in self.staged:
            last, length = self.staged[i]
            ct = os.pread(self._open_staging(), length + fmt.BLOCK_OVERHEAD, self.layout.block_offset(i))
            return fmt.decrypt_block(self.fk, self.header, i, ct, last)
        if self.basis is not None and i < self.basis_blocks:
            return self.reader.block(self.basis, self.fk, self.header, i)
        return b""

    def _plain(self, i: int) -> bytes:
        need = fmt.block_plain_len(i, self.size, self.bs)
        data = self._stored_plain(i)
        return data[:need].ljust(need, b"\0")

    # ------------------------------------------------------------ reads and writes

    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            if offset >= self.size or size <= 0:
                return b""
            size = min(size, self.size - offset)
            self.accessed()
            window = self.seq.observe(offset, size)
            span = fmt.block_span(offset, size, self.bs)
            if window and self.basis is not None and not self.dirty and not self.staged:
                self.reader.prefetch(self.basis, self.fk, self.header, span.start, window)
            out = b"".join(self._plain(i) for i in span)
            skip = offset - span.start * self.bs
            return out[skip : skip + size]

    def pin(self) -> None:
        """A standalone file opened read-only: fetch the version it was opened from, whole,
        so that a reader goes on reading it after another mount replaces it."""
        if self.standalone and self.basis is not None and self.basis_blocks and not self.modified:
            self.reader.fetch_all(self.basis, self.fk, self.header)

    def detach(self) -> None:
        """A standalone file opened for writing (and before any change): copy the basis's
        blocks into staging, so neither reads nor the upload need anything of a version
        another mount may replace meanwhile. PreconditionFailed: it was replaced already."""
        with self.lock:
            if not self.standalone or not self.basis_blocks:
                return
            for i in range(self.basis_blocks):
                if i not in self.dirty and i not in self.staged:
                    self.dirty[i] = bytearray(self._stored_plain(i))
                    self._evict()
            self.basis_blocks = 0

    def write(self, offset: int, data: bytes) -> int:
        with self.lock:
            self.detach()
            end = offset + len(data)
            new_size = max(self.size, end)
            if offset > self.size:
                self._resize(offset)
            for i in fmt.block_span(offset, len(data), self.bs):
                start = i * self.bs
                lo, hi = max(offset, start), min(end, start + self.bs)
                existing = max(0, min(self.bs, self.size - start))
                if lo == start and hi - start >= existing:
                    buf = bytearray()
                else:
                    buf = bytearray(self._plain(i)) if existing else bytearray()
                if len(buf) < hi - start:
                    buf.extend(bytes(hi - start - len(buf)))
                buf[lo - start : hi - start] = data[lo - offset : hi - offset]
                self.dirty.pop(i, None)
                self.dirty[i] = buf
                self.staged.pop(i, None)
            self.size = new_size
            self.modified = True
            self.touch()
            self._evict()
            return len(data)

    def _evict(self) -> None:
        """Encrypt the oldest dirty blocks once too many are held (never the last block)."""
        last = fmt.block_count(self.size, self.bs) - 1
        while len(self.dirty) > MAX_DIRTY_BLOCKS:
            i = next(i for i in self.dirty if i != last)
            self._stage(i, False)

    def _stage(self, i: int, last: bool) -> None:
        plain = self.dirty[i]
        ct = fmt.encrypt_block(self.fk, self.header, i, plain, last)
        _pwrite(self._open_staging(), ct, self.layout.block_offset(i))
        del self.dirty[i]
        self.staged[i] = (last, len(plain))
        self.unsynced = True

    def truncate(self, length: int) -> None:
        with self.lock:
            if length == self.size:
                return
            self.detach()
            self._resize(length)
            self.modified = True
            self.touch()

    def _resize(self, length: int) -> None:
        if length < self.size:
            last = fmt.block_count(length, self.bs) - 1
            keep = bytearray(self._stored_plain(last)[: length - last * self.bs])
            for table in (self.dirty, self.staged):
                for i in [i for i in table if i >= last]:
                    del table[i]
            self.dirty[last] = keep
            self.basis_blocks = min(self.basis_blocks, last)
            if self.fd is not None:
                os.ftruncate(self.fd, self.layout.block_offset(last))
        self.size = length

    def rewrite_from_scratch(self) -> None:
        """O_TRUNC or truncate to 0: a new data key (same file id), nothing kept."""
        with self.lock:
            self.fk, self.wrapped = self.store.new_file_key(self.fk.file_id)
            self.header = fmt.make_header(self.fk, self.layout)
            self.basis, self.basis_blocks = None, 0
            self.dirty.clear()
            self.staged.clear()
            if self.fd is not None:
                os.ftruncate(self.fd, 0)
                _pwrite(self.fd, self.header, 0)
            self.size = 0
            self.modified = True
            self.touch()

    # ------------------------------------------------------------ upload plan

    def prepare(self, sync: bool = True) -> list[list]:
        """Encrypt what is dirty, fix last-block flags, fsync staging; return runs [kind, start, end).

        kind: "s" staged block in the staging file, "b" basis object block, "z" hole.
        """
        with self.lock:
            n = fmt.block_count(self.size, self.bs)
            basis_size = self.basis.size if self.basis else 0
            basis_n = fmt.block_count(basis_size, self.bs)
            runs: list[list] = []
            for i in range(n):
                last, length = i == n - 1, fmt.block_plain_len(i, self.size, self.bs)
                if i in self.dirty:
                    self._stage(i, last)
                if i in self.staged:
                    if self.staged[i] != (last, length):
                        self.dirty[i] = bytearray(self._plain(i))
                        self._stage(i, last)
                    kind = "s"
                elif i < self.basis_blocks:
                    basis_last = i == basis_n - 1
                    basis_len = fmt.block_plain_len(i, basis_size, self.bs)
                    if (basis_last, basis_len) == (last, length):
                        kind = "b"
                    else:
                        self.dirty[i] = bytearray(self._plain(i))
                        self._stage(i, last)
                        kind = "s"
                else:
                    kind = "z"
                if runs and runs[-1][0] == kind and runs[-1][2] == i:
                    runs[-1][2] = i + 1
                else:
                    runs.append([kind, i, i + 1])
            if sync and self.unsynced:
                os.fsync(self._open_staging())
                self.unsynced = False
            return runs

    def read_staged(self, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of the staging file (an upload's source)."""
        return os.pread(self._open_staging(), hi - lo, lo)

    def staged_bytes(self) -> bytes:
        """The staging file as it stands (for small files, journaled inline)."""
        with self.lock:
            if self.fd is None:
                return b""
            return os.pread(self.fd, os.fstat(self.fd).st_size, 0)

    def uploaded(self, entry: Entry) -> None:
        """The bucket now holds what we had: it becomes the basis; staging is dropped."""
        with self.lock:
            self.basis = entry
            self.seen = entry.etag
            self.basis_blocks = fmt.block_count(entry.size, self.bs)
            self.staged.clear()
            self.discard_staging()
            self.modified = bool(self.dirty) or entry.size != self.size
            self.journaled = False
            if not self.modified:
                self.pending_since = None

    def discard_staging(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            os.unlink(self.staging_path)
        except FileNotFoundError:
            pass

    def entry(self) -> Entry:
        """What getattr and listings show for this file now."""
        base = self.basis
        return Entry(
            self.parent_id,
            self.name,
            self.key,
            False,
            self.fk.file_id,
            self.size,
            base.etag if base else "",
            base.last_modified if base else time.time(),
            self.attrs,
            self.wrapped,
        )


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    localstate.check_room(fd, len(data))
    try:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace("no space left on the cache disk") from None
        raise
