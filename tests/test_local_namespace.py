"""Metadata from local state: under the lease a mount's listings are the truth, so scans send
no request, and a clean unmount saves them for the next mount, which reuses them only when
the lease shows nobody has written since. The mount's layers in-process (no kernel), with a
counting rule at the one door to storage; mount-free commands run as real subprocesses."""

from __future__ import annotations

import os

import pytest

from cryptfs import errors, volume
from cryptfs import format as fmt
from cryptfs.backend.faults import OPS, FaultPlan, FaultyBackend, Rule
from cryptfs.config import VolumeSettings
from cryptfs.mount import Mount, hold
from cryptfs.store import Store
from cryptfs.target import locate
from fsapi import Ops

DIRS, FILES = 6, 5


class Session:
    """One in-process read-write mount that holds the lease, as `cryptfs mount` does."""

    def __init__(self, ref, cache_dir: str, plan: FaultPlan | None = None):
        self.plan = plan or FaultPlan()
        target = locate(ref.url, ref.settings())
        backend = FaultyBackend(target.backend, self.plan)
        vol = volume.open_volume(backend, target.prefix, ref.passphrase.encode())
        self.store = Store(vol)
        settings = VolumeSettings(url=ref.url, endpoint_url=ref.endpoint, cache_dir=cache_dir,
                                  writeback_delay=0.05, attr_ttl=0.2)
        self.lock, self.lease = hold(self.store, settings, read_only=False)
        self.lease.start()
        self.mount = Mount(self.store, settings, lease=self.lease)
        self.mount.recover()
        self.ops = Ops(self.mount.fs)

    def counting(self):
        """A rule that counts every request for the volume's tree (not the lease's)."""
        return self.plan.add(Rule(frozenset(OPS), key_contains=self.store.vol.prefix + "t/"))

    def close(self) -> None:
        self.mount.fs.destroy("/")
        self.mount.ns.close()
        self.mount.reader.close()
        self.lease.release()
        self.lock.close()

    def crash(self) -> None:
        """Gone without unmounting: no upload drained, no listing saved, the lease not released."""
        self.mount.fs.wb.stop()
        self.mount.ns.close()
        self.lease._stop.set()
        self.lock.close()


def scan(ops: Ops, path: str = "/") -> dict:
    """`ls -lR`: every name with its type and size, by path."""
    seen = {}
    for name in ops.listdir(path):
        full = os.path.join(path, name)
        st = ops.stat(full)
        seen[full] = (st["st_mode"] >> 12, st["st_size"])
        if st["st_mode"] >> 12 == 0o04:
            seen.update(scan(ops, full))
    return seen


def populate(ops: Ops) -> None:
    for d in range(DIRS):
        ops.mkdir(f"/d{d}")
        ops.mkdir(f"/d{d}/sub")
        for f in range(FILES):
            ops.write_file(f"/d{d}/f{f}", f"file {d}/{f}\n".encode() * (f + 1))


class KeyLog(FaultPlan):
    """A plan that notes the key of every request it sees."""

    def __init__(self):
        super().__init__()
        self.requests: list[tuple[str, str]] = []

    def before(self, op: str, key: str) -> None:
        self.requests.append((op, key))
        super().before(op, key)


@pytest.fixture
def ref(volume_factory, volume_kind):
    return volume_factory(volume_kind)


def test_scans_cost_nothing_under_the_lease_and_after_a_clean_remount(ref, tmp_path):
    cache = str(tmp_path / "cache")
    s = Session(ref, cache)
    try:
        populate(s.ops)
        first = scan(s.ops)
        count = s.counting()
        assert scan(s.ops) == first
        assert count.seen == 0, "a scan of a mount that holds the lease sent requests"
    finally:
        s.close()

    s = Session(ref, cache)
    try:
        count = s.counting()
        assert scan(s.ops) == first
        assert s.ops.read_file("/d3/f2") == b"file 3/2\n" * 3
        reads = count.seen
        assert reads == 1, f"{reads} requests after a remount of an unchanged volume (only the file's GET)"
        s.ops.write_file("/d0/new", b"made on the second mount")
        s.ops.rename("/d1", "/d1-renamed")
        s.ops.unlink("/d2/f0")
        after = scan(s.ops)
    finally:
        s.close()
    assert set(after) - set(first) >= {"/d0/new", "/d1-renamed", "/d1-renamed/sub"}
    assert "/d2/f0" not in after and "/d1" not in after

    s = Session(ref, cache)  # the second mount's own changes were saved with its listings
    try:
        count = s.counting()
        assert scan(s.ops) == after
        assert count.seen == 0
    finally:
        s.close()
    ref.assert_clean()


