"""Write-back: the journal of pending uploads, the upload queue, and crash recovery.

A journal record (`UploadRecord`, versioned; the untyped records of the previous release
still read) and its staging file hold everything needed to finish an upload (object key,
metadata with the wrapped key, the plan of where each block comes from, the basis ETag, and
for a shared mount the ETag the commit is conditional on) and nothing secret: names are
encrypted, attributes sealed, the data key wrapped. Both are fsynced before close()
returns, so a closed file survives kill -9; the next mount uploads it (into /lost+found if
its directory is gone), conditionally when the record says so, so a dead mount's upload
never replaces a newer version: it becomes a conflict copy.

`_cond` guards `_due` and `_busy`; a file's own lock is held while it uploads.
"""

import concurrent.futures as cf
import dataclasses
import errno
import heapq
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass, field

from . import format as fmt
from .errors import AlreadyExists, CryptfsError, NoSpace, NotFound, PreconditionFailed
from .logs import shown
from .handles import FileState
from .store import Entry, ProducedStream, Store, TagCollector

log = logging.getLogger(__name__)

INLINE_MAX = 1024 * 1024  # objects up to this size are journaled inline
RESERVE = 1024 * 1024  # bytes set aside on the cache disk for removing journal records


class Journal:
    """Pending uploads in a small sqlite database (WAL): one fsync per durable write, and
    replacing a record is atomic. `_lock` serialises use of the connection.

    A little space is set aside next to it (`RESERVE`) and given up when the cache disk is
    full, so that a record can always be removed: an upload that landed, or an unlink, never
    fails for a full disk. It is set aside again at the next write that finds room."""

    def __init__(self, directory: str):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._db = sqlite3.connect(os.path.join(directory, "journal.db"), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS pending (uid TEXT PRIMARY KEY, record TEXT)")
        self._lock = threading.Lock()
        self._reserve = os.path.join(directory, "reserve")
        self._spent = True  # the reserve is to be set aside (again)
        self._warned_full = False
        self._set_aside()

    def _set_aside(self) -> None:
        try:
            fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE)
                self._spent = False
            finally:
                os.close(fd)
        except OSError:
            pass  # no room yet

    def write(self, uid: str, record: dict, durable: bool = True) -> None:
        """Replace a record atomically; durable means on disk when this returns."""
        try:
            with self._lock:
                self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'OFF'}")
                self._db.execute("INSERT OR REPLACE INTO pending VALUES (?, ?)", (uid, json.dumps(record)))
                if self._spent:
                    self._set_aside()
        except sqlite3.OperationalError as exc:
            if _disk_full(exc):
                raise NoSpace("no space left on the cache disk for the journal") from None
            raise

    def intend(self, uid: str, record: dict) -> None:
        """Record what a directory operation is about to do, so a crash half-way is settled
        at the next mount. Not fsynced (a killed process loses nothing of it). On a full disk
        the operation goes on without it: what a crash would then leave, fsck --repair settles."""
        try:
            self.write(uid, record, durable=False)
        except NoSpace:
            if not self._warned_full:
                log.warning("cache disk full: directory operations go on without their journal intent")
                self._warned_full = True

    def get(self, uid: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT record FROM pending WHERE uid=?", (uid,)).fetchone()
        try:
            return json.loads(row[0]) if row else None
        except ValueError:
            return None

    def remove(self, uid: str) -> None:
        with self._lock:
            if self._db.execute("SELECT 1 FROM pending WHERE uid=?", (uid,)).fetchone() is None:
                return  # nothing to write
            self._db.execute("PRAGMA synchronous=OFF")
            try:
                self._db.execute("DELETE FROM pending WHERE uid=?", (uid,))
            except sqlite3.OperationalError as exc:
                if not _disk_full(exc) or self._spent:
                    raise
                log.warning("cache disk full: giving up the journal's reserve to remove a record")
                os.unlink(self._reserve)
                self._spent = True
                self._db.execute("DELETE FROM pending WHERE uid=?", (uid,))

    def records(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT uid, record FROM pending ORDER BY rowid").fetchall()
        out = []
        for uid, raw in rows:
            try:
                out.append(json.loads(raw))
            except ValueError:
                log.error("journal record %s is unreadable; left in place", uid)
        return out

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _disk_full(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


RECORD_VERSION = 2  # 1: the untyped records of 0.1 (no `expect`), still read
NO_OBJECT = ""  # `expect` when the mount saw no object under the key: commit with If-None-Match


@dataclass
class UploadRecord:
    """A journal record of one pending upload (see the module docstring)."""

    uid: str
    key: str  # where the object goes (volume-relative)
    parent: str  # hex id of its directory
    file_id: str  # hex
    size: int  # plaintext size
    metadata: dict  # as stored: wrapped key, sealed attributes
    runs: list  # the plan: [kind, first block, end block)
    staging: str | None = None  # the staging file, or
    inline: str | None = None  # the object's bytes (base64), for small files
    basis: dict | None = None  # {"key", "etag", "size"} of the version basis blocks come from
    upload: list | None = None  # [key, upload id or None]: a multipart upload may exist
    obsolete: list = field(default_factory=list)  # keys to delete once uploaded
    # a shared mount's commit condition: the ETag it last saw under `key`, NO_OBJECT for none;
    # None for an exclusive mount's record (the lease alone keeps others out)
    expect: str | None = None
    version: int = RECORD_VERSION

    @classmethod
    def from_dict(cls, doc: dict) -> "UploadRecord":
        """A stored record; version 1 records (plain dicts of the previous release) too."""
        if doc.get("version", 1) > RECORD_VERSION:
            raise CryptfsError(f"journal record {doc.get('uid')} is of a newer release (version {doc['version']})")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names and k != "version"})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Commit:
    """Where an upload landed: its own name, or a conflict copy or /lost+found entry."""

    key: str
    etag: str
    metadata: dict
    parent: bytes
    name: bytes | None  # None: the name it was journaled under
    conflict: bool = False  # a conflict copy: another mount's version holds the name


class ComposedReader(ProducedStream):
    """The object's bytes in order: header, then staged, basis and hole blocks per the plan,
    then the tag table. Basis blocks are checked against the basis's own tag table, so a
    block spliced into the basis is never carried into the new version."""

    def __init__(
        self, store: Store, fk: fmt.FileKey, header: bytes, size: int, runs: list, read_staged, basis: Entry | None
    ):
        self.store, self.fk, self.header, self.size = store, fk, header, size
        self.layout = store.layout
        self.bs = store.block_size
        self.n = fmt.block_count(size, self.bs)
        self.runs = [list(r) for r in runs]
        self.read_staged = read_staged  # (start, end) -> bytes of the staging file
        self.basis = basis
        self.basis_tags = (
            store.tag_table(basis, fk, header) if basis is not None and any(r[0] == "b" for r in runs) else None
        )
        self.tags = TagCollector(fk, header, store.layout)
        self.finished = False
        self.buf = bytearray(header)
        self.pos = 0

    def _more(self) -> None:
        if not self.runs:
            self.buf += self.tags.table()
            self.finished = True
            return
        kind, start, end = self.runs[0]
        step_end = min(end, start + 128)  # 8 MiB at a time
        lo, hi = self.layout.blocks_extent(start, step_end, self.size)
        if kind == "s":
            data = self.read_staged(lo, hi)
        elif kind == "b":
            if self.basis is None:
                raise CryptfsError("upload plan names basis blocks but has no basis")
            data = self.store.get_range(self.basis.key, lo, hi, self.basis.etag)
        else:
            data = b"".join(
                fmt.encrypt_block(
                    self.fk, self.header, i, bytes(fmt.block_plain_len(i, self.size, self.bs)), i == self.n - 1
                )
                for i in range(start, step_end)
            )
        if len(data) != hi - lo:
            raise CryptfsError(f"upload source for blocks {start}-{step_end} is short")
        for i, block in enumerate(self.layout.split_blocks(data, start, step_end, self.size), start):
            if kind == "b" and self.basis_tags is not None:
                fmt.check_tag(self.basis_tags, i, block)
            self.tags.add(block)
        self.buf += data
        if step_end == end:
            self.runs.pop(0)
        else:
            self.runs[0][1] = step_end

    def _exhausted(self) -> bool:
        return self.finished


def upload_record(
    store: Store,
    journal: Journal,
    record: UploadRecord,
    fk: fmt.FileKey,
    header: bytes,
    read_staged,
    key: str | None = None,
    metadata: dict | None = None,
) -> Commit:
    """Upload the object a journal record describes (normal uploads and recovery alike);
    `key` and `metadata` override the record's (a recovered file moved to /lost+found).

    A shared mount's record commits only over the version it last saw (`expect`: If-Match,
    or If-None-Match for a new name); when that fails, the version goes to a conflict copy
    beside the winner, and a file whose directory another mount removed goes to /lost+found.

    Before an object that may go in parts is sent, the record says so; the upload's id
    follows as soon as it exists. The next attempt (or the next mount's recovery) aborts
    every unfinished upload to that key first: a kill between the upload's creation and its
    id reaching the journal leaves nothing behind either. (Upload ids are listed per key, and
    only this mount journals an upload to a key it is committing.)"""
    uid = record.uid
    left = UploadRecord.from_dict(journal.get(uid) or record.to_dict()).upload
    if left:
        store.abort_uploads_to(*left)
    key = key or record.key
    metadata = metadata or record.metadata
    size = store.layout.object_size(record.size)
    parent = bytes.fromhex(record.parent)

    def send(to: str, meta: dict, if_none_match: bool, if_match: str | None) -> str:
        if size > INLINE_MAX:  # not fsynced: enough against a killed process (the page cache survives
            # it); after a power cut `fsck --repair` finds the upload
            journal.write(uid, dataclasses.replace(record, upload=[to, None]).to_dict(), durable=False)

        def started(upload_id: str) -> None:
            journal.write(uid, dataclasses.replace(record, upload=[to, upload_id]).to_dict(), durable=False)

        reader = ComposedReader(store, fk, header, record.size, record.runs, read_staged, _basis_entry(record, fk))
        return store.upload(to, reader, size, meta, started=started, if_none_match=if_none_match, if_match=if_match)

    if record.expect is None:  # an exclusive mount: the lease keeps every other writer out
        return Commit(key, send(key, metadata, False, None), metadata, parent, None)
    try:
        if record.expect != NO_OBJECT:
            try:
                done = Commit(key, send(key, metadata, False, record.expect), metadata, parent, None)
                return _rehome_orphan(store, record, fk, done)
            except NotFound:
                pass  # removed (or renamed) meanwhile: our version takes the free name
        done = Commit(key, send(key, metadata, True, None), metadata, parent, None)
        return _rehome_orphan(store, record, fk, done)
    except PreconditionFailed:
        pass
    theirs = _modified_at(store, key)
    name = _plain_name(store, parent, key)
    attrs = _attrs_of(store, key, metadata)
    for attempt in range(5):
        copy_name = conflict_name(name, time.time(), socket.gethostname(), attempt)
        copy = store.entry_key(parent, copy_name)
        meta = store.metadata_for(copy, fk.file_id, attrs, fmt.parse_metadata(metadata).wrapped_key, False)
        try:
            etag = send(copy, meta, True, None)
        except PreconditionFailed:
            continue
        log.warning(
            "conflict: %s was replaced by another mount (its version written %s) while this mount's "
            "version (written %s) waited; ours is kept beside it as %s",
            shown(name),
            _stamp(theirs),
            _stamp(attrs.mtime_ns / 1e9),
            shown(copy_name),
        )
        return _rehome_orphan(store, record, fk, Commit(copy, etag, meta, parent, copy_name, True))
    raise CryptfsError(f"{key}: conflict copies of this version keep colliding")


def _rehome_orphan(store: Store, record: UploadRecord, fk: fmt.FileKey, done: Commit) -> Commit:
    """A shared mount's file committed into a directory another mount removed meanwhile
    (its back-pointer is gone): moved to /lost+found, so no object is left unreachable."""
    if done.parent == fmt.ROOT_DIR_ID:
        return done
    try:
        store.head(store.backptr_key(done.parent))
        return done
    except NotFound:
        pass
    name = _plain_name(store, done.parent, done.key) + b"." + record.file_id[:8].encode()
    lf = store.lost_and_found()
    key = store.entry_key(lf.obj_id, name[-fmt.NAME_MAX :])
    attrs = _attrs_of(store, done.key, done.metadata)
    meta = store.metadata_for(key, fk.file_id, attrs, fmt.parse_metadata(done.metadata).wrapped_key, False)
    etag = store.objects.copy(done.key, key, meta, if_match=done.etag)
    store.delete_key(done.key)
    log.warning("%s: its directory was removed by another mount; stored in /lost+found", shown(name))
    return Commit(key, etag, meta, lf.obj_id, name[-fmt.NAME_MAX :], done.conflict)


def _basis_entry(record: UploadRecord, fk: fmt.FileKey) -> Entry | None:
    basis = record.basis
    if basis is None:
        return None
    return Entry(  # records of version 1 volumes have no basis size
        bytes.fromhex(record.parent),
        b"",
        basis["key"],
        False,
        fk.file_id,
        basis.get("size", 0),
        basis["etag"],
        0.0,
        None,
    )


def _attrs_of(store: Store, key: str, metadata: dict) -> fmt.Attrs:
    meta = fmt.parse_metadata(metadata)
    return fmt.decrypt_attrs(store.vk, key, meta.obj_id, meta.attr_blob)


def _modified_at(store: Store, key: str) -> float | None:
    try:
        return store.head(key).last_modified
    except (NotFound, CryptfsError):
        return None


def _stamp(t: float | None) -> str:
    return "unknown time" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _plain_name(store: Store, parent: bytes, key: str) -> bytes:
    try:
        return fmt.decrypt_name(store.vk, parent, key[len(fmt.dir_prefix(store.vk, parent)) :])
    except CryptfsError:
        return key.rsplit("/", 1)[-1].encode()


def conflict_name(name: bytes, when: float, host: str, attempt: int = 0) -> bytes:
    """`report.txt` -> `report (conflict 2026-12-02 101500 host-b).txt`, kept within NAME_MAX."""
    stem, dot, ext = name.rpartition(b".")
    if not stem or b"/" in ext or len(ext) > 16:
        stem, dot, ext = name, b"", b""
    tag = f" (conflict {time.strftime('%Y-%m-%d %H%M%S', time.localtime(when))} {host}"
    tag += f" {attempt + 1})" if attempt else ")"
    tail = tag.encode() + dot + ext
    return stem[: fmt.NAME_MAX - len(tail)] + tail


class WriteBack:
    """Schedules uploads of closed files after a delay; uploads now on fsync and at unmount."""

    def __init__(
        self, store: Store, journal: Journal, delay: float, on_uploaded, workers: int = 4, shared: bool = False
    ):
        self.store, self.journal, self.delay = store, journal, delay
        self.on_uploaded = on_uploaded  # callback(state, entry, moved, winner) after an upload landed, lock held
        self.shared = shared  # every commit conditional on the version last seen (--shared)
        self.conflicts = 0  # conflict copies made (under _cond)
        self._due: list[tuple[float, int, FileState]] = []
        self._busy: set[str] = set()
        self._counter = 0
        self._cond = threading.Condition()
        self._stop = False
        self._threads = [threading.Thread(target=self._worker, name=f"upload-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ journal

    def record(self, state: FileState, runs: list) -> UploadRecord:
        meta = self.store.metadata_for(state.key, state.fk.file_id, state.attrs, state.wrapped, False)
        record = UploadRecord(
            uid=state.uid,
            key=state.key,
            parent=state.parent_id.hex(),
            file_id=state.fk.file_id.hex(),
            size=state.size,
            metadata=meta,
            runs=runs,
            basis={"key": state.basis.key, "etag": state.basis.etag, "size": state.basis.size} if state.basis else None,
            expect=(state.seen or NO_OBJECT) if self.shared else None,
        )
        if state.fd is not None:
            if self._inline(state):
                record.inline = fmt.b64e(state.staged_bytes())
            else:
                record.staging = state.staging_path
        return record

    @staticmethod
    def _inline(state: FileState) -> bool:
        """Small files go into the journal record itself: one fsync instead of two."""
        return state.layout.object_size(state.size) <= INLINE_MAX

    def journal_state(self, state: FileState) -> None:
        """Make a modified file durable locally (close/flush, or fsync in journal mode)."""
        with state.lock:
            if state.unlinked or not state.modified:
                return
            if state.journaled and state.journaled_at == state.changes:
                return
            runs = state.prepare(sync=not self._inline(state))
            self.journal.write(state.uid, self.record(state, runs).to_dict())
            state.journaled, state.journaled_at = True, state.changes
            _unlink(kept_path(state))

    def keep_closed_version(self, state: FileState) -> None:
        """Before the first change after a close (or flush): that close's journal record names
        the staging file, which the change would overwrite in place. Copy it aside and point
        the record there, so a crash before the next close recovers the closed version, never
        a mix of it and unclosed writes. Small files are journaled inline: nothing to do."""
        with state.lock:
            if not (state.journaled and state.journaled_at == state.changes) or state.fd is None:
                return
            doc = self.journal.get(state.uid)
            if doc is None or doc.get("staging") != state.staging_path:
                return
            kept = kept_path(state)
            try:
                fd = os.open(kept, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    size, pos = os.fstat(state.fd).st_size, 0
                    while pos < size:
                        pos += os.write(fd, os.pread(state.fd, min(8 << 20, size - pos), pos))
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                _unlink(kept)
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise NoSpace("no space left on the cache disk to keep the closed version") from None
                raise
            self.journal.write(state.uid, {**doc, "staging": kept})

    def rejournal(self, state: FileState) -> None:
        """After a rename or attribute change of a journaled file: atomic, durable with the next flush."""
        with state.lock:
            if state.journaled and not state.unlinked:
                runs = state.prepare(sync=False)
                self.journal.write(state.uid, self.record(state, runs).to_dict(), durable=False)
                state.journaled_at = state.changes

    # ------------------------------------------------------------ uploads

    def upload_now(self, state: FileState) -> None:
        """Upload synchronously (fsync); raises what the upload raised."""
        with state.lock:
            if state.unlinked or not state.modified:
                return
            fresh = state.journaled and state.journaled_at == state.changes
            runs = state.prepare(sync=not fresh)
            record = self.record(state, runs)
            if not fresh:
                self.journal.write(state.uid, record.to_dict())
                state.journaled, state.journaled_at = True, state.changes
            done = upload_record(self.store, self.journal, record, state.fk, state.header, state.read_staged)
            if done.conflict:
                with self._cond:
                    self.conflicts += 1
            self.journal.remove(state.uid)
            _unlink(kept_path(state))
            entry = Entry(
                done.parent,
                state.name if done.name is None else done.name,
                done.key,
                False,
                state.fk.file_id,
                state.size,
                done.etag,
                time.time(),
                state.attrs,
                state.wrapped,
                raw_meta=done.metadata,
                link_key=state.link_key,
            )
            winner = None
            if done.conflict:  # what the name holds now: the other mount's version
                try:
                    winner = self.store.lookup(state.parent_id, state.name)[0]
                except (NotFound, CryptfsError):
                    winner = None  # the listing finds out
            state.uploaded(entry)
            # still under the lock: no rename or unlink in between. Landed under another name
            # (a conflict copy, /lost+found), the file follows it there.
            self.on_uploaded(state, entry, done.name is not None, winner)

    def schedule(self, state: FileState, delay: float | None = None) -> None:
        with self._cond:
            self._counter += 1
            heapq.heappush(
                self._due, (time.monotonic() + (self.delay if delay is None else delay), self._counter, state)
            )
            self._cond.notify()

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (not self._due or self._due[0][0] > time.monotonic()):
                    self._cond.wait(None if not self._due else max(0.01, self._due[0][0] - time.monotonic()))
                if self._stop and not self._due:
                    return
                _, _, state = heapq.heappop(self._due)
                if state.uid in self._busy:
                    continue
                self._busy.add(state.uid)
            try:
                if (state.handles == 0 or self._stop) and not state.unlinked:
                    self.upload_now(state)
            except Exception as exc:  # a worker never dies: the file stays journaled and is retried
                state.error = exc
                if isinstance(exc, (CryptfsError, OSError)):
                    log.error("upload of %s failed (kept in the journal, retried): %s", state.key, exc)
                else:
                    log.exception("upload of %s failed (kept in the journal, retried)", state.key)
                if not self._stop:
                    self.schedule(state, delay=min(60.0, max(5.0, self.delay * 4)))
            finally:
                with self._cond:
                    self._busy.discard(state.uid)
                    self._cond.notify_all()

    def drain(self, states: list[FileState], timeout: float | None = None) -> list[FileState]:
        """Upload everything now (unmount); returns what could not be uploaded."""
        with self._cond:
            self._due.clear()

        def one(state: FileState) -> FileState | None:
            with self._cond:
                while state.uid in self._busy:
                    self._cond.wait(1.0)
            try:
                self.upload_now(state)
            except (CryptfsError, OSError) as exc:  # reported and kept: the next mount uploads it
                log.error("could not upload %s at unmount: %s (kept in the journal for the next mount)", state.key, exc)
                return state
            except Exception:
                log.exception("could not upload %s at unmount (kept in the journal for the next mount)", state.key)
                return state
            return None

        with cf.ThreadPoolExecutor(max(1, len(self._threads)), thread_name_prefix="drain") as pool:
            return [s for s in pool.map(one, states) if s is not None]

    def hurry(self) -> bool:
        """Make every scheduled upload due now (the staging bound is reached); returns whether
        any upload is scheduled or running."""
        with self._cond:
            if self._due:
                self._due = [(0.0, counter, state) for _, counter, state in self._due]
                heapq.heapify(self._due)
                self._cond.notify_all()
            return bool(self._due or self._busy)

    def in_flight(self) -> int:
        """How many uploads run now (for `cryptfs status`)."""
        with self._cond:
            return len(self._busy)

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._due.clear()
            self._cond.notify_all()


# ---------------------------------------------------------------- renames of uploaded entries


def rename_journaled(
    store: Store, journal: Journal, entry: Entry, new_parent: bytes, new_name: bytes, target: Entry | None
) -> Entry:
    """store.rename with an intent recorded first, so a crash half-way is finished at the next mount
    (a hard-linked name needs none: its stored link count covers a crash, see store.py)."""
    if entry.link_key is not None:
        return store.rename(entry, new_parent, new_name, target)
    uid = "rename-" + os.urandom(8).hex()
    journal.intend(
        uid,
        {
            "uid": uid,
            "intent": {
                "src": entry.key,
                "dst": store.entry_key(new_parent, new_name),
                "is_dir": entry.is_dir,
                "obj_id": entry.obj_id.hex(),
                "parent": new_parent.hex(),
                "name": new_name.hex(),
                "size": store.layout.object_size(entry.size) if not entry.is_dir else fmt.DIRENT_SIZE,
            },
        },
    )
    moved = store.rename(entry, new_parent, new_name, target)
    journal.remove(uid)
    return moved


def mkdir_journaled(store: Store, journal: Journal, parent_id: bytes, name: bytes, attrs: fmt.Attrs) -> Entry:
    """store.mkdir with an intent recorded first: a crash between its two writes (back-pointer,
    then entry) leaves a back-pointer that the next mount removes. Not fsynced: it guards
    against a killed mount; after a power cut `fsck --repair` finds the orphan."""
    child = fmt.new_dir_id()
    uid = "mkdir-" + child.hex()
    journal.intend(uid, {"uid": uid, "mkdir": {"child": child.hex(), "key": store.entry_key(parent_id, name)}})
    try:
        entry = store.mkdir(parent_id, name, attrs, child)
    except AlreadyExists:
        journal.remove(uid)  # store.mkdir took its back-pointer away again
        raise
    journal.remove(uid)  # any other failure leaves the record: the next mount settles it
    return entry


def rmdir_journaled(store: Store, journal: Journal, entry: Entry) -> None:
    """store.remove of a directory with an intent recorded first: a crash between its two
    deletes (entry, then back-pointer) leaves a back-pointer the next mount removes."""
    uid = "rmdir-" + entry.obj_id.hex()
    journal.intend(uid, {"uid": uid, "rmdir": {"child": entry.obj_id.hex(), "key": entry.key}})
    store.remove(entry)
    journal.remove(uid)  # a failure leaves the record: the next mount settles it


def _finish_rmdir(store: Store, intent: dict) -> str:
    """An interrupted rmdir: once its entry is gone, its back-pointer goes too, if it named
    that entry (a stale entry is removed alone; the directory belongs to another)."""
    try:
        store.head(intent["key"])
        return f"rmdir of {intent['key']} had not started"
    except NotFound:
        pass
    child = bytes.fromhex(intent["child"])
    loc = store.read_backptr(child)
    if loc is not None and store.entry_key(*loc) == intent["key"]:
        store.delete_key(store.backptr_key(child))
    return f"finished rmdir of {intent['key']}"


def _finish_mkdir(store: Store, intent: dict) -> str:
    """An interrupted mkdir: keep the directory if its entry was stored, else remove its back-pointer."""
    child = bytes.fromhex(intent["child"])
    try:
        info = store.head(intent["key"])
        if fmt.parse_metadata(info.metadata or {}).obj_id == child:
            return f"mkdir of {intent['key']} had completed"
    except NotFound:
        pass
    store.delete_key(store.backptr_key(child))
    return f"mkdir of {intent['key']} had not completed; its back-pointer was removed"


def _finish_rename(store: Store, intent: dict) -> str:
    """Roll an interrupted rename forward when its new entry was written, else drop it."""
    try:
        copied = store.head(intent["dst"])
    except NotFound:
        return f"rename to {intent['dst']} had not started; source kept"
    try:
        same = fmt.parse_metadata(copied.metadata or {}).obj_id.hex() == intent["obj_id"]
    except CryptfsError:
        same = False
    if copied.size != intent["size"] or not same:
        return f"rename to {intent['dst']} had not completed; source kept"
    if intent["is_dir"]:
        child = bytes.fromhex(intent["obj_id"])
        meta = fmt.parse_metadata(copied.metadata or {})
        store.write_backptr(
            child,
            bytes.fromhex(intent["parent"]),
            bytes.fromhex(intent["name"]),
            fmt.decrypt_attrs(store.vk, intent["dst"], child, meta.attr_blob),
        )
    store.delete_key(intent["src"])
    return f"finished rename to {intent['dst']}"


# ---------------------------------------------------------------- crash recovery


def recover(store: Store, journal: Journal) -> list[str]:
    """Finish uploads and renames left by a mount that died; returns a line per item for the log."""
    done = []
    for record in journal.records():
        try:
            if "intent" in record:
                done.append(_finish_rename(store, record["intent"]))
                journal.remove(record["uid"])
                continue
            if "mkdir" in record:
                done.append(_finish_mkdir(store, record["mkdir"]))
                journal.remove(record["uid"])
                continue
            if "rmdir" in record:
                done.append(_finish_rmdir(store, record["rmdir"]))
                journal.remove(record["uid"])
                continue
            done.append(recover_record(store, journal, record))
        except (CryptfsError, OSError) as exc:
            log.error("journal record %s not recovered yet: %s", record.get("uid"), exc)
        except Exception:
            log.exception("journal record %s not recovered yet", record.get("uid"))
    return done


def kept_path(state: FileState) -> str:
    """Where keep_closed_version copies a staging file (its name starts with the uid, so
    the mount's cleanup of unjournaled staging files keeps it while its record lives)."""
    return state.staging_path[: -len(".obj")] + ".closed.obj"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def recover_record(store: Store, journal: Journal, doc: dict) -> str:
    record = UploadRecord.from_dict(doc)
    if record.staging and not os.path.exists(record.staging):
        if record.upload:
            store.abort_uploads_to(*record.upload)
        journal.remove(record.uid)  # uploaded before the removal of its record was lost
        raise CryptfsError(f"staging file of {record.key} is gone; record dropped")
    meta = fmt.parse_metadata(record.metadata)
    if meta.wrapped_key is None:
        raise CryptfsError(f"journal record of {record.key} has no data key")
    fk = fmt.FileKey.derive(store.vol.data_keys.unwrap(meta.wrapped_key), meta.obj_id)
    header = fmt.make_header(fk, store.layout)
    parent = bytes.fromhex(record.parent)
    key, metadata = record.key, record.metadata
    if parent != fmt.ROOT_DIR_ID:
        try:
            store.head(store.backptr_key(parent))
        except NotFound:
            key, metadata = _lost_and_found(store, record, fk, meta)
    fd = os.open(record.staging, os.O_RDONLY) if record.staging else None
    inline = fmt.b64d(record.inline) if record.inline else b""
    try:
        done = upload_record(
            store,
            journal,
            record,
            fk,
            header,
            (lambda lo, hi: os.pread(fd, hi - lo, lo)) if fd is not None else (lambda lo, hi: inline[lo:hi]),
            key,
            metadata,
        )
    finally:
        if fd is not None:
            os.close(fd)
    for old in record.obsolete:
        if old != done.key:
            store.delete_key(old)
    journal.remove(record.uid)
    if record.staging:
        _unlink(record.staging)
    return done.key


def _lost_and_found(store: Store, record: UploadRecord, fk, meta) -> tuple[str, dict]:
    """A pending file whose directory vanished: put it in /lost+found under its old name."""
    parent = bytes.fromhex(record.parent)
    suffix = record.key[len(fmt.dir_prefix(store.vk, parent)) :]
    try:
        name = fmt.decrypt_name(store.vk, parent, suffix)
    except CryptfsError:
        name = f"file-{record.file_id}".encode()
    lf = store.lost_and_found()
    name = name + b"." + record.file_id[:8].encode()
    key = store.entry_key(lf.obj_id, name[-255:])
    attrs = fmt.decrypt_attrs(store.vk, record.key, meta.obj_id, meta.attr_blob)
    log.warning("recovered file's directory is gone; stored in /lost+found as %s", shown(name))
    return key, store.metadata_for(key, fk.file_id, attrs, meta.wrapped_key, False)
