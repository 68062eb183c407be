"""The FUSE operations: a thin shell over namespace, handles and write-back.

Paths arrive as str (surrogate-escaped bytes); errors leave as errno through `errno_of`.
Which lock guards what, and their order, is written in namespace.py.
"""

import contextlib
import ctypes
import errno
import functools
import itertools
import logging
import os
import re
import stat
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from . import format as fmt
from . import localstate
from .backend.base import MAX_OBJECT_SIZE
from .errors import (
    AlreadyExists,
    BadHandle,
    Busy,
    CryptfsError,
    DirectoryNotEmpty,
    FileTooLarge,
    InvalidArgument,
    IsADirectory,
    NoSpace,
    NotADirectory,
    NotFound,
    NotPermitted,
    PreconditionFailed,
    ReadOnly,
    Unsupported,
    UploadFailed,
)
from .handles import FileState
from .logs import shown
from .namespace import ROOT_LOC, Namespace
from .progress import human
from .reader import BlockReader
from .store import SPECIAL_TYPES, Entry, Store, entry_attrs
from .writeback import Journal, WriteBack, mkdir_journaled, recover_record, rename_journaled, rmdir_journaled

if TYPE_CHECKING:
    from .lease import Lease

log = logging.getLogger(__name__)

DIR_SIZE = 4096  # what local filesystems show, so tools comparing trees see no difference
# libfuse hides an open file that is unlinked by renaming it to such a name, and unlinks
# that name at its last close; to us the rename is the unlink, and the name is only ever
# known in `CryptFS._hidden` (never listed, never stored)
HIDDEN_NAME = re.compile(rb"\.fuse_hidden[0-9a-f]{16}\Z")
# a directory's times go to the bucket once it has been left alone this long (seconds), so
# filling a directory costs one write of its times, not one per file
DIR_TIMES_QUIET = 3.0
# a shared mount fetches a file opened read-only up to this size whole at its open, so it
# reads that one version to the end even if another mount replaces it meanwhile
SHARED_PIN_MAX = 16 * 1024 * 1024
# the staging bound (staging_size): how often staging is counted while writes pass, polled
# while one waits, and how long a wait may see no upload make room before it fails
STAGING_RECOUNT, STAGING_POLL, STAGING_PATIENCE = 0.5, 0.05, 60.0
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class FuseError(OSError):
    """What FUSE returns to the caller; made only by `op`, from an error's errno."""

    def __init__(self, code: int):
        super().__init__(code, os.strerror(code))


def op(func):
    """Translate cryptfs errors into their errno (errors.py is the mapping); log anything
    unexpected as EIO."""

    @functools.wraps(func)
    def wrapper(self, *args):
        where = f" {shown(args[0])}" if args and isinstance(args[0], str) else ""
        try:
            return func(self, *args)
        except CryptfsError as exc:
            if exc.errno in (errno.EIO, errno.EACCES):  # the rest is ordinary use
                log.error("%s%s: %s", func.__name__, where, exc)
            elif exc.errno == errno.ENOSPC:
                log.warning("%s%s: %s", func.__name__, where, exc)
            raise FuseError(exc.errno) from None
        except OSError:
            raise
        except Exception:
            log.exception("%s%s failed", func.__name__, where)
            raise FuseError(errno.EIO) from None

    return wrapper


def split(path: str) -> list[bytes]:
    return [p for p in os.fsencode(path).split(b"/") if p]


def ino_of(obj_id: bytes) -> int:
    return 1 if obj_id == fmt.ROOT_DIR_ID else (int.from_bytes(obj_id[:8], "big") & (2**63 - 1)) or 2


