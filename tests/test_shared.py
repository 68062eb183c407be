"""`--shared`: several read-write mounts of one volume (docs/lease.md, "Shared mounts").

Two real mounts with their own cache directories, on moto and on SeaweedFS: every commit is
conditional, a lost race keeps both versions (a conflict copy), a file created in a
directory the other mount removed lands in /lost+found, and a dead mount's pending upload
never replaces a newer version. Every case ends with an fsck that finds nothing.
"""

import errno
import os
import random
import re
import signal
import subprocess
import threading
import time

import pytest

from conftest import S3_SERVERS, run_cli
from mountlib import MountedVolume, allowed_log_errors, data, read, usable, wait_gone, write

from cryptfs.errors import EXIT_IN_USE

pytestmark = pytest.mark.usefixtures("hang_guard")

TTL = "0.5"  # --attr-ttl of the test mounts: a change shows in the other mount after this
SEEN = 1.5  # seconds to wait for the other mount to see a change (TTL, kernel caches of 1 s)
CONFLICT = re.compile(r" \(conflict \d{4}-\d\d-\d\d \d{6} [^)]+\)")


@pytest.fixture(scope="module", params=S3_SERVERS)
def server(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def both(volume_factory, server, tmp_path_factory):
    """(volume, mount a, mount b): two --shared mounts of one volume on `server`, for the module."""
    ref = volume_factory("s3", server=server)
    base = tmp_path_factory.mktemp(f"shared-{server}")
    made = [MountedVolume(ref, base / n, base / f"{n}-cache", ["--shared", "--attr-ttl", TTL]) for n in "ab"]
    try:
        for m in made:
            m.mount()
        yield ref, made[0], made[1]
    finally:
        for m in made:
            m.force_unmount()


class View:
    """One test's own directory in a shared mount."""

    def __init__(self, mount: MountedVolume, sub: str):
        self.mount, self.sub = mount, sub

    def path(self, *parts) -> str:
        return self.mount.path(self.sub, *parts)

    def log(self) -> str:
        return self.mount.log()


@pytest.fixture
def pair(both, request):
    """(volume, a, b): this test's directory, seen through both shared mounts; the test fails
    on a Traceback or ERROR either mount logs meanwhile."""
    ref, a, b = both
    for m in (a, b):
        if not usable(m.mountpoint):
            m.force_unmount()
            m.mount()
    sub = request.node.originalname
    os.mkdir(a.path(sub))
    start = time.monotonic()
    while not os.path.isdir(b.path(sub)):
        assert time.monotonic() - start < 10, "the test directory never showed in the other mount"
        time.sleep(0.05)
    since = {m: m.log_size() for m in (a, b)}
    yield ref, View(a, sub), View(b, sub)
    problems = [p for m in (a, b) for p in m.log_problems(since[m], allowed_log_errors(request))]
    assert not problems, "mount log:\n" + "\n".join(problems[:20])


def settle() -> None:
    """Let pending uploads land (write-back delay 0.2 s) and the other mount see them."""
    time.sleep(SEEN)


def seen_by(mount, name: str, content: bytes) -> float:
    """Seconds until `mount` reads `content` under `name` (a change made by the other mount)."""
    start = time.monotonic()
    while True:
        try:
            if read(mount.path(name)) == content:
                return time.monotonic() - start
        except FileNotFoundError:
            pass
        assert time.monotonic() - start < 10, f"{name} not seen by the other mount"
        time.sleep(0.05)


def files(mount, path="") -> dict[str, bytes]:
    """Every regular file under a mount's directory, with its contents."""
    out = {}
    top = mount.path(path)
    for dirpath, _, names in os.walk(top):
        for name in names:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, top)] = read(full)
    return out


def conflicts_of(tree: dict[str, bytes], name: str) -> list[str]:
    return [k for k in tree if k != name and CONFLICT.sub("", k) == name]


def test_conflict_names():
    from cryptfs.writeback import conflict_name

    when = time.mktime((2026, 12, 2, 10, 15, 0, 0, 0, -1))
    assert conflict_name(b"report.txt", when, "host-b") == b"report (conflict 2026-12-02 101500 host-b).txt"
    assert conflict_name(b".bashrc", when, "h") == b".bashrc (conflict 2026-12-02 101500 h)"
    assert conflict_name(b"a.b.tar", when, "h", 1) == b"a.b (conflict 2026-12-02 101500 h 2).tar"
    long = conflict_name(b"x" * 255, when, "h")
    assert len(long) == 255 and long.endswith(b" (conflict 2026-12-02 101500 h)")