@pytest.mark.parametrize("volume_kind", ["s3"], indirect=True)
def test_every_request_stays_under_the_volume_prefix(ref, tmp_path):
    """The volume lives at s3://bucket/vol/: whatever the mount does, from creating and
    linking to renaming, removing, unmounting and reloading saved listings, no request
    names a key outside that prefix (the prefixed view in Store is the only one adding it)."""
    cache, keys = str(tmp_path / "cache"), KeyLog()
    s = Session(ref, cache, keys)
    try:
        populate(s.ops)
        s.ops.rename("/d1", "/d1-renamed")
        s.ops.rename("/d0/f1", "/d2/moved")
        s.mount.fs.link("/d3/hard", "/d3/f0")
        s.mount.fs.symlink("/d3/sym", "f0")
        s.ops.unlink("/d4/f0")
        s.mount.fs.rmdir("/d5/sub")
        before = scan(s.ops)
    finally:
        s.close()
    s = Session(ref, cache, keys)
    try:
        assert scan(s.ops) == before
        assert s.ops.read_file("/d3/hard") == b"file 3/0\n"
    finally:
        s.close()
    assert {op for op, _ in keys.requests} >= {"get", "head", "put", "copy", "delete", "list"}
    outside = sorted({k for _, k in keys.requests if not k.startswith("vol/")})
    assert not outside, f"requests outside the volume prefix: {outside[:5]}"
    ref.assert_clean()


def test_a_change_by_a_command_is_seen_after_remount(ref, tmp_path):
    cache = str(tmp_path / "cache")
    s = Session(ref, cache)
    try:
        populate(s.ops)
        before = scan(s.ops)
    finally:
        s.close()
    (tmp_path / "added.txt").write_bytes(b"from the command line")
    assert ref.cli("put", str(tmp_path / "added.txt"), ref.path("d4")).returncode == 0
    assert ref.cli("rm", ref.path("d5/f1")).returncode == 0

    s = Session(ref, cache)
    try:
        count = s.counting()
        now = scan(s.ops)
        assert count.seen > 0, "the saved listings were reused although a command changed the volume"
        assert now["/d4/added.txt"] == (0o10, len(b"from the command line"))
        assert "/d5/f1" not in now and set(now) - {"/d4/added.txt"} == set(before) - {"/d5/f1"}
        assert s.ops.read_file("/d4/added.txt") == b"from the command line"
    finally:
        s.close()


def test_directory_attributes_are_stored_once_per_burst(ref, tmp_path):
    """rsync -a makes a directory, fills it, then sets its mode and times: under the lease
    those changes wait in the namespace and reach the bucket in one write (here: at the
    directory's fsync), which a mount with another cache directory then reads."""
    s = Session(ref, str(tmp_path / "cache"))
    fs = s.mount.fs
    try:
        s.ops.mkdir("/d", 0o755)
        writes = s.plan.add(Rule(frozenset({"put", "copy", "upload"}),
                                 key_contains=s.store.entry_key(fmt.ROOT_DIR_ID, b"d")))
        for i in range(5):
            s.ops.write_file(f"/d/f{i}", b"x" * i)
        fs.chmod("/d", 0o700)
        fs.chown("/d", 1234, 5678)
        fs.utimens("/d", (1_000_000_000 * 10**9, 1_100_000_000 * 10**9))
        assert writes.seen == 0, "a directory attribute change was written at once"
        st = s.ops.stat("/d")
        assert (st["st_mode"] & 0o7777, st["st_uid"], st["st_gid"]) == (0o700, 1234, 5678)
        fh = fs.opendir("/d")
        try:
            fs.fsyncdir("/d", 0, fh)
        finally:
            fs.releasedir("/d", fh)
        assert writes.seen == 1
    finally:
        s.close()
    assert writes.seen == 1, "the unmount wrote the directory again"
    other = Session(ref, str(tmp_path / "other-cache"))
    try:
        st = other.ops.stat("/d")
        assert (st["st_mode"] & 0o7777, st["st_uid"], st["st_gid"]) == (0o700, 1234, 5678)
        assert st["st_mtime"] == 1_100_000_000 * 10**9  # the mount reports nanoseconds
        assert sorted(other.ops.listdir("/d")) == [f"f{i}" for i in range(5)]
    finally:
        other.close()


