"""The encrypted tree over a backend: the one place where plaintext meets ciphertext.

Directories, entries, attributes and file bodies as the CLI and the mount see them,
built from format.py (pure) and a Backend (I/O). Stateless apart from the volume's key
caches, so any number of threads may call it at once.
"""

import concurrent.futures as cf
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

from . import format as fmt
from . import keys
from cachetools import LRUCache
from .backend.base import Backend, ObjectInfo, PendingUpload, Readable, read_exact
from .backend.prefixed import PrefixedBackend
from .errors import (
    AlreadyExists,
    DirectoryNotEmpty,
    FormatError,
    IntegrityError,
    IsADirectory,
    NotADirectory,
    NotFound,
    PreconditionFailed,
)
from .volume import Volume

log = logging.getLogger(__name__)

LOST_FOUND = b"lost+found"
SPECIAL_TYPES = (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK)  # what mknod makes


@dataclass(frozen=True)
class Entry:
    """One name in one directory, as the bucket holds it."""

    parent_id: bytes
    name: bytes
    key: str  # object key relative to the volume prefix
    is_dir: bool
    obj_id: bytes  # file id, or the directory's own id
    size: int  # plaintext size; 0 for directories
    etag: str
    last_modified: float
    attrs: fmt.Attrs | None  # None until metadata was read
    wrapped_key: bytes | None = None
    raw_meta: dict | None = field(default=None, compare=False, repr=False)  # as the bucket holds it
    link_key: str | None = None  # a hard-linked name: its link entry's key (`key` is the file's object)

    @property
    def name_key(self) -> str:
        """The key of this name's own object."""
        return self.link_key or self.key

    @property
    def is_symlink(self) -> bool:
        return self.attrs is not None and stat.S_ISLNK(self.attrs.mode)

    @property
    def is_special(self) -> bool:
        """A FIFO, socket or device node: an empty object whose attributes are all it holds."""
        return self.attrs is not None and stat.S_IFMT(self.attrs.mode) in SPECIAL_TYPES


def entry_attrs(entry: Entry) -> fmt.Attrs:
    """An entry's attributes (only entries taken from a bare listing have none yet)."""
    if entry.attrs is None:
        raise FormatError(f"object {entry.key}: attributes not read")
    return entry.attrs


def now_ns() -> int:
    return time.time_ns()


def default_attrs(mode: int) -> fmt.Attrs:
    t = now_ns()
    return fmt.Attrs(mode, os.getuid(), os.getgid(), t, t)


