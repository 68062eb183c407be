"""Mount wiring: backend -> store -> caches -> FUSE; background start, signals, unmount.

The only place that loads the FUSE binding (libfuse 3, chosen explicitly, since mfusepy
would pick libfuse 2 silently when both are installed).
"""

import ctypes.util
import logging
import os
import resource
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, cast

from . import __version__, control, localstate, logs
from .backend.base import Backend
from .cache import BlockCache, DiskCache
from .config import VolumeSettings, cache_bytes
from .errors import EXIT_ERROR, EXIT_USAGE, CryptfsError, UsageError
from .fs import CryptFS
from .lease import CacheLock, FencedBackend, Lease, cache_id, probe_conditions, take_journal
from .namespace import AttrDB, Namespace
from .reader import BlockReader
from .monitor import Counters, CountingBackend, ErrorCounter
from .progress import Bar, human, shown
from .store import Store
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
        mountpoint: str = "",
    ):
        self.store, self.settings, self.mountpoint = store, settings, mountpoint
        self.url = store.vol.url.rstrip("/")  # as mount, df and findmnt show the source
        self.state = "mounting"  # then "mounted", "unmounting"
        self.counters = Counters()
        store.backend = cast(Backend, CountingBackend(store.backend, self.counters))
        self.root = root = localstate.cache_dir(store.vol.volume_id, settings.cache_dir)
        self.journal = Journal(os.path.join(root, "journal"))
        self.staging = os.path.join(root, "staging")
        os.makedirs(self.staging, mode=0o700, exist_ok=True)
        localstate.keep_free(settings.min_free)
        disk = DiskCache(os.path.join(root, "blocks"), cache_bytes(settings)) if cache_bytes(settings) > 0 else None
        self.memory = BlockCache(settings.memory_cache_mb * 1024 * 1024)
        self.disk = disk
        self.reader = BlockReader(store, self.memory, disk, workers=settings.workers)
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
            staging_limit=settings.staging_size,
        )
        self.fs.lease = lease
        if lease is not None and not lease.shared:  # under the lease, the mount's own listings are the truth
            self.ns.authoritative = lambda: lease.writable
            taken = self.ns.load(lease.unchanged_since)
            if taken:
                log.info("the volume is unchanged since the last unmount: %d directory listings reused", taken)

    def status(self) -> dict:
        """What `cryptfs status` shows (its --json form; docs/operations.md lists the fields)."""
        now = time.time()
        owed = [s for s in self.ns.pending() if s.handles == 0]  # closed files not yet in the bucket
        since = [s.pending_since for s in owed if s.pending_since is not None]
        r = self.reader
        return {
            "volume": self.url,
            "volume_id": self.store.vol.volume_id,
            "mountpoint": self.mountpoint,
            "pid": os.getpid(),
            "state": self.state,
            "read_only": self.fs.read_only,
            "started": self.counters.started,
            "uptime": round(now - self.counters.started, 1),
            "pending": {
                "files": len(owed),
                "bytes": sum(s.size for s in owed),
                "oldest": min(since) if since else None,
                "oldest_age": round(now - min(since), 1) if since else None,
            },
            "open_modified": sum(1 for s in self.ns.pending() if s.handles > 0),
            "uploads_in_flight": self.fs.wb.in_flight(),
            "cache": {
                "memory_bytes": self.memory.used,
                "memory_limit": self.settings.memory_cache_mb * 1024 * 1024,
                "disk_bytes": self.disk.used if self.disk else 0,
                "disk_limit": self.disk.max_bytes if self.disk else 0,
                "disk_free": localstate.free_bytes(self.root),
                "min_free": self.settings.min_free,
                "memory_hits": r.memory_hits,
                "memory_misses": r.memory_misses,
                "memory_hit_rate": _rate(r.memory_hits, r.memory_misses),
                "disk_hits": r.disk_hits,
                "disk_misses": r.disk_misses,
                "disk_hit_rate": _rate(r.disk_hits, r.disk_misses),
            },
            **self.counters.snapshot(),
            "conflicts": self.fs.wb.conflicts,  # conflict copies made (--shared)
        }

    def recover(self) -> None:
        done = recover(self.store, self.journal)
        if done:
            log.warning("finished %d upload(s) left by an earlier mount", len(done))
        live = {r["uid"] for r in self.journal.records()}
        for name in os.listdir(self.staging):  # staging files nobody journaled: never closed, so not owed
            if name.split(".")[0] not in live:
                os.unlink(os.path.join(self.staging, name))