def test_own_changes_make_no_conflict(pair):
    """A mount's own successive changes (rewrite, chmod, rename, append) commit over its own
    last version: no conflict copy."""
    ref, a, b = pair
    since = a.mount.log_size()
    write(a.path("f"), b"one")
    time.sleep(0.6)  # uploaded
    write(a.path("f"), b"two")
    time.sleep(0.6)
    os.chmod(a.path("f"), 0o600)
    os.rename(a.path("f"), a.path("g"))
    with open(a.path("g"), "ab") as f:
        f.write(b" three")
    time.sleep(0.6)
    write(a.path("g"), b"four")
    seen_by(b, "g", b"four")
    assert sorted(files(b)) == ["g"]
    with open(a.mount.log_path(), errors="replace") as log:
        log.seek(since)
        assert "conflict" not in log.read()
    ref.assert_clean()


def test_exclusive_and_shared_mounts_exclude_each_other(volume_factory, server, own_mounts, tmp_path):
    ref = volume_factory("s3", server=server)
    a = own_mounts(ref, "--shared", name="a")
    os.makedirs(tmp_path / "x", exist_ok=True)
    refused = run_cli("mount", ref.url, str(tmp_path / "x"), *ref.args, "--cache-dir", str(tmp_path / "x-cache"))
    assert refused.returncode == EXIT_IN_USE, refused
    assert "--shared mounts" in refused.stderr and "host " in refused.stderr, refused.stderr
    a.umount()

    # and a shared mount never joins an exclusive one
    c = own_mounts(ref, "--break-lease", name="c")  # the shared lease is left to expire: taken over
    os.makedirs(tmp_path / "y", exist_ok=True)
    refused = run_cli("mount", ref.url, str(tmp_path / "y"), *ref.args, "--cache-dir", str(tmp_path / "y-cache"),
                      "--shared")
    assert refused.returncode == EXIT_IN_USE and "host " in refused.stderr, refused
    c.umount()
    ref.assert_clean()


def test_both_write_one_file_keeps_both_versions(pair):
    ref, a, b = pair
    write(a.path("report.txt"), b"first\n")
    seen_by(b, "report.txt", b"first\n")
    fa = open(a.path("report.txt"), "r+b")
    fb = open(b.path("report.txt"), "r+b")
    fa.write(b"from a\n")
    fb.write(b"from b, longer\n")
    fa.close()
    time.sleep(1.0)  # a's version lands first
    fb.close()
    settle()
    for m in (a, b):
        tree = files(m)
        assert tree["report.txt"] == b"from a\n", tree
        copies = conflicts_of(tree, "report.txt")
        assert len(copies) == 1 and copies[0].endswith(").txt"), tree
        assert tree[copies[0]] == b"from b, longer\n"
    # names stay out of the log unless --log-names; both versions' times are in it
    assert re.search(r"WARNING: conflict: .* replaced by another mount \(its version written \d{4}-.*\) while "
                     r"this mount's version \(written \d{4}-.*\) waited; ours is kept beside it", b.log()), b.log()
    ref.assert_clean()


def test_a_reader_keeps_its_version_while_the_other_replaces_it(pair):
    """b opens a file read-only, a replaces it (durably) before b reads: b reads the version
    it opened to the end, never a mix and never EAGAIN; its next open sees a's version."""
    ref, a, b = pair
    old, new = data(6 << 20, "old version"), data((6 << 20) + 5, "new version")  # one PUT: moto
    write(a.path("big.bin"), old)
    start = time.monotonic()
    while not (os.path.exists(b.path("big.bin")) and os.path.getsize(b.path("big.bin")) == len(old)):
        assert time.monotonic() - start < 10, "the file never showed in the other mount"
        time.sleep(0.05)
    with open(b.path("big.bin"), "rb") as reader:
        with open(a.path("big.bin"), "wb") as writer:
            writer.write(new)
            writer.flush()
            os.fsync(writer.fileno())  # in the bucket: the version b opened is gone from it
        assert reader.read() == old
    seen_by(b, "big.bin", new)
    ref.assert_clean()


