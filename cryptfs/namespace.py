"""The one authority for names in the mount: every entry, pending or uploaded, in one table.

A directory's children live in one dict, whatever their state:

    ObjectInfo  listed by the bucket, attributes not read yet
    Entry       in the bucket, attributes known (attribute cache or a HEAD)
    FileState   open, or closed and waiting to upload: its data is local

A name absent from a listed directory's dict does not exist; one present exists, in every
state, so no lookup can fall between two structures. While the mount holds the volume's
lease (`authoritative`), nothing else changes the volume, so a directory listed once stays
listed: lookups, listings and scans send no request. Otherwise (read-only mounts, a lease
not renewed) a listing is trusted for `ttl`, and listings are merged under local state: a FileState is never
replaced by a listing, nor an unflushed directory attribute change, nor a name changed
locally after the listing began. So a LIST that raced an upload, a rename or an unlink can
neither hide a name nor bring one back. Local changes are recorded after their bucket write
returned (or, for a FileState, at once: the state is the authority until it is uploaded).

Attribute blobs are cached on local disk keyed by (object key, ETag, LastModified, size),
holding only what the bucket holds (the encrypted blobs), so after a remount a listing
needs no HEAD per unchanged entry. At a clean unmount the listings themselves are saved
beside them (`save`), stamped with the lease epoch; the next mount uses them instead of
listing again when the lease shows nobody has written since (`load`).

Locks, always taken in this order (never the other way round):

    NameLocks (at most two, in index order)   one name's binding, across a whole operation
      -> FileState.lock                         one file's contents and upload
        -> Namespace._lock                      the tables below; never held during I/O
          -> AttrDB._lock                       its sqlite connection

`_lock` guards `_dirs` (children, freshness, change marks), `_seq`, `_where`, `_dirty`, `_abandoned`,
`_doomed`, `_backptrs`, `root`, and FileState.handles; FileState.parent_id/name change only with both
the state's lock and `_lock` held.
"""

import concurrent.futures as cf
import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from . import format as fmt
from .backend.base import ObjectInfo
from .errors import CryptfsError, FormatError, IntegrityError, NotADirectory, NotFound
from .handles import FileState
from .store import Entry, Store, entry_attrs

log = logging.getLogger(__name__)

KEYS_RELATIVE = 2  # the database's user_version since its keys are relative to the volume


