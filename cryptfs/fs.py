"""The FUSE operations: a thin shell over namespace, handles and write-back.

Paths arrive as str (surrogate-escaped bytes); errors leave as errno through `errno_of`.
`_lock` guards `files` (pending or open files by (directory id, name)), `fhs` and `dirs`.
"""

import errno
import functools
import itertools
import logging
import os
import stat
import threading
import time
from dataclasses import replace

from . import format as fmt
from .errors import AlreadyExists, CryptfsError, NotFound
from .handles import FileState
from .namespace import Namespace
from .reader import BlockReader
from .store import Entry, Store
from .writeback import Journal, WriteBack, rename_journaled

log = logging.getLogger(__name__)

DIR_SIZE = 4096  # what local filesystems show, so tools comparing trees see no difference
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class FuseError(OSError):
    def __init__(self, code: int):
        super().__init__(code, os.strerror(code))


def op(func):
    """Translate cryptfs errors into errno; log anything unexpected as EIO."""
    @functools.wraps(func)
    def wrapper(self, *args):
        try:
            return func(self, *args)
        except CryptfsError as exc:
            if exc.errno in (errno.EIO, errno.ENOSPC, errno.EACCES):  # the rest is ordinary use
                log.error("%s %s: %s", func.__name__, args[0] if args else "", exc)
            raise FuseError(exc.errno) from None
        except OSError:
            raise
        except Exception:
            log.exception("%s%s failed", func.__name__, args[:1])
            raise FuseError(errno.EIO) from None
    return wrapper


def split(path: str) -> list[bytes]:
    return [p for p in os.fsencode(path).split(b"/") if p]


def ino_of(obj_id: bytes) -> int:
    return 1 if obj_id == fmt.ROOT_DIR_ID else (int.from_bytes(obj_id[:8], "big") & (2 ** 63 - 1)) or 2


