"""Real mounts: names never vanish while uploads complete, every state of a file behaves
as on a local filesystem, and directory times and atime are kept.

Upload timing is controlled through CRYPTFS_FAULTS (a rule file the mount process reads):
uploads are slowed at random, or held at the door to storage while a pause file exists,
so the windows between states are hit on every run.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import stat
import tarfile
import threading
import time

import pytest

from mountlib import read, run, sh, write

pytestmark = [pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                                 reason="needs /dev/fuse and fusermount3"),
              pytest.mark.usefixtures("hang_guard")]


class Faults:
    """A CRYPTFS_FAULTS rule file and its pause switch, for one mount."""

    def __init__(self, base, rules=()):
        self.path = os.path.join(base, "faults.json")
        self.pause_file = os.path.join(base, "faults-hold")
        self.arrived_file = os.path.join(base, "faults-held")
        self.write(list(rules))

    def write(self, rules) -> None:
        with open(self.path + ".tmp", "w") as f:
            json.dump({"rules": rules}, f)
        os.replace(self.path + ".tmp", self.path)

    @property
    def env(self) -> dict:
        return {"CRYPTFS_FAULTS": self.path}

    def hold_uploads(self) -> None:
        """Uploads (whole-object and multipart) wait at the door until release()."""
        open(self.pause_file, "w").close()
        if os.path.exists(self.arrived_file):
            os.unlink(self.arrived_file)
        self.write([{"ops": ["upload"], "pause_file": self.pause_file, "arrived_file": self.arrived_file}])

    def wait_arrived(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.arrived_file):
            assert time.monotonic() < deadline, "no upload reached the door"
            time.sleep(0.02)

    def release(self) -> None:
        if os.path.exists(self.pause_file):
            os.unlink(self.pause_file)


@pytest.fixture(scope="module")
def slow_mount(volume_factory, volume_kind, tmp_path_factory):
    """A mount whose uploads land at random moments 0-0.15 s after they start, and whose
    listings are re-read every 0.3 s, so lookups race uploads all the time."""
    from mountlib import MountedVolume
    ref = volume_factory(volume_kind)
    base = tmp_path_factory.mktemp(f"names-{volume_kind}")
    faults = Faults(str(base), [{"ops": ["upload", "put", "copy"], "jitter": 0.15}])
    # listings trusted 0.3 s only: they are re-read while uploads land
    m = MountedVolume(ref, base / "mnt", base / "cache", ("--attr-ttl", "0.3"), env=faults.env)
    try:
        m.mount()
        yield m
    finally:
        m.force_unmount()


@pytest.fixture
def held(volume_factory, volume_kind, own_mounts, tmp_path):
    """(mount, faults): a mount of a fresh volume whose uploads can be held at the door."""
    ref = volume_factory(volume_kind)
    faults = Faults(str(tmp_path))
    m = own_mounts(ref, name="held", env=faults.env)
    yield m, faults
    faults.release()


def in_thread(func, *args):
    """Start func(*args) in a thread; returns a join() that re-raises what it raised."""
    box = {}

    def target():
        try:
            box["result"] = func(*args)
        except BaseException as exc:  # handed to the joiner
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()

    def join(timeout=60):
        t.join(timeout)
        assert not t.is_alive(), f"{func.__name__} did not return"
        if "error" in box:
            raise box["error"]
        return box.get("result")
    return join


def bucket_names(ref, path="") -> list[str]:
    return ref.listdir(path)


# ---------------------------------------------------------------- names never vanish

def test_probe_no_name_vanishes_while_uploads_finish(slow_mount, tmp_path):
    """The write-temp-then-rename pattern for 300 files, polled while their uploads land; a
    program that appends (creating the file when absent) during that time loses nothing."""
    d = slow_mount.path("probe")
    os.makedirs(d)
    names = [f"f{i:04d}" for i in range(300)]
    for n in names:
        t = os.path.join(d, "." + n + ".tmp")
        with open(t, "w") as f:
            f.write("A\n")
        os.rename(t, os.path.join(d, n))
    missing_seen = []
    for _ in range(20):
        gone = [n for n in names if not os.path.exists(os.path.join(d, n))]
        listed = set(os.listdir(d))
        missing_seen += gone + [n for n in names if n not in listed]
        for n in gone:
            with open(os.path.join(d, n), "a") as f:
                f.write("B\n")
        time.sleep(0.1)
    assert not missing_seen, f"{len(missing_seen)} names vanished: {sorted(set(missing_seen))[:20]}"
    assert sorted(os.listdir(d)) == names
    slow_mount.remount()
    assert sorted(os.listdir(d)) == names
    wrong = [n for n in names if read(os.path.join(d, n)) != b"A\n"]
    assert not wrong, wrong[:20]


def test_tar_extract_then_find_counts_every_file(slow_mount, tmp_path):
    src = tmp_path / "src"
    for i in range(20):
        (src / f"d{i:02d}").mkdir(parents=True)
        for j in range(20):
            (src / f"d{i:02d}" / f"f{j:02d}.txt").write_bytes(f"{i}-{j}\n".encode() * (j + 1))
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src, arcname="tree")
    for round_ in range(2):
        dest = slow_mount.path(f"tar{round_}")
        os.makedirs(dest)
        run("tar", "-xf", archive, "-C", dest)
        count = run("find", dest, "-type", "f").stdout.count(b"\n")
        assert count == 400, (round_, count)
    slow_mount.remount()
    assert run("find", slow_mount.path("tar0"), "-type", "f").stdout.count(b"\n") == 400
    assert read(slow_mount.path("tar1", "tree", "d19", "f19.txt")) == b"19-19\n" * 20


def test_rsync_again_at_once_sends_nothing(slow_mount, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(150):
        (src / f"f{i:03d}").write_bytes(os.urandom(100 + i))
    dest = slow_mount.path("rsync")
    run("rsync", "-a", f"{src}/", f"{dest}/")
    out = run("rsync", "-a", "--stats", f"{src}/", f"{dest}/").stdout.decode()
    assert "Number of regular files transferred: 0" in out, out
    assert "Number of created files: 0" in out, out


def test_read_then_unlink_leaves_the_directory_removable(slow_mount, volume_kind):
    """`cat f; rm f` at once, uploaded and pending alike: no .fuse_hidden name, in the
    listing or in the bucket, and the directory can be removed."""
    base = slow_mount.path("readrm")
    os.makedirs(base)
    for i in range(30):
        d = os.path.join(base, f"d{i}")
        os.mkdir(d)
        write(os.path.join(d, "f"), b"x" * (i * 1000))
        if i % 2:
            time.sleep(0.5)  # uploaded (or nearly) first
        sh("cat f >/dev/null; rm f", cwd=d)
        p = os.path.join(d, "g")
        with open(p, "w") as f:
            f.write("y")
        open(p).read()
        os.unlink(p)
        assert os.listdir(d) == [], os.listdir(d)
        os.rmdir(d)
    assert os.listdir(base) == []
    slow_mount.remount()
    assert os.listdir(base) == []
    assert bucket_names(slow_mount.ref, "readrm") == []


def test_open_unlinked_file_stays_readable_and_is_then_gone(slow_mount):
    d = slow_mount.path("openrm")
    os.makedirs(d)
    p = os.path.join(d, "f")
    write(p, b"keep me" * 1000)
    time.sleep(1.0)
    with open(p, "rb") as f:
        os.unlink(p)
        assert os.listdir(d) == []
        assert os.fstat(f.fileno()).st_size == 7000
        assert f.read() == b"keep me" * 1000
        write(p, b"new")  # the name is free for a new file meanwhile
    assert read(p) == b"new"
    slow_mount.remount()
    assert os.listdir(d) == ["f"] and read(p) == b"new"


# ---------------------------------------------------------------- changes during an upload

def _during_upload(m, faults, name: str, content: bytes, change) -> None:
    """Write a file, hold its upload at the door, apply `change` (which may wait for the
    upload to finish), then let the upload go; the name is visible throughout."""
    path = m.path(name)
    faults.hold_uploads()
    write(path, content)
    faults.wait_arrived()
    assert os.stat(path).st_size == len(content)  # uploading: still there
    assert name in os.listdir(m.mountpoint)
    join = in_thread(change, path)
    time.sleep(0.3)
    faults.release()
    join()


def test_rename_during_upload(held):
    m, faults = held
    _during_upload(m, faults, "a", b"big" * 300000, lambda p: os.rename(p, m.path("b")))
    assert not os.path.exists(m.path("a")) and read(m.path("b")) == b"big" * 300000
    m.remount()
    assert sorted(os.listdir(m.mountpoint)) == ["b"] and read(m.path("b")) == b"big" * 300000
    assert bucket_names(m.ref) == ["b"]


def test_chmod_and_utimens_during_upload(held):
    m, faults = held

    def change(p):
        os.chmod(p, 0o600)
        os.utime(p, ns=(1_900_000_000_100_000_000, 1_950_000_000_200_000_000))
    _during_upload(m, faults, "c", b"c" * 5000, change)
    for _ in range(2):
        st = os.stat(m.path("c"))
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert (st.st_atime_ns, st.st_mtime_ns) == (1_900_000_000_100_000_000, 1_950_000_000_200_000_000)
        assert read(m.path("c")) == b"c" * 5000
        m.remount()


def test_unlink_during_upload(held):
    m, faults = held
    _during_upload(m, faults, "u", b"u" * 70000, os.unlink)
    assert os.listdir(m.mountpoint) == []
    m.remount()
    assert os.listdir(m.mountpoint) == [] and bucket_names(m.ref) == []


def test_overwrite_during_upload(held):
    m, faults = held
    _during_upload(m, faults, "o", b"old" * 40000, lambda p: write(p, b"new content"))
    assert read(m.path("o")) == b"new content"
    m.remount()
    assert read(m.path("o")) == b"new content"


# ---------------------------------------------------------------- emptiness sees every state

def test_rename_over_directory_with_a_file_in_each_state(volume_factory, volume_kind, own_mounts, tmp_path):
    """rename(a, b) and rmdir(b) refuse with ENOTEMPTY while b holds a file that is dirty
    (open), journaled (closed, waiting), uploading (held at the door) or uploaded."""
    ref = volume_factory(volume_kind)
    faults = Faults(str(tmp_path))
    m = own_mounts(ref, "--writeback-delay", "60", name="states", env=faults.env)

    def refuses(state: str) -> None:
        a, b = m.path(f"a-{state}"), m.path(f"b-{state}")
        with pytest.raises(OSError) as info:
            os.rename(a, b)
        assert info.value.errno == errno.ENOTEMPTY, (state, info.value)
        with pytest.raises(OSError) as info:
            os.rmdir(b)
        assert info.value.errno == errno.ENOTEMPTY, (state, info.value)
        assert os.listdir(b) == ["k"], state

    for state in ("dirty", "journaled", "uploading", "uploaded"):
        os.mkdir(m.path(f"a-{state}"))
        os.mkdir(m.path(f"b-{state}"))
    k = {s: m.path(f"b-{s}", "k") for s in ("dirty", "journaled", "uploading", "uploaded")}
    write(k["uploaded"], b"uploaded")
    with open(k["uploaded"], "rb+") as f:
        os.fsync(f.fileno())
    refuses("uploaded")
    write(k["journaled"], b"journaled")
    refuses("journaled")
    faults.hold_uploads()
    write(k["uploading"], b"uploading")
    def fsync(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    join = in_thread(fsync, k["uploading"])
    faults.wait_arrived()
    refuses("uploading")
    with open(k["dirty"], "wb") as f:
        f.write(b"dirty")
        f.flush()
        refuses("dirty")
    faults.release()
    join()
    m.remount()
    for state, path in k.items():
        assert read(path) == state.encode(), state


# ---------------------------------------------------------------- directory times, atime

def test_directory_times_follow_changes_inside_and_persist(mnt, work):
    d = os.path.join(work, "d")
    os.mkdir(d)
    other = os.path.join(work, "other")
    os.mkdir(other)
    steps = [
        ("create", lambda: write(os.path.join(d, "f"), b"1")),
        ("mkdir", lambda: os.mkdir(os.path.join(d, "sub"))),
        ("symlink", lambda: os.symlink("f", os.path.join(d, "ln"))),
        ("rename inside", lambda: os.rename(os.path.join(d, "f"), os.path.join(d, "g"))),
        ("rename out", lambda: os.rename(os.path.join(d, "g"), os.path.join(other, "g"))),
        ("rename in", lambda: os.rename(os.path.join(other, "g"), os.path.join(d, "g"))),
        ("unlink", lambda: os.unlink(os.path.join(d, "ln"))),
        ("rmdir", lambda: os.rmdir(os.path.join(d, "sub"))),
    ]
    for label, action in steps:
        before = os.stat(d)
        time.sleep(0.02)
        action()
        after = os.stat(d)
        assert after.st_mtime_ns > before.st_mtime_ns, label
        assert after.st_ctime_ns > before.st_ctime_ns, label
    last = os.stat(d)
    root_mtime = os.stat(work).st_mtime_ns
    mnt.remount()
    st = os.stat(d)
    assert (st.st_mtime_ns, st.st_ctime_ns) == (last.st_mtime_ns, last.st_ctime_ns)
    assert os.stat(work).st_mtime_ns == root_mtime


UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    times = (Timespec * 2)(Timespec(*atime), Timespec(*mtime))
    if libc.utimensat(-100, os.fsencode(path), times, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)


def test_atime_mtime_ctime_kept_apart_with_nanoseconds(mnt, work):
    p = os.path.join(work, "t")
    write(p, b"x")
    os.utime(p, ns=(1_900_000_000_100_000_000, 1_950_000_000_200_000_000))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_900_000_000_100_000_000, 1_950_000_000_200_000_000)
    ctime = st.st_ctime_ns
    utimensat(p, (0, UTIME_OMIT), (1_960_000_000, 300_000_000))  # mtime only
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_900_000_000_100_000_000, 1_960_000_000_300_000_000)
    assert st.st_ctime_ns >= ctime
    utimensat(p, (1_910_000_000, 400_000_000), (0, UTIME_OMIT))  # atime only
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_910_000_000_400_000_000, 1_960_000_000_300_000_000)
    before = time.time_ns()
    utimensat(p, (0, UTIME_NOW), (0, UTIME_OMIT))
    st = os.stat(p)
    assert st.st_atime_ns >= before - 10**9 and st.st_mtime_ns == 1_960_000_000_300_000_000
    os.mkdir(os.path.join(work, "dir"))
    os.utime(os.path.join(work, "dir"), ns=(1_800_000_000_000_000_001, 1_700_000_000_000_000_002))
    want = os.stat(p)
    mnt.remount()
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (want.st_atime_ns, want.st_mtime_ns)
    st = os.stat(os.path.join(work, "dir"))
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_800_000_000_000_000_001, 1_700_000_000_000_000_002)


@pytest.mark.expect_log_errors(r"upload", r"injected failure")
def test_umount_fails_when_uploads_fail_and_the_next_mount_uploads(volume_factory, volume_kind, own_mounts,
                                                                     tmp_path):
    """An unmount that returns 0 has every closed file in the bucket; one that could not
    upload says so, and the next mount finishes from the journal."""
    from conftest import assert_cli_error, run_cli
    ref = volume_factory(volume_kind)
    faults = Faults(str(tmp_path), [{"ops": ["upload"], "fail_rate": 1.0}])
    m = own_mounts(ref, "--writeback-delay", "30", name="failing", env=faults.env)
    write(m.path("kept"), b"closed before the outage")
    result = run_cli("umount", m.mountpoint, "--timeout", "60")
    assert_cli_error(result, 1, "could not be uploaded", "journal")
    assert not os.path.ismount(m.mountpoint)
    assert bucket_names(ref) == []
    faults.write([])
    m.mount()
    assert read(m.path("kept")) == b"closed before the outage"
    m.umount()
    assert bucket_names(ref) == ["kept"]
