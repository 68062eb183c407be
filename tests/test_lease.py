"""The volume's lease: one read-write mount at a time, takeover of a dead holder's lease, and
journals that are never replayed over newer data (docs/lease.md).

The first tests drive cryptfs/lease.py in-process on the local backend; the rest mount for
real through `cryptfs mount`, on both backends.
"""

import errno
import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import REPO, run_cli
from mountlib import data, raises_errno, read, wait_gone, write

from cryptfs import format as fmt
from cryptfs import lease as lease_mod
from cryptfs.errors import EXIT_IN_USE, InUse, ReadOnly

pytestmark = pytest.mark.usefixtures("hang_guard")

HOST = socket.gethostname()


# ---------------------------------------------------------------- in-process, local backend

def test_lease_take_refuse_release_renew(volume_factory):
    ref = volume_factory("local")
    one, other = ref.store(), ref.store(ref.passphrase)
    a = lease_mod.Lease(one, "cache-a", 30)
    assert a.acquire() == (None, False)
    assert a.writable and a.epoch == 1

    b = lease_mod.Lease(other, "cache-b", 30)
    with pytest.raises(InUse) as info:
        b.acquire()
    assert f"host {HOST}, pid {os.getpid()}" in str(info.value) and "--break-lease" in str(info.value)
    body, _ = ref.raw.read(lease_mod.LEASE_NAME)
    assert HOST.encode() not in body and b"cache-a" not in body  # sealed, not readable in the bucket

    a.release()
    prev, existed = b.acquire()
    assert existed and prev.state == "released" and prev.cache == "cache-a" and b.epoch == 2
    etag = b.etag
    b.renew()
    assert b.etag != etag and b.writable

    # someone replaced the lease under b: the next renewal finds out, and b writes nothing more
    c = lease_mod.Lease(ref.store(ref.passphrase), "cache-c", 30)
    c.acquire(break_lease=True)
    assert c.epoch == 3
    b.renew()
    assert not b.writable and "someone else" in b.lost
    fenced = lease_mod.FencedBackend(other.backend, b)
    with pytest.raises(ReadOnly):
        fenced.put("x", b"y")
    b.release()  # not b's any more: left alone
    assert lease_mod.read(one)[0].mount == c.record.mount

    # gone altogether: lost too
    ref.raw.delete(lease_mod.LEASE_NAME)
    c.renew()
    assert not c.writable


def test_lease_expiry_and_same_cache_takeover(volume_factory):
    ref = volume_factory("local")
    a = lease_mod.Lease(ref.store(), "cache-a", 3)
    a.acquire()  # and never renewed, as if its mount was killed
    with pytest.raises(InUse):
        lease_mod.Lease(ref.store(ref.passphrase), "cache-b", 3).acquire()
    # the same cache directory (whose lock the caller holds) takes over at once
    same = lease_mod.Lease(ref.store(ref.passphrase), "cache-a", 3)
    prev, _ = same.acquire()
    assert prev.cache == "cache-a" and prev.epoch == 1 and same.epoch == 2
    time.sleep(3.3)
    prev, _ = lease_mod.Lease(ref.store(ref.passphrase), "cache-b", 3).acquire()
    assert prev.epoch == 2
    info = lease_mod.read(ref.store())[1]
    assert not lease_mod.expired(lease_mod.read(ref.store())[0], info)


def test_unreadable_lease_is_held_until_it_ages(volume_factory):
    ref = volume_factory("local")
    ref.raw.write(lease_mod.LEASE_NAME, b"not a lease")
    lease = lease_mod.Lease(ref.store(), "cache-a", 3)
    with pytest.raises(InUse, match="unreadable"):
        lease.acquire()
    prev, existed = lease.acquire(break_lease=True)
    assert prev is None and existed
    assert fmt.open_lease(ref.store().vk, ref.raw.read(lease_mod.LEASE_NAME)[0])