class AttrDB:
    """Encrypted metadata of objects seen, persisted in sqlite under the cache directory.

    Only a cache: a write it cannot make (a full cache disk) is skipped, logged once, and
    costs a HEAD later; lookups, listings and unlinks never fail for it."""

    def __init__(self, path: str | None):
        self._lock = threading.Lock()
        self._failing = False  # the last write failed (logged once per run of failures)
        self._db = sqlite3.connect(path or ":memory:", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        if self._db.execute("PRAGMA user_version").fetchone()[0] < KEYS_RELATIVE:
            # keys were the bucket's (volume prefix included): start the cache afresh
            self._db.executescript(
                "DROP TABLE IF EXISTS attrs; DROP TABLE IF EXISTS saved; DROP TABLE IF EXISTS saved_dirs;"
                "DROP TABLE IF EXISTS saved_entries; DROP TABLE IF EXISTS saved_backptrs;"
                f"PRAGMA user_version={KEYS_RELATIVE};"
            )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS attrs (key TEXT PRIMARY KEY, etag TEXT, lm REAL, size INTEGER, meta TEXT)"
        )
        # the listings saved at a clean unmount (one epoch at a time), and the back-pointers seen
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS saved (epoch INTEGER);"
            "CREATE TABLE IF NOT EXISTS saved_dirs (dir BLOB PRIMARY KEY);"
            "CREATE TABLE IF NOT EXISTS saved_entries"
            " (dir BLOB, name BLOB, key TEXT, etag TEXT, size INTEGER, lm REAL);"
            "CREATE TABLE IF NOT EXISTS saved_backptrs (dir BLOB PRIMARY KEY, parent BLOB, name BLOB);"
        )

    def get(self, info: ObjectInfo) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT etag, lm, size, meta FROM attrs WHERE key=?", (info.key,)).fetchone()
        if row is None or row[0] != info.etag or row[2] != info.size:
            return None
        if row[1] is None:  # written by us; adopt the first LastModified a listing shows
            self.put(info.key, info.etag, info.last_modified, info.size, json.loads(row[3]))
        elif abs(row[1] - info.last_modified) > 0.001:
            return None
        return json.loads(row[3])

    def save_listings(self, epoch: int, dirs: list[bytes], entries: list[tuple], backptrs: list[tuple]) -> bool:
        """Replace the saved listings in one transaction; False if the disk refused them."""
        with self._lock:
            try:
                self._db.execute("BEGIN")
                self._clear_saved()
                self._db.executemany("INSERT INTO saved_dirs VALUES (?)", [(d,) for d in dirs])
                self._db.executemany("INSERT INTO saved_entries VALUES (?,?,?,?,?,?)", entries)
                self._db.executemany("INSERT INTO saved_backptrs VALUES (?,?,?)", backptrs)
                self._db.execute("INSERT INTO saved VALUES (?)", (epoch,))
                self._db.execute("COMMIT")
                return True
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK")
                log.warning("listings not saved for the next mount (%s); it lists the volume again", exc)
                return False

    def take_listings(self) -> tuple[int | None, list[bytes], list[tuple], list[tuple]]:
        """The saved listings, removed as they are read: a save serves one mount only."""
        with self._lock:
            row = self._db.execute("SELECT epoch FROM saved").fetchone()
            dirs = [r[0] for r in self._db.execute("SELECT dir FROM saved_dirs")]
            entries = self._db.execute("SELECT dir, name, key, etag, size, lm FROM saved_entries").fetchall()
            backptrs = self._db.execute("SELECT dir, parent, name FROM saved_backptrs").fetchall()
            try:
                self._db.execute("BEGIN")
                self._clear_saved()
                self._db.execute("COMMIT")
            except sqlite3.Error:
                self._db.execute("ROLLBACK")
                return None, [], [], []  # left in place, it could be used twice: use it never
        return (row[0] if row else None), dirs, entries, backptrs

    def _clear_saved(self) -> None:
        for table in ("saved", "saved_dirs", "saved_entries", "saved_backptrs"):
            self._db.execute(f"DELETE FROM {table}")

    def put(self, key: str, etag: str, lm: float | None, size: int, meta: dict) -> None:
        self._write("INSERT OR REPLACE INTO attrs VALUES (?,?,?,?,?)", (key, etag, lm, size, json.dumps(meta)))

    def forget(self, key: str) -> None:
        self._write("DELETE FROM attrs WHERE key=?", (key,))

    def _write(self, sql: str, args: tuple) -> None:
        with self._lock:
            try:
                self._db.execute(sql, args)
                self._failing = False
            except sqlite3.Error as exc:
                if not self._failing:
                    log.warning("attribute cache not updated (%s); entries are read from the bucket", exc)
                self._failing = True

    def close(self) -> None:
        with self._lock:
            self._db.close()


class NameLocks:
    """Striped locks over (directory id, name): held across an operation that changes what a
    name is bound to (create, open of an uploaded file, unlink, rename, mkdir, rmdir)."""

    def __init__(self, stripes: int = 128):
        self._locks = [threading.Lock() for _ in range(stripes)]

    @contextlib.contextmanager
    def hold(self, *names: tuple[bytes, bytes]):
        order = sorted({hash(n) % len(self._locks) for n in names})
        for i in order:
            self._locks[i].acquire()
        try:
            yield
        finally:
            for i in reversed(order):
                self._locks[i].release()


class _Dir:
    __slots__ = ("children", "listed_at", "listing", "changed", "resets")

    def __init__(self):
        self.children: dict[bytes, ObjectInfo | Entry | FileState] = {}
        self.listed_at: float | None = None  # monotonic time of the last listing; None: list it again
        self.listing: threading.Event | None = None  # a LIST in flight
        self.changed: dict[bytes, int] = {}  # name -> sequence number of its last local change
        self.resets = 0  # bumped when the listing must be read again: a LIST begun before is not enough