def _rate(hits: int, misses: int) -> float | None:
    return round(hits / (hits + misses), 3) if hits + misses else None


def notify(message: str) -> None:
    """sd_notify(3): one datagram to $NOTIFY_SOCKET, when a service manager gave one."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path  # "@": the abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.warning("could not notify the service manager at %s: %s", path, exc)


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
    store: Store,
    settings: VolumeSettings,
    mountpoint: str,
    options: dict,
    held=None,
    ready: Callable[[], None] = lambda: None,
    shared: bool = False,
) -> None:
    """Mount and serve until unmounted; `ready()` once the mount answers."""
    read_only = bool(options.pop("ro", False))
    lock, lease = held if held is not None else hold(store, settings, read_only, shared=shared)
    lock.note_pid()
    try:
        if lease is not None:
            lease.start()
            store.backend = cast(Backend, FencedBackend(store.backend, lease))  # delegates all but writes
        _run(store, settings, mountpoint, options, read_only, lease, ready, shared)
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
    ready: Callable[[], None],
    shared: bool = False,
) -> None:
    mfusepy = load_fuse()
    fuse_base: Any = mfusepy.FUSE  # loaded at run time, bound to libfuse 3
    mount = Mount(store, settings, read_only, lease, shared and not read_only, mountpoint=mountpoint)
    errors = ErrorCounter(mount.counters)
    logging.getLogger().addHandler(errors)
    if not read_only:  # a read-only mount writes nothing, not even what an earlier mount left
        mount.recover()
    fs = mount.fs
    server = control.Server(mountpoint, mount.status)

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
        # the kernel waits for this call to return before the mount answers: announce from aside
        threading.Thread(target=announce, name="announce", daemon=True).start()

    def announce():
        deadline = time.monotonic() + 60
        while not os.path.ismount(mountpoint) and time.monotonic() < deadline:
            time.sleep(0.02)
        mount.state = "mounted"
        log.info("mounted %s on %s (pid %d)", mount.url, mountpoint, os.getpid())
        ready()

    destroy = fs.destroy

    owed: dict = {}

    def unmounting(path):
        mount.state = "unmounting"
        notify("STOPPING=1")
        try:
            owed.update(mount.status()["pending"])  # what this unmount has to upload, for umount to report
            destroy(path)
        except BaseException:  # libfuse would drop it without a word; umount then says it failed
            log.exception("unmount failed; what is not uploaded stays in the journal for the next mount")
            raise

    fs.init_with_config = init_with_config  # type: ignore[attr-defined]  # mfusepy looks for it
    fs.destroy = unmounting  # type: ignore[method-assign]

    kwargs = dict(options)
    kwargs.setdefault("fsname", mount.url)
    kwargs.setdefault("subtype", "cryptfs")  # type fuse.cryptfs
    kwargs["default_permissions"] = True
    if read_only:
        kwargs["ro"] = True
    kwargs.pop("nonempty", None)
    try:
        FUSE(fs, mountpoint, foreground=True, nothreads=False, **kwargs)
    except RuntimeError:
        # libfuse ends its loop with an error code on SIGTERM, SIGINT and SIGHUP, after a
        # complete unmount: that is how a service stops, not a failure
        if fs.unmount_failed is None:
            raise
        log.info("stopped by a signal; unmounted")
    finally:
        server.finish(
            {
                "failed": fs.unmount_failed,
                "files": owed.get("files", 0),
                "bytes": owed.get("bytes", 0),
                "conflicts": fs.wb.conflicts,
            }
        )
        server.close()
        logging.getLogger().removeHandler(errors)
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
    log_path: str | None,
    syslog: bool = False,
    break_lease: bool = False,
    shared: bool = False,
) -> int:
    """Mount; in the background unless foreground. Returns once mounted (or failed).

    The background mount logs to `log_path` (rotated) or to syslog; in the foreground the
    log stays on stderr unless one of them is asked for."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core dump ever holds unwrapped keys
    os.umask(0o077)  # every file of the mount's local state is the user's alone
    if log_path and not syslog:  # the log is checked before anything else is made in the cache directory
        os.close(localstate.private_file(log_path, os.O_WRONLY | os.O_APPEND))
    held = hold(store, settings, bool(options.get("ro")), break_lease, shared)  # refusals reach the caller
    if foreground:
        logs.send_to(log_path, syslog)
        stderr = logs.StderrToLog(foreground=True)
        try:
            run(store, settings, mountpoint, options, held, ready=lambda: notify("READY=1"), shared=shared)
        except RuntimeError as exc:  # libfuse's failure: its reason, as a cryptfs error
            stderr.close()
            code, reason = _failure(exc, stderr.last)
            failed = CryptfsError(reason)
            failed.exit_code = code
            raise failed from None
        finally:
            stderr.close()
        return 0
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the mount process
        os.close(read_fd)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.close(devnull)
        logs.send_to(log_path, syslog)
        stderr = logs.StderrToLog()
        code = 0

        def ready() -> None:
            notify("READY=1")
            try:
                os.write(write_fd, b"M")
            except OSError:  # the caller stopped waiting (it said so): the mount runs on
                pass

        try:
            log.info("mounting %s on %s (cryptfs %s)", store.vol.url.rstrip("/"), mountpoint, __version__)
            run(store, settings, mountpoint, options, held, ready, shared)
        except BaseException as exc:  # noqa: BLE001 - the process must end with a code
            stderr.close()
            code, reason = _failure(exc, stderr.last)
            log.error("mount failed: %s", reason)
            try:  # the caller prints it, unless it heard the mount is up (then the log has it)
                os.write(write_fd, f"E{code} {reason}".encode(errors="replace"))
            except OSError:
                pass
        finally:
            stderr.close()
            logging.shutdown()
            os._exit(code)
    os.close(write_fd)
    return _wait_mounted(pid, read_fd, "syslog" if syslog else log_path or "?")