class CryptFS:
    use_ns = True

    def __init__(self, store: Store, ns: Namespace, reader: BlockReader, journal: Journal, staging_dir: str,
                 writeback_delay: float = 2.0, fsync_mode: str = "upload", read_only: bool = False):
        self.store, self.ns, self.reader, self.journal = store, ns, reader, journal
        self.staging_dir = staging_dir
        self.fsync_mode = fsync_mode
        self.read_only = read_only
        self.wb = WriteBack(store, journal, writeback_delay, self._uploaded)
        self.files: dict[tuple[bytes, bytes], FileState] = {}
        self.fhs: dict[int, FileState] = {}
        self.dirs: dict[int, bytes] = {}  # open directory handles: their directory ids
        self._fh = itertools.count(1)
        self._lock = threading.Lock()
        self._symlinks: dict[tuple[bytes, str], bytes] = {}

    # ------------------------------------------------------------ helpers

    def _ctx(self) -> tuple[int, int]:
        try:
            from mfusepy import fuse_get_context
            uid, gid, _ = fuse_get_context()
            return uid, gid
        except Exception:
            return os.getuid(), os.getgid()

    def _new_attrs(self, mode: int) -> fmt.Attrs:
        uid, gid = self._ctx()
        now = time.time_ns()
        return fmt.Attrs(mode, uid, gid, now, now)

    def _parent(self, parts: list[bytes]) -> Entry:
        parent = self.ns.resolve(parts[:-1])
        if not parent.is_dir:
            raise FuseError(errno.ENOTDIR)
        return parent

    def _find(self, path: str) -> tuple[Entry | None, FileState | None, bytes | None, bytes]:
        """(entry, pending state, parent id, name) for a path; NotFound if it has neither."""
        parts = split(path)
        if not parts:
            return self.ns.root, None, None, b""
        parent = self._parent(parts)
        name = parts[-1]
        fmt.check_name(name)
        with self._lock:
            state = self.files.get((parent.obj_id, name))
        if state is not None:
            return None, state, parent.obj_id, name
        return self.ns.lookup(parent.obj_id, name), None, parent.obj_id, name

    def _check_writable(self) -> None:
        if self.read_only:
            raise FuseError(errno.EROFS)

    def _stat(self, entry: Entry) -> dict:
        a = entry.attrs
        size = DIR_SIZE if entry.is_dir else entry.size
        return {"st_mode": a.mode, "st_ino": ino_of(entry.obj_id), "st_nlink": 2 if entry.is_dir else 1,
                "st_uid": a.uid, "st_gid": a.gid, "st_size": size, "st_atime": a.mtime_ns,
                "st_mtime": a.mtime_ns, "st_ctime": a.ctime_ns, "st_blksize": self.store.block_size,
                "st_blocks": -(-size // 512)}

    # ------------------------------------------------------------ attributes

    @op
    def getattr(self, path, fh=None):
        state = self.fhs.get(fh) if fh else None
        if state is not None:
            return self._stat(state.entry())
        entry, state, _, _ = self._find(path)
        return self._stat(state.entry() if state else entry)

    @op
    def opendir(self, path):
        entry, _, _, _ = self._find(path)
        if not entry or not entry.is_dir:
            raise FuseError(errno.ENOTDIR)
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
        # pending files first: one uploaded meanwhile is then in one list or the other
        with self._lock:
            pending = [s for (d, _), s in self.files.items() if d == dir_id]
        # inode numbers must be non-zero, or readdir(3) hides the entry
        items = {e.name: (e.attrs.mode, ino_of(e.obj_id)) for e in self.ns.listdir(dir_id)}
        for state in pending:
            items[state.name] = (state.attrs.mode, ino_of(state.fk.file_id))
        here = {"st_mode": stat.S_IFDIR, "st_ino": ino_of(dir_id)}
        return [(".", here, 0), ("..", {"st_mode": stat.S_IFDIR, "st_ino": 1}, 0)] + [
            (os.fsdecode(name), {"st_mode": mode, "st_ino": ino}, 0) for name, (mode, ino) in sorted(items.items())]

    @op
    def readlink(self, path):
        entry, state, _, _ = self._find(path)
        if state is not None:
            return os.fsdecode(state.read(0, state.size))
        if not entry.is_symlink:
            raise FuseError(errno.EINVAL)
        key = (entry.obj_id, entry.etag)
        target = self._symlinks.get(key)
        if target is None:
            target = self._symlinks[key] = self.store.read_all(entry)
        return os.fsdecode(target)

    def _set_attrs(self, path: str | None, change, fh: int | None) -> None:
        self._check_writable()
        state = self.fhs.get(fh) if fh else None
        entry = None
        if state is None:
            entry, state, _, _ = self._find(path)
        if state is None:
            self.ns.put(self.store.set_attrs(entry, change(entry.attrs)))
            return
        with state.lock:
            state.attrs = change(state.attrs)
            state.changes += 1
            if state.modified or state.basis is None:
                self.wb.rejournal(state)  # the upload carries the new attributes
                return
            new = state.basis = self.store.set_attrs(state.basis, state.attrs)
        self.ns.put(new)

    @op
    def chmod(self, path, mode, fh=None):
        now = time.time_ns()
        self._set_attrs(path, lambda a: replace(a, mode=stat.S_IFMT(a.mode) | stat.S_IMODE(mode), ctime_ns=now),
                        fh)

    @op
    def chown(self, path, uid, gid, fh=None):
        now = time.time_ns()
        self._set_attrs(path, lambda a: replace(a, uid=a.uid if uid in (-1, 0xFFFFFFFF) else uid,
                                                gid=a.gid if gid in (-1, 0xFFFFFFFF) else gid, ctime_ns=now), fh)

    @op
    def utimens(self, path, times=None, fh=None):
        now = time.time_ns()
        mtime = times[1] if times else now
        if mtime is None:  # only atime, which is not stored
            return 0
        self._set_attrs(path, lambda a: replace(a, mtime_ns=int(mtime), ctime_ns=now), fh)

    # ------------------------------------------------------------ files

    def _register(self, state: FileState) -> int:
        fh = next(self._fh)
        with self._lock:
            self.files[(state.parent_id, state.name)] = state
            self.fhs[fh] = state
            state.handles += 1
        return fh

    @op
    def create(self, path, mode, flags=0):
        self._check_writable()
        parts = split(path)
        parent = self._parent(parts)
        name = parts[-1]
        fmt.check_name(name)
        state = FileState.create(self.store, self.reader, self.staging_dir, parent.obj_id, name,
                                 self._new_attrs(stat.S_IFREG | stat.S_IMODE(mode)))
        try:
            existing = self.ns.lookup(parent.obj_id, name)
            if existing.is_dir:
                raise FuseError(errno.EISDIR)
            state.fk, state.wrapped = self.store.new_file_key(existing.obj_id)  # keep the file id (st_ino)
            state.header = fmt.make_header(state.fk, self.store.block_size)
            state.remote_at_key = True
        except NotFound:
            pass
        return self._register(state)

    @op
    def open(self, path, flags):
        writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC)
        if writing:
            self._check_writable()
        entry, state, parent_id, name = self._find(path)
        if state is None:
            if entry.is_dir:
                raise FuseError(errno.EISDIR)
            state = FileState.open_existing(self.store, self.reader, self.staging_dir, entry)
        fh = self._register(state)
        if flags & os.O_TRUNC and (state.size or state.basis is not None):
            state.rewrite_from_scratch()
        return fh

    @op
    def read(self, path, size, offset, fh):
        return self.fhs[fh].read(offset, size)

    @op
    def write(self, path, data, offset, fh):
        return self.fhs[fh].write(offset, data)

    @op
    def truncate(self, path, length, fh=None):
        self._check_writable()
        state = self.fhs.get(fh) if fh else None
        temporary = False
        if state is None:
            entry, state, _, _ = self._find(path)
            if state is None:
                if entry.is_dir:
                    raise FuseError(errno.EISDIR)
                state = FileState.open_existing(self.store, self.reader, self.staging_dir, entry)
                fh = self._register(state)
                temporary = True
        if length == 0:
            state.rewrite_from_scratch()
        else:
            state.truncate(length)
        if temporary:
            self.flush(path, fh)
            self.release(path, fh)

    @op
    def flush(self, path, fh):
        state = self.fhs[fh]
        self.wb.journal_state(state)
        return self._report(state)

    def _report(self, state: FileState) -> int:
        if state.error is not None:
            exc, state.error = state.error, None
            log.error("reporting failed upload of %s: %s", state.key, exc)
            raise FuseError(errno.EIO)
        return 0

    @op
    def fsync(self, path, datasync, fh):
        state = self.fhs[fh]
        if self.fsync_mode == "journal":
            self.wb.journal_state(state)
        else:
            try:
                self.wb.upload_now(state)
            except CryptfsError as exc:
                log.error("fsync upload of %s failed: %s", state.key, exc)
                raise FuseError(errno.EIO) from None
        return self._report(state)

    @op
    def release(self, path, fh):
        with self._lock:
            state = self.fhs.pop(fh)
            state.handles -= 1
            last = state.handles == 0
        if not last:
            return 0
        if state.unlinked:
            self._discard(state)
        elif state.modified:
            self.wb.journal_state(state)
            self.wb.schedule(state)
        else:
            self._forget(state)
        return 0

    def _forget(self, state: FileState) -> None:
        with self._lock:
            if state.handles == 0 and not state.modified and \
                    self.files.get((state.parent_id, state.name)) is state:
                del self.files[(state.parent_id, state.name)]

    def _uploaded(self, state: FileState, entry: Entry) -> None:
        self.ns.put(entry)
        self._forget(state)

    def _discard(self, state: FileState) -> None:
        """An unlinked file's last close: drop local data, delete what the bucket had for it."""
        with state.lock:
            state.discard_staging()
            self.journal.remove(state.uid)
            basis, obsolete = state.basis, list(state.obsolete)
        if basis is not None:
            try:  # unless the name was reused meanwhile
                if self.store.backend.head(self.store.abs_key(basis.key)).etag == basis.etag:
                    self.store.backend.delete(self.store.abs_key(basis.key))
            except NotFound:
                pass
        for key in obsolete:
            self.store.backend.delete(self.store.abs_key(key))

    # ------------------------------------------------------------ names

    @op
    def unlink(self, path):
        self._check_writable()
        entry, state, parent_id, name = self._find(path)
        if state is None:
            if entry.is_dir:
                raise FuseError(errno.EISDIR)
            self.store.remove(entry)
        else:
            with self._lock:
                self.files.pop((parent_id, name), None)
                state.unlinked = True
                open_now = state.handles > 0
            self.journal.remove(state.uid)
            if not open_now:
                self._discard(state)
            if not open_now or state.basis is None:
                # an older object under this name (a file created over it) goes too
                self.store.backend.delete(self.store.abs_key(self.store.entry_key(parent_id, name)))
        self.ns.remove(parent_id, name)

    def _new_name(self, path: str) -> tuple[bytes, bytes]:
        """(parent id, name) for an entry about to be made; EEXIST if a pending file has it."""
        self._check_writable()
        parts = split(path)
        parent = self._parent(parts)
        name = parts[-1]
        fmt.check_name(name)
        with self._lock:
            if (parent.obj_id, name) in self.files:
                raise FuseError(errno.EEXIST)
        return parent.obj_id, name

    @op
    def mkdir(self, path, mode):
        parent_id, name = self._new_name(path)
        self.ns.put(self.store.mkdir(parent_id, name, self._new_attrs(stat.S_IFDIR | stat.S_IMODE(mode))))

    @op
    def rmdir(self, path):
        self._check_writable()
        entry, state, parent_id, name = self._find(path)
        if state is not None or not entry.is_dir:
            raise FuseError(errno.ENOTDIR)
        if not parent_id:
            raise FuseError(errno.EBUSY)
        with self._lock:
            if any(d == entry.obj_id for (d, _) in self.files):
                raise FuseError(errno.ENOTEMPTY)
        self.store.remove(entry)
        self.ns.remove(parent_id, name)
        self.ns.forget_dir(entry.obj_id)

    @op
    def symlink(self, path, target):
        parent_id, name = self._new_name(path)
        try:
            entry = self.store.write_bytes(parent_id, name, os.fsencode(target),
                                           self._new_attrs(stat.S_IFLNK | 0o777), create_only=True)
        except AlreadyExists:
            raise FuseError(errno.EEXIST) from None
        self.ns.put(entry)

    @op
    def rename(self, old, new, flags=0):
        self._check_writable()
        if flags & RENAME_EXCHANGE:
            raise FuseError(errno.EINVAL)
        entry, state, old_parent, old_name = self._find(old)
        new_parts = split(new)
        new_parent = self._parent(new_parts).obj_id
        new_name = new_parts[-1]
        fmt.check_name(new_name)
        try:
            t_entry, t_state, _, _ = self._find(new)
        except NotFound:
            t_entry, t_state = None, None
        if (t_entry or t_state) and flags & RENAME_NOREPLACE:
            raise FuseError(errno.EEXIST)
        if (old_parent, old_name) == (new_parent, new_name):
            return
        src_is_dir = entry is not None and entry.is_dir
        if t_entry is not None and t_entry.is_dir != src_is_dir:
            raise FuseError(errno.EISDIR if t_entry.is_dir else errno.ENOTDIR)
        replaced_remote = t_entry is not None
        if t_state is not None:
            if src_is_dir:
                raise FuseError(errno.ENOTDIR)
            self._drop_target(t_state, new_parent, new_name)
            replaced_remote = t_state.remote_at_key or t_state.basis is not None
            if state is not None:
                state.obsolete += t_state.obsolete
        if state is not None and state.basis is None:
            # never uploaded: a local rename, journaled; the upload goes to the new key, and
            # what the bucket still holds under the old key goes once it is done
            with self._lock:
                self.files.pop((old_parent, old_name), None)
                if state.remote_at_key:
                    state.obsolete.append(state.key)
                state.parent_id, state.name = new_parent, new_name
                state.remote_at_key = replaced_remote
                self.files[(new_parent, new_name)] = state
            with state.lock:
                state.touch(ctime_only=True)
            self.wb.rejournal(state)
            self.ns.remove(old_parent, old_name)
            return
        if state is not None:
            if state.modified:
                self.wb.upload_now(state)
            entry = state.basis
        target = t_entry if t_entry is not None and t_state is None else None
        moved = rename_journaled(self.store, self.journal, entry, new_parent, new_name, target)
        if state is not None:
            with self._lock:
                self.files.pop((old_parent, old_name), None)
                with state.lock:
                    state.parent_id, state.name, state.basis = new_parent, new_name, moved
                self.files[(new_parent, new_name)] = state
        self.ns.remove(old_parent, old_name)
        self.ns.put(moved)

    def _drop_target(self, t_state: FileState, parent_id: bytes, name: bytes) -> None:
        with self._lock:
            self.files.pop((parent_id, name), None)
            t_state.unlinked = True
            open_now = t_state.handles > 0
        self.journal.remove(t_state.uid)
        if not open_now:
            with t_state.lock:
                t_state.discard_staging()

    @op
    def link(self, target, source):
        raise FuseError(errno.EPERM)

    @op
    def mknod(self, path, mode, dev):
        raise FuseError(errno.EPERM)

    @op
    def setxattr(self, path, name, value, options, position=0):
        raise FuseError(errno.ENOTSUP)

    @op
    def getxattr(self, path, name, position=0):
        raise FuseError(errno.ENOTSUP)

    @op
    def listxattr(self, path):
        return []

    @op
    def removexattr(self, path, name):
        raise FuseError(errno.ENOTSUP)

    @op
    def statfs(self, path):
        total = 1 << 50  # 1 PiB: object storage has no fixed size
        bsize = 4096
        return {"f_bsize": bsize, "f_frsize": bsize, "f_blocks": total // bsize, "f_bfree": total // bsize,
                "f_bavail": total // bsize, "f_files": 1 << 32, "f_ffree": 1 << 32, "f_favail": 1 << 32,
                "f_namemax": fmt.NAME_MAX}

    # ------------------------------------------------------------ lifecycle

    def pending_states(self) -> list[FileState]:
        with self._lock:
            return [s for s in self.files.values() if s.modified and not s.unlinked]

    def destroy(self, path):
        states = self.pending_states()
        if states:
            log.info("unmount: uploading %d pending file(s)", len(states))
        failed = self.wb.drain(states)
        self.wb.stop()
        if failed:
            log.error("unmount: %d file(s) could not be uploaded; they stay in the journal and upload "
                      "at the next mount", len(failed))
        else:
            log.info("unmount: everything uploaded")
