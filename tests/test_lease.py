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
from mountlib import hang_guard, own_mounts  # noqa: F401 - fixtures

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