class CryptFS:
    """FUSE operations. Every name is answered by the namespace (`ns`), pending files and
    uploaded ones alike; an operation that changes what a name is bound to holds that name's
    lock (`ns.names`) for its whole length. Lock order: see namespace.py.

    `_lock` guards `fhs`, `dirs` and `_hidden` only.
    """

    use_ns = True

    def __init__(
        self,
        store: Store,
        ns: Namespace,
        reader: BlockReader,
        journal: Journal,
        staging_dir: str,
        writeback_delay: float = 2.0,
        fsync_mode: str = "upload",
        read_only: bool = False,
        shared: bool = False,
        staging_limit: int | None = None,
    ):
        self.store, self.ns, self.reader, self.journal = store, ns, reader, journal
        self.staging_limit = staging_limit or None  # bytes of staging files (staging_size)
        self._staged = (0, -1.0)  # staging bytes last counted, and when (monotonic); under _lock
        self.shared = shared  # --shared: other mounts write too; every commit is conditional
        self.staging_dir = staging_dir
        self.fsync_mode = fsync_mode
        self.read_only = read_only
        self.lease: Lease | None = None  # a read-write mount's lease (lease.py): lost or unrenewed, nothing is written
        self.wb = WriteBack(store, journal, writeback_delay, ns.uploaded, shared=shared)
        self.fhs: dict[int, FileState] = {}
        self._appending: set[int] = set()  # (--shared) handles opened with O_APPEND
        self.dirs: dict[int, bytes] = {}  # open directory handles: their directory ids
        self._hidden: dict[tuple[bytes, bytes], FileState] = {}  # libfuse's names for unlinked open files
        self._fh = itertools.count(1)
        self._lock = threading.Lock()
        self._symlinks: dict[tuple[bytes, str], bytes] = {}
        self.unmount_failed: int | None = None  # files left in the journal at unmount (None: no unmount)
        self._stop = threading.Event()
        self._dir_interval = max(1.0, writeback_delay)
        self._ticker = threading.Thread(target=self._flush_dirs_loop, name="dir-times", daemon=True)
        self._ticker.start()

    # ------------------------------------------------------------ helpers

    def _ctx(self) -> tuple[int, int]:
        try:
            from mfusepy import fuse_get_context

            uid, gid, _ = fuse_get_context()
            return uid, gid
        except (ImportError, OSError):  # no FUSE library: in-process use
            return os.getuid(), os.getgid()

    def _new_attrs(self, mode: int, parent_id: bytes) -> fmt.Attrs:
        """A new entry's attributes: the caller's uid and gid, or, in a set-group-ID
        directory, the directory's gid (and its set-group-ID bit for a subdirectory), as
        Linux does (the kernel already stripped S_ISGID the caller may not set)."""
        uid, gid = self._ctx()
        parent = self.ns.dir_entry(parent_id)
        if parent is not None and entry_attrs(parent).mode & stat.S_ISGID:
            gid = entry_attrs(parent).gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        now = time.time_ns()
        return fmt.Attrs(mode, uid, gid, now, now, now)

    def _where(self, path: str) -> tuple[bytes, bytes]:
        """(parent directory id, name) of a path that is not the root."""
        parts = split(path)
        if not parts:
            raise Busy()
        parent = self.ns.resolve(parts[:-1])
        if not (isinstance(parent, Entry) and parent.is_dir):
            raise NotADirectory()
        fmt.check_name(parts[-1])
        return parent.obj_id, parts[-1]

    def _node(self, path: str):
        parts = split(path)
        return self.ns.resolve(parts) if parts else self.ns.root

    @contextlib.contextmanager
    def _bound(self, parent_id: bytes, name: bytes):
        """The node bound to a name; a FileState comes locked and still bound (an upload in
        flight finishes first). Callers hold the name's lock."""
        while True:
            node = self.ns.lookup(parent_id, name)
            if not isinstance(node, FileState):
                yield node
                return
            with node.lock:
                if self.ns.bound(parent_id, name, node):
                    yield node
                    return

    @staticmethod
    @contextlib.contextmanager
    def _space(state: FileState):
        """Changes to a file: once one met a full cache disk, the file has failed, and every
        further write, flush and fsync is ENOSPC until its last close gives it up (`_abandon`)."""
        if state.failed:
            raise NoSpace("an earlier write to this file found the cache disk full; its changes are given up at close")
        try:
            yield
        except NoSpace:
            state.failed = True
            state.journaled = False  # what a journal record holds is no longer to be uploaded
            raise

    def _change(self, state: FileState, change):
        """Every change to a file's contents: the version its last close journaled is kept
        for recovery first (write-back), and a full cache disk fails the file (`_space`)."""
        with self._space(state), state.lock:
            self.wb.keep_closed_version(state)
            return change()

    def _live(self, node):
        """What a hard-linked name stands for: the FileState this mount has open for its file
        under any of its names, else the node itself."""
        if isinstance(node, Entry) and node.link_key is not None:
            return self.ns.open_link(node.obj_id) or node
        return node

    @contextlib.contextmanager
    def _linked(self, node):
        """Around a name operation on a hard-linked file: the FileState open for it (if any),
        locked and uploaded first, so the store works on the file as it is; `_adopt` then gives
        that state the file as stored."""
        live = self._live(node)
        if not isinstance(live, FileState):
            yield None
            return
        with live.lock:
            if live.modified:
                self.wb.upload_now(live)
            yield live

    def _adopt(self, state: FileState | None, inode: Entry | None) -> None:
        """A hard-linked file changed in the store: its open state and its other names follow."""
        if inode is None:
            return
        if state is not None:
            state.basis = replace(inode, parent_id=state.parent_id, name=state.name, link_key=state.link_key)
            state.attrs, state.seen = entry_attrs(inode), inode.etag
        self.ns.record(inode)

    def _names_changed(self, file_id: bytes | None, besides: tuple[bytes, bytes] | None = None) -> None:
        """libfuse gives each name of a hard-linked file an inode of its own in the kernel,
        whose cached attributes and pages would lag a change made through another name for up
        to the attribute timeout: after such a change (outside every lock), drop them."""
        if file_id is None:
            return
        try:
            from mfusepy import _libfuse

            invalidate = _libfuse.fuse_invalidate_path  # libfuse 3 only, as the mount loads it
            context = _libfuse.fuse_get_context()
        except (ImportError, OSError, AttributeError):  # no FUSE library: in-process use
            return
        if not context or not context.contents.fuse:
            return
        invalidate.argtypes, invalidate.restype = [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_int
        for parent_id, name in self.ns.link_names(file_id):
            if (parent_id, name) == besides:
                continue  # the name the change came through: its kernel inode is current
            parts = [name]
            while parent_id != fmt.ROOT_DIR_ID:
                loc = self.ns.location(parent_id)
                if loc is None:
                    break
                parent_id = loc[0]
                parts.append(loc[1])
            else:
                invalidate(context.contents.fuse, b"/" + b"/".join(reversed(parts)))

    def _linked_id(self, path: str) -> bytes | None:
        """The file id of a hard-linked file at a path, else None."""
        try:
            node = self._node(path)
        except (CryptfsError, OSError):
            return None
        return _file_id(node) if node.link_key is not None else None

    def _check_writable(self) -> None:
        if self.read_only or (self.lease is not None and not self.lease.writable):
            raise ReadOnly()

    def _dir_links(self, dir_id: bytes) -> int:
        """A directory's link count as a local filesystem keeps it: 2 and one per subdirectory
        (its ".."); 1, the usual "not counted", while its listing is not known here."""
        subdirs = self.ns.subdirs(dir_id)
        return 1 if subdirs is None else 2 + subdirs

    def _stat(self, node) -> dict:
        node = self._live(node)
        entry = node.entry() if isinstance(node, FileState) else node
        a = entry_attrs(entry)
        size = DIR_SIZE if entry.is_dir else entry.size
        return {
            "st_mode": a.mode,
            "st_ino": ino_of(entry.obj_id),
            "st_nlink": self._dir_links(entry.obj_id) if entry.is_dir else a.nlink,
            "st_uid": a.uid,
            "st_gid": a.gid,
            "st_size": size,
            "st_atime": a.atime_ns,
            "st_mtime": a.mtime_ns,
            "st_ctime": a.ctime_ns,
            "st_rdev": a.rdev,
            "st_blksize": self.store.block_size,
            "st_blocks": -(-size // 512),
        }

    def _handle(self, state: FileState) -> int:
        fh = next(self._fh)
        with self._lock:
            self.fhs[fh] = state
        return fh

    def _touch(self, *dir_ids: bytes) -> None:
        now = time.time_ns()
        for dir_id in set(dir_ids):
            self.ns.touch_dir(dir_id, now)

    def _flush_dirs_loop(self) -> None:
        while not self._stop.wait(self._dir_interval):
            try:
                self.ns.flush_dirs(quiet=DIR_TIMES_QUIET)
            except Exception:  # the loop must survive; the next round retries
                log.exception("storing directory times failed")

    # ------------------------------------------------------------ attributes

    def _hidden_name(self, path: str | None) -> tuple[bytes, bytes] | None:
        """(parent id, name) of a path libfuse gave an unlinked open file, if it is one."""
        if path is None or not HIDDEN_NAME.match(os.fsencode(path).rsplit(b"/", 1)[-1]):
            return None
        where = self._where(path)
        with self._lock:
            return where if where in self._hidden else None

    @op
    def getattr(self, path, fh=None):
        state = self.fhs.get(fh) if fh else None
        if state is None:
            hidden = self._hidden_name(path)
            with self._lock:
                state = self._hidden.get(hidden) if hidden else None
        return self._stat(state if state is not None else self._node(path))

    @op
    def opendir(self, path):
        entry = self._node(path)
        if not (isinstance(entry, Entry) and entry.is_dir):
            raise NotADirectory()
        fh = next(self._fh)
        with self._lock:
            self.dirs[fh] = entry.obj_id
        return fh

    @op
    def releasedir(self, path, fh):
        with self._lock:
            self.dirs.pop(fh, None)
        return 0

    @op
    def readdir(self, path, fh):
        with self._lock:
            dir_id = self.dirs[fh]
        out = [
            (".", {"st_mode": stat.S_IFDIR, "st_ino": ino_of(dir_id)}, 0),
            ("..", {"st_mode": stat.S_IFDIR, "st_ino": 1}, 0),
        ]
        for name, node in sorted(self.ns.listdir(dir_id), key=lambda item: item[0]):
            if isinstance(node, FileState):
                mode, ino = node.attrs.mode, ino_of(node.fk.file_id)
            else:
                mode, ino = entry_attrs(node).mode, ino_of(node.obj_id)
            # inode numbers must be non-zero, or readdir(3) hides the entry
            out.append((os.fsdecode(name), {"st_mode": mode, "st_ino": ino}, 0))
        return out

    @op
    def readlink(self, path):
        node = self._node(path)
        if isinstance(node, FileState):
            return os.fsdecode(node.read(0, node.size))
        if not node.is_symlink:
            raise InvalidArgument()
        key = (node.obj_id, node.etag)
        target = self._symlinks.get(key)
        if target is None:
            target = self._symlinks[key] = self.store.read_all(node)
        return os.fsdecode(target)

    def _set_attrs(self, path: str | None, change, fh: int | None) -> None:
        self._set_attrs_held(path, change, fh)
        state = self.fhs.get(fh) if fh else None
        self._names_changed(
            state.fk.file_id
            if state is not None and state.inode_key
            else self._linked_id(path)
            if path is not None
            else None
        )

    def _set_attrs_held(self, path: str | None, change, fh: int | None) -> None:
        self._check_writable()
        state = self.fhs.get(fh) if fh else None
        if state is not None:
            with state.lock:
                self._set_state_attrs(state, change)
            return
        if path is None:  # no path: only ever sent with an open file's handle
            raise BadHandle()
        parts = split(path)
        if not parts:
            with self.ns.names.hold(ROOT_LOC):
                self._set_dir_attrs(ROOT_LOC, self.ns.root, change)
            return
        parent_id, name = self._where(path)
        with self.ns.names.hold((parent_id, name)), self._bound(parent_id, name) as node:
            live = self._live(node)
            if live is not node:  # a hard-linked file open under another name
                with live.lock:
                    self._set_state_attrs(live, change)
            elif isinstance(node, FileState):
                self._set_state_attrs(node, change)
            elif node.is_dir:
                self._set_dir_attrs((parent_id, name), node, change)
            else:
                self.ns.put(parent_id, name, self.store.set_attrs(node, change(node.attrs)))

    def _set_dir_attrs(self, loc: tuple[bytes, bytes], entry: Entry, change) -> None:
        """A mount that holds the lease keeps a directory's new mode, owner or times here and
        stores them with its other changes (flush_dirs: once the directory is quiet, at its
        fsync, at unmount), so `rsync -a` costs one write per directory, not one per call; a
        crash before then loses only those attributes, as it loses directory times. A shared
        mount stores them at once."""
        if not self.shared and self.ns.set_dir_attrs(entry.obj_id, change, persist=True) is not None:
            return
        self.ns.stored_dir(loc, entry, self.store.set_attrs(entry, change(entry_attrs(entry))))

    def _set_state_attrs(self, state: FileState, change) -> None:
        """With the state's lock held: pending files carry new attributes in their upload;
        uploaded ones get a metadata-only copy now."""
        state.attrs = change(state.attrs)
        state.changes += 1
        if state.unlinked:
            return
        if state.modified or state.basis is None:
            self.wb.rejournal(state)
            return
        state.basis = self.store.set_attrs(state.basis, state.attrs)
        state.seen = state.basis.etag  # our own copy: what a shared commit replaces next
        state.journaled_at = state.changes
        self.ns.record(state.basis)

    @op
    def chmod(self, path, mode, fh=None):
        now = time.time_ns()
        self._set_attrs(path, lambda a: replace(a, mode=stat.S_IFMT(a.mode) | stat.S_IMODE(mode), ctime_ns=now), fh)

    @op
    def chown(self, path, uid, gid, fh=None):
        now = time.time_ns()
        self._set_attrs(
            path,
            lambda a: replace(
                a,
                uid=a.uid if uid in (-1, 0xFFFFFFFF) else uid,
                gid=a.gid if gid in (-1, 0xFFFFFFFF) else gid,
                ctime_ns=now,
            ),
            fh,
        )

    @op
    def utimens(self, path, times=None, fh=None):
        """times: (atime, mtime) in ns, either None for UTIME_OMIT; None for both now."""
        now = time.time_ns()
        atime, mtime = times if times is not None else (now, now)
        if atime is None and mtime is None:
            return 0
        self._set_attrs(
            path,
            lambda a: replace(
                a,
                atime_ns=a.atime_ns if atime is None else int(atime),
                mtime_ns=a.mtime_ns if mtime is None else int(mtime),
                ctime_ns=now,
            ),
            fh,
        )

    # ------------------------------------------------------------ files

    def _open_node(self, parent_id: bytes, name: bytes, node, flags: int) -> int:
        """A handle on the file bound to a name (its lock held by the caller). A shared mount
        copies a file opened for writing at once (FileState.detach) and fetches a small file
        opened read-only whole (FileState.pin); when another mount replaced the version it
        knew, it looks the name up again, up to three times."""
        tries = 0
        while True:
            fh = self._open_once(parent_id, name, node, flags)
            if not self.shared or flags & os.O_TRUNC:
                return fh
            state = self.fhs[fh]
            try:
                if flags & os.O_ACCMODE != os.O_RDONLY:
                    state.detach()
                elif state.size <= SHARED_PIN_MAX:
                    state.pin()
                return fh
            except PreconditionFailed:
                self.release(None, fh)
                tries += 1
                if tries == 3:
                    raise
                self.ns.stale(parent_id)
                node = self.ns.lookup(parent_id, name)

    def _open_once(self, parent_id: bytes, name: bytes, node, flags: int) -> int:
        while True:
            if isinstance(node, FileState):
                self.ns.hold(node)
                state = node
                break
            if node.is_dir:
                raise IsADirectory()
            live = self._live(node)
            if live is not node:  # a hard-linked file already open under another name
                self.ns.hold(live)
                state = live
                break
            fresh = FileState.open_existing(self.store, self.reader, self.staging_dir, node)
            fresh.standalone = self.shared
            adopted = self.ns.adopt(parent_id, name, node, fresh)
            if adopted is not None:
                state = adopted
                break
            node = self.ns.lookup(parent_id, name)  # changed behind our back (another mount)
        fh = self._handle(state)
        if flags & os.O_TRUNC and (state.size or state.basis is not None):
            try:
                self._change(state, state.rewrite_from_scratch)
            except BaseException:
                self.release(None, fh)
                raise
        return fh

    @op
    def create(self, path, mode, flags=0):
        self._check_writable()
        parent_id, name = self._where(path)
        with self.ns.names.hold((parent_id, name)):
            try:
                existing = self.ns.lookup(parent_id, name)
            except NotFound:
                existing = None
            if existing is not None:  # made meanwhile: open(2) without O_EXCL opens it
                if flags & os.O_EXCL:
                    raise AlreadyExists()
                return self._open_node(parent_id, name, existing, flags)
            state = FileState.create(
                self.store,
                self.reader,
                self.staging_dir,
                parent_id,
                name,
                self._new_attrs(stat.S_IFREG | stat.S_IMODE(mode), parent_id),
            )
            claimed = self.ns.claim(parent_id, name)  # an unlinked open file's object is still there
            state.remote_at_key, state.seen = claimed is not None, claimed.seen if claimed else None
            state.handles = 1
            self.ns.put(parent_id, name, state)
            fh = self._handle(state)
        self._touch(parent_id)
        return fh

    @op
    def open(self, path, flags):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self._check_writable()
        parts = split(path)
        if not parts:
            raise IsADirectory()
        parent_id, name = self._where(path)
        with self.ns.names.hold((parent_id, name)):
            fh = self._open_node(parent_id, name, self.ns.lookup(parent_id, name), flags)
        if self.shared and flags & os.O_APPEND:
            with self._lock:
                self._appending.add(fh)
        return fh

    @op
    def read(self, path, size, offset, fh):
        return self.fhs[fh].read(offset, size)

    @op
    def write(self, path, data, offset, fh):
        self._check_writable()
        state = self.fhs[fh]
        self._check_size(max(offset + len(data), state.size))
        self._staging_room(len(data))
        if fh in self._appending:  # the kernel's idea of the size may predate another mount's change
            return self._change(state, lambda: state.write(state.size, data))
        return self._change(state, lambda: state.write(offset, data))

    def _staging_room(self, nbytes: int) -> None:
        """With a staging bound: a write that would take the staging files past it waits while
        closed files upload (sooner than their write-back delay); ENOSPC when nothing is left
        to upload, or nothing shrinks for STAGING_PATIENCE seconds (the endpoint is down)."""
        if self.staging_limit is None:
            return
        with self._lock:
            used, counted_at = self._staged
            recount = time.monotonic() - counted_at > STAGING_RECOUNT
            if not recount:
                self._staged = (used + nbytes, counted_at)  # counted again soon; meanwhile writes add up
        if recount:  # a scan of the staging directory: outside the lock
            used = localstate.dir_usage(self.staging_dir)
            with self._lock:
                self._staged = (used + nbytes, time.monotonic())
        if used + nbytes <= self.staging_limit:
            return
        best, since, hurried = used, time.monotonic(), 0.0
        while used + nbytes > self.staging_limit:
            now = time.monotonic()
            if now - hurried >= 1.0:  # a failing upload is not retried more often than this
                if not self.wb.hurry():
                    raise NoSpace(f"staging_size ({human(self.staging_limit)}) is full of files still open for writing")
                hurried = now
            if now - since > STAGING_PATIENCE:
                raise NoSpace(f"staging_size ({human(self.staging_limit)}) reached, and uploads make no room")
            time.sleep(STAGING_POLL)
            used = localstate.dir_usage(self.staging_dir)
            if used < best:
                best, since = used, time.monotonic()
        with self._lock:
            self._staged = (used + nbytes, time.monotonic())

    def _check_size(self, size: int) -> None:
        """EFBIG beyond the largest file whose object the bucket can hold."""
        if size > self.store.layout.largest_plain(MAX_OBJECT_SIZE):
            raise FileTooLarge()
        if self.shared and self.lease is not None and not self.lease.multipart_ok:
            # only a single PUT commits conditionally on this endpoint
            if size > self.store.layout.largest_plain(self.store.backend.single_put_max):
                raise FileTooLarge("larger than one PUT, and this endpoint's multipart uploads ignore conditions")

    @op
    def truncate(self, path, length, fh=None):
        self._check_writable()
        self._check_size(length)
        state = self.fhs.get(fh) if fh else None
        temporary = None
        if state is None:
            parent_id, name = self._where(path)
            with self.ns.names.hold((parent_id, name)):
                temporary = self._open_node(parent_id, name, self.ns.lookup(parent_id, name), 0)
            state = self.fhs[temporary]
        try:
            self._change(state, state.rewrite_from_scratch if length == 0 else lambda: state.truncate(length))
        finally:
            if temporary is not None:
                try:
                    self.flush(path, temporary)
                finally:
                    self.release(path, temporary)

    @op
    def flush(self, path, fh):
        state = self.fhs[fh]
        with self._space(state):
            self.wb.journal_state(state)
        if state.inode_key and state.modified:
            # close() waits for flush, not for release: the other names must not show the old
            # contents to a read that follows the close
            self._names_changed(state.fk.file_id, besides=(state.parent_id, state.name))
        return self._report(state)

    def _report(self, state: FileState) -> int:
        if state.error is not None:
            exc, state.error = state.error, None
            raise UploadFailed(f"upload of {state.key} failed: {exc}")
        return 0

    @op
    def fsync(self, path, datasync, fh):
        state = self.fhs[fh]
        with self._space(state):
            if self.fsync_mode == "journal":
                self.wb.journal_state(state)
            else:
                try:
                    self.wb.upload_now(state)
                except NoSpace:
                    raise
                except CryptfsError as exc:
                    raise UploadFailed(f"upload of {state.key} failed: {exc}") from None
        return self._report(state)

    @op
    def fsyncdir(self, path, datasync, fh):
        """The directory's attributes changed here reach the bucket now (its entries are
        durable already: names are stored as they are made)."""
        with self._lock:
            dir_id = self.dirs.get(fh)
        if dir_id is not None and self.ns.flush_dirs(only=dir_id):
            raise UploadFailed(f"attributes of directory {path} not stored")
        return 0

    @op
    def release(self, path, fh):
        with self._lock:
            state = self.fhs.pop(fh)
            self._appending.discard(fh)
        if not self.ns.let_go(state):
            return 0
        if state.unlinked:
            self._discard(state)
            return 0
        if state.modified and not state.failed:
            try:
                with self._space(state):
                    self.wb.journal_state(state)
            except NoSpace:
                pass  # failed now: given up below
            else:
                self.wb.schedule(state)
                if state.inode_key:
                    self._names_changed(state.fk.file_id)
                return 0
        if state.failed:
            self._abandon(state)
        else:
            self.ns.settle(state)
        return 0

    def _abandon(self, state: FileState) -> None:
        """The last close of a file that met a full cache disk: nothing of it is uploaded, its
        staging goes (the space comes back), and its name shows again what the bucket holds
        under it (the version before, or nothing for a new file)."""
        with self.ns.names.hold((state.parent_id, state.name)), state.lock:
            if state.handles:
                return  # opened again meanwhile: its last close gives it up
            state.discard_staging()
            record = self.journal.get(state.uid)
            state.modified = False  # no upload is owed
            # the version an earlier close journaled (inline, or copied aside before the first
            # change) goes to the bucket before the name is given back to the bucket's listing,
            # so no lookup finds the name missing meanwhile; a record of the staging file itself
            # named what is now given up
            if record is not None and record.get("staging") != state.staging_path:
                try:
                    recover_record(self.store, self.journal, record)
                except CryptfsError as exc:
                    log.warning("%s: the closed version stays in the journal for the next mount: %s", state.key, exc)
            else:
                self.journal.remove(state.uid)
            self.ns.abandon(state)
        log.warning("%s: changes given up after the cache disk filled", state.key)

    def _discard(self, state: FileState) -> None:
        """An unlinked file's last close: drop local data; delete its object if it kept it."""
        with state.lock:
            state.discard_staging()
            self.journal.remove(state.uid)
        with self._lock:
            for name in [k for k, v in self._hidden.items() if v is state]:
                del self._hidden[name]
        where = (state.parent_id, state.name)
        with self.ns.names.hold(where):
            if self.ns.release_doomed(state):
                self.store.delete_key(state.key)
                self.ns.remove(*where)  # a listing that saw it meanwhile does not bring it back

    # ------------------------------------------------------------ names

    @op
    def unlink(self, path):
        self._check_writable()
        hidden = self._hidden_name(path)
        if hidden is not None:  # libfuse's last close of a hidden file
            with self._lock:
                self._hidden.pop(hidden, None)
            return
        parent_id, name = self._where(path)
        linked = self._linked_id(path)
        self._unlink(parent_id, name)
        self._touch(parent_id)
        self._names_changed(linked)

    def _unlink(self, parent_id: bytes, name: bytes, hide_as: tuple[bytes, bytes] | None = None) -> None:
        with self.ns.names.hold((parent_id, name)):
            self._unlink_held(parent_id, name, hide_as)

    def _unlink_held(self, parent_id: bytes, name: bytes, hide_as: tuple[bytes, bytes] | None = None) -> None:
        """Unlink a name whose lock the caller holds."""
        with self._bound(parent_id, name) as node:
            if isinstance(node, Entry) and node.is_dir:
                raise IsADirectory()
            if node.link_key is not None and self._unlink_link(parent_id, name, node):
                live = self._live(node)
                if hide_as is not None and isinstance(live, FileState):  # open: fstat still works
                    with self._lock:
                        self._hidden[hide_as] = live
            elif isinstance(node, Entry):
                self.store.delete_key(node.key)
            else:
                open_now = self.ns.unlink_state(node)
                self.journal.remove(node.uid)
                if not open_now:
                    node.discard_staging()
                elif hide_as is not None:
                    with self._lock:
                        self._hidden[hide_as] = node
                if node.remote_at_key if node.basis is None else not open_now:
                    self.store.delete_key(node.key)
        self.ns.remove(parent_id, name)  # again, after the DELETE: no listing brings it back

    def _unlink_link(self, parent_id: bytes, name: bytes, node) -> bool:
        """One name of a hard-linked file goes: its link entry, then one link fewer (the file too
        with its last name). False when the caller is to finish: the last name of a file open
        under it, whose object goes at its last close."""
        with self._linked(node) as live:
            self.store.delete_key(self.store.entry_key(parent_id, name))
            if live is None:
                inode = self.store.unlinked(node)
                self._adopt(None, inode and replace(inode, link_key=node.link_key))
                return True
            if live is node and live.attrs.nlink <= 1:
                return False
            inode = self.store.unlinked(live.basis)
            self._adopt(live, inode)
            if live is node:  # it was open under this very name: it moves to another one
                other = self.ns.other_name(live.fk.file_id, (parent_id, name))
                if other is not None:
                    self.ns.rename_state(live, other.parent_id, other.name)
                    live.basis = replace(
                        live.basis, parent_id=other.parent_id, name=other.name, link_key=other.link_key
                    )
                else:  # its other names are unknown here: it stays open, as uploaded, under none
                    self.ns.unlink_state(live)
                    self.ns.claim(parent_id, name)
            return True

    def _new_name(self, path: str) -> tuple[bytes, bytes]:
        self._check_writable()
        return self._where(path)

    def _take_name(self, parent_id: bytes, name: bytes) -> None:
        """Before a create-only write: EEXIST if bound; an unlinked open file's object goes first."""
        try:
            self.ns.lookup(parent_id, name)
            raise AlreadyExists()
        except NotFound:
            pass
        doomed = self.ns.claim(parent_id, name)
        if doomed is not None:
            log.info("%s: deleting an unlinked open file's object early, its name is reused", doomed.key)
            self.store.delete_key(doomed.key)

    @op
    def mkdir(self, path, mode):
        parent_id, name = self._new_name(path)
        with self.ns.names.hold((parent_id, name)):
            self._take_name(parent_id, name)
            entry = mkdir_journaled(
                self.store, self.journal, parent_id, name, self._new_attrs(stat.S_IFDIR | stat.S_IMODE(mode), parent_id)
            )
            self.ns.put(parent_id, name, entry)
            self.ns.pointed_back(entry)
            self.ns.created_dir(entry.obj_id)
        self._touch(parent_id)

    @op
    def rmdir(self, path):
        self._check_writable()
        parent_id, name = self._where(path)
        with self.ns.names.hold((parent_id, name)):
            entry = self.ns.lookup(parent_id, name)
            if not (isinstance(entry, Entry) and entry.is_dir):
                raise NotADirectory()
            self.ns.follow(entry)
            self._remove_dir(entry)
            self.ns.remove(parent_id, name)
            self.ns.forget_dir(entry.obj_id)
        self._touch(parent_id)

    def _remove_dir(self, entry: Entry) -> None:
        """Delete an empty directory: empty of pending, uploading and uploaded entries alike."""
        if not self.ns.is_empty(entry.obj_id):
            raise DirectoryNotEmpty()
        for state in self.ns.doomed_in(entry.obj_id):  # unlinked files still open: their objects go now
            if self.ns.release_doomed(state):
                self.store.delete_key(state.key)
        rmdir_journaled(self.store, self.journal, entry)  # checks the bucket too: entries of another mount

    @op
    def symlink(self, path, target):
        self._make(path, os.fsencode(target), stat.S_IFLNK | 0o777)

    def _make(self, path: str, body: bytes, mode: int, rdev: int = 0) -> None:
        """A new small entry uploaded at once: a symlink (its target) or a special file (empty)."""
        parent_id, name = self._new_name(path)
        attrs = replace(self._new_attrs(mode, parent_id), rdev=rdev)
        with self.ns.names.hold((parent_id, name)):
            self._take_name(parent_id, name)
            entry = self.store.write_bytes(parent_id, name, body, attrs, create_only=True)
            self.ns.put(parent_id, name, entry)
        self._touch(parent_id)

    @op
    def rename(self, old, new, flags=0):
        self._check_writable()
        if flags & RENAME_EXCHANGE:
            raise InvalidArgument()
        src = self._where(old)
        dst = self._where(new)
        if HIDDEN_NAME.match(dst[1]) and not flags:  # libfuse hiding an open file: an unlink
            self._unlink(*src, hide_as=dst)
            self._touch(src[0])
            return
        with self.ns.names.hold(src, dst), self._bound(*src) as node:
            try:
                target = self.ns.lookup(*dst)
            except NotFound:
                target = None
            if target is not None and flags & RENAME_NOREPLACE:
                raise AlreadyExists()
            if src == dst or target is node or _same_file(target, node):
                return  # two names of one hard-linked file: POSIX says do nothing
            linked = {_file_id(n) for n in (node, target) if n is not None and n.link_key is not None}
            if isinstance(node, Entry) and node.is_dir:
                self._rename_dir(node, src, dst, target)
            else:
                self._rename_file(node, src, dst, target)
        self._touch(src[0], dst[0])
        for file_id in linked:
            self._names_changed(file_id)

    def _rename_dir(self, entry: Entry, src, dst, target) -> None:
        self.ns.follow(entry)
        if target is not None:
            if not (isinstance(target, Entry) and target.is_dir):
                raise NotADirectory()
            self._remove_dir(target)
            self.ns.remove(*dst)
            self.ns.forget_dir(target.obj_id)
        moved = rename_journaled(self.store, self.journal, _ctime_now(entry), dst[0], dst[1], None)
        self.ns.remove(*src)
        self.ns.put(dst[0], dst[1], moved)
        self.ns.pointed_back(moved)

    def _rename_file(self, node, src, dst, target) -> None:
        if isinstance(target, Entry) and target.is_dir:
            raise IsADirectory()
        if target is not None and (target.link_key is not None or node.link_key is not None):
            self._unlink_held(*dst)  # a hard-linked file gains or loses a name: unlink the target first
            target = None
        if node.link_key is not None:  # a link entry moves; the file's object stays
            with self._linked(node) as live:
                entry = node if isinstance(node, Entry) else replace(live.basis, attrs=live.attrs)
                moved = self.store.rename(entry, dst[0], dst[1])
                if live is not None and self.ns.bound(src[0], src[1], live):
                    self.ns.rename_state(live, *dst)
                    self._adopt(live, moved)
                    return
                self._adopt(live, moved)
            self.ns.remove(*src)
            self.ns.put(dst[0], dst[1], moved)
            return
        replaced_remote = isinstance(target, Entry)
        replaced_seen = target.etag if isinstance(target, Entry) else None  # what a shared commit replaces
        if isinstance(target, FileState):
            with target.lock:
                replaced_remote = target.basis is not None or target.remote_at_key
                replaced_seen = target.seen
                self._drop(target)
        self.ns.claim(*dst)  # our object takes the key: an unlinked open file there no longer owns it
        if isinstance(node, FileState) and node.modified and node.basis is not None:
            with self._space(node):
                self.wb.upload_now(node)  # the rename then copies what was written
            if not self.ns.bound(src[0], src[1], node):
                node = self.ns.lookup(*src)  # it settled into its uploaded entry
        if isinstance(node, FileState) and node.basis is None:
            # never uploaded: a local rename, journaled; the upload goes to the new key
            if node.remote_at_key:
                self.store.delete_key(node.key)  # an older object under the old name
            self.ns.rename_state(node, *dst)
            node.remote_at_key, node.seen = replaced_remote, replaced_seen
            node.touch(ctime_only=True)
            self.wb.rejournal(node)
            return
        if isinstance(node, FileState):
            if node.basis is None:
                raise CryptfsError("an uploaded file without its stored version")
            entry = replace(node.basis, attrs=node.attrs)
        else:
            entry = node
        moved = rename_journaled(
            self.store, self.journal, _ctime_now(entry), dst[0], dst[1], target if isinstance(target, Entry) else None
        )
        if isinstance(node, FileState):
            node.basis, node.attrs, node.seen = moved, entry_attrs(moved), moved.etag
            self.ns.rename_state(node, *dst)
            self.ns.record(moved)
        else:
            self.ns.remove(*src)
            self.ns.put(dst[0], dst[1], moved)

    def _drop(self, state: FileState) -> None:
        """A pending or open file replaced by a rename (its lock held)."""
        open_now = self.ns.unlink_state(state)
        self.journal.remove(state.uid)
        if not open_now:
            state.discard_staging()

    @op
    def link(self, target, source):
        """A new name (`target`) for the file at `source`: see store.link."""
        self._check_writable()
        src, dst = self._where(source), self._where(target)
        with self.ns.names.hold(src, dst):
            self._take_name(*dst)
            with self._bound(*src) as node:
                if isinstance(node, Entry) and node.is_dir:
                    raise NotPermitted()
                with self._linked(node) as live:  # an open file is uploaded first
                    old, new = self.store.link(node if live is None else replace(live.basis, attrs=live.attrs), *dst)
                    if live is not None:
                        live.inode_key = old.key
                    self._adopt(live, old)
                    if live is None or not self.ns.bound(src[0], src[1], live):
                        self.ns.put(
                            src[0],
                            src[1],
                            replace(old, parent_id=src[0], name=src[1], link_key=self.store.entry_key(*src)),
                        )
                self.ns.put(dst[0], dst[1], new)
        self._touch(dst[0])
        self._names_changed(new.obj_id)

    @op
    def mknod(self, path, mode, dev):
        """FIFOs, sockets and device nodes: an empty file object whose sealed attributes carry
        the type, mode and rdev (nothing is served through them)."""
        if stat.S_IFMT(mode) not in SPECIAL_TYPES:
            raise NotPermitted() if stat.S_IFMT(mode) else InvalidArgument()
        rdev = dev if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0
        self._make(path, b"", mode, rdev)

    @op
    def setxattr(self, path, name, value, options, position=0):
        raise Unsupported()

    @op
    def getxattr(self, path, name, position=0):
        raise Unsupported()

    @op
    def listxattr(self, path):
        return []

    @op
    def removexattr(self, path, name):
        raise Unsupported()

    @op
    def statfs(self, path):
        total = 1 << 50  # 1 PiB: object storage has no fixed size
        bsize = 4096
        return {
            "f_bsize": bsize,
            "f_frsize": bsize,
            "f_blocks": total // bsize,
            "f_bfree": total // bsize,
            "f_bavail": total // bsize,
            "f_files": 1 << 32,
            "f_ffree": 1 << 32,
            "f_favail": 1 << 32,
            "f_namemax": fmt.NAME_MAX,
        }

    # ------------------------------------------------------------ lifecycle

    def destroy(self, path):
        """Unmount: every closed file and every directory time goes to the bucket first."""
        states = self.ns.pending()
        if states:
            log.info("unmount: uploading %d pending file(s)", len(states))
        failed = self.wb.drain(states)
        left = [r for r in self.journal.records() if "staging" in r or "inline" in r]
        self.unmount_failed = max(len(failed), len(left))  # the journal is the truth: what it still holds
        self.wb.stop()
        self._stop.set()
        dirs_failed = self.ns.flush_dirs()
        if self.lease is not None:
            self.lease.pending = self.unmount_failed
            clean = not failed and not dirs_failed and not self.journal.records()
            if clean and self.lease.writable and not self.lease.shared:
                saved = self.ns.save(self.lease.epoch)
                log.info("unmount: %d directory listings saved for the next mount", saved)
        if failed:
            log.error(
                "unmount: %d file(s) could not be uploaded; they stay in the journal and upload at the next mount",
                len(failed),
            )
        elif dirs_failed:
            log.warning("unmount: times of %d directories could not be stored", dirs_failed)
        else:
            log.info("unmount: everything uploaded")


def _file_id(node) -> bytes:
    return node.fk.file_id if isinstance(node, FileState) else node.obj_id


def _same_file(a, b) -> bool:
    """Whether two names stand for one hard-linked file."""
    return a is not None and a.link_key is not None and b.link_key is not None and _file_id(a) == _file_id(b)


def _ctime_now(entry: Entry) -> Entry:
    """A renamed entry's ctime changes, as on a local filesystem."""
    return replace(entry, attrs=replace(entry_attrs(entry), ctime_ns=time.time_ns()))
