"""One read-write mount per volume: the lease object, the cache-directory lock, and whose
journal may be replayed. The rules and timings are in docs/lease.md.

The lease is the object `cryptfs.lease` beside the volume config, its record sealed with the
volume's entry key (format.md §7.5). A read-write mount takes it with a conditional write
(If-None-Match when absent, If-Match on the ETag read when released or expired), renews it
every duration/3 with If-Match on the ETag it last wrote, and at a clean unmount replaces
it, again with If-Match, by a released record: the lease object never goes away, so each
take has an epoch one above the last and names the cache directory (by a random id) whose
journal wrote under it.

`Lease._lock` guards `etag`, `record`, `lost` and `_renewed_at`; the renewal thread and
the writers that ask `writable` are the only users.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass

from . import format as fmt
from .errors import CryptfsError, InUse, NotFound, PreconditionFailed, ReadOnly
from .store import Store

log = logging.getLogger(__name__)

LEASE_NAME = "cryptfs.lease"
DEFAULT_DURATION = 60.0
MIN_DURATION = 3.0
FENCE_AT = 0.75  # unrenewed for this share of the duration, a holder stops writing by itself
COMMAND = "command-"  # how a mount-free command's take names its (absent) cache directory
COMMAND_POLL = 0.25  # seconds between looks at a lease a command holds


@dataclass
class Record:
    state: str  # "held", "shared" (--shared mounts; the last renewer named), or "released" at a clean unmount
    host: str
    pid: int
    since: float  # when this holder took the lease (its clock)
    renewed: float  # its last renewal (its clock)
    duration: float  # seconds the lease lasts unrenewed
    epoch: int  # one more than the record it replaced
    cache: str  # random id of the holder's cache directory (its journal)
    mount: str  # random id of this take
    pending: int = 0  # released with uploads still in the holder's journal (they upload at its next mount)

    def dumps(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def loads(cls, raw: bytes) -> "Record":
        try:
            doc = json.loads(raw)
            fields = dataclasses.fields(cls)  # a field with a default may be absent (older records)
            return cls(**{f.name: doc[f.name] for f in fields if f.name in doc or f.default is dataclasses.MISSING})
        except (ValueError, KeyError, TypeError):
            raise fmt.FormatError("lease record is not readable") from None


def read(store: Store):
    """(record or None, ObjectInfo or None): (None, None) when there is no lease object,
    (None, info) when it is there but unreadable (foreign, tampered)."""
    try:
        body, info = store.get_object(LEASE_NAME)
    except NotFound:
        return None, None
    try:
        return Record.loads(fmt.open_lease(store.vk, body)), info
    except CryptfsError:
        return None, info


def _held_by_command(record: Record | None, info) -> bool:
    return (
        record is not None and record.state == "held" and record.cache.startswith(COMMAND) and not expired(record, info)
    )


def expired(record: Record | None, info, duration: float = DEFAULT_DURATION) -> bool:
    """Unrenewed for longer than its duration by the holder's own clock and by the server's."""
    limit = record.duration if record is not None else duration
    server_now = info.server_time if info.server_time is not None else time.time()
    if server_now - info.last_modified <= limit:
        return False
    return record is None or time.time() - record.renewed > limit


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M:%S %z")


def describe(record: Record | None, info) -> str:
    if info is None:
        return "free (never taken)"
    if record is None:
        return f"unreadable (not sealed with this volume's keys; last written {_when(info.last_modified)})"
    who = f"host {record.host}, pid {record.pid}"
    if record.state == "released":
        return f"free (last held by {who}, released {_when(record.renewed)})"
    ago = max(0, round(time.time() - record.renewed))
    left = max(0, round(record.duration) - ago)
    state = "expired" if expired(record, info) else f"expires in {left} s unless renewed"
    if record.state == "shared":
        return f"in shared use (--shared), last renewed by {who} {ago} s ago ({state})"
    return f"held by {who}, since {_when(record.since)} (renewed {ago} s ago, {state})"


class Lease:
    """The lease of one read-write mount: taken before the mount forks, renewed by a thread
    of the mount process, released at unmount."""

    def __init__(self, store: Store, cache_id: str, duration: float = DEFAULT_DURATION, shared: bool = False):
        self.store = store
        self.shared = shared  # a --shared mount: joins other shared mounts, never an exclusive one
        self.multipart_ok = True  # (shared) the endpoint's multipart uploads honour conditions
        self.backend = store.objects  # the unfenced door: the lease itself is always written
        self.key = LEASE_NAME
        self.cache_id = cache_id
        self.duration = max(MIN_DURATION, duration)
        self.period = self.duration / 3
        self.record: Record | None = None
        self.etag: str | None = None
        self.prev: Record | None = None  # the record this take replaced
        self.pending = 0  # uploads left in the journal at unmount, said in the released record
        self.existed = False  # whether a lease object was there to replace
        self.lost: str | None = None  # why, once someone else holds the lease
        self._renewed_at = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False

    # ------------------------------------------------------------ taking

    def acquire(self, break_lease: bool = False, command: str | None = None):
        """Take the lease; returns (previous record or None, whether a lease object existed).
        Raises InUse naming the holder when another mount holds it. `command`: the mount-free
        command taking it, which never takes over from a holder that did not release it. A
        command holding it is waited for: commands are short, and hold it only to keep mounts
        from starting beside them."""
        lost_races = 0
        waiting = False
        while lost_races < 3:
            prev, info = read(self.store)
            if _held_by_command(prev, info) and not break_lease:
                if not waiting:
                    log.warning(
                        "waiting for a cryptfs command that holds the volume's lease (host %s, pid %s) to end",
                        prev.host,
                        prev.pid,
                    )
                    waiting = True
                time.sleep(COMMAND_POLL)
                continue
            if info is not None:
                if command is None:
                    self._may_take(prev, info, break_lease)
                else:
                    self._command_may_take(prev, info, break_lease, command)
            now = time.time()
            record = Record(
                "shared" if self.shared else "held",
                socket.gethostname(),
                os.getpid(),
                now,
                now,
                self.duration,
                (prev.epoch if prev else 0) + 1,
                self.cache_id,
                os.urandom(8).hex(),
            )
            started = time.monotonic()
            try:
                etag = self.backend.put(
                    self.key,
                    fmt.seal_lease(self.store.vk, record.dumps()),
                    if_none_match=info is None,
                    if_match=None if info is None else info.etag,
                )
            except (PreconditionFailed, NotFound):
                lost_races += 1
                continue  # another mount took or changed it meanwhile: look again
            with self._lock:
                self.record, self.etag, self._renewed_at = record, etag, started
                self.prev, self.existed = prev, info is not None
            return prev, info is not None
        prev, info = read(self.store)
        raise InUse(f"{self.store.vol.url}: the lease keeps changing hands ({describe(prev, info)})")

    def _may_take(self, prev: Record | None, info, break_lease: bool) -> None:
        if prev is not None and prev.state == "released":
            return
        if prev is not None and prev.state == "shared" and self.shared:
            return  # joining the other shared mounts
        if prev is not None and prev.cache == self.cache_id:
            # the caller holds this cache directory's lock, so the mount that used it is gone
            log.warning(
                "the lease was held by a mount with this cache directory (host %s, pid %s) that "
                "ended without releasing it; taken over",
                prev.host,
                prev.pid,
            )
            return
        if expired(prev, info, self.duration):
            log.warning("the lease of the volume had expired (%s); taken over", describe(prev, info))
            return
        if break_lease:
            log.warning(
                "breaking the lease of the volume (%s). If that mount is still running, both mounts "
                "may write until its next renewal (within %d s), and the later upload of a file wins; "
                "after that it writes nothing more. What it has not uploaded stays in its own journal "
                "and is not replayed over this mount's changes.",
                describe(prev, info),
                round(prev.duration / 3 if prev else self.duration),
            )
            return
        if prev is not None and prev.state == "shared":
            raise InUse(
                f"{self.store.vol.url} is mounted read-write by --shared mounts: lease {describe(prev, info)}. "
                "Mount it with --shared too, read-only (-o ro), or wait until the shared mounts have "
                "ended and their lease has expired"
            )
        raise InUse(
            f"{self.store.vol.url} is mounted read-write elsewhere: lease {describe(prev, info)}. "
            "Mount it read-only (-o ro) beside that mount, wait for it to end, or, if that mount is "
            "gone for good, take over at once with --break-lease"
            + ("; a --shared mount never joins an exclusive one" if self.shared else "")
        )

    def _command_may_take(self, prev: Record | None, info, break_lease: bool, command: str) -> None:
        if prev is not None and prev.state == "released" and not prev.pending:
            return
        if break_lease:
            log.warning("%s: breaking the lease of the volume (%s)", command, describe(prev, info))
            return
        if prev is not None and prev.state == "released":
            raise InUse(
                f"{self.store.vol.url}: its last read-write mount (host {prev.host}) left {prev.pending} "
                "upload(s) in its cache directory. Mount the volume there once (it uploads them), or run "
                f"{command} with --break-lease: those uploads are then kept aside, never replayed over "
                "what this command writes"
            )
        if prev is not None and prev.cache.startswith(COMMAND):
            return  # a command that died: it leaves no journal behind (live ones are waited for)
        if prev is not None and prev.state == "shared" and expired(prev, info, self.duration):
            return  # shared mounts never release; what they left commits conditionally, whoever writes
        if prev is not None and expired(prev, info, self.duration):
            raise InUse(
                f"{self.store.vol.url}: its last read-write mount (host {prev.host}, pid {prev.pid}) ended "
                "without unmounting, and may have left uploads in its cache directory. Mount the volume "
                f"there once (it uploads them), or run {command} with --break-lease: those uploads are "
                "then kept aside, never replayed over what this command writes"
            )
        raise InUse(
            f"{self.store.vol.url} is mounted read-write: lease {describe(prev, info)}. Make the change "
            "through that mount, or unmount it first"
        )

    def unchanged_since(self, epoch: int) -> bool:
        """Whether nobody has held the lease since this cache directory held it under `epoch`:
        then the volume is as this cache directory last saw it."""
        return self.existed and self.prev is not None and self.prev.cache == self.cache_id and self.prev.epoch == epoch

    # ------------------------------------------------------------ holding

    @property
    def epoch(self) -> int:
        return self.record.epoch if self.record else 0

    @property
    def writable(self) -> bool:
        """Whether this mount may still write: the lease is ours and was renewed recently
        enough that nobody can have taken it as expired."""
        with self._lock:
            return (
                self.lost is None
                and self.record is not None
                and time.monotonic() - self._renewed_at < self.duration * FENCE_AT
            )

    def start(self) -> None:
        """In the mount process: record its pid, renew now and then every duration/3."""
        with self._lock:
            if self.record is None:
                raise CryptfsError("the lease was never taken")
            self.record = dataclasses.replace(self.record, pid=os.getpid())
        self.renew()
        self._thread = threading.Thread(target=self._loop, name="lease", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.renew()

    def renew(self) -> None:
        with self._lock:
            if self.lost is not None or self.record is None:
                return
            record = dataclasses.replace(self.record, renewed=time.time())
            etag = self.etag
        started = time.monotonic()
        try:
            new = self.backend.put(self.key, fmt.seal_lease(self.store.vk, record.dumps()), if_match=etag)
        except (PreconditionFailed, NotFound) as exc:
            current, info = read(self.store)
            if self._still_ours(record, current, info) or self._shared_with(current, info):
                return
            self._lose(f"the lease was taken or removed by someone else ({exc})")
            return
        except CryptfsError as exc:
            if not self.writable and not self._warned:
                self._warned = True
                log.error(
                    "the lease could not be renewed for %d s (%s): no more writes to the bucket until "
                    "it is; closed files wait in the journal",
                    round(time.monotonic() - self._renewed_at),
                    exc,
                )
            else:
                log.warning("lease renewal failed (retried in %d s): %s", round(self.period), exc)
            return
        with self._lock:
            self.record, self.etag, self._renewed_at = record, new, started
        if self._warned:
            self._warned = False
            log.warning("the lease is renewed again; writes resume")

    def _still_ours(self, sent: Record, current: Record | None, info) -> bool:
        """A retried renewal can fail its condition on our own write: look before giving up."""
        if (
            current is not None
            and current.mount == sent.mount
            and current.state == "held"
            and current.renewed == sent.renewed
        ):
            with self._lock:
                self.record, self.etag, self._renewed_at = current, info.etag, time.monotonic()
            return True
        return False

    def _shared_with(self, current: Record | None, info) -> bool:
        """A shared mount whose renewal met another shared mount's: that one renewed the shared
        lease for all, as of its Last-Modified (by the server's clock). No write: the next
        renewal goes over it."""
        if not self.shared or current is None or info is None or current.state != "shared":
            return False
        server_now = info.server_time if info.server_time is not None else time.time()
        age = max(0.0, server_now - info.last_modified)
        with self._lock:
            self.etag, self._renewed_at = info.etag, time.monotonic() - age
        return True

    def _lose(self, why: str) -> None:
        with self._lock:
            if self.lost is not None:
                return
            self.lost = why
        log.error(
            "%s: this mount writes nothing more to the bucket; new writes fail (EROFS) and closed "
            "files not yet uploaded stay in the local journal",
            why,
        )

    def release(self) -> None:
        """At unmount: mark the lease released, only if it is still ours. A shared mount
        cannot know whether other shared mounts still run: it leaves the record to expire."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            if self.lost is not None or self.record is None or self.shared:
                return
            record = dataclasses.replace(self.record, state="released", renewed=time.time(), pending=self.pending)
            etag = self.etag
        try:
            self.backend.put(self.key, fmt.seal_lease(self.store.vk, record.dumps()), if_match=etag)
        except (PreconditionFailed, NotFound):
            log.warning("the lease was no longer this mount's at unmount; left as it is")
        except CryptfsError as exc:
            log.warning(
                "could not release the lease (%s); it expires %d s after its last renewal", exc, round(self.duration)
            )


@contextlib.contextmanager
def held_by_command(store: Store, command: str, break_lease: bool = False):
    """A mount-free command that changes the volume holds its lease meanwhile, as a mount
    would: so no read-write mount runs beside it, and the next mount sees the volume changed."""
    lease = Lease(store, COMMAND + os.urandom(8).hex())
    lease.acquire(break_lease, command=command)
    lease.start()
    try:
        yield lease
    finally:
        lease.release()


class FencedBackend:
    """A backend that refuses to change anything once the mount may no longer write."""

    def __init__(self, backend, lease: Lease):
        self._backend, self._lease = backend, lease

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def _check(self) -> None:
        if not self._lease.writable:
            raise ReadOnly(self._lease.lost or "the lease is not renewed: nothing is written to the bucket until it is")

    def put(self, *args, **kwargs):
        self._check()
        return self._backend.put(*args, **kwargs)

    def upload(self, *args, **kwargs):
        self._check()
        return self._backend.upload(*args, **kwargs)

    def copy(self, *args, **kwargs):
        self._check()
        return self._backend.copy(*args, **kwargs)

    def delete(self, *args, **kwargs):
        self._check()
        return self._backend.delete(*args, **kwargs)


# ---------------------------------------------------------------- the cache directory


class CacheLock:
    """An exclusive flock on `<cache dir>/lock`, held for the mount's life (the mount process
    inherits it across fork), so two mounts never share a cache directory."""

    def __init__(self, root: str, url: str):
        self.path = os.path.join(root, "lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise InUse(
                f"the cache directory {root} is in use by another mount of {url} (pid {holder}); "
                "give this mount its own --cache-dir"
            ) from None
        self.note_pid()

    def note_pid(self) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def close(self) -> None:
        os.close(self.fd)


def cache_id(root: str) -> str:
    """This cache directory's random, permanent id (what a lease names as its journal)."""
    path = os.path.join(root, "cache-id")
    try:
        with open(path) as f:
            value = f.read().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    value = os.urandom(16).hex()
    _write_atomic(path, value)
    return value


def journal_epoch(root: str) -> int | None:
    """The lease epoch under which this cache directory's journal was last written."""
    try:
        with open(os.path.join(root, "journal-epoch")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def probe_conditions(store: Store) -> bool:
    """Refuse --shared on an endpoint that does not honour conditional writes: a create with
    If-None-Match over an existing object, and a replace with If-Match on a wrong ETag, must
    both fail. Returns whether completing a multipart upload honours If-None-Match too (when
    not, a shared mount keeps its files to what one PUT carries). Costs about eight requests."""
    key = f"{LEASE_NAME}.probe-{os.urandom(6).hex()}"
    backend = store.objects
    try:
        etag = backend.put(key, b"probe", if_none_match=True)
        for what, kwargs in (
            ("If-None-Match: *", {"if_none_match": True}),
            ("If-Match", {"if_match": '"00000000000000000000000000000000"' if etag != '"0"' else '"1"'}),
        ):
            try:
                backend.put(key, b"probe again", **kwargs)
            except PreconditionFailed:
                continue
            raise CryptfsError(
                f"{store.vol.url}: the endpoint ignores {what} on PUT, so --shared mounts could overwrite "
                "each other's changes; mount without --shared (one read-write mount at a time)"
            )
        multipart = backend.multipart_conditions(key)
        if not multipart:
            log.warning(
                "the endpoint ignores conditions when completing multipart uploads: this shared mount "
                "keeps files to what one PUT carries (%d MiB; larger writes fail with EFBIG)",
                backend.single_put_max >> 20,
            )
        return multipart
    finally:
        backend.delete(key)


def replay_allowed(prev: Record | None, existed: bool, cache: str, epoch: int | None) -> bool:
    """Whether the journal in a cache directory may be uploaded by the mount that just took
    the lease: only when no other mount has held the lease since that journal was written,
    i.e. the record replaced was this cache directory's own, of the epoch it recorded. With
    no lease object at all there is no history, and the journal is replayed."""
    if not existed:
        return True
    return prev is not None and prev.cache == cache and epoch is not None and prev.epoch == epoch


def take_journal(
    root: str,
    journal_dir: str,
    staging_dir: str,
    prev: Record | None,
    existed: bool,
    epoch: int,
    pending: int,
    conditional: bool = False,
) -> str | None:
    """Decide the fate of a journal with `pending` records before a read-write mount opens it,
    then record the new epoch. Returns where a stale journal was set aside, if it was.
    conditional: every pending upload commits only over the version it last saw (records of
    --shared mounts), so it may be replayed whoever wrote since: a lost race makes a conflict copy."""
    me = cache_id(root)
    aside = None
    if pending and not conditional and not replay_allowed(prev, existed, me, journal_epoch(root)):
        aside = os.path.join(root, f"stale-journal-{time.strftime('%Y%m%d-%H%M%S')}-epoch{epoch}")
        os.makedirs(aside, mode=0o700)
        for d in (journal_dir, staging_dir):
            if os.path.exists(d):
                shutil.move(d, os.path.join(aside, os.path.basename(d)))
        who = "another mount" if prev is None else f"host {prev.host} (pid {prev.pid})"
        log.error(
            "%d pending upload(s) in this cache directory were written before %s held the lease; "
            "they are not uploaded, so they cannot overwrite newer data, and are kept in %s",
            pending,
            who,
            aside,
        )
    _write_atomic(os.path.join(root, "journal-epoch"), str(epoch))
    return aside


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