def _failure(exc: BaseException, libfuse_said: str) -> tuple[int, str]:
    """(exit code, reason) of a mount that failed with `exc`, libfuse's last words given."""
    if isinstance(exc, RuntimeError) and str(exc).isdigit():  # mfusepy: libfuse's own exit code
        # an -o option neither cryptfs nor FUSE knows is a usage error
        code = EXIT_USAGE if "unknown option" in libfuse_said else EXIT_ERROR
        return code, f"FUSE could not mount: {libfuse_said or 'libfuse gave no reason'}"
    return (exc.exit_code if isinstance(exc, CryptfsError) else EXIT_ERROR), str(exc) or type(exc).__name__


def _wait_mounted(pid: int, read_fd: int, log_path: str) -> int:
    """What the mount process says through the pipe: M when it answers, E<code> <why> when it failed."""
    try:
        ready, _, _ = select.select([read_fd], [], [], 60)
        said = os.read(read_fd, 4096).decode(errors="replace") if ready else None
    finally:
        os.close(read_fd)
    if said is None:
        print(f"cryptfs: error: the mount did not answer within 60 s (pid {pid}); see {log_path}", file=sys.stderr)
        return EXIT_ERROR
    if said.startswith("M"):
        return 0
    if said.startswith("E"):
        code, _, reason = said[1:].partition(" ")
        print(f"cryptfs: error: {reason} (log: {log_path})", file=sys.stderr)
        os.waitpid(pid, 0)
        return int(code) if code.isdigit() else EXIT_ERROR
    os.waitpid(pid, 0)
    print(f"cryptfs: error: the mount process exited before mounting; see {log_path}", file=sys.stderr)
    return EXIT_ERROR


