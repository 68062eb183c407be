"""Names to entries for the mount: lookups, listings and the attribute cache.

Lookups and listings are trusted for `ttl` seconds (so a second mount's changes show up
after that), misses included. Attribute blobs are cached on local disk keyed by
(object key, ETag, LastModified, size), holding only what the bucket holds (the encrypted
blobs), so after a remount a listing needs no HEAD per unchanged entry.

`_lock` guards the in-memory dicts; network requests run outside it. `AttrDB._lock`
guards its sqlite connection.
"""

import concurrent.futures as cf
import json
import os
import sqlite3
import threading
import time
from dataclasses import replace

from . import format as fmt
from .backend.base import ObjectInfo
from .errors import CryptfsError, FormatError, IntegrityError, NotADirectory, NotFound
from .store import Entry, Store


class AttrDB:
    """Encrypted metadata of objects seen, persisted in sqlite under the cache directory."""

    def __init__(self, path: str | None):
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path or ":memory:", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS attrs (key TEXT PRIMARY KEY, etag TEXT, "
                         "lm REAL, size INTEGER, meta TEXT)")

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

    def put(self, key: str, etag: str, lm: float | None, size: int, meta: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO attrs VALUES (?,?,?,?,?)",
                             (key, etag, lm, size, json.dumps(meta)))

    def forget(self, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM attrs WHERE key=?", (key,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Namespace:
    """Listings (one LIST per directory per `ttl`) answer lookups, hits and misses alike;
    entries are resolved from the attribute cache, or a HEAD when it has nothing."""

    def __init__(self, store: Store, attr_db: AttrDB, ttl: float = 5.0, workers: int = 8):
        self.store = store
        self.db = attr_db
        self.ttl = ttl
        self._listings: dict[bytes, tuple[dict[bytes, ObjectInfo], float]] = {}
        self._entries: dict[tuple[bytes, bytes], Entry] = {}
        self._lock = threading.Lock()
        self._pool = cf.ThreadPoolExecutor(workers, thread_name_prefix="head")
        self.root = store.root()

    # ------------------------------------------------------------ lookups

    def resolve(self, parts: list[bytes]) -> Entry:
        entry = self.root
        for name in parts:
            if not entry.is_dir:
                raise NotADirectory("not a directory")
            entry = self.lookup(entry.obj_id, name)
        return entry

    def _listing(self, dir_id: bytes) -> dict[bytes, ObjectInfo]:
        now = time.monotonic()
        with self._lock:
            cached = self._listings.get(dir_id)
        if cached and cached[1] > now:
            return cached[0]
        listing = {name: info for name, info, _ in self.store.list_dir(dir_id)}
        with self._lock:
            self._listings[dir_id] = (listing, time.monotonic() + self.ttl)
        return listing

    def lookup(self, dir_id: bytes, name: bytes) -> Entry:
        fmt.check_name(name)
        info = self._listing(dir_id).get(name)
        if info is None:
            raise NotFound("no such entry")
        return self._resolve(dir_id, name, info)

    def _resolve(self, dir_id: bytes, name: bytes, info: ObjectInfo) -> Entry:
        with self._lock:
            known = self._entries.get((dir_id, name))
        if known is not None and known.etag == info.etag and known.key == info.key[len(self.store.vol.prefix):]:
            return known
        rel = info.key[len(self.store.vol.prefix):]
        meta = self.db.get(info)
        entry = None
        if meta is not None:
            try:
                entry = self.store.entry_from(dir_id, name, rel, replace(info, metadata=meta), None)
            except CryptfsError:
                self.db.forget(info.key)  # a blob failing its check is a miss, not EIO
        if entry is None:
            entry = self.store.stat_listed(dir_id, name, rel)
            if entry.etag == info.etag:
                self.db.put(info.key, entry.etag, info.last_modified, info.size, entry.raw_meta)
        with self._lock:
            self._entries[(dir_id, name)] = entry
        return entry

    def _record(self, entry: Entry) -> None:
        """Persist an entry's encrypted metadata (as the bucket holds it) for later listings."""
        if entry.raw_meta is not None and entry.obj_id != fmt.ROOT_DIR_ID:
            self.db.put(self.store.abs_key(entry.key), entry.etag, None, self._obj_size(entry), entry.raw_meta)

    def _obj_size(self, entry: Entry) -> int:
        return fmt.DIRENT_SIZE if entry.is_dir else fmt.object_size(entry.size, self.store.block_size)

    # ------------------------------------------------------------ listings

    def listdir(self, dir_id: bytes) -> list[Entry]:
        """Every entry with attributes: one LIST, attribute cache hits, parallel HEADs for the rest."""
        listing = self._listing(dir_id)

        def one(item) -> Entry | None:
            name, info = item
            try:
                return self._resolve(dir_id, name, info)
            except NotFound:
                return None
            except (FormatError, IntegrityError) as exc:
                self.store.warn_once(info.key, f"skipped: {exc}")
                return None

        return [e for e in self._pool.map(one, list(listing.items())) if e is not None]

    # ------------------------------------------------------------ our own changes

    def put(self, entry: Entry) -> None:
        """An entry we just wrote: visible at once, and its metadata remembered."""
        if entry.obj_id == fmt.ROOT_DIR_ID and entry.is_dir:
            self.root = entry
            return
        info = ObjectInfo(self.store.abs_key(entry.key), self._obj_size(entry), entry.etag, entry.last_modified)
        with self._lock:
            self._entries[(entry.parent_id, entry.name)] = entry
            listing = self._listings.get(entry.parent_id)
            if listing:
                listing[0][entry.name] = info
        self._record(entry)

    def remove(self, dir_id: bytes, name: bytes) -> None:
        with self._lock:
            self._entries.pop((dir_id, name), None)
            listing = self._listings.get(dir_id)
            if listing:
                listing[0].pop(name, None)

    def forget_dir(self, dir_id: bytes) -> None:
        with self._lock:
            self._listings.pop(dir_id, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.db.close()


def cache_root(volume_id: str, base: str | None) -> str:
    base = base or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cryptfs")
    return os.path.join(base, volume_id)