Node = Entry | FileState
ROOT_LOC = (fmt.ROOT_DIR_ID, b"")


class Namespace:
    """Every name of the mount: lookups, listings, local changes, directory times."""

    def __init__(self, store: Store, attr_db: AttrDB, ttl: float = 5.0, workers: int = 8):
        self.store = store
        self.db = attr_db
        self.ttl = ttl
        # whether nothing but this mount can change the volume now (it holds the lease)
        self.authoritative: Callable[[], bool] = lambda: False
        self.names = NameLocks()
        self._dirs: dict[bytes, _Dir] = {}
        self._seq = 0
        self._where: dict[bytes, tuple[bytes, bytes]] = {fmt.ROOT_DIR_ID: ROOT_LOC}  # dir id -> its entry
        # directory entries with unflushed attributes -> (first, last) monotonic time of a change
        self._dirty: dict[tuple[bytes, bytes], tuple[float, float]] = {}
        self._doomed: dict[tuple[bytes, bytes], FileState] = {}  # unlinked while open: DELETE at last close
        self._abandoned: set[FileState] = set()  # changes given up; an earlier upload may still land
        self._backptrs: dict[bytes, tuple[bytes, bytes]] = {}  # dir id -> the entry it was seen to point back to
        self._lock = threading.Lock()
        self._pool = cf.ThreadPoolExecutor(workers, thread_name_prefix="head")
        self.root = store.root()

    # ------------------------------------------------------------ lookups

    def resolve(self, parts: list[bytes]) -> Node:
        """The node at a path (a list of names from the root)."""
        node: Node = self.root
        for name in parts:
            if not (isinstance(node, Entry) and node.is_dir):
                raise NotADirectory("not a directory")
            node = self.lookup(node.obj_id, name)
            if isinstance(node, Entry) and node.is_dir:
                self.follow(node)
        return node

    def follow(self, entry: Entry) -> None:
        """Enter a directory only through the entry it points back to: its back-pointer is read
        once per mount (and again if another entry claims it), so a stale or restored entry is
        never followed."""
        if entry.obj_id == fmt.ROOT_DIR_ID:
            return
        with self._lock:
            if self._backptrs.get(entry.obj_id) == (entry.parent_id, entry.name):
                return
        self.store.follow(entry)
        with self._lock:
            self._backptrs[entry.obj_id] = (entry.parent_id, entry.name)

    def pointed_back(self, entry: Entry) -> None:
        """A directory entry this mount just made canonical (mkdir, rename)."""
        with self._lock:
            self._backptrs[entry.obj_id] = (entry.parent_id, entry.name)

    def lookup(self, dir_id: bytes, name: bytes) -> Node:
        fmt.check_name(name)
        self._fresh(dir_id)
        with self._lock:
            child = self._dir(dir_id).children.get(name)
        if child is None:
            raise NotFound("no such entry")
        if isinstance(child, ObjectInfo):
            return self._resolve(dir_id, name, child)
        return child

    def listdir(self, dir_id: bytes) -> list[tuple[bytes, Node]]:
        """Every child with attributes: one LIST per `ttl`, attribute cache hits, parallel HEADs."""
        self._fresh(dir_id)
        with self._lock:
            items = list(self._dir(dir_id).children.items())

        def resolved(item) -> tuple[bytes, Node] | None:
            name, info = item
            try:
                return name, self._resolve(dir_id, name, info)
            except NotFound:
                return None
            except (FormatError, IntegrityError) as exc:
                self.store.warn_once(self.store.abs_key(info.key), f"skipped: {exc}")
                return None

        known = [(name, child) for name, child in items if not isinstance(child, ObjectInfo)]
        listed = [(name, child) for name, child in items if isinstance(child, ObjectInfo)]
        return known + [r for r in self._pool.map(resolved, listed) if r is not None]

    def subdirs(self, dir_id: bytes) -> int | None:
        """How many subdirectories the directory's last listing holds; None if never listed
        (a stat does not pay a LIST for it)."""
        with self._lock:
            d = self._dirs.get(dir_id)
            if d is None or d.listed_at is None:
                return None
            return sum(
                c.size == fmt.DIRENT_SIZE if isinstance(c, ObjectInfo) else isinstance(c, Entry) and c.is_dir
                for c in d.children.values()
            )

    def is_empty(self, dir_id: bytes) -> bool:
        """No child in any state: pending, uploading and uploaded entries alike."""
        self._fresh(dir_id)
        with self._lock:
            return not self._dir(dir_id).children

    def _dir(self, dir_id: bytes) -> _Dir:
        d = self._dirs.get(dir_id)
        if d is None:
            d = self._dirs[dir_id] = _Dir()
        return d

    def _is_fresh(self, d: _Dir) -> bool:
        return d.listed_at is not None and (self.authoritative() or time.monotonic() - d.listed_at < self.ttl)

    def _fresh(self, dir_id: bytes) -> None:
        """Make sure the directory's listing is no older than `ttl`, unless the mount is
        authoritative (one LIST, shared by waiters)."""
        while True:
            with self._lock:
                d = self._dir(dir_id)
                if self._is_fresh(d):
                    return
                event, mine = d.listing, d.listing is None
                if event is None:
                    event = d.listing = threading.Event()
                    seq0, resets0 = self._seq, d.resets
            if not mine:
                event.wait()
                with self._lock:
                    if d.listed_at is not None:  # listed (perhaps already stale again under a tiny ttl)
                        return
                continue  # the LIST failed: try it ourselves
            try:
                listing = {name: info for name, info, _ in self.store.list_dir(dir_id)}
            except BaseException:
                with self._lock:
                    d.listing = None
                event.set()
                raise
            with self._lock:
                self._merge(dir_id, d, listing, seq0)
                d.listing = None
                d.listed_at = time.monotonic() if d.resets == resets0 else None
            event.set()
            return

    def _merge(self, dir_id: bytes, d: _Dir, listing: dict[bytes, ObjectInfo], seq0: int) -> None:
        """Lay a listing begun at sequence number seq0 under the local state (with _lock held)."""
        local = {
            name: child
            for name, child in d.children.items()
            if isinstance(child, FileState) or d.changed.get(name, -1) > seq0 or (dir_id, name) in self._dirty
        }
        merged: dict[bytes, ObjectInfo | Entry | FileState] = {}
        for name, info in listing.items():
            if name in local or d.changed.get(name, -1) > seq0 or (dir_id, name) in self._doomed:
                continue  # changed here after the LIST began (ours is newer), or unlinked while open
            old = d.children.get(name)
            if isinstance(old, Entry) and old.etag == info.etag and old.name_key == info.key:
                merged[name] = old
            else:
                merged[name] = info
        merged.update(local)
        d.children = merged
        d.changed = {n: s for n, s in d.changed.items() if s > seq0}

    def _resolve(self, dir_id: bytes, name: bytes, info: ObjectInfo) -> Node:
        meta = self.db.get(info)
        entry = None
        if meta is not None:
            try:
                entry = self.store.entry_from(dir_id, name, info.key, replace(info, metadata=meta), None)
            except CryptfsError:
                self.db.forget(info.key)  # a blob failing its check is a miss, not EIO
        if entry is None:
            try:
                entry = self.store.stat_listed(dir_id, name, info.key, info.size)
            except NotFound:
                with self._lock:
                    d = self._dir(dir_id)
                    if d.children.get(name) is info:
                        del d.children[name]  # removed behind our back since the LIST
                raise
            if entry.etag == info.etag and entry.raw_meta is not None:
                self.db.put(info.key, entry.etag, info.last_modified, info.size, entry.raw_meta)
        with self._lock:
            d = self._dir(dir_id)
            current = d.children.get(name)
            if current is info:
                d.children[name] = entry
                if entry.is_dir:
                    self._where[entry.obj_id] = (dir_id, name)
                return entry
        if current is None:
            raise NotFound("no such entry")
        return current if not isinstance(current, ObjectInfo) else entry

    # ------------------------------------------------------------ local changes

    def put(self, dir_id: bytes, name: bytes, node: Node) -> None:
        """Bind a name: a FileState at once, an Entry after its bucket write returned."""
        with self._lock:
            self._set(dir_id, name, node)
        if isinstance(node, Entry):
            self.record(node)

    def _set(self, dir_id: bytes, name: bytes, node: Node) -> None:
        d = self._dir(dir_id)
        self._seq += 1
        d.children[name] = node
        d.changed[name] = self._seq
        if isinstance(node, Entry) and node.is_dir:
            self._where[node.obj_id] = (dir_id, name)

    def remove(self, dir_id: bytes, name: bytes) -> Node | ObjectInfo | None:
        """Unbind a name (after its bucket delete returned); returns what it was bound to."""
        with self._lock:
            d = self._dir(dir_id)
            self._seq += 1
            d.changed[name] = self._seq
            self._dirty.pop((dir_id, name), None)
            return d.children.pop(name, None)

    def swap(self, dir_id: bytes, name: bytes, expect, new: Node) -> bool:
        """Bind a name to `new` if it is still bound to `expect` (the same object)."""
        with self._lock:
            d = self._dirs.get(dir_id)
            if d is None or d.children.get(name) is not expect:
                return False
            self._set(dir_id, name, new)
        if isinstance(new, Entry):
            self.record(new)
        return True

    def bound(self, dir_id: bytes, name: bytes, node) -> bool:
        """Whether the name is still bound to this very node."""
        with self._lock:
            d = self._dirs.get(dir_id)
            return d is not None and d.children.get(name) is node

    def created_dir(self, dir_id: bytes) -> None:
        """A directory we just made: known to be empty, no LIST needed for a while."""
        with self._lock:
            self._dir(dir_id).listed_at = time.monotonic()

    def forget_dir(self, dir_id: bytes) -> None:
        with self._lock:
            self._dirs.pop(dir_id, None)
            self._where.pop(dir_id, None)

    def record(self, entry: Entry) -> None:
        """Persist an entry's encrypted metadata (as the bucket holds it) for later listings; a
        hard-linked file's other names known here see its new size, version and attributes."""
        if entry.link_key is not None:
            self._refresh_links(entry)
        if entry.raw_meta is not None and entry.obj_id != fmt.ROOT_DIR_ID:
            size = fmt.DIRENT_SIZE if entry.is_dir else self.store.layout.object_size(entry.size)
            self.db.put(entry.key, entry.etag, None, size, entry.raw_meta)

    # ------------------------------------------------------------ hard-linked files
    # A hard-linked file open under one name is one FileState, bound to that name; its other
    # names stay bound to Entries, and the mount acts on the FileState through them. These
    # scan the tables: hard links are few.

    def _refresh_links(self, inode: Entry) -> None:
        with self._lock:
            for d in self._dirs.values():
                for name, child in d.children.items():
                    if (
                        isinstance(child, Entry)
                        and child.link_key
                        and child.obj_id == inode.obj_id
                        and child.link_key != inode.link_key
                    ):
                        d.children[name] = replace(
                            inode, parent_id=child.parent_id, name=child.name, link_key=child.link_key
                        )

    def open_link(self, file_id: bytes) -> FileState | None:
        """The FileState of a hard-linked file, under whichever of its names it is bound to."""
        with self._lock:
            for d in self._dirs.values():
                for child in d.children.values():
                    if isinstance(child, FileState) and child.inode_key and child.fk.file_id == file_id:
                        return child
        return None

    def link_names(self, file_id: bytes) -> list[tuple[bytes, bytes]]:
        """Every name of a hard-linked file known here, as (directory id, name)."""
        with self._lock:
            return [
                (dir_id, name)
                for dir_id, d in self._dirs.items()
                for name, child in d.children.items()
                if (
                    child.link_key is not None and child.obj_id == file_id
                    if isinstance(child, Entry)
                    else isinstance(child, FileState) and child.inode_key and child.fk.file_id == file_id
                )
            ]

    def other_name(self, file_id: bytes, but: tuple[bytes, bytes]) -> Entry | None:
        """Another name of a hard-linked file bound to an Entry here, if any is known."""
        with self._lock:
            for d in self._dirs.values():
                for child in d.children.values():
                    if (
                        isinstance(child, Entry)
                        and child.link_key
                        and child.obj_id == file_id
                        and (child.parent_id, child.name) != but
                    ):
                        return child
        return None

    # ------------------------------------------------------------ open and pending files

    def hold(self, state: FileState) -> None:
        with self._lock:
            state.handles += 1

    def let_go(self, state: FileState) -> bool:
        """One handle fewer; True when it was the last."""
        with self._lock:
            state.handles -= 1
            return state.handles == 0

    def adopt(self, dir_id: bytes, name: bytes, entry: Entry, state: FileState) -> FileState | None:
        """Open an uploaded file: `state` replaces `entry` as the child, with one handle; or the
        FileState already there gets one more handle. None if the name changed meanwhile."""
        with self._lock:
            current = self._dir(dir_id).children.get(name)
            if current is entry:
                self._dir(dir_id).children[name] = state
                state.handles += 1
                return state
            if isinstance(current, FileState):
                current.handles += 1
                return current
            return None

    def settle(self, state: FileState) -> None:
        """A closed file with nothing to upload goes back to being its uploaded entry (keeping
        attributes changed only here, such as atime)."""
        with state.lock, self._lock:
            if state.handles or state.modified or state.unlinked or state.basis is None:
                return
            d = self._dirs.get(state.parent_id)
            if d is not None and d.children.get(state.name) is state:
                d.children[state.name] = replace(state.basis, attrs=state.attrs)

    def uploaded(self, state: FileState, entry: Entry, moved: bool = False, winner: Entry | None = None) -> None:
        """A file's upload landed (called with the state's lock held, after state.uploaded).
        moved: it landed under another name (a shared mount's conflict copy, or /lost+found):
        the file follows it there, and its old name shows `winner`, the other mount's version
        (or, when that is not known, what the next listing finds)."""
        if moved:
            with self._lock:
                if self._dir(state.parent_id).children.get(state.name) is state:
                    self._unbind(state)
                    if winner is not None:
                        self._set(state.parent_id, state.name, winner)
                    else:
                        self._relist(self._dir(state.parent_id))
                    state.parent_id, state.name = entry.parent_id, entry.name
                    self._set(entry.parent_id, entry.name, state)
                else:
                    state.parent_id, state.name = entry.parent_id, entry.name
        with self._lock:
            d = self._dirs.get(state.parent_id)
            current = d.children.get(state.name) if d is not None else None
            if d is not None and current is state:
                self._seq += 1
                d.changed[state.name] = self._seq
                if not state.handles and not state.modified:
                    d.children[state.name] = entry
            elif d is not None and state in self._abandoned and not isinstance(current, FileState):
                # an upload of a version closed before the changes given up landed after the
                # name was given back to the listing, which (under the lease) is not read again
                self._abandoned.discard(state)
                self._seq += 1
                d.changed[state.name] = self._seq
                d.children[state.name] = entry
        self.record(entry)

    def _unbind(self, state: FileState) -> None:
        """Take a FileState off its name, marking the change (with _lock held)."""
        d = self._dir(state.parent_id)
        if d.children.get(state.name) is state:
            del d.children[state.name]
        self._seq += 1
        d.changed[state.name] = self._seq

    def stale(self, dir_id: bytes) -> None:
        """Another mount changed the directory (a condition failed): list it again at the next lookup."""
        with self._lock:
            self._relist(self._dir(dir_id))

    @staticmethod
    def _relist(d: _Dir) -> None:
        d.listed_at = None
        d.resets += 1

    def abandon(self, state: FileState) -> None:
        """Unbind a file whose local changes are given up: the directory is listed again at its
        next lookup, so the name shows what the bucket holds under it, if anything."""
        with self._lock:
            self._unbind(state)
            if state.basis is not None:  # the stored version it was opened from, as uploaded
                self._set(state.parent_id, state.name, state.basis)
                return
            self._abandoned.add(state)
            self._relist(self._dir(state.parent_id))

    def rename_state(self, state: FileState, new_parent: bytes, new_name: bytes) -> None:
        """Move a FileState to another name (with its lock held): both names change at once."""
        with self._lock:
            self._unbind(state)
            state.parent_id, state.name = new_parent, new_name
            self._set(new_parent, new_name, state)

    def unlink_state(self, state: FileState) -> bool:
        """Unbind an open or pending file (with its lock held); True if handles remain open."""
        with self._lock:
            self._unbind(state)
            state.unlinked = True
            open_now = state.handles > 0
            if open_now and state.basis is not None:
                self._doomed[(state.parent_id, state.name)] = state
            return open_now

    def claim(self, dir_id: bytes, name: bytes) -> FileState | None:
        """A new binding of a name: the unlinked-but-open file whose object still sits under its
        key, if any, is no longer to be deleted at its last close (the new owner replaces it)."""
        with self._lock:
            return self._doomed.pop((dir_id, name), None)

    def doomed_in(self, dir_id: bytes) -> list[FileState]:
        with self._lock:
            return [s for (d, _), s in self._doomed.items() if d == dir_id]

    def release_doomed(self, state: FileState) -> bool:
        """At an unlinked file's last close: True if its object is still ours to delete."""
        with self._lock:
            if self._doomed.get((state.parent_id, state.name)) is state:
                del self._doomed[(state.parent_id, state.name)]
                return True
            return False

    def pending(self) -> list[FileState]:
        with self._lock:
            return [
                c for d in self._dirs.values() for c in d.children.values() if isinstance(c, FileState) and c.modified
            ]

    # ------------------------------------------------------------ directory attributes

    def dir_entry(self, dir_id: bytes) -> Entry | None:
        with self._lock:
            return self._dir_entry(self._where.get(dir_id))

    def _dir_entry(self, loc: tuple[bytes, bytes] | None) -> Entry | None:
        if loc is None:
            return None
        if loc == ROOT_LOC:
            return self.root
        d = self._dirs.get(loc[0])
        child = d.children.get(loc[1]) if d else None
        return child if isinstance(child, Entry) and child.is_dir else None

    def _put_dir_entry(self, loc: tuple[bytes, bytes], entry: Entry) -> None:
        if loc == ROOT_LOC:
            self.root = entry
        else:
            self._set(loc[0], loc[1], entry)

    def set_dir_attrs(self, dir_id: bytes, change, persist: bool) -> Entry | None:
        """Change a directory's attributes here; `persist`: also mark them for the next flush."""
        with self._lock:
            loc = self._where.get(dir_id)
            entry = self._dir_entry(loc)
            if loc is None or entry is None:
                return None
            new = replace(entry, attrs=change(entry_attrs(entry)))
            self._put_dir_entry(loc, new)
            if persist:
                now = time.monotonic()
                self._dirty[loc] = (self._dirty.get(loc, (now, now))[0], now)
            return new

    def touch_dir(self, dir_id: bytes, now_ns: int) -> None:
        """An entry was made, removed or renamed in the directory: its mtime and ctime move."""
        self.set_dir_attrs(dir_id, lambda a: replace(a, mtime_ns=now_ns, ctime_ns=now_ns), persist=True)

    def stored_dir(self, loc: tuple[bytes, bytes], old: Entry, new: Entry) -> None:
        """A directory's attributes were written to the bucket as `new` (from `old`)."""
        with self._lock:
            current = self._dir_entry(loc)
            if current is old:
                self._put_dir_entry(loc, new)
                self._dirty.pop(loc, None)
            elif current is not None and current.obj_id == old.obj_id and current.key == old.key:
                # changed again meanwhile: keep those attributes (still dirty), take the new ETag
                self._put_dir_entry(
                    loc, replace(current, etag=new.etag, last_modified=new.last_modified, raw_meta=None)
                )
        if new.raw_meta is not None:
            self.record(new)

    def flush_dirs(self, quiet: float = 0.0, oldest: float = 30.0, only: bytes | None = None) -> int:
        """Write directory attributes changed here to the bucket; returns how many failed.
        `quiet`: only those unchanged for that long, or changed first more than `oldest`
        seconds ago; so a directory being filled is written once it is done, not per file.
        `only`: that directory alone (its fsync), whatever its age."""
        now = time.monotonic()
        with self._lock:
            if only is not None:
                todo = [loc for loc in [self._where.get(only)] if loc in self._dirty]
            else:
                todo = [
                    loc for loc, (first, last) in self._dirty.items() if now - last >= quiet or now - first >= oldest
                ]
        failed = 0
        for loc in todo:
            with self.names.hold(loc):
                with self._lock:
                    entry = self._dir_entry(loc)
                    if entry is None or loc not in self._dirty:
                        self._dirty.pop(loc, None)
                        continue
                try:
                    new = self.store.set_attrs(entry, entry_attrs(entry))
                except CryptfsError as exc:
                    failed += 1
                    log.warning("directory times of %s not stored yet: %s", entry.key, exc)
                    continue
                self.stored_dir(loc, entry, new)
        return failed

    def location(self, dir_id: bytes) -> tuple[bytes, bytes] | None:
        with self._lock:
            return self._where.get(dir_id)

    # ------------------------------------------------------------ saved listings

    def save(self, epoch: int) -> int:
        """At a clean unmount, with nothing pending: save every listed directory as a listing
        would show it (key, ETag, size, LastModified; attributes stay in the attribute cache),
        for the next mount under the lease epoch after `epoch`. Returns the directories saved."""
        dirs, entries = [], []
        with self._lock:
            if self._dirty:
                return 0
            backptrs = [(d, p, n) for d, (p, n) in self._backptrs.items()]
            for dir_id, d in self._dirs.items():
                listed = [(n, c) for n, c in d.children.items() if not isinstance(c, FileState)]
                if d.listed_at is None or len(listed) < len(d.children):
                    continue  # listed again next time
                dirs.append(dir_id)
                entries += [(dir_id, name, *self._as_listed(child)) for name, child in listed]
        return len(dirs) if self.db.save_listings(epoch, dirs, entries, backptrs) else 0

    def _as_listed(self, child: ObjectInfo | Entry) -> tuple:
        """(key, etag, size, LastModified) of a child as a LIST shows it."""
        if isinstance(child, ObjectInfo):
            return child.key, child.etag, child.size, child.last_modified
        if child.link_key is not None:  # its link entry's ETag is not kept: read again when used
            return child.link_key, "", fmt.LINK_SIZE, 0.0
        size = fmt.DIRENT_SIZE if child.is_dir else self.store.layout.object_size(child.size)
        return child.key, child.etag, size, child.last_modified

    def load(self, unchanged_since: Callable[[int], bool]) -> int:
        """At mount: take the listings the last clean unmount saved, if `unchanged_since` their
        epoch (nobody took the lease since). Returns the directories taken (0: list as needed)."""
        epoch, dirs, entries, backptrs = self.db.take_listings()
        if epoch is None or not unchanged_since(epoch):
            return 0
        now = time.monotonic()
        with self._lock:
            for dir_id in dirs:
                self._dir(dir_id).listed_at = now
            for dir_id, name, key, etag, size, lm in entries:
                self._dir(dir_id).children[name] = ObjectInfo(key, size, etag, lm)
            for dir_id, parent, name in backptrs:
                self._backptrs[dir_id] = (parent, name)
        return len(dirs)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.db.close()