def test_saved_listings_serve_one_mount_only(ref, tmp_path):
    """A mount that ends without unmounting saves nothing, and the listings it started from
    are gone: the next mount lists again and sees what that mount uploaded."""
    cache = str(tmp_path / "cache")
    s = Session(ref, cache)
    try:
        populate(s.ops)
    finally:
        s.close()
    s = Session(ref, cache)
    s.ops.write_file("/d0/late", b"uploaded, then the mount died")
    s.mount.fs.wb.drain(s.mount.ns.pending())
    s.crash()

    s = Session(ref, cache)
    try:
        count = s.counting()
        assert s.ops.read_file("/d0/late") == b"uploaded, then the mount died"
        assert "late" in s.ops.listdir("/d0")
        assert count.seen > 0
    finally:
        s.close()


def test_commands_refused_while_a_mount_holds_the_lease(ref, tmp_path):
    (tmp_path / "x.txt").write_bytes(b"x")
    s = Session(ref, str(tmp_path / "cache"))
    try:
        s.ops.write_file("/kept", b"kept")
        for args in (("put", str(tmp_path / "x.txt"), ref.path("x.txt")), ("mkdir", ref.path("m")),
                     ("rm", ref.path("kept")), ("mv", ref.path("kept"), ref.path("moved"))):
            result = ref.cli(*args)
            assert result.returncode == errors.EXIT_IN_USE, result
            assert "is mounted read-write" in result.stderr and "pid" in result.stderr, result
        assert ref.cli("ls", ref.url).returncode == 0  # reading needs no lease
        assert s.ops.listdir("/") == ["kept"]
    finally:
        s.close()
    assert ref.cli("put", str(tmp_path / "x.txt"), ref.path("x.txt")).returncode == 0


@pytest.mark.parametrize("volume_kind", ["local"], indirect=True)
def test_commands_wait_for_a_mount_that_left_uploads(ref, tmp_path):
    """A mount whose unmount could not upload everything says so in the released lease; a
    command then refuses (its write would make those uploads stale) unless --break-lease."""
    cache = str(tmp_path / "cache")
    s = Session(ref, cache)
    s.plan.add(Rule(frozenset({"put", "upload"}), fail_times=10_000, key_contains=s.store.vol.prefix + "t/"))
    s.ops.write_file("/pending", b"not uploaded yet")
    s.close()
    (tmp_path / "x.txt").write_bytes(b"x")
    refused = ref.cli("put", str(tmp_path / "x.txt"), ref.path("x.txt"))
    assert refused.returncode == errors.EXIT_IN_USE, refused
    assert "left 1 upload(s)" in refused.stderr and "--break-lease" in refused.stderr, refused

    s = Session(ref, cache)  # the next mount there uploads it, and releases cleanly
    try:
        assert s.ops.read_file("/pending") == b"not uploaded yet"
    finally:
        s.close()
    assert ref.cli("put", str(tmp_path / "x.txt"), ref.path("x.txt")).returncode == 0
    assert ref.read("pending") == b"not uploaded yet"


@pytest.mark.parametrize("volume_kind", ["local"], indirect=True)
def test_a_command_that_breaks_the_lease_makes_the_left_uploads_stale(ref, tmp_path):
    """With --break-lease a command writes anyway; the uploads the last mount left are then
    never replayed over what it wrote: the next mount there sets them aside."""
    cache = str(tmp_path / "cache")
    s = Session(ref, cache)
    s.plan.add(Rule(frozenset({"put", "upload"}), fail_times=10_000, key_contains=s.store.vol.prefix + "t/"))
    s.ops.write_file("/f", b"the mount's version, never uploaded")
    s.close()
    (tmp_path / "f").write_bytes(b"the command's version")
    forced = ref.cli("put", "--break-lease", str(tmp_path / "f"), ref.path("f"))
    assert forced.returncode == 0, forced

    s = Session(ref, cache)
    try:
        assert s.ops.read_file("/f") == b"the command's version"
        assert s.mount.journal.records() == []
    finally:
        s.close()
    aside = [n for n in os.listdir(s.mount.root) if n.startswith("stale-journal")]
    assert len(aside) == 1, "the left uploads were neither replayed nor set aside"
    assert ref.read("f") == b"the command's version"