class Store:
    def __init__(self, volume: Volume, workers: int = 8):
        self.vol = volume
        self.backend = volume.backend  # also sets self.objects
        self.vk = volume.volume_keys
        self.block_size = volume.block_size
        self.layout = volume.layout
        self.workers = workers
        self._warned: set[str] = set()
        self._keys: LRUCache = LRUCache(65536)
        self._tables: LRUCache = LRUCache(64 << 20, getsizeof=len)  # (key, etag) -> tags of that version
        self._headers: LRUCache = LRUCache(65536)  # (key, etag) of versions whose stored header was checked
        self._tables_lock = threading.Lock()  # guards _tables and _headers

    # ------------------------------------------------------------ keys and names

    @property
    def backend(self) -> Backend:
        """The door to storage (a mount wraps it to count, fence or fail requests); the store
        itself sends every request through `objects`, its view on volume-relative keys."""
        return self._backend

    @backend.setter
    def backend(self, backend: Backend) -> None:
        self._backend = backend
        self.objects = PrefixedBackend(backend, self.vol.prefix)

    def abs_key(self, rel: str) -> str:
        """A volume-relative key as the bucket names it (for messages and local databases)."""
        return self.objects.full_key(rel)

    def entry_key(self, dir_id: bytes, name: bytes) -> str:
        key = self._keys.get((dir_id, name))
        if key is None:
            key = fmt.dir_prefix(self.vk, dir_id) + fmt.encrypt_name(self.vk, dir_id, name)
            self._keys[(dir_id, name)] = key  # an LRU: harmless races, as values never change
        return key

    def backptr_key(self, dir_id: bytes) -> str:
        return fmt.dir_prefix(self.vk, dir_id) + fmt.BACKPTR_NAME

    # ------------------------------------------------------------ objects by volume-relative key

    def head(self, rel: str) -> ObjectInfo:
        return self.objects.head(rel)

    def get_object(self, rel: str) -> tuple[bytes, ObjectInfo]:
        return self.objects.get(rel)

    def list_objects(self, rel_prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under a volume-relative prefix, keys relative to the volume."""
        return self.objects.list(rel_prefix)

    def pending_uploads(self) -> list[PendingUpload]:
        """Unfinished multipart uploads under the volume, keys relative to the volume."""
        return self.objects.pending_uploads("")

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s: %s", key, message)

    # ------------------------------------------------------------ reading entries

    def entry_from(self, parent_id: bytes, name: bytes, rel: str, info: ObjectInfo, body: bytes | None) -> Entry:
        """An Entry from an object's info (with metadata) and, for directories, its body."""
        if info.size == fmt.LINK_SIZE:
            return self._linked(parent_id, name, rel, body)
        meta = fmt.parse_metadata(info.metadata or {})
        attrs = fmt.decrypt_attrs(self.vk, rel, meta.obj_id, meta.attr_blob)
        if info.size == fmt.DIRENT_SIZE:
            # the child id is authenticated by the attribute blob; the body repeats it
            if (
                body is not None
                and fmt.decrypt_dirent(self.vk, parent_id, name, body[: fmt.DIRENT_SIZE]) != meta.obj_id
            ):
                raise IntegrityError(f"directory entry {rel} does not match its metadata")
            if not stat.S_ISDIR(attrs.mode):
                raise IntegrityError(f"directory entry {rel} has non-directory attributes")
            return Entry(
                parent_id, name, rel, True, meta.obj_id, 0, info.etag, info.last_modified, attrs, raw_meta=info.metadata
            )
        if meta.wrapped_key is None:
            raise FormatError("file object without a wrapped key")
        if body is not None and len(body) >= fmt.HEADER_SIZE:
            if fmt.parse_header(body).file_id != meta.obj_id:
                raise IntegrityError("file header and metadata name different files")
        size = self.layout.plain_size(info.size)
        return Entry(
            parent_id,
            name,
            rel,
            False,
            meta.obj_id,
            size,
            info.etag,
            info.last_modified,
            attrs,
            meta.wrapped_key,
            raw_meta=info.metadata,
        )

    def _linked(self, parent_id: bytes, name: bytes, rel: str, body: bytes | None) -> Entry:
        """A hard-linked name: its link entry names the file, whose object holds the rest."""
        if body is None or len(body) < fmt.LINK_SIZE:
            body, _ = self.objects.get(rel)
        file_id = fmt.decrypt_link(self.vk, parent_id, name, body[: fmt.LINK_SIZE])
        entry = self.inode(file_id, parent_id, name)
        return replace(entry, link_key=rel)

    def inode(self, file_id: bytes, parent_id: bytes = b"", name: bytes = b"") -> Entry:
        """A hard-linked file as the bucket holds it now (NotFound: its last name went meanwhile)."""
        rel = fmt.inode_key(self.vk, file_id)
        entry = self.entry_from(parent_id, name, rel, self.objects.head(rel), None)
        if entry.is_dir or entry.obj_id != file_id:
            raise IntegrityError(f"hard-linked file {rel} is not the file its name points to")
        return entry

    def lookup(self, dir_id: bytes, name: bytes, first: int | None = None) -> tuple[Entry, bytes]:
        """One request: the entry and the first bytes of its object (by default header and first
        block, and the tag table of a one-block file)."""
        rel = self.entry_key(dir_id, name)
        first = first or self.layout.object_size(self.block_size)
        body, info = self.objects.get(rel, 0, first)
        try:
            entry = self.entry_from(dir_id, name, rel, info, body)
            return entry, body if entry.link_key is None else b""
        except (FormatError, IntegrityError) as exc:
            raise type(exc)(f"{name.decode(errors='replace')}: {exc}") from None

    def stat_listed(self, dir_id: bytes, name: bytes, rel: str, size: int | None = None) -> Entry:
        """An entry found by a listing: one request. A directory entry (listed `size` 56) is
        read whole, so its body is checked too; a file is a HEAD."""
        if size in (fmt.DIRENT_SIZE, fmt.LINK_SIZE):
            body, info = self.objects.get(rel)
        else:
            body, info = None, self.objects.head(rel)
        return self.entry_from(dir_id, name, rel, info, body)

    def root(self) -> Entry:
        rel = self.backptr_key(fmt.ROOT_DIR_ID)
        info = self.objects.head(rel)
        meta = fmt.parse_metadata(info.metadata or {})
        attrs = fmt.decrypt_attrs(self.vk, rel, fmt.ROOT_DIR_ID, meta.attr_blob)
        return Entry(fmt.ROOT_DIR_ID, b"", rel, True, fmt.ROOT_DIR_ID, 0, info.etag, info.last_modified, attrs)

    def resolve(self, parts: list[bytes]) -> Entry:
        entry = self.root()
        for i, name in enumerate(parts):
            if not entry.is_dir:
                raise NotADirectory(f"{b'/'.join(parts[:i]).decode(errors='replace')} is not a directory")
            try:
                entry, _ = self.lookup(entry.obj_id, name)
            except NotFound:
                raise NotFound(
                    f"/{b'/'.join(parts[: i + 1]).decode(errors='replace')}: no such file or directory"
                ) from None
            self.follow(entry)
        return entry

    def list_dir(self, dir_id: bytes) -> Iterator[tuple[bytes, ObjectInfo, bool]]:
        """(name, info, is_dir) for every entry, from one LIST; foreign keys are skipped."""
        prefix = fmt.dir_prefix(self.vk, dir_id)
        for info in self.objects.list(prefix):
            suffix = info.key[len(prefix) :]
            if suffix == fmt.BACKPTR_NAME:
                continue
            try:
                name = fmt.decrypt_name(self.vk, dir_id, suffix)
            except (FormatError, IntegrityError):
                self.warn_once(self.abs_key(info.key), "not a cryptfs entry of this volume; skipped")
                continue
            yield name, info, info.size == fmt.DIRENT_SIZE

    def list_entries(self, dir_id: bytes, skipped: list | None = None) -> list[Entry]:
        """Every entry with its attributes: one LIST, then HEADs in parallel. An entry whose
        metadata fails its checks is left out: logged, or added to `skipped` as (name, error)."""
        listed = list(self.list_dir(dir_id))

        def one(item):
            name, info, _ = item
            try:
                entry = self.stat_listed(dir_id, name, info.key, info.size)
                if entry.is_dir:
                    self.follow(entry)
                return entry
            except (FormatError, IntegrityError) as exc:
                if skipped is None:
                    self.warn_once(self.abs_key(info.key), f"skipped: {exc}")
                else:
                    skipped.append((name, type(exc)(f"{exc} (object {self.abs_key(info.key)})")))
            except NotFound:
                pass  # removed since the listing
            return None

        with cf.ThreadPoolExecutor(self.workers) as pool:
            return [e for e in pool.map(one, listed) if e is not None]

    # ------------------------------------------------------------ file contents

    def file_key(self, entry: Entry) -> fmt.FileKey:
        if entry.wrapped_key is None:
            raise FormatError(f"object {entry.key} has no data key")
        return fmt.FileKey.derive(self.vol.data_keys.unwrap(entry.wrapped_key), entry.obj_id)

    def tag_table(self, entry: Entry, fk: fmt.FileKey, header: bytes, raw: bytes | None = None) -> bytes | None:
        """The block tags of this version of the file (None in version 1 volumes), fetched once
        unless the caller already has the table's bytes (`raw`)."""
        if not self.layout.has_table:
            return None
        with self._tables_lock:
            tags = self._tables.get((entry.key, entry.etag))
        if tags is None:
            if raw is None:
                raw = self.get_range(entry.key, *self.layout.table_extent(entry.size), entry.etag)
            try:
                tags = fmt.open_table(fk, header, raw, fmt.block_count(entry.size, self.block_size))
            except IntegrityError as exc:
                log.error("%s: %s", entry.key, exc)
                raise IntegrityError(f"{exc} (object {entry.key})") from None
            with self._tables_lock:
                self._tables[(entry.key, entry.etag)] = tags
        return tags

    def decrypt_range(self, entry: Entry, fk: fmt.FileKey, header: bytes, first: int, raw: bytes) -> list[bytes]:
        """Plaintext blocks from raw ciphertext starting at block `first`, each checked to be
        a block of this version of the file."""
        ct = fmt.block_ct_size(self.block_size)
        nblocks = fmt.block_count(entry.size, self.block_size)
        self.verify_header(entry, fk)
        tags = self.tag_table(entry, fk, header)
        out = []
        for n, pos in enumerate(range(0, len(raw), ct)):
            index = first + n
            block = raw[pos : pos + ct]
            try:
                if tags is not None:
                    fmt.check_tag(tags, index, block)
                out.append(fmt.decrypt_block(fk, header, index, block, index == nblocks - 1))
            except IntegrityError as exc:
                log.error("%s: %s", entry.key, exc)  # the error names the block
                raise IntegrityError(f"{exc} (object {entry.key})") from None
        return out

    def check_header(self, entry: Entry, fk: fmt.FileKey, raw: bytes) -> bytes:
        """The header an object stores, checked against the entry's key, id and the volume."""
        try:
            header = fmt.check_header(fk, raw, self.layout)
            if header.file_id != entry.obj_id:
                raise IntegrityError("header and metadata name different files")
        except (FormatError, IntegrityError) as exc:
            log.error("%s: %s", entry.key, exc)
            raise type(exc)(f"{exc} (object {entry.key})") from None
        with self._tables_lock:
            self._headers[(entry.key, entry.etag)] = True
        return header.raw

    def verify_header(self, entry: Entry, fk: fmt.FileKey) -> None:
        """Check the stored header of this version once, whichever block is read first."""
        with self._tables_lock:
            if (entry.key, entry.etag) in self._headers:
                return
        self.read_header(entry, fk)

    def read_header(self, entry: Entry, fk: fmt.FileKey, raw: bytes | None = None) -> bytes:
        if raw is None:
            raw, _ = self.objects.get(entry.key, 0, fmt.HEADER_SIZE, if_match=entry.etag)
        return self.check_header(entry, fk, raw)

    def get_range(self, rel: str, start: int, end: int, etag: str | None) -> bytes:
        """Object bytes [start, end) of one version (If-Match on its ETag); short is an error."""
        raw, _ = self.objects.get(rel, start, end, if_match=etag)
        if len(raw) != end - start:
            raise IntegrityError(f"object {rel} is shorter than its listed size")
        return raw

    def upload(
        self,
        rel: str,
        stream,
        size: int,
        metadata: dict[str, str],
        started=None,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        """Store an object from a stream of exactly `size` bytes; returns its ETag.
        started(upload_id): a multipart upload began (see Backend.upload). The conditions
        hold for single-part and multipart uploads alike (PreconditionFailed)."""
        return self.objects.upload(
            rel, stream, size, metadata, if_none_match=if_none_match, if_match=if_match, started=started
        )

    def abort_upload(self, rel: str, upload_id: str) -> None:
        """Abort a multipart upload of ours; one already finished or aborted is not an error."""
        try:
            self.objects.abort_upload(PendingUpload(rel, upload_id, 0.0))
        except NotFound:
            pass

    def abort_uploads_to(self, rel: str, upload_id: str | None = None) -> None:
        """Abort every unfinished multipart upload to one key (and `upload_id`, if known)."""
        ids = {u.upload_id for u in self.objects.pending_uploads(rel) if u.key == rel}
        for upload in ids | ({upload_id} if upload_id else set()):
            self.abort_upload(rel, upload)

    def read_blocks(self, entry: Entry, fk: fmt.FileKey, header: bytes, first: int, count: int) -> list[bytes]:
        """Blocks [first, first+count) of an unchanged object (If-Match on the entry's ETag)."""
        nblocks = fmt.block_count(entry.size, self.block_size)
        count = min(count, nblocks - first)
        if count <= 0:
            return []
        start, end = self.layout.blocks_extent(first, first + count, entry.size)
        return self.decrypt_range(entry, fk, header, first, self.get_range(entry.key, start, end, entry.etag))

    def iter_plain(self, entry: Entry, chunk_blocks: int = 256, parallel: int = 3) -> Iterator[bytes]:
        """A file's plaintext in order, fetching and decrypting `parallel` chunks at once."""
        fk = self.file_key(entry)
        header = self.read_header(entry, fk)
        nblocks = fmt.block_count(entry.size, self.block_size)
        starts = list(range(0, nblocks, chunk_blocks))
        with cf.ThreadPoolExecutor(parallel) as pool:
            pending: list[cf.Future] = []
            for start in starts:
                pending.append(pool.submit(self.read_blocks, entry, fk, header, start, chunk_blocks))
                if len(pending) >= parallel:
                    yield b"".join(pending.pop(0).result())
            for fut in pending:
                yield b"".join(fut.result())

    def read_all(self, entry: Entry) -> bytes:
        return b"".join(self.iter_plain(entry))

    # ------------------------------------------------------------ writing files

    def metadata_for(
        self, rel: str, obj_id: bytes, attrs: fmt.Attrs | None, wrapped: bytes | None, is_dir: bool
    ) -> dict[str, str]:
        if attrs is None:
            raise FormatError(f"object {rel}: attributes not read")
        if is_dir:
            return fmt.dirent_metadata(self.vk, rel, obj_id, attrs)
        if wrapped is None:
            raise FormatError(f"object {rel} has no data key")
        return fmt.file_metadata(self.vk, rel, obj_id, wrapped, attrs)

    def new_file_key(self, file_id: bytes | None = None) -> tuple[fmt.FileKey, bytes]:
        """A fresh data key (keeping `file_id` for a rewrite) and its wrapped form."""
        fk = fmt.FileKey.new(file_id)
        wrapped = keys.wrap(self.vol.content_public, fk.data_key, keys.DATA_KEY_LABEL)
        self.vol.data_keys.remember(wrapped, fk.data_key)
        return fk, wrapped

    def write_stream(
        self,
        dir_id: bytes,
        name: bytes,
        stream: Readable,
        size: int,
        attrs: fmt.Attrs,
        existing: Entry | None = None,
        create_only: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> Entry:
        """Encrypt `size` bytes from `stream` into the entry (dir_id, name), streaming."""
        rel = self.entry_key(dir_id, name)
        if existing is not None and existing.is_dir:
            raise IsADirectory(f"{name.decode(errors='replace')} is a directory")
        fk, wrapped = self.new_file_key(existing.obj_id if existing else None)
        meta = self.metadata_for(rel, fk.file_id, attrs, wrapped, False)
        reader = EncryptingReader(stream, fk, size, self.layout)
        obj_size = self.layout.object_size(size)
        try:
            etag = self.objects.upload(
                rel,
                reader,
                obj_size,
                meta,
                if_none_match=create_only,
                progress=_plain_progress(progress, size, obj_size),
            )
        except PreconditionFailed:
            raise AlreadyExists(f"{name.decode(errors='replace')} already exists") from None
        return Entry(dir_id, name, rel, False, fk.file_id, size, etag, time.time(), attrs, wrapped, meta)

    def write_bytes(
        self,
        dir_id: bytes,
        name: bytes,
        data: bytes,
        attrs: fmt.Attrs,
        existing: Entry | None = None,
        create_only: bool = False,
    ) -> Entry:
        import io

        return self.write_stream(dir_id, name, io.BytesIO(data), len(data), attrs, existing, create_only)

    # ------------------------------------------------------------ directories

    def write_backptr(self, child: bytes, parent_id: bytes, name: bytes, attrs: fmt.Attrs | None) -> None:
        """A directory's back-pointer. Its metadata (the directory's id and attributes, sealed to
        the key) is what lets `fsck --repair` prove an orphaned one is this volume's."""
        rel = self.backptr_key(child)
        self.objects.put(
            rel,
            fmt.encrypt_backptr(self.vk, child, parent_id, name),
            fmt.dirent_metadata(self.vk, rel, child, attrs) if attrs is not None else None,
        )

    def backptr_id(self, rel: str, info: ObjectInfo) -> bytes | None:
        """The directory id an unreached back-pointer proves to be this volume's, or None."""
        try:
            meta = fmt.parse_metadata(info.metadata or {})
            fmt.decrypt_attrs(self.vk, rel, meta.obj_id, meta.attr_blob)
        except (FormatError, IntegrityError, KeyError):
            return None
        return meta.obj_id if self.backptr_key(meta.obj_id) == rel else None

    def mkdir(self, parent_id: bytes, name: bytes, attrs: fmt.Attrs, child: bytes | None = None) -> Entry:
        child = child or fmt.new_dir_id()
        self.entry_key(parent_id, name)  # a name the format refuses is refused before anything is stored
        self.write_backptr(child, parent_id, name, attrs)
        try:
            return self._new_dirent(parent_id, name, child, attrs)
        except AlreadyExists:
            self.objects.delete(self.backptr_key(child))
            raise

    def link_dir(self, parent_id: bytes, name: bytes, child: bytes, attrs: fmt.Attrs) -> Entry:
        """Give an existing directory a (new) entry, and point it back there."""
        entry = self._new_dirent(parent_id, name, child, attrs)
        self.write_backptr(child, parent_id, name, attrs)
        return entry

    def _new_dirent(self, parent_id: bytes, name: bytes, child: bytes, attrs: fmt.Attrs) -> Entry:
        """Store the entry (parent_id, name) for directory `child`, refusing an existing name."""
        rel = self.entry_key(parent_id, name)
        meta = self.metadata_for(rel, child, attrs, None, True)
        try:
            etag = self.objects.put(rel, fmt.encrypt_dirent(self.vk, parent_id, name, child), meta, if_none_match=True)
        except PreconditionFailed:
            raise AlreadyExists(f"{name.decode(errors='replace')} already exists") from None
        return Entry(parent_id, name, rel, True, child, 0, etag, time.time(), attrs, raw_meta=meta)

    def lost_and_found(self) -> Entry:
        """/lost+found, made if need be: where recovered files and directories go."""
        try:
            return self.lookup(fmt.ROOT_DIR_ID, LOST_FOUND)[0]
        except NotFound:
            pass
        try:
            return self.mkdir(fmt.ROOT_DIR_ID, LOST_FOUND, default_attrs(stat.S_IFDIR | 0o700))
        except AlreadyExists:
            return self.lookup(fmt.ROOT_DIR_ID, LOST_FOUND)[0]

    def init_root(self, attrs: fmt.Attrs) -> None:
        rel = self.backptr_key(fmt.ROOT_DIR_ID)
        self.objects.put(
            rel,
            fmt.encrypt_backptr(self.vk, fmt.ROOT_DIR_ID, fmt.ROOT_DIR_ID, b""),
            fmt.dirent_metadata(self.vk, rel, fmt.ROOT_DIR_ID, attrs),
        )

    def is_empty(self, dir_id: bytes) -> bool:
        prefix = fmt.dir_prefix(self.vk, dir_id)
        return all(info.key == prefix + fmt.BACKPTR_NAME for info in self.objects.list(prefix))

    def remove(self, entry: Entry) -> None:
        """Delete a file, or an empty directory (entry first, so it vanishes at once). A stale
        directory entry goes alone: the directory belongs to the entry it points back to."""
        if entry.is_dir and entry.obj_id != fmt.ROOT_DIR_ID and not self.check_backptr(entry):
            self.objects.delete(entry.key)
            return
        if entry.is_dir:
            if not self.is_empty(entry.obj_id):
                raise DirectoryNotEmpty(f"{entry.name.decode(errors='replace')}: directory not empty")
            self.objects.delete(entry.key)
            self.objects.delete(self.backptr_key(entry.obj_id))
        else:
            self.objects.delete(entry.name_key)
            if entry.link_key is not None:
                self.unlinked(entry)

    def delete_key(self, rel: str) -> None:
        """Delete the object under a volume-relative key (absent is not an error)."""
        self.objects.delete(rel)

    def read_backptr(self, dir_id: bytes) -> tuple[bytes, bytes] | None:
        """(parent id, name) a directory points back to; None if it has no back-pointer."""
        try:
            raw, _ = self.objects.get(self.backptr_key(dir_id))
        except NotFound:
            return None
        return fmt.decrypt_backptr(self.vk, dir_id, raw)

    def check_backptr(self, entry: Entry) -> bool:
        """Whether a directory entry is the canonical one its directory points back to."""
        return self.read_backptr(entry.obj_id) == (entry.parent_id, entry.name)

    def follow(self, entry: Entry) -> None:
        """Refuse to enter a directory through an entry it does not point back to (a stale
        entry, left by a crash or restored by someone with write access to the bucket)."""
        if entry.is_dir and entry.obj_id != fmt.ROOT_DIR_ID and not self.check_backptr(entry):
            self.warn_once(entry.key, "stale directory entry (its directory points back elsewhere); not followed")
            raise IntegrityError(
                f"{entry.name.decode(errors='replace')}: stale directory entry, not followed (object {entry.key})"
            )

    # ------------------------------------------------------------ renames and attributes

    # ------------------------------------------------------------ hard links
    #
    # A file's first link moves its object to its inode key (format.md §7.5) and turns each
    # name into a link entry. The stored link count is raised before a name is added and
    # lowered after one is removed, so an interrupted operation leaves it too high (the file
    # outlives its last name: fsck reports it), never too low. Each change of the count reads
    # the file's object first, so names known to be stale elsewhere cannot undo one another.

    def bump_links(self, entry: Entry, delta: int) -> Entry:
        """Change a hard-linked file's stored link count, from what the bucket holds now."""
        current = self.inode(entry.obj_id, entry.parent_id, entry.name)
        have = entry_attrs(current)
        attrs = replace(have, nlink=have.nlink + delta, ctime_ns=now_ns())
        return replace(self.set_attrs(current, attrs), link_key=entry.link_key)

    def put_link(self, parent_id: bytes, name: bytes, file_id: bytes, create_only: bool) -> str:
        rel = self.entry_key(parent_id, name)
        try:
            self.objects.put(rel, fmt.encrypt_link(self.vk, parent_id, name, file_id), None, if_none_match=create_only)
        except PreconditionFailed:
            raise AlreadyExists(f"{name.decode(errors='replace')} already exists") from None
        return rel

    def link(self, entry: Entry, new_parent: bytes, new_name: bytes) -> tuple[Entry, Entry]:
        """Give a file a new name: (the file under its old name, under the new one)."""
        if entry.link_key is None:
            rel = fmt.inode_key(self.vk, entry.obj_id)
            attrs = replace(entry_attrs(entry), nlink=entry_attrs(entry).nlink + 1, ctime_ns=now_ns())
            meta = self.metadata_for(rel, entry.obj_id, attrs, entry.wrapped_key, False)
            etag = self.objects.copy(entry.key, rel, meta, if_match=entry.etag)
            if self.objects.head(rel).size != self.layout.object_size(entry.size):
                raise IntegrityError(f"copy of {entry.name!r} has the wrong size; not linked")
            self.put_link(entry.parent_id, entry.name, entry.obj_id, create_only=False)  # replaces the object
            old = replace(
                entry, key=rel, etag=etag, last_modified=time.time(), attrs=attrs, raw_meta=meta, link_key=entry.key
            )
        else:
            old = self.bump_links(entry, 1)
        try:
            new_rel = self.put_link(new_parent, new_name, entry.obj_id, create_only=True)
        except AlreadyExists:
            self.bump_links(old, -1)
            raise
        return old, replace(old, parent_id=new_parent, name=new_name, link_key=new_rel)

    def unlinked(self, entry: Entry) -> Entry | None:
        """A hard-linked name is gone (its object deleted or replaced): one link fewer, and the
        file itself goes with its last name. Returns the file as its other names see it."""
        try:
            current = self.inode(entry.obj_id, entry.parent_id, entry.name)
        except NotFound:
            return None
        if entry_attrs(current).nlink > 1:
            return self.bump_links(entry, -1)
        self.objects.delete(entry.key)
        return None

    def _rename_link(self, entry: Entry, new_parent: bytes, new_name: bytes, target: Entry | None) -> Entry:
        if entry.link_key is None:
            raise FormatError(f"object {entry.key} is not a linked name")
        self.bump_links(entry, 1)
        new_rel = self.put_link(new_parent, new_name, entry.obj_id, create_only=target is None)
        if target is not None and target.link_key is not None:
            self.unlinked(target)
        self.objects.delete(entry.link_key)
        return replace(self.bump_links(entry, -1), parent_id=new_parent, name=new_name, link_key=new_rel)

    def rename(self, entry: Entry, new_parent: bytes, new_name: bytes, target: Entry | None = None) -> Entry:
        """Move an entry; `target` is what (new_parent, new_name) holds now, replaced if allowed."""
        new_rel = self.entry_key(new_parent, new_name)
        if target is not None and target.is_dir and not entry.is_dir:
            raise IsADirectory(f"{new_name.decode(errors='replace')} is a directory")
        if entry.link_key is not None:
            return self._rename_link(entry, new_parent, new_name, target)
        if target is not None:
            if target.is_dir and not entry.is_dir:
                raise IsADirectory(f"{new_name.decode(errors='replace')} is a directory")
            if entry.is_dir and not target.is_dir:
                raise NotADirectory(f"{new_name.decode(errors='replace')} is not a directory")
            if target.is_dir:
                self.remove(target)
        meta = self.metadata_for(new_rel, entry.obj_id, entry.attrs, entry.wrapped_key, entry.is_dir)
        if entry.is_dir:
            etag = self.objects.put(
                new_rel,
                fmt.encrypt_dirent(self.vk, new_parent, new_name, entry.obj_id),
                meta,
                if_none_match=target is None or target.is_dir,
            )
            self.write_backptr(entry.obj_id, new_parent, new_name, entry.attrs)
        else:
            etag = self.objects.copy(entry.key, new_rel, meta, if_match=entry.etag)
            copied = self.objects.head(new_rel)
            if copied.size != self.layout.object_size(entry.size):
                raise IntegrityError(f"copy of {entry.key} has the wrong size; source kept")
        if target is not None and target.link_key is not None:
            self.unlinked(target)  # its link entry was replaced by the copy
        if new_rel != entry.key:
            self.objects.delete(entry.key)
        return replace(
            entry, parent_id=new_parent, name=new_name, key=new_rel, etag=etag, last_modified=time.time(), raw_meta=meta
        )

    def set_attrs(self, entry: Entry, attrs: fmt.Attrs) -> Entry:
        """Persist new attributes: a metadata-only copy (files) or a small re-PUT (directories)."""
        if entry.obj_id == fmt.ROOT_DIR_ID and entry.is_dir:
            meta = fmt.dirent_metadata(self.vk, entry.key, fmt.ROOT_DIR_ID, attrs)
            etag = self.objects.put(
                entry.key, fmt.encrypt_backptr(self.vk, fmt.ROOT_DIR_ID, fmt.ROOT_DIR_ID, b""), meta
            )
            return replace(entry, attrs=attrs, etag=etag, raw_meta=meta)
        meta = self.metadata_for(entry.key, entry.obj_id, attrs, entry.wrapped_key, entry.is_dir)
        if entry.is_dir:
            etag = self.objects.put(
                entry.key,
                fmt.encrypt_dirent(self.vk, entry.parent_id, entry.name, entry.obj_id),
                meta,
                if_match=entry.etag,
            )
        else:
            etag = self.objects.copy(entry.key, entry.key, meta, if_match=entry.etag)
        return replace(entry, attrs=attrs, etag=etag, last_modified=time.time(), raw_meta=meta)


def _plain_progress(progress, size: int, obj_size: int):
    """Report plaintext bytes to a callback that gets ciphertext byte counts."""
    if progress is None:
        return None
    return lambda n: progress(n * size // obj_size if obj_size else n)


class ProducedStream:
    """A read()-able stream over bytes produced on demand by `_more()`, holding only what
    the last read asked for; subclasses say when they are `_exhausted()`."""

    buf: bytearray
    pos: int

    def _more(self) -> None:
        raise NotImplementedError

    def _exhausted(self) -> bool:
        raise NotImplementedError

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = 1 << 62
        while len(self.buf) - self.pos < n and not self._exhausted():
            if self.pos:
                del self.buf[: self.pos]
                self.pos = 0
            self._more()
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += len(out)
        return out


class EncryptingReader(ProducedStream):
    """A file object's bytes, encrypting `size` plaintext bytes from `source` lazily.

    A source that ends early is an error (the file changed while it was read), never a
    short object.
    """

    def __init__(self, source: Readable, fk: fmt.FileKey, size: int, layout: fmt.Layout):
        self.source, self.fk, self.size, self.layout = source, fk, size, layout
        self.bs = layout.block_size
        self.header = fmt.make_header(fk, layout)
        self.nblocks = fmt.block_count(size, self.bs)
        self.index = 0
        self.tags = TagCollector(fk, self.header, layout)
        self.buf = bytearray(self.header)
        self.pos = 0

    def _exhausted(self) -> bool:
        return self.index > self.nblocks

    def _more(self) -> None:
        if self.index == self.nblocks:
            self.buf += self.tags.table()
            self.index += 1
            return
        want = fmt.block_plain_len(self.index, self.size, self.bs)
        plain = read_exact(self.source, want)
        if len(plain) != want:
            raise IntegrityError("source file changed size while being encrypted")
        block = fmt.encrypt_block(self.fk, self.header, self.index, plain, self.index == self.nblocks - 1)
        self.tags.add(block)
        self.buf += block
        self.index += 1


class TagCollector:
    """The tag table of an object being written, from its blocks as they go out in order."""

    def __init__(self, fk: fmt.FileKey, header: bytes, layout: fmt.Layout):
        self.fk, self.header, self.layout = fk, header, layout
        self.tags = bytearray()

    def add(self, block: bytes) -> None:
        self.tags += fmt.block_tag(block)

    def table(self) -> bytes:
        """What ends the object: the tag table (version 2), or nothing (version 1)."""
        return fmt.make_table(self.fk, self.header, bytes(self.tags)) if self.layout.has_table else b""
