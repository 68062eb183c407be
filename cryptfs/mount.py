"""Mount wiring: backend -> store -> caches -> FUSE; background start, signals, unmount.

The only place that loads the FUSE binding (libfuse 3, chosen explicitly, since mfusepy
would pick libfuse 2 silently when both are installed).
"""

import ctypes.util
import hashlib
import logging
import os
import resource
import subprocess
import sys
import time
from typing import Any, cast

from . import localstate
from .backend.base import Backend
from .cache import BlockCache, DiskCache
from .config import VolumeSettings
from .errors import CryptfsError, UsageError
from .fs import CryptFS
from .lease import CacheLock, FencedBackend, Lease, cache_id, probe_conditions, take_journal
from .namespace import AttrDB, Namespace
from .reader import BlockReader
from .store import Store
from .volume import state_dir
from .writeback import Journal, recover

log = logging.getLogger(__name__)


def load_fuse() -> Any:
    """Import mfusepy bound to libfuse 3."""
    if "FUSE_LIBRARY_PATH" not in os.environ:
        lib = ctypes.util.find_library("fuse3")
        if lib is None:
            raise UsageError("libfuse 3 is not installed (apt-get install fuse3 libfuse3-3)")
        os.environ["FUSE_LIBRARY_PATH"] = lib
    import mfusepy

    return mfusepy


def check_mountpoint(path: str, nonempty: bool = False) -> str:
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise UsageError(f"mount point {path} does not exist or is not a directory")
    if os.path.ismount(path):
        raise UsageError(f"{path} is already a mount point")
    if os.listdir(path) and not nonempty:
        raise UsageError(f"mount point {path} is not empty (use -o nonempty to mount over it)")
    return path


def pidfile(mountpoint: str) -> str:
    digest = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:16]
    return os.path.join(state_dir(), "mounts", digest + ".pid")


def parse_options(opts: list[str]) -> dict:
    out: dict = {}
    for group in opts:
        for item in group.split(","):
            if not item:
                continue
            key, eq, value = item.partition("=")
            out[key] = value if eq else True
    return out


class Mount:
    """Everything a mounted volume needs, built from an opened store."""

    def __init__(
        self,
        store: Store,
        settings: VolumeSettings,
        read_only: bool = False,
        lease: Lease | None = None,
        shared: bool = False,
    ):
        self.store = store
        self.root = root = localstate.cache_dir(store.vol.volume_id, settings.cache_dir)
        self.journal = Journal(os.path.join(root, "journal"))
        self.staging = os.path.join(root, "staging")
        os.makedirs(self.staging, mode=0o700, exist_ok=True)
        disk = (
            DiskCache(os.path.join(root, "blocks"), settings.cache_size_mb * 1024 * 1024)
            if settings.cache_size_mb > 0
            else None
        )
        self.reader = BlockReader(
            store, BlockCache(settings.memory_cache_mb * 1024 * 1024), disk, workers=settings.workers
        )
        self.ns = Namespace(store, AttrDB(os.path.join(root, "attrs.db")), settings.attr_ttl, settings.workers)
        self.fs = CryptFS(
            store,
            self.ns,
            self.reader,
            self.journal,
            self.staging,
            writeback_delay=settings.writeback_delay,
            fsync_mode=settings.fsync,
            read_only=read_only,
            shared=shared,
        )
        self.fs.lease = lease
        if lease is not None and not lease.shared:  # under the lease, the mount's own listings are the truth
            self.ns.authoritative = lambda: lease.writable
            taken = self.ns.load(lease.unchanged_since)
            if taken:
                log.info("the volume is unchanged since the last unmount: %d directory listings reused", taken)

    def recover(self) -> None:
        done = recover(self.store, self.journal)
        if done:
            log.warning("finished %d upload(s) left by an earlier mount", len(done))
        live = {r["uid"] for r in self.journal.records()}
        for name in os.listdir(self.staging):  # staging files nobody journaled: never closed, so not owed
            if name.split(".")[0] not in live:
                os.unlink(os.path.join(self.staging, name))


def hold(store: Store, settings: VolumeSettings, read_only: bool, break_lease: bool = False, shared: bool = False):
    """Before the mount forks: lock the cache directory; for a read-write mount take the lease
    (exclusive, or --shared: see docs/lease.md) and decide whether the journal found there may
    be replayed (lease.py). -> (lock, lease)."""
    root = localstate.cache_dir(store.vol.volume_id, settings.cache_dir)
    lock = CacheLock(root, store.vol.url)
    if read_only:
        return lock, None
    try:
        multipart_ok = probe_conditions(store) if shared else True
        lease = Lease(store, cache_id(root), settings.lease_duration, shared=shared)
        lease.multipart_ok = multipart_ok
        prev, existed = lease.acquire(break_lease)
        try:
            journal = Journal(os.path.join(root, "journal"))
            records = journal.records()
            journal.close()
            uploads = [r for r in records if "runs" in r]
            take_journal(
                root,
                os.path.join(root, "journal"),
                os.path.join(root, "staging"),
                prev,
                existed,
                lease.epoch,
                len(records),
                conditional=bool(uploads) and all(r.get("expect") is not None for r in uploads),
            )
        except BaseException:
            lease.release()
            raise
    except BaseException:
        lock.close()
        raise
    return lock, lease