def test_both_write_a_multipart_file_keeps_both_versions(pair, server):
    """The same race on a file large enough for a multipart upload: the condition is on
    CompleteMultipartUpload, and the losing upload becomes the conflict copy. moto ignores
    that condition: there a shared mount keeps files to one PUT, and says so."""
    ref, a, b = pair
    big = data(9 << 20, 3)  # more than one 8 MiB part
    if server == "moto":
        with pytest.raises(OSError) as info:
            write(a.path("big.bin"), big)
        assert info.value.errno == errno.EFBIG  # (`cryptfs mount` said why, on its stderr)
        return
    write(a.path("big.bin"), big)
    seen_by(b, "big.bin", big)
    with open(a.path("big.bin"), "r+b") as fa, open(b.path("big.bin"), "r+b") as fb:
        fa.write(b"A" * 100)
        fb.write(b"B" * 100)
        fa.close()
        time.sleep(2.0)  # a's version lands first
    settle()
    tree = files(a)
    copies = conflicts_of(tree, "big.bin")  # a's upload may still be running when b's starts
    assert len(copies) == 1, list(tree)
    assert {tree["big.bin"], tree[copies[0]]} == {b"A" * 100 + big[100:], b"B" * 100 + big[100:]}
    ref.assert_clean()


def test_append_race_loses_no_append(pair):
    ref, a, b = pair
    write(a.path("log.txt"), b"start\n")
    seen_by(b, "log.txt", b"start\n")
    with open(a.path("log.txt"), "ab") as fa, open(b.path("log.txt"), "ab") as fb:
        fa.write(b"append a\n")
        fb.write(b"append b\n")
    settle()
    tree = files(a)
    everything = b"".join(v for k, v in tree.items() if CONFLICT.sub("", k) == "log.txt")
    assert b"append a\n" in everything and b"append b\n" in everything, tree
    assert len(conflicts_of(tree, "log.txt")) == 1, tree
    ref.assert_clean()


def test_create_in_a_directory_the_other_removes(pair):
    ref, a, b = pair
    os.mkdir(a.path("d"))
    os.mkdir(a.path("e"))
    settle()
    # uploaded before the removal: rmdir fails, nothing is lost
    with open(b.path("e", "kept"), "wb") as f:
        f.write(b"kept in e")
        f.flush()
        os.fsync(f.fileno())
    time.sleep(SEEN)
    with pytest.raises(OSError) as info:
        os.rmdir(a.path("e"))
    assert info.value.errno == errno.ENOTEMPTY
    # created while the other mount removes the directory: lands in /lost+found
    with open(b.path("d", "late"), "wb") as f:
        f.write(b"written late")
        f.flush()
        os.rmdir(a.path("d"))  # b's file is uploaded only after its close: the directory looks empty
    time.sleep(SEEN)
    found = {k: v for k, v in files(a.mount, "lost+found").items() if k.startswith("late.")}
    assert list(found.values()) == [b"written late"], found
    assert "its directory was removed by another mount" in b.log()
    assert read(a.path("e", "kept")) == b"kept in e"
    ref.assert_clean()


def test_rename_while_the_other_writes_keeps_all_data(pair):
    ref, a, b = pair
    write(a.path("f"), b"version one")
    seen_by(b, "f", b"version one")
    with open(b.path("f"), "r+b") as fb:
        fb.write(b"VERSION TWO")
        os.rename(a.path("f"), a.path("g"))
    settle()
    tree = files(a)
    assert tree.get("g") == b"version one", tree
    assert b"VERSION TWO" in [v for k, v in tree.items() if k != "g"], tree
    ref.assert_clean()