def fusermount() -> str:
    """fusermount3 (or fusermount) by PATH, or where Debian puts it: mount(8) gives helpers no PATH."""
    for name in ("fusermount3", "fusermount"):
        found = shutil.which(name) or shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
        if found:
            return found
    raise UsageError("fusermount3 is not installed (apt-get install fuse3)")


def unmount(mountpoint: str, timeout: float | None = None, quiet: bool = False) -> int:
    """Unmount, then wait until the mount process has uploaded every closed file and exited.

    The mount is found by its mount point (control.py), whoever calls and with whatever
    environment; a progress line says what is left to upload.
    """
    mountpoint = os.path.abspath(mountpoint)
    if not os.path.ismount(mountpoint):
        raise UsageError(f"{mountpoint} is not mounted")
    sock = control.connect(mountpoint, timeout=30)
    with sock:
        lines = control.wait(sock)  # before the unmount starts, so its end cannot be missed
        result = subprocess.run([fusermount(), "-u", mountpoint], capture_output=True, text=True)
        if result.returncode != 0:
            raise CryptfsError(f"unmount failed: {result.stderr.strip() or result.stdout.strip()}")
        progress = Progress(quiet)
        start = time.monotonic()
        outcome = None
        try:
            for line in lines:
                if "progress" in line:
                    progress.show(line["progress"])
                elif "done" in line:
                    outcome = line["done"]
                    sock.settimeout(60)  # the lease is released next; then the process exits
                if timeout is not None and outcome is None and time.monotonic() - start > timeout:
                    progress.end()
                    print(
                        "cryptfs: error: uploads still pending; they finish in the background (or at the next mount)",
                        file=sys.stderr,
                    )
                    return EXIT_ERROR
        except (OSError, ValueError) as exc:  # a timeout, or a process that died mid-line
            log.debug("control socket: %s", exc)
        progress.end()
    failed = None if outcome is None else outcome.get("failed")
    if outcome and outcome.get("conflicts"):
        print(
            f"cryptfs: {outcome['conflicts']} conflict copy(ies) made (another mount changed the same files; "
            "see the mount log)",
            file=sys.stderr,
        )
    if failed:
        raise CryptfsError(
            f"{failed} closed file(s) could not be uploaded; they stay in the local journal and upload "
            "at the next mount of this volume with the same cache directory (see the mount log)"
        )
    if failed is None:
        raise CryptfsError(
            "the mount process ended before it said that everything was uploaded; what is left stays "
            "in the local journal for the next mount (see the mount log)"
        )
    if not quiet and outcome:
        done = f"{outcome['files']} file(s), {human(outcome['bytes'])} uploaded first" if outcome["files"] else ""
        print(f"cryptfs: unmounted {mountpoint}" + (f"; {done}" if done else ""), file=sys.stderr)
    return 0


class Progress:
    """The umount progress line: a bar on a terminal; elsewhere (a service's stop, a script's
    log) a line every few seconds, so a long wait says what it waits for."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar: Bar | None = None
        self.shown = 0.0
        self.total = 0

    def show(self, pending: dict) -> None:
        if self.quiet or not pending["files"]:
            return
        text = f"uploading before unmount: {pending['files']} file(s), {human(pending['bytes'])} left"
        self.total = max(self.total, pending["bytes"])
        if shown(False):
            if self.bar is None:
                self.bar = Bar(text, self.total)
            self.bar.update(self.total - pending["bytes"], self.total, text)
        elif time.monotonic() - self.shown >= 5:
            self.shown = time.monotonic()
            print("cryptfs: " + text, file=sys.stderr)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.update(self.total, self.total, "uploaded before unmount")
            self.bar.close()