def test_journal_replay_rule():
    rec = lease_mod.Record("held", "h", 1, 0, 0, 60, 5, "mine", "m")
    allowed = lease_mod.replay_allowed
    assert allowed(None, False, "mine", None)           # no lease object: no history, replay
    assert allowed(rec, True, "mine", 5)                # our own lease, nobody since
    assert not allowed(rec, True, "mine", 4)            # we held it at 4; someone held 5 since
    assert not allowed(rec, True, "other", 5)           # another cache directory's lease
    assert not allowed(rec, True, "mine", None)         # a journal from before any lease
    assert not allowed(None, True, "mine", 5)           # unreadable lease: no telling


def test_cache_lock_is_exclusive(tmp_path):
    lock = lease_mod.CacheLock(str(tmp_path), "file:///v")
    child = subprocess.run(
        ["python3", "-c", "import sys; from cryptfs.lease import CacheLock; CacheLock(sys.argv[1], 'file:///v')",
         str(tmp_path)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
    assert child.returncode != 0 and f"pid {os.getpid()}" in child.stderr, child.stderr
    lock.close()
    lease_mod.CacheLock(str(tmp_path), "file:///v").close()


# ---------------------------------------------------------------- real mounts, both backends

def _second(ref, tmp_path, name, *extra, cache=None):
    """`cryptfs mount` of ref at tmp_path/name with its own (or the given) cache directory."""
    mp = tmp_path / name
    mp.mkdir(exist_ok=True)
    return run_cli("mount", ref.url, mp, *ref.args, "--cache-dir", cache or tmp_path / (name + "-cache"), *extra)


def _kill(m) -> None:
    pid = m.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    assert wait_gone([pid], 10)
    subprocess.run(["fusermount3", "-uz", m.mountpoint], check=True)


def _uploaded(ref, path, body, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ref.entry(path) is not None and ref.read(path) == body:
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} not uploaded within {timeout} s")


def test_second_rw_mount_refused_ro_beside_release(volume_factory, volume_kind, own_mounts, tmp_path):
    ref = volume_factory(volume_kind)
    a = own_mounts(ref, name="a")
    write(a.path("f.txt"), b"from a")
    refused = _second(ref, tmp_path, "b")
    assert refused.returncode == EXIT_IN_USE, refused
    assert f"host {HOST}, pid {a.daemon_pid()}" in refused.stderr and "since" in refused.stderr, refused.stderr
    assert "--break-lease" in refused.stderr and "-o ro" in refused.stderr
    assert not os.path.ismount(tmp_path / "b")
    info = ref.cli("info", ref.url)
    assert f"lease:         held by host {HOST}, pid {a.daemon_pid()}" in info.stdout, info

    b = own_mounts(ref, "-o", "ro", "--attr-ttl", "1", name="b")  # read-only beside it: fine
    _uploaded(ref, "f.txt", b"from a")
    time.sleep(1.2)
    assert read(b.path("f.txt")) == b"from a"
    raises_errno(errno.EROFS, write, b.path("g.txt"), b"no")

    a.umount()  # releases the lease: a new read-write mount right after is fine
    assert "free (last held by" in ref.cli("info", ref.url).stdout
    c = own_mounts(ref, name="c")
    assert read(c.path("f.txt")) == b"from a"


def test_same_cache_directory_refused(volume_factory, volume_kind, own_mounts, tmp_path):
    ref = volume_factory(volume_kind)
    a = own_mounts(ref, name="a")
    for extra in ((), ("-o", "ro")):
        refused = _second(ref, tmp_path, "b", *extra, cache=a.cache_dir)
        assert refused.returncode == EXIT_IN_USE, refused
        assert "cache directory" in refused.stderr and f"pid {a.daemon_pid()}" in refused.stderr, refused.stderr
        assert not os.path.ismount(tmp_path / "b")
    write(a.path("still.txt"), b"fine")
    assert read(a.path("still.txt")) == b"fine"


def test_kill_9_then_refused_then_break_lease(volume_factory, volume_kind, own_mounts, tmp_path):
    ref = volume_factory(volume_kind)
    a = own_mounts(ref, "--lease-duration", "30", name="a")
    pid = a.daemon_pid()
    _kill(a)
    refused = _second(ref, tmp_path, "b")
    assert refused.returncode == EXIT_IN_USE and f"pid {pid}" in refused.stderr, refused
    broke = _second(ref, tmp_path, "b", "--break-lease")
    try:
        assert broke.returncode == 0, broke
        assert "breaking the lease" in broke.stderr and f"pid {pid}" in broke.stderr, broke.stderr
        assert "both mounts may write" in broke.stderr and "not replayed" in broke.stderr
        write(tmp_path / "b" / "after.txt", b"b writes")
        assert read(tmp_path / "b" / "after.txt") == b"b writes"
    finally:
        assert run_cli("umount", tmp_path / "b", "--timeout", "60").returncode == 0
    assert ref.read("after.txt") == b"b writes"
    assert "free (last held by" in ref.cli("info", ref.url).stdout


def test_expired_lease_taken_over_and_stale_journal_not_replayed(volume_factory, volume_kind, own_mounts,
                                                                tmp_path):
    ref = volume_factory(volume_kind)
    # long enough that the refused mount below starts before expiry on a loaded machine
    a = own_mounts(ref, "--lease-duration", "12", "--writeback-delay", "60", name="a")
    fd = os.open(a.path("f.txt"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"version 1")
    os.fsync(fd)  # uploaded now
    os.close(fd)
    write(a.path("f.txt"), b"version 2, closed but not uploaded when a died")
    write(a.path("only-a.txt"), b"also pending")
    assert ref.read("f.txt") == b"version 1"
    pid = a.daemon_pid()
    _kill(a)
    killed = time.monotonic()
    refused = _second(ref, tmp_path, "b")
    assert refused.returncode == EXIT_IN_USE and f"pid {pid}" in refused.stderr, refused
    time.sleep(max(0.0, killed + 12.5 - time.monotonic()))  # the lease expires
    b = own_mounts(ref, name="b")
    assert read(b.path("f.txt")) == b"version 1"  # a's journal is in a's cache directory, not b's
    write(b.path("f.txt"), b"version 3, newer than the dead holder's")
    b.umount()

    a.extra = ["--writeback-delay", "0.2"]
    again = run_cli(*a.mount_command())  # a's cache directory again: its journal predates b's lease
    assert again.returncode == 0, again
    assert "2 pending upload(s)" in again.stderr and "not uploaded" in again.stderr, again.stderr
    assert "stale-journal-" in again.stderr
    assert read(a.path("f.txt")) == b"version 3, newer than the dead holder's"
    assert not os.path.exists(a.path("only-a.txt"))
    a.umount()
    assert ref.read("f.txt") == b"version 3, newer than the dead holder's"
    aside = [d for d in os.listdir(os.path.dirname(a.log_path())) if d.startswith("stale-journal-")]
    assert len(aside) == 1, aside


@pytest.mark.expect_log_errors(r"lease was taken or removed", r"upload of .* failed", r"could not upload",
                               r"could not be uploaded")
def test_lease_lost_under_running_mount(volume_factory, volume_kind, own_mounts, tmp_path):
    ref = volume_factory(volume_kind)
    a = own_mounts(ref, "--lease-duration", "3", "--writeback-delay", "60", name="a")
    body = data(100_000, "kept")
    write(a.path("closed.bin"), body)
    fd = os.open(a.path("open.txt"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"before")
    ref.raw.delete(lease_mod.LEASE_NAME)
    deadline = time.monotonic() + 20
    while "lease was taken or removed" not in a.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "ERROR" in a.log() and "writes nothing more" in a.log(), a.log()
    raises_errno(errno.EROFS, write, a.path("new.txt"), b"x")
    raises_errno(errno.EROFS, os.mkdir, a.path("dir"))
    raises_errno(errno.EROFS, os.write, fd, b"more")
    os.close(fd)
    assert ref.entry("closed.bin") is None  # nothing written after the loss
    result = run_cli("umount", a.mountpoint, "--timeout", "60")
    assert result.returncode == 1 and "stay in the local journal" in result.stderr, result
    assert not os.path.exists(ref.raw._path(lease_mod.LEASE_NAME)) if volume_kind == "local" else True

    a.extra = []
    a.mount()  # same cache directory, and nobody held the lease since: the journal is replayed
    assert read(a.path("closed.bin")) == body
    assert read(a.path("open.txt")) == b"before"
    a.umount()
    assert ref.read("closed.bin") == body