def test_dead_holder_pending_upload_not_replayed_over_newer_data(volume_factory, server, own_mounts):
    ref = volume_factory("s3", server=server)
    a = own_mounts(ref, "--shared", "--attr-ttl", TTL, "--lease-duration", "3", "--writeback-delay", "60", name="a")
    b = own_mounts(ref, "--shared", "--attr-ttl", TTL, "--lease-duration", "3", name="b")
    with open(a.path("f"), "wb") as f:
        f.write(b"old")
        f.flush()
        os.fsync(f.fileno())
    seen_by(b, "f", b"old")
    write(a.path("f"), b"a's pending version")  # journaled, upload due in 60 s
    pid = a.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    assert wait_gone([pid], 10)
    subprocess.run(["fusermount3", "-uz", a.mountpoint], check=True)
    write(b.path("f"), b"b's newer version")
    time.sleep(SEEN)
    b.umount()
    time.sleep(4)  # the shared lease expires: an exclusive mount may take over
    a.extra = ["--attr-ttl", TTL]
    a.mount()  # exclusive now: the dead shared mount's conditional record is replayed, and loses
    tree = files(a)
    assert tree["f"] == b"b's newer version", tree
    copies = conflicts_of(tree, "f")
    assert [tree[c] for c in copies] == [b"a's pending version"], tree
    a.umount()
    ref.assert_clean()


# ---------------------------------------------------------------- model: both mounts at random

def test_model_two_mounts_lose_no_update(pair):
    """Both mounts create, append, overwrite (read-modify-write through one open file),
    rename, unlink, mkdir and rmdir at once. Every token a successful write added must be in the final tree: in its
    file or a conflict copy. Unlinks remove only a mount's own files (their tokens go)."""
    ref, a, b = pair
    for name in ("s0", "s1", "s2"):  # files both mounts update
        write(a.path(name), b"")
    settle()
    kept: set[str] = set()
    done: list[str] = []  # what each mount did, in order: for the failure message
    lock = threading.Lock()
    counts = {"ops": 0}
    errors: list[str] = []

    def worker(m, tag: str, seed: int) -> None:
        rng = random.Random(seed)
        own: dict[str, set[str]] = {}  # this mount's own files -> their tokens
        dirs: list[str] = []
        for i in range(40):
            token = f"<{tag}{i}>"
            op = rng.choice(["create", "append", "overwrite", "rename", "unlink", "mkdir", "rmdir"])
            try:
                if op == "create":
                    name = f"{tag}-{i}"
                    if dirs and rng.random() < 0.5:
                        name = f"{rng.choice(dirs)}/{name}"
                    write(m.path(name), token.encode())
                    own[name] = {token}
                    with lock:
                        kept.add(token)
                elif op == "append":
                    with open(m.path(rng.choice(["s0", "s1", "s2"])), "ab") as f:
                        f.write(token.encode())
                    with lock:
                        kept.add(token)
                elif op == "overwrite":  # read-modify-write through one open file
                    with open(m.path(rng.choice(["s0", "s1", "s2"])), "r+b") as f:
                        old = f.read()
                        f.seek(0)
                        f.write(token.encode() + old)
                    with lock:
                        kept.add(token)
                elif op == "rename" and own:
                    name = rng.choice(sorted(own))
                    new = f"{name}.r{i}"
                    os.rename(m.path(name), m.path(new))
                    own[new] = own.pop(name)
                elif op == "unlink" and own:
                    name = rng.choice(sorted(own))
                    os.unlink(m.path(name))
                    with lock:
                        kept.difference_update(own.pop(name))
                elif op == "mkdir":
                    os.mkdir(m.path(f"{tag}d{i}"))
                    dirs.append(f"{tag}d{i}")
                elif op == "rmdir" and dirs:
                    d = rng.choice(dirs)
                    if not any(n.startswith(d + "/") for n in own):
                        os.rmdir(m.path(d))
                        dirs.remove(d)
            except OSError as exc:
                errors.append(f"{tag} {op}: {exc}")
            with lock:
                counts["ops"] += 1
                done.append(f"{token} {op}")

    seed = int(os.environ.get("CRYPTFS_MODEL_SEED", "1"))  # other seeds: other runs of the model
    threads = [threading.Thread(target=worker, args=(m, t, s)) for m, t, s in ((a, "a", seed), (b, "b", -seed))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    settle()
    final = b"".join(files(a).values()).decode()
    lost = sorted(t for t in kept if t not in final)
    print(f"model (seed {seed}): {counts['ops']} operations, {len(kept)} tokens kept, {len(lost)} lost")
    if lost:
        print("model: lost", lost, "\nops:", done, "\ntree:", files(a))
    assert not lost, lost
    ref.assert_clean()