def run(
    store: Store, settings: VolumeSettings, mountpoint: str, options: dict, held=None, shared: bool = False
) -> None:
    read_only = bool(options.pop("ro", False))
    lock, lease = held if held is not None else hold(store, settings, read_only, shared=shared)
    lock.note_pid()
    try:
        if lease is not None:
            lease.start()
            store.backend = cast(Backend, FencedBackend(store.backend, lease))  # delegates all but writes
        _run(store, settings, mountpoint, options, read_only, lease, shared)
    finally:
        if lease is not None:
            lease.release()
        lock.close()


def _run(
    store: Store,
    settings: VolumeSettings,
    mountpoint: str,
    options: dict,
    read_only: bool,
    lease: Lease | None,
    shared: bool = False,
) -> None:
    mfusepy = load_fuse()
    fuse_base: Any = mfusepy.FUSE  # loaded at run time, bound to libfuse 3
    mount = Mount(store, settings, read_only, lease, shared and not read_only)
    if not read_only:  # a read-only mount writes nothing, not even what an earlier mount left
        mount.recover()
    fs = mount.fs

    class FUSE(fuse_base):
        """mfusepy drops what libfuse 3 passes beyond fusepy's API: rename's flags
        (RENAME_NOREPLACE/EXCHANGE) and the open file of truncate/chmod/chown/utimens."""

        def _path(self, path):
            return None if path is None else path.decode(self.encoding, self.errors)

        def rename_fuse_3(self, old, new, flags):
            return self.operations.rename(self._path(old), self._path(new), flags)

        def truncate_fuse_3(self, path, length, fip):
            return self.operations.truncate(self._path(path), length, fip.contents.fh if fip else None)

        def chmod_fuse_3(self, path, mode, fip):
            return self.operations.chmod(self._path(path), mode, fip.contents.fh if fip else None)

        def chown_fuse_3(self, path, uid, gid, fip):
            uid = -1 if mfusepy.c_uid_t(uid + 1).value == 0 else uid
            gid = -1 if mfusepy.c_gid_t(gid + 1).value == 0 else gid
            return self.operations.chown(self._path(path), uid, gid, fip.contents.fh if fip else None)

        def utimens_fuse_3(self, path, buf, fip):
            times = None
            if buf:
                times = (_timespec_ns(buf.contents.actime), _timespec_ns(buf.contents.modtime))
            return self.operations.utimens(self._path(path), times, fip.contents.fh if fip else None)

    def init_with_config(conn, config):
        if config is not None:
            config.use_ino = 1
            # hard_remove stays off, so fstat of an open unlinked file works (the kernel sends it
            # without a handle); libfuse's .fuse_hidden* rename is an unlink to us (fs.py)
            config.nullpath_ok = 1
            config.auto_cache = 1  # page cache kept while mtime and size are unchanged
            # a shared mount asks every time: the namespace's --attr-ttl alone bounds how long
            # another mount's change stays unseen, and auto_cache then drops stale pages at open
            config.attr_timeout = config.entry_timeout = config.negative_timeout = 0.0 if shared else 1.0
        if conn is not None:
            conn.max_readahead = 1024 * 1024

    fs.init_with_config = init_with_config  # type: ignore[attr-defined]  # mfusepy looks for it

    kwargs = dict(options)
    kwargs.setdefault("fsname", "cryptfs")
    kwargs.setdefault("subtype", "cryptfs")
    kwargs["default_permissions"] = True
    if read_only:
        kwargs["ro"] = True
    kwargs.pop("nonempty", None)
    try:
        FUSE(fs, mountpoint, foreground=True, nothreads=False, **kwargs)
    finally:
        _write_status(mountpoint, fs.unmount_failed, fs.wb.conflicts)
        mount.ns.close()
        mount.reader.close()


UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2


def _timespec_ns(ts) -> int | None:
    """Nanoseconds, the current time for UTIME_NOW, None for UTIME_OMIT."""
    if ts.tv_nsec == UTIME_OMIT:
        return None
    if ts.tv_nsec == UTIME_NOW:
        return time.time_ns()
    return ts.tv_sec * 10**9 + ts.tv_nsec


