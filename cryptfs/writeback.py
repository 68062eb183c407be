"""Write-back: the journal of pending uploads, the upload queue, and crash recovery.

A journal record and its staging file hold everything needed to finish an upload (object
key, metadata with the wrapped key, the plan of where each block comes from, the basis
ETag) and nothing secret: names are encrypted, attributes sealed, the data key wrapped.
Both are fsynced before close() returns, so a closed file survives kill -9; the next
mount uploads it (into /lost+found if its directory is gone).

`_cond` guards `_due` and `_busy`; a file's own lock is held while it uploads.
"""

import concurrent.futures as cf
import errno
import heapq
import json
import logging
import os
import sqlite3
import threading
import time

from . import format as fmt
from .errors import AlreadyExists, CryptfsError, NoSpace, NotFound
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
    record: dict,
    fk: fmt.FileKey,
    header: bytes,
    read_staged,
    key: str | None = None,
    metadata: dict | None = None,
) -> str:
    """Upload the object a journal record describes (normal uploads and recovery alike);
    `key` and `metadata` override the record's (a recovered file moved to /lost+found).

    Before an object that may go in parts is sent, the record says so; the upload's id
    follows as soon as it exists. The next attempt (or the next mount's recovery) aborts
    every unfinished upload to that key first: a kill between the upload's creation and its
    id reaching the journal leaves nothing behind either. (Only this mount writes the
    volume while it holds the lease, so every upload to the key is ours.)"""
    uid = record["uid"]
    left = (journal.get(uid) or {}).get("upload")
    if left:
        store.abort_uploads_to(*left)
    key = key or record["key"]
    size = store.layout.object_size(record["size"])
    if size > INLINE_MAX:  # not fsynced: enough against a killed process (the page cache survives
        # it); after a power cut `fsck --repair` finds the upload
        journal.write(uid, {**record, "upload": [key, None]}, durable=False)

    def started(upload_id: str) -> None:
        journal.write(uid, {**record, "upload": [key, upload_id]}, durable=False)

    basis = record.get("basis")
    basis_entry = (
        None
        if basis is None
        else Entry(  # records of version 1 volumes have no basis size
            bytes.fromhex(record["parent"]),
            b"",
            basis["key"],
            False,
            fk.file_id,
            basis.get("size", 0),
            basis["etag"],
            0.0,
            None,
        )
    )
    reader = ComposedReader(store, fk, header, record["size"], record["runs"], read_staged, basis_entry)
    return store.upload(key, reader, size, metadata or record["metadata"], started=started)


class WriteBack:
    """Schedules uploads of closed files after a delay; uploads now on fsync and at unmount."""

    def __init__(self, store: Store, journal: Journal, delay: float, on_uploaded, workers: int = 4):
        self.store, self.journal, self.delay = store, journal, delay
        self.on_uploaded = on_uploaded  # callback(state, entry) after a successful upload, lock held
        self._due: list[tuple[float, int, FileState]] = []
        self._busy: set[str] = set()
        self._counter = 0
        self._cond = threading.Condition()
        self._stop = False
        self._threads = [threading.Thread(target=self._worker, name=f"upload-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ journal

    def record(self, state: FileState, runs: list) -> dict:
        meta = self.store.metadata_for(state.key, state.fk.file_id, state.attrs, state.wrapped, False)
        record = {
            "version": 1,
            "uid": state.uid,
            "key": state.key,
            "parent": state.parent_id.hex(),
            "file_id": state.fk.file_id.hex(),
            "size": state.size,
            "metadata": meta,
            "runs": runs,
            "staging": None,
            "inline": None,
            "basis": {"key": state.basis.key, "etag": state.basis.etag, "size": state.basis.size}
            if state.basis
            else None,
        }
        if state.fd is not None:
            if self._inline(state):
                record["inline"] = fmt.b64e(state.staged_bytes())
            else:
                record["staging"] = state.staging_path
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
            self.journal.write(state.uid, self.record(state, runs))
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
            record = self.journal.get(state.uid)
            if record is None or record.get("staging") != state.staging_path:
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
            self.journal.write(state.uid, {**record, "staging": kept})

    def rejournal(self, state: FileState) -> None:
        """After a rename or attribute change of a journaled file: atomic, durable with the next flush."""
        with state.lock:
            if state.journaled and not state.unlinked:
                runs = state.prepare(sync=False)
                self.journal.write(state.uid, self.record(state, runs), durable=False)
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
                self.journal.write(state.uid, record)
                state.journaled, state.journaled_at = True, state.changes
            entry = self._send(state, record)
            self.journal.remove(state.uid)
            _unlink(kept_path(state))
            state.uploaded(entry)
            self.on_uploaded(state, entry)  # still under the lock: no rename or unlink in between

    def _send(self, state: FileState, record: dict) -> Entry:
        etag = upload_record(self.store, self.journal, record, state.fk, state.header, state.read_staged)
        return Entry(
            state.parent_id,
            state.name,
            record["key"],
            False,
            state.fk.file_id,
            state.size,
            etag,
            time.time(),
            state.attrs,
            state.wrapped,
            raw_meta=record["metadata"],
            link_key=state.link_key,
        )

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


def recover_record(store: Store, journal: Journal, record: dict) -> str:
    if record.get("staging") and not os.path.exists(record["staging"]):
        if record.get("upload"):
            store.abort_uploads_to(*record["upload"])
        journal.remove(record["uid"])  # uploaded before the removal of its record was lost
        raise CryptfsError(f"staging file of {record['key']} is gone; record dropped")
    meta = fmt.parse_metadata(record["metadata"])
    if meta.wrapped_key is None:
        raise CryptfsError(f"journal record of {record['key']} has no data key")
    fk = fmt.FileKey.derive(store.vol.data_keys.unwrap(meta.wrapped_key), meta.obj_id)
    header = fmt.make_header(fk, store.layout)
    parent = bytes.fromhex(record["parent"])
    key, metadata = record["key"], record["metadata"]
    if parent != fmt.ROOT_DIR_ID:
        try:
            store.head(store.backptr_key(parent))
        except NotFound:
            key, metadata = _lost_and_found(store, record, fk, meta)
    fd = os.open(record["staging"], os.O_RDONLY) if record.get("staging") else None
    inline = fmt.b64d(record["inline"]) if record.get("inline") else b""
    try:
        upload_record(
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
    for old in record.get("obsolete", []):
        if old != key:
            store.delete_key(old)
    journal.remove(record["uid"])
    if record.get("staging"):
        _unlink(record["staging"])
    return key


def _lost_and_found(store: Store, record: dict, fk, meta) -> tuple[str, dict]:
    """A pending file whose directory vanished: put it in /lost+found under its old name."""
    parent = bytes.fromhex(record["parent"])
    suffix = record["key"][len(fmt.dir_prefix(store.vk, parent)) :]
    try:
        name = fmt.decrypt_name(store.vk, parent, suffix)
    except CryptfsError:
        name = f"file-{record['file_id']}".encode()
    lf = store.lost_and_found()
    name = name + b"." + record["file_id"][:8].encode()
    key = store.entry_key(lf.obj_id, name[-255:])
    attrs = fmt.decrypt_attrs(store.vk, record["key"], meta.obj_id, meta.attr_blob)
    log.warning("recovered file's directory is gone; stored in /lost+found as %s", shown(name))
    return key, store.metadata_for(key, fk.file_id, attrs, meta.wrapped_key, False)
