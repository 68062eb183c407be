"""Helpers and fixtures for tests that mount volumes through the real entry point.

Every mount is `python -m cryptfs mount URL MOUNTPOINT --cache-dir <tmp> --writeback-delay 0.2`
run as a subprocess. Mount logs are checked: a `Traceback`, `ERROR` or `CRITICAL` line a
test did not declare (`expect_log_errors`) fails it.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import random
import re
import signal
import stat
import subprocess
import threading
import time

import pytest

from conftest import run_cli

BLOCK = 64 * 1024
WRITEBACK_DELAY = "0.2"
PROGRAM_TIMEOUT = 120
TEST_TIMEOUT = 150   # a test still running then is hung in the mount: its mount processes are killed
LOG_PROBLEM = re.compile(r"Traceback|: (ERROR|CRITICAL):")


# ---------------------------------------------------------------- helpers

def run(*cmd, cwd=None, env=None, check=True, input=None) -> subprocess.CompletedProcess:
    """Run a real program; on failure show what it said."""
    proc = subprocess.run([os.fspath(c) for c in cmd], cwd=cwd, env=env, input=input, capture_output=True,
                          timeout=PROGRAM_TIMEOUT, check=False)
    if check:
        assert proc.returncode == 0, (cmd, proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def sh(script: str, cwd=None) -> subprocess.CompletedProcess:
    return run("sh", "-ec", script, cwd=cwd)


def data(n: int, seed) -> bytes:
    return random.Random(seed).randbytes(n)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write(path, content: bytes) -> None:
    with open(path, "wb") as f:
        f.write(content)


def sha256(path) -> str:
    return hashlib.sha256(read(path)).hexdigest()


def raises_errno(code: int, func, *args, **kwargs) -> None:
    with pytest.raises(OSError) as info:
        func(*args, **kwargs)
    assert info.value.errno == code, (errno.errorcode.get(info.value.errno), info.value)


def _cmdline(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def mount_pids(mountpoint: str) -> list[int]:
    """PIDs of cryptfs mount processes for this mountpoint (`cryptfs mount ... MOUNTPOINT`)."""
    want = os.fsencode(os.path.abspath(mountpoint))
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        args = _cmdline(int(name))
        if b"cryptfs" in args and b"mount" in args and want in args and alive(int(name)):
            found.append(int(name))
    return found


def wait_gone(pids, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return not any(alive(p) for p in pids)


def usable(mountpoint: str) -> bool:
    """Mounted and answering (not 'Transport endpoint is not connected')."""
    if not os.path.ismount(mountpoint):
        return False
    try:
        os.listdir(mountpoint)
        return True
    except OSError:
        return False


ALL_MOUNTS: list = []  # every MountedVolume this module created, for the hang guard


class MountedVolume:
    """One volume mounted through `python -m cryptfs mount`, with its own cache directory."""

    def __init__(self, ref, mountpoint, cache_dir, extra=(), env=None):
        self.ref = ref
        self.env = env  # laid over the environment of the mount process (CRYPTFS_FAULTS, say)
        self.mountpoint = os.path.abspath(os.fspath(mountpoint))
        self.cache_dir = os.fspath(cache_dir)
        self.extra = list(extra)
        os.makedirs(self.mountpoint, exist_ok=True)
        ALL_MOUNTS.append(self)

    def __fspath__(self) -> str:
        return self.mountpoint

    def path(self, *parts) -> str:
        return os.path.join(self.mountpoint, *parts)

    def mount_command(self, *extra):
        return ("mount", self.ref.url, self.mountpoint, *self.ref.args, "--cache-dir", self.cache_dir,
                "--writeback-delay", WRITEBACK_DELAY, *self.extra, *extra)

    def mount(self, *extra) -> None:
        result = run_cli(*self.mount_command(*extra), env=self.env)
        assert result.returncode == 0, (result, self.log())
        assert "Traceback" not in result.stderr, result
        assert os.path.ismount(self.mountpoint), result

    def umount(self) -> None:
        """`cryptfs umount`: must succeed, leave nothing mounted and the mount process gone."""
        pids = mount_pids(self.mountpoint)
        result = run_cli("umount", self.mountpoint, "--timeout", "60")
        assert result.returncode == 0, (result, self.log())
        assert not os.path.ismount(self.mountpoint)
        assert wait_gone(pids, 60), f"mount process {pids} still running after umount"

    def remount(self, *extra) -> None:
        self.umount()
        self.mount(*extra)

    def daemon_pid(self) -> int:
        pids = mount_pids(self.mountpoint)
        assert len(pids) == 1, pids
        return pids[0]

    def log_path(self) -> str | None:
        found = glob.glob(os.path.join(self.cache_dir, "*", "mount.log"))
        return found[0] if found else None

    def log(self) -> str:
        path = self.log_path()
        if not path:
            return "<no mount.log>"
        with open(path, errors="replace") as f:
            return f.read()[-4000:]

    def log_size(self) -> int:
        path = self.log_path()
        return os.path.getsize(path) if path else 0

    def log_problems(self, since: int = 0, allowed: tuple = ()) -> list[str]:
        """Traceback/ERROR/CRITICAL lines logged since byte offset `since`, but for `allowed` patterns."""
        path = self.log_path()
        if not path:
            return []
        with open(path, errors="replace") as f:
            f.seek(since)
            lines = f.read().splitlines()
        return [line for line in lines if LOG_PROBLEM.search(line)
                and not any(re.search(p, line) for p in allowed)]

    def force_unmount(self) -> None:
        """Teardown: never leave a mount or a mount process behind."""
        pids = mount_pids(self.mountpoint)
        if os.path.ismount(self.mountpoint):
            result = run_cli("umount", self.mountpoint, "--timeout", "60")
            if result.returncode != 0 or os.path.ismount(self.mountpoint):
                subprocess.run(["fusermount3", "-uz", self.mountpoint], capture_output=True, check=False)
        if not wait_gone(pids, 60):
            for pid in pids:  # processes this test started, by PID
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
            wait_gone(pids, 10)


def mounted(ref, base, *extra, name="mnt") -> MountedVolume:
    m = MountedVolume(ref, os.path.join(base, name), os.path.join(base, name + "-cache"), extra)
    m.mount()
    return m


def tree_files(root) -> dict:
    """{relative path (bytes): kind} for everything under root."""
    root = os.fsencode(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            out[rel] = stat.S_IFMT(st.st_mode)
    return out


def compare_trees(a, b, mtimes=True, owners=True, dir_mtimes=True) -> None:
    """Same names, kinds, bytes, modes (and mtimes in ns, owners) under a and b."""
    ta, tb = tree_files(a), tree_files(b)
    assert sorted(ta) == sorted(tb)
    for rel, kind in sorted(ta.items()):
        pa, pb = os.path.join(os.fsencode(a), rel), os.path.join(os.fsencode(b), rel)
        sa, sb = os.lstat(pa), os.lstat(pb)
        assert stat.S_IFMT(sb.st_mode) == kind, rel
        if kind == stat.S_IFLNK:
            assert os.readlink(pb) == os.readlink(pa), rel
            continue
        assert stat.S_IMODE(sb.st_mode) == stat.S_IMODE(sa.st_mode), (rel, oct(sa.st_mode), oct(sb.st_mode))
        if owners:
            assert (sb.st_uid, sb.st_gid) == (sa.st_uid, sa.st_gid), rel
        if kind == stat.S_IFREG:
            assert sb.st_size == sa.st_size, rel
            assert read(pb) == read(pa), rel
        if mtimes and (kind == stat.S_IFREG or dir_mtimes):
            assert sb.st_mtime_ns == sa.st_mtime_ns, (rel, sa.st_mtime_ns, sb.st_mtime_ns)


def make_tree(root, seed=1) -> None:
    """A small tree with awkward sizes, names, modes, owners and nanosecond mtimes."""
    rng = random.Random(seed)
    root = os.fspath(root)
    os.makedirs(os.path.join(root, "sub", "deeper"))
    os.makedirs(os.path.join(root, "empty-dir"))
    sizes = {"empty": 0, "one": 1, "b-1.bin": BLOCK - 1, "b.bin": BLOCK, "b+1.bin": BLOCK + 1,
             "big.bin": 200001, "sub/text file.txt": 5000, "sub/café ünïcode.txt": 333,
             "sub/deeper/x.dat": 3 * BLOCK + 17}
    for i, (name, size) in enumerate(sizes.items()):
        write(os.path.join(root, name), rng.randbytes(size))
    write(os.path.join(os.fsencode(root), b"not-utf8-\xff\xfe.bin"), rng.randbytes(1234))
    os.chmod(os.path.join(root, "one"), 0o600)
    os.chmod(os.path.join(root, "b.bin"), 0o755)
    os.chmod(os.path.join(root, "sub/text file.txt"), 0o444)
    os.chmod(os.path.join(root, "sub"), 0o750)
    os.chown(os.path.join(root, "b+1.bin"), 1234, 2345)
    os.symlink("sub/text file.txt", os.path.join(root, "link"))
    os.symlink("../nowhere", os.path.join(root, "sub", "dangling"))
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root), topdown=False):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                os.utime(full, ns=(1_600_000_000_000_000_000 + rng.randrange(10**15),
                                   1_500_000_000_000_000_000 + rng.randrange(10**15)))
        os.utime(dirpath, ns=(1_600_000_000_123_456_789, 1_400_000_000_000_000_000 + rng.randrange(10**15)))


# ---------------------------------------------------------------- fixtures

@pytest.fixture
def hang_guard():
    """A request the mount never answers would block the test for good: after TEST_TIMEOUT
    seconds, kill this module's mount processes (by PID), which fails the blocked calls."""
    fired = []

    def fire():
        for m in list(ALL_MOUNTS):
            for pid in mount_pids(m.mountpoint):
                fired.append((m.mountpoint, pid, m.log()[-1500:]))
                os.kill(pid, signal.SIGKILL)

    timer = threading.Timer(TEST_TIMEOUT, fire)
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()
    if fired:
        pytest.fail(f"the test hung for {TEST_TIMEOUT} s; killed mount processes: {fired}")