def daemonize_and_run(
    store: Store,
    settings: VolumeSettings,
    mountpoint: str,
    options: dict,
    foreground: bool,
    log_path: str,
    break_lease: bool = False,
    shared: bool = False,
) -> int:
    """Mount; in the background unless foreground. Returns once mounted (or failed)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core dump ever holds unwrapped keys
    os.umask(0o077)  # every file of the mount's local state is the user's alone
    # the log is checked before anything else is made in the cache directory
    logfd = None if foreground else localstate.private_file(log_path, os.O_WRONLY | os.O_APPEND)
    try:
        held = hold(store, settings, bool(options.get("ro")), break_lease, shared)  # refusals reach the caller
    except BaseException:
        if logfd is not None:
            os.close(logfd)
        raise
    if logfd is None:
        _write_pid(mountpoint)
        run(store, settings, mountpoint, options, held, shared)
        return 0
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the mount process
        os.close(read_fd)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(logfd, 1)
        os.dup2(logfd, 2)
        code = 0
        try:
            _write_pid(mountpoint)
            os.write(write_fd, b"S")
            os.close(write_fd)
            run(store, settings, mountpoint, options, held, shared)
        except BaseException as exc:  # noqa: BLE001 - the process must end with a code
            log.error("mount failed: %s", exc)
            code = 1
        finally:
            try:
                os.unlink(pidfile(mountpoint))
            except OSError:
                pass
            logging.shutdown()
            os._exit(code)
    os.close(write_fd)
    os.close(logfd)
    os.read(read_fd, 1)
    os.close(read_fd)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if os.path.ismount(mountpoint):
            return 0
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            print(f"cryptfs: error: the mount process exited before mounting; see {log_path}", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(f"cryptfs: error: mount did not appear within 60 s; see {log_path}", file=sys.stderr)
    return 1


def status_file(mountpoint: str) -> str:
    """What the mount process says of its unmount, for `cryptfs umount` to report."""
    return pidfile(mountpoint)[: -len(".pid")] + ".status"


def _write_status(mountpoint: str, failed: int | None, conflicts: int = 0) -> None:
    try:
        with open(status_file(mountpoint), "w") as f:
            f.write(("unknown" if failed is None else str(failed)) + f" {conflicts}")
    except OSError as exc:
        log.warning("could not record the unmount's outcome: %s", exc)


def _read_status(mountpoint: str) -> str | None:
    try:
        with open(status_file(mountpoint)) as f:
            return f.read().strip()
    except OSError:
        return None
    finally:
        try:
            os.unlink(status_file(mountpoint))
        except OSError:
            pass


def _write_pid(mountpoint: str) -> None:
    path = pidfile(mountpoint)
    localstate.private_dir(state_dir())
    localstate.private_dir(os.path.dirname(path))
    with open(path, "w") as f:
        f.write(str(os.getpid()))


def unmount(mountpoint: str, timeout: float | None = None) -> int:
    """Unmount, then wait until the mount process has uploaded everything and exited."""
    mountpoint = os.path.abspath(mountpoint)
    if not os.path.ismount(mountpoint):
        raise UsageError(f"{mountpoint} is not mounted")
    try:
        with open(pidfile(mountpoint)) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        pid = None
    try:
        os.unlink(status_file(mountpoint))  # left by an earlier mount
    except OSError:
        pass
    tool = "fusermount3" if _which("fusermount3") else "fusermount"
    result = subprocess.run([tool, "-u", mountpoint], capture_output=True, text=True)
    if result.returncode != 0:
        raise CryptfsError(f"unmount failed: {result.stderr.strip() or result.stdout.strip()}")
    if pid is None:
        return 0
    start = time.monotonic()
    told = False
    while _alive(pid):
        if not told and time.monotonic() - start > 2:
            print("cryptfs: waiting for pending uploads to finish...", file=sys.stderr)
            told = True
        if timeout is not None and time.monotonic() - start > timeout:
            print(
                "cryptfs: error: uploads still pending; they finish in the background (or at the next mount)",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.1)
    failed, _, conflicts = (_read_status(mountpoint) or "").partition(" ")
    if conflicts not in ("", "0"):
        print(
            f"cryptfs: {conflicts} conflict copy(ies) made (another mount changed the same files; see the mount log)",
            file=sys.stderr,
        )
    if failed not in ("", "0"):
        what = (
            "the mount ended before uploading what was pending"
            if failed == "unknown"
            else f"{failed} closed file(s) could not be uploaded"
        )
        raise CryptfsError(
            f"{what}; they stay in the local journal and upload at the next mount of this "
            "volume with the same cache directory (see the mount log)"
        )
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours has finished
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _which(name: str) -> bool:
    return any(os.access(os.path.join(d, name), os.X_OK) for d in os.environ.get("PATH", "").split(":"))