@pytest.fixture(scope="module")
def shared_mount(volume_factory, volume_kind, tmp_path_factory):
    """One mount per backend for the tests that do not interfere with each other."""
    ref = volume_factory(volume_kind)
    base = tmp_path_factory.mktemp(f"mount-{volume_kind}")
    m = MountedVolume(ref, base / "mnt", base / "cache")
    try:
        m.mount()
        yield m
    finally:
        m.force_unmount()


def allowed_log_errors(request) -> tuple:
    marker = request.node.get_closest_marker("expect_log_errors")
    return tuple(marker.args) if marker else ()


@pytest.fixture
def mnt(shared_mount, request) -> MountedVolume:
    """The shared mount, remounted first if an earlier test left it unusable; the test fails
    on a Traceback or ERROR it logs."""
    if not usable(shared_mount.mountpoint):
        shared_mount.force_unmount()
        shared_mount.mount()
    start = shared_mount.log_size()
    yield shared_mount
    problems = shared_mount.log_problems(start, allowed_log_errors(request))
    assert not problems, "mount log:\n" + "\n".join(problems[:20])


@pytest.fixture
def work(mnt, request) -> str:
    """A fresh directory inside the shared mount, named after the test."""
    path = mnt.path(request.node.originalname)
    os.mkdir(path)
    return path


@pytest.fixture
def own_mounts(tmp_path, request):
    """mount(ref, *extra, name=...) -> a MountedVolume of its own; all unmounted at teardown,
    then their logs checked for a Traceback or ERROR."""
    made: list[MountedVolume] = []

    def mount(ref, *extra, name="mnt", env=None) -> MountedVolume:
        m = MountedVolume(ref, tmp_path / name, tmp_path / (name + "-cache"), extra, env=env)
        made.append(m)
        m.mount()
        return m

    yield mount
    for m in reversed(made):
        m.force_unmount()
    problems = [p for m in made for p in m.log_problems(0, allowed_log_errors(request))]
    assert not problems, "mount log:\n" + "\n".join(problems[:20])


