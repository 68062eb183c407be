"""Real FUSE mounts through the real entry point, driven with ordinary programs.

Every mount here is `python -m cryptfs mount URL MOUNTPOINT --cache-dir <tmp> --writeback-delay 0.2`
run as a subprocess, once per backend (a local directory and moto's S3 server over HTTP).
Tests that do not interfere share one mount per backend (module scope), each in its own
directory; tests that need their own options (kill -9, tampering, two mounts) get their own
volume and mount. Every mount is unmounted at teardown (`cryptfs umount`, falling back to
`fusermount3 -uz`); `remount()` checks that what was written persists.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import assert_cli_error, closed_port, run_cli, run_cli_many, unique_bucket_name
from cryptfs import format as fmt
from mountlib import (BLOCK, PROGRAM_TIMEOUT, WRITEBACK_DELAY, compare_trees, data, make_tree, mount_pids,
                      raises_errno, read, run, sh, sha256, tree_files, wait_gone, write)

pytestmark = [pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                                 reason="needs /dev/fuse and fusermount3"),
              pytest.mark.usefixtures("hang_guard")]

# ---------------------------------------------------------------- whole programs

def test_cp_a_round_trip(mnt, work, tmp_path):
    src, back = tmp_path / "src", tmp_path / "back"
    make_tree(src)
    run("cp", "-a", src, os.path.join(work, "tree"))
    compare_trees(src, os.path.join(work, "tree"))
    # back out from what was stored (test_listing_while_uploads_finish covers listing during uploads)
    mnt.remount()
    run("cp", "-a", os.path.join(work, "tree"), back)
    compare_trees(src, back)


def test_dd_notrunc_overwrites(mnt, work, tmp_path):
    ref, f = str(tmp_path / "ref"), os.path.join(work, "file")
    base = data(200001, "dd-base")
    write(tmp_path / "base", base)
    steps = [  # (patch size, dd arguments); each runs on the reference and on the mount
        (3000, ["bs=1000", "seek=10", "conv=notrunc"]),
        (20, ["bs=4096", "seek=65530", "oflag=seek_bytes", "conv=notrunc"]),            # across a block edge
        (10000, ["bs=4096", "seek=30", "conv=notrunc"]),                                # 122880..132880
        (1, ["bs=1", "seek=0", "conv=notrunc"]),
        (777, ["bs=4096", "seek=205001", "oflag=seek_bytes", "conv=notrunc"]),          # past the end: a hole
        (100, ["bs=4096", "seek=70000", "oflag=seek_bytes"]),                           # no notrunc: cuts there
        (BLOCK, ["bs=65536", "seek=1", "conv=notrunc"]),                                # one whole block
    ]
    for target in (ref, f):
        run("dd", f"if={tmp_path / 'base'}", f"of={target}", "bs=65536", "status=none")
    assert read(f) == base
    for i, (size, args) in enumerate(steps):
        write(tmp_path / "patch", data(size, f"patch{i}"))
        for target in (ref, f):
            run("dd", f"if={tmp_path / 'patch'}", f"of={target}", "status=none", *args)
        assert os.path.getsize(f) == os.path.getsize(ref), (i, args)
        assert read(f) == read(ref), (i, args)
        if i % 2:
            time.sleep(0.5)  # let it upload: the next dd starts from the stored object
    expected = read(ref)
    mnt.remount()
    assert read(f) == expected


def test_truncate_against_reference(mnt, work, tmp_path):
    ref, f = str(tmp_path / "ref"), os.path.join(work, "file")
    base = data(150000, "trunc")
    write(ref, base)
    write(f, base)
    for i, size in enumerate([65535, 65537, 1, 0, 200001, 131072, 131073]):
        for target in (ref, f):
            run("truncate", "-s", str(size), target)
        assert os.path.getsize(f) == size
        assert read(f) == read(ref), size
        if i % 2:
            time.sleep(0.5)
    # path-based truncate(2) and ftruncate(2) from Python, and a write after growing
    for target in (ref, f):
        os.truncate(target, 100001)
        with open(target, "r+b") as fh:
            fh.truncate(140000)
            fh.seek(139990)
            fh.write(b"0123456789tail")
    assert read(f) == read(ref)
    expected = read(ref)
    mnt.remount()
    assert read(f) == expected
    assert os.path.getsize(f) == 140004
    # O_TRUNC (a shell's `>`) on the uploaded file, then growing it again
    for target in (ref, f):
        sh(f'printf "short" > "{target}"')
        assert read(target) == b"short"
        run("truncate", "-s", "70000", target)
    assert read(f) == read(ref)


def test_o_append(work):
    f = os.path.join(work, "log.txt")
    sh('for i in $(seq 1 40); do echo "line $i" >> log.txt; done', cwd=work)
    expected = b"".join(b"line %d\n" % i for i in range(1, 41))
    assert read(f) == expected
    big = data(70000, "append")
    with open(f, "ab") as fh:
        fh.write(big)
    expected += big
    time.sleep(0.5)  # the next appends start from the uploaded object
    with open(f, "ab") as fh:
        fh.write(b"A")
        fh.seek(0)  # O_APPEND: every write goes to the end whatever the offset
        fh.write(b"B")
    expected += b"AB"
    sh('printf "from shell\\n" >> log.txt', cwd=work)
    expected += b"from shell\n"
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"fd-append")
    finally:
        os.close(fd)
    expected += b"fd-append"
    assert read(f) == expected
    assert os.path.getsize(f) == len(expected)


def test_sparse_holes(work, tmp_path):
    def make(root):
        with open(os.path.join(root, "sparse1"), "wb") as fh:
            fh.seek(1_000_000)
            fh.write(b"end")
        with open(os.path.join(root, "sparse2"), "wb") as fh:
            fh.write(b"head" * 25)
        with open(os.path.join(root, "sparse2"), "r+b") as fh:
            fh.seek(300_000)
            fh.write(b"x")
        run("truncate", "-s", "10M", os.path.join(root, "sparse3"))
        run("dd", "if=/dev/urandom", f"of={os.path.join(root, 'sparse3')}", "bs=1", "count=0", "status=none")
        with open(os.path.join(root, "sparse3"), "r+b") as fh:
            fh.seek(5 * 1024 * 1024 + 3)
            fh.write(b"middle")
    ref = tmp_path / "ref"
    ref.mkdir()
    make(ref)
    make(work)
    for name in ("sparse1", "sparse2", "sparse3"):
        assert os.path.getsize(os.path.join(work, name)) == os.path.getsize(ref / name)
        assert sha256(os.path.join(work, name)) == sha256(ref / name), name
    assert read(os.path.join(work, "sparse1")) == b"\0" * 1_000_000 + b"end"
    run("cmp", ref / "sparse3", os.path.join(work, "sparse3"))


def test_tar_round_trip(work, tmp_path):
    src = tmp_path / "src"
    make_tree(src, seed=7)
    sums = tmp_path / "SHA256SUMS"
    with open(sums, "wb") as out:
        out.write(run("sh", "-c", "find . -type f -print0 | sort -z | xargs -0 sha256sum", cwd=src).stdout)
    archive = os.path.join(work, "tree.tar")
    run("tar", "--format=posix", "-C", src, "-cf", archive, ".")
    os.mkdir(os.path.join(work, "x"))
    run("tar", "-C", os.path.join(work, "x"), "-xpf", archive)
    run("sha256sum", "--quiet", "-c", sums, cwd=os.path.join(work, "x"))
    compare_trees(src, os.path.join(work, "x"), dir_mtimes=False)
    back = tmp_path / "back"
    back.mkdir()
    run("tar", "--format=posix", "-C", os.path.join(work, "x"), "-cf", tmp_path / "back.tar", ".")
    run("tar", "-C", back, "-xpf", tmp_path / "back.tar")
    run("sha256sum", "--quiet", "-c", sums, cwd=back)
    assert sha256(archive) == sha256(read_tar_copy(tmp_path, archive))


def read_tar_copy(tmp_path, archive) -> str:
    """A local copy of a file in the mount, made by cat."""
    copy = tmp_path / "copy.tar"
    with open(copy, "wb") as out:
        subprocess.run(["cat", archive], stdout=out, check=True)
    return str(copy)


def rsync_transferred(output: bytes) -> int:
    m = re.search(rb"Number of regular files transferred: ([\d,]+)", output)
    assert m, output
    return int(m.group(1).replace(b",", b""))


def test_rsync_twice_and_after_remount(mnt, work, tmp_path):
    src = tmp_path / "src"
    make_tree(src, seed=3)
    dst = os.path.join(work, "dst")
    first = run("rsync", "-a", "--stats", f"{src}/", f"{dst}/")
    assert rsync_transferred(first.stdout) == sum(kind == stat.S_IFREG for kind in tree_files(src).values())
    compare_trees(src, dst)
    second = run("rsync", "-a", "--stats", f"{src}/", f"{dst}/")
    assert rsync_transferred(second.stdout) == 0, second.stdout.decode()
    mnt.remount()
    compare_trees(src, dst)
    third = run("rsync", "-a", "--stats", f"{src}/", f"{dst}/")
    assert rsync_transferred(third.stdout) == 0, third.stdout.decode()
    # a change goes across, and only it
    write(src / "sub" / "deeper" / "x.dat", data(1000, "changed"))
    fourth = run("rsync", "-a", "--stats", f"{src}/", f"{dst}/")
    assert rsync_transferred(fourth.stdout) == 1
    compare_trees(src, dst)


def test_git(work, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_AUTHOR_NAME": "T", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "T", "GIT_COMMITTER_EMAIL": "t@example.com"}
    repo = os.path.join(work, "repo")
    run("git", "init", "-q", repo, env=env)
    for i in range(5):
        write(os.path.join(repo, f"file{i}.txt"), b"hello %d\n" % i * (i * 1000 + 1))
    os.mkdir(os.path.join(repo, "src"))
    write(os.path.join(repo, "src", "blob.bin"), data(100000, "git"))
    run("git", "add", "-A", cwd=repo, env=env)
    run("git", "commit", "-q", "-m", "first", cwd=repo, env=env)
    write(os.path.join(repo, "file1.txt"), b"changed\n")
    os.unlink(os.path.join(repo, "file2.txt"))
    run("git", "commit", "-q", "-a", "-m", "second", cwd=repo, env=env)
    run("git", "gc", "-q", cwd=repo, env=env)
    run("git", "fsck", "--full", "--strict", cwd=repo, env=env)
    log = run("git", "log", "--format=%s", cwd=repo, env=env).stdout.split()
    assert log == [b"second", b"first"]
    assert run("git", "status", "--porcelain", cwd=repo, env=env).stdout == b""
    clone = tmp_path / "clone"
    run("git", "clone", "-q", repo, clone, env=env)
    assert read(clone / "src" / "blob.bin") == data(100000, "git")


SQL_SETUP = """
PRAGMA journal_mode=DELETE;
CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL);
CREATE INDEX t_v ON t(v);
BEGIN;
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 5000)
INSERT INTO t(v) SELECT printf('%08d-', x) || hex(randomblob(40)) FROM c;
COMMIT;
BEGIN;
UPDATE t SET v = 'u' || v WHERE id % 7 = 0;
DELETE FROM t WHERE id % 11 = 0;
COMMIT;
BEGIN;
DELETE FROM t;
ROLLBACK;
"""


def test_sqlite(mnt, work):
    db = os.path.join(work, "test.db")
    run("sqlite3", db, SQL_SETUP)
    for _ in range(5):
        run("sqlite3", db, "BEGIN; INSERT INTO t(v) SELECT 'again' || v FROM t WHERE id % 97 = 1; COMMIT;")

    def query(sql) -> str:
        return run("sqlite3", db, sql).stdout.decode().strip()

    assert query("PRAGMA integrity_check;") == "ok"
    summary = query("SELECT count(*), sum(length(v)), max(id) FROM t;")
    assert summary.split("|")[0] != "0"
    assert not os.path.exists(db + "-journal")
    mnt.remount()
    assert query("PRAGMA integrity_check;") == "ok"
    assert query("SELECT count(*), sum(length(v)), max(id) FROM t;") == summary


def test_editor_save_pattern(mnt, work):
    orig = os.path.join(work, "doc.txt")
    write(orig, b"version 1\n")
    os.chmod(orig, 0o640)
    for version in range(2, 6):
        content = b"version %d\n" % version * (version * 5000)
        tmp = os.path.join(work, ".doc.txt.swp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for off in range(0, len(content), 8192):
                os.write(fd, content[off:off + 8192])
            os.fsync(fd)
            os.fchmod(fd, stat.S_IMODE(os.stat(orig).st_mode))
        finally:
            os.close(fd)
        os.rename(tmp, orig)
        dirfd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        assert read(orig) == content
        assert os.listdir(work) == ["doc.txt"]
        assert stat.S_IMODE(os.stat(orig).st_mode) == 0o640
        if version == 3:
            time.sleep(0.5)
    mnt.remount()
    assert read(orig) == content
    assert os.listdir(work) == ["doc.txt"]
    assert stat.S_IMODE(os.stat(orig).st_mode) == 0o640


WRITER = textwrap.dedent("""
    import os, sys, time
    i, own, shared, chunk, start = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
    pattern = bytes((i * 37 + k) % 251 for k in range(4099))
    payload = (pattern * (chunk // len(pattern) + 1))[:chunk]
    while time.time() < start:
        time.sleep(0.002)
    fd = os.open(shared, os.O_WRONLY)
    with open(own, "wb") as f:
        for off in range(0, chunk, 10007):
            f.write(payload[off:off + 10007])
            os.pwrite(fd, payload[off:off + 10007], i * chunk + off)
    os.close(fd)
""")


def writer_payload(i: int, chunk: int) -> bytes:
    pattern = bytes((i * 37 + k) % 251 for k in range(4099))
    return (pattern * (chunk // len(pattern) + 1))[:chunk]


def test_concurrent_writers(mnt, work):
    chunk = 150001  # not block-aligned: neighbours share blocks of the shared file
    shared = os.path.join(work, "shared.bin")
    write(shared, b"")
    start = time.time() + 1.0
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(i), os.path.join(work, f"own{i}.bin"), shared,
                               str(chunk), str(start)], stderr=subprocess.PIPE) for i in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=PROGRAM_TIMEOUT)
        assert p.returncode == 0, err.decode()
    expected_shared = b"".join(writer_payload(i, chunk) for i in range(4))

    def check():
        for i in range(4):
            assert read(os.path.join(work, f"own{i}.bin")) == writer_payload(i, chunk), i
        got = read(shared)
        assert len(got) == len(expected_shared)
        bad = [i for i in range(4) if got[i * chunk:(i + 1) * chunk] != writer_payload(i, chunk)]
        assert not bad, f"writers' ranges wrong: {bad}"
    check()
    mnt.remount()
    check()


# ---------------------------------------------------------------- names and the tree

def test_name_max(work):
    name = "n" * 255
    multibyte = "é" * 127 + "x"  # 255 bytes in UTF-8
    assert len(multibyte.encode()) == 255
    for n in (name, multibyte):
        write(os.path.join(work, n), b"long name")
        assert read(os.path.join(work, n)) == b"long name"
        assert os.stat(os.path.join(work, n)).st_size == 9
    os.mkdir(os.path.join(work, "d" * 255))
    assert sorted(os.listdir(work)) == sorted([name, multibyte, "d" * 255])
    long = os.path.join(work, "m" * 256)
    raises_errno(errno.ENAMETOOLONG, open, long, "wb")
    raises_errno(errno.ENAMETOOLONG, os.mkdir, long)
    raises_errno(errno.ENAMETOOLONG, os.symlink, "x", long)
    raises_errno(errno.ENAMETOOLONG, os.rename, os.path.join(work, name), long)
    raises_errno(errno.ENAMETOOLONG, os.stat, long)
    assert read(os.path.join(work, name)) == b"long name"
    proc = run("touch", long, check=False)
    assert proc.returncode != 0 and b"too long" in proc.stderr.lower()


def test_listing_while_uploads_finish(work):
    """`ls` (and so cp -a, tar, rsync reading the mount) sees every file while uploads complete."""
    short = []
    for round in range(5):
        d = os.path.join(work, f"round{round}")
        os.mkdir(d)
        for i in range(40):
            write(os.path.join(d, f"f{i}"), b"x" * 70000)
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            n = len(os.listdir(d))
            if n != 40:
                short.append((round, n))
                break
    assert not short, f"listings missing files while uploads finished: {short}"


def test_deep_nesting(work):
    parts = [f"level{i:02d}" for i in range(20)]
    deepest = os.path.join(work, *parts)
    os.makedirs(deepest)
    write(os.path.join(deepest, "bottom.txt"), b"at the bottom")
    assert read(os.path.join(deepest, "bottom.txt")) == b"at the bottom"
    found = run("find", work, "-name", "bottom.txt").stdout.decode().strip()
    assert found == os.path.join(deepest, "bottom.txt")
    assert sum(len(d) for _, d, _ in os.walk(work)) == 20
    sh(f'cd "{deepest}" && echo shell > s.txt && cat s.txt >/dev/null')
    assert read(os.path.join(deepest, "s.txt")) == b"shell\n"


def test_empty_files_and_dirs_persist(mnt, work):
    run("touch", os.path.join(work, "touched"))
    open(os.path.join(work, "opened"), "wb").close()
    sh(": > redirected", cwd=work)
    os.makedirs(os.path.join(work, "e1", "e2", "e3"))
    os.mkdir(os.path.join(work, "lonely"))
    open(os.path.join(work, "e1", "empty-inside"), "wb").close()
    mnt.remount()
    assert sorted(os.listdir(work)) == ["e1", "lonely", "opened", "redirected", "touched"]
    for name in ("touched", "opened", "redirected", "e1/empty-inside"):
        st = os.stat(os.path.join(work, name))
        assert stat.S_ISREG(st.st_mode) and st.st_size == 0, name
        assert read(os.path.join(work, name)) == b""
    assert os.listdir(os.path.join(work, "lonely")) == []
    assert os.listdir(os.path.join(work, "e1", "e2", "e3")) == []
    assert sorted(os.listdir(os.path.join(work, "e1"))) == ["e2", "empty-inside"]


def test_mkdir_rmdir_unlink(work):
    a = os.path.join(work, "a")
    os.mkdir(a)
    raises_errno(errno.EEXIST, os.mkdir, a)
    write(os.path.join(a, "f"), b"f")
    raises_errno(errno.EEXIST, os.mkdir, os.path.join(a, "f"))
    raises_errno(errno.ENOTEMPTY, os.rmdir, a)
    assert run("rmdir", a, check=False).returncode != 0
    raises_errno(errno.ENOTDIR, os.rmdir, os.path.join(a, "f"))
    raises_errno(errno.EISDIR, os.unlink, a)
    time.sleep(0.5)  # uploaded now: still not empty
    raises_errno(errno.ENOTEMPTY, os.rmdir, a)
    os.unlink(os.path.join(a, "f"))
    raises_errno(errno.ENOENT, os.unlink, os.path.join(a, "f"))
    os.rmdir(a)
    assert not os.path.exists(a)
    raises_errno(errno.ENOENT, os.rmdir, a)
    run("mkdir", "-p", os.path.join(work, "p", "q", "r"))
    write(os.path.join(work, "p", "q", "pending"), b"not uploaded yet")
    raises_errno(errno.ENOTEMPTY, os.rmdir, os.path.join(work, "p", "q"))
    run("rm", "-r", os.path.join(work, "p"))
    assert os.listdir(work) == []


def test_rename_files_and_directories(mnt, work):
    # a file renamed over an existing one: uploaded over uploaded, then pending over uploaded
    x, y = os.path.join(work, "x"), os.path.join(work, "y")
    write(x, b"X" * 70000)
    write(y, b"Y" * 10)
    time.sleep(0.6)
    os.rename(x, y)
    assert read(y) == b"X" * 70000 and not os.path.exists(x)
    write(x, b"second x")
    os.rename(x, y)
    assert read(y) == b"second x" and not os.path.exists(x)
    time.sleep(0.6)
    # into another directory, and back with mv
    other = os.path.join(work, "other")
    os.mkdir(other)
    os.rename(y, os.path.join(other, "y2"))
    assert read(os.path.join(other, "y2")) == b"second x"
    run("mv", os.path.join(other, "y2"), os.path.join(work, "y3"))
    assert read(os.path.join(work, "y3")) == b"second x"
    # a whole directory with contents, then into another directory
    t = os.path.join(work, "t")
    os.makedirs(os.path.join(t, "sub", "sub2"))
    os.mkdir(os.path.join(t, "emptydir"))
    contents = {"f1": data(1000, 1), "sub/f2": data(BLOCK + 5, 2), "sub/sub2/f3": b""}
    for rel, body in contents.items():
        write(os.path.join(t, rel), body)
    time.sleep(0.6)
    os.rename(t, os.path.join(work, "t-renamed"))
    assert not os.path.exists(t)
    os.rename(os.path.join(work, "t-renamed"), os.path.join(other, "t-moved"))
    moved = os.path.join(other, "t-moved")

    def check():
        for rel, body in contents.items():
            assert read(os.path.join(moved, rel)) == body, rel
        assert os.listdir(os.path.join(moved, "emptydir")) == []
        assert sorted(os.listdir(work)) == ["other", "y3"]
        assert sorted(os.listdir(other)) == ["t-moved"]
        assert read(os.path.join(work, "y3")) == b"second x"
        write(os.path.join(moved, "sub", "new"), b"new")  # the moved directory takes new files
        assert read(os.path.join(moved, "sub", "new")) == b"new"
        os.unlink(os.path.join(moved, "sub", "new"))
    check()
    mnt.remount()
    check()


def test_rename_pending_over_uploaded_then_away(mnt, work):
    y, x, z = (os.path.join(work, n) for n in "yxz")
    write(y, b"old")
    time.sleep(0.6)  # y is uploaded
    write(x, b"new")
    os.rename(x, y)  # x is still pending
    os.rename(y, z)
    assert os.listdir(work) == ["z"]
    mnt.remount()
    assert os.listdir(work) == ["z"]
    assert read(z) == b"new"


def test_symlink_readlink(work):
    write(os.path.join(work, "target.txt"), b"target")
    os.symlink("target.txt", os.path.join(work, "rel"))
    os.symlink("/nonexistent/absolute/path", os.path.join(work, "dangling"))
    run("ln", "-s", "sub/../target.txt", os.path.join(work, "via-ln"))
    assert os.readlink(os.path.join(work, "rel")) == "target.txt"
    assert os.readlink(os.path.join(work, "dangling")) == "/nonexistent/absolute/path"
    assert run("readlink", os.path.join(work, "via-ln")).stdout == b"sub/../target.txt\n"
    assert stat.S_ISLNK(os.lstat(os.path.join(work, "rel")).st_mode)
    assert read(os.path.join(work, "rel")) == b"target"
    assert not os.path.exists(os.path.join(work, "dangling"))
    raises_errno(errno.EEXIST, os.symlink, "x", os.path.join(work, "rel"))
    raises_errno(errno.EINVAL, os.readlink, os.path.join(work, "target.txt"))
    os.rename(os.path.join(work, "rel"), os.path.join(work, "rel2"))
    assert os.readlink(os.path.join(work, "rel2")) == "target.txt"
    os.unlink(os.path.join(work, "rel2"))
    assert sorted(os.listdir(work)) == ["dangling", "target.txt", "via-ln"]


def test_chmod_utimens_chown_persist(mnt, work):
    pending, uploaded, d = (os.path.join(work, n) for n in ("pending", "uploaded", "dir"))
    write(uploaded, b"u" * 100)
    os.mkdir(d)
    time.sleep(0.6)
    write(pending, b"p" * 100)
    want = {
        pending: (0o604, 1_234_567_890_123_456_789, (1234, 5678)),
        uploaded: (0o640, 1_111_111_111_987_654_321, (4321, 8765)),
        d: (0o711, 1_000_000_000_000_000_001, (2000, 3000)),
    }
    for path, (mode, mtime, (uid, gid)) in want.items():
        os.chmod(path, mode)
        os.utime(path, ns=(mtime + 5, mtime))
        os.chown(path, uid, gid)

    def check():
        for path, (mode, mtime, owner) in want.items():
            st = os.stat(path)
            assert stat.S_IMODE(st.st_mode) == mode, (path, oct(st.st_mode))
            assert st.st_mtime_ns == mtime, (path, st.st_mtime_ns)
            assert (st.st_uid, st.st_gid) == owner, path
        assert read(pending) == b"p" * 100 and read(uploaded) == b"u" * 100
    check()
    mnt.remount()
    check()


# ---------------------------------------------------------------- what is not supported, and special cases

def test_xattrs_enotsup(work):
    f = os.path.join(work, "f")
    write(f, b"f")
    raises_errno(errno.ENOTSUP, os.setxattr, f, "user.test", b"value")
    proc = run("setfattr", "-n", "user.test", "-v", "1", f, check=False)
    assert proc.returncode != 0 and b"not supported" in proc.stderr.lower()
    assert os.listxattr(f) == []


def test_statfs_namemax(mnt):
    st = os.statvfs(mnt.mountpoint)
    assert st.f_namemax == 255
    assert run("stat", "-f", "-c", "%l", mnt.mountpoint).stdout.strip() == b"255"


def renameat2(old, new, flags: int) -> int:
    """renameat2(2) through libc; returns 0 or the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.renameat2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd = -100
    return 0 if fn(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), flags) == 0 else ctypes.get_errno()


def test_rename_noreplace_and_exchange(work):
    a, b, c = (os.path.join(work, n) for n in "abc")
    write(a, b"A")
    write(b, b"B")
    assert renameat2(a, b, 1) == errno.EEXIST  # RENAME_NOREPLACE
    assert read(a) == b"A" and read(b) == b"B"
    time.sleep(0.5)
    assert renameat2(a, b, 1) == errno.EEXIST
    assert renameat2(a, c, 1) == 0
    assert read(c) == b"A" and not os.path.exists(a)
    assert renameat2(c, b, 2) == errno.EINVAL  # RENAME_EXCHANGE
    assert read(c) == b"A" and read(b) == b"B"
    assert sorted(os.listdir(work)) == ["b", "c"]


def test_open_unlink_read(work):
    for label, wait in (("uploaded", 0.6), ("pending", 0.0)):
        f = os.path.join(work, label)
        body = data(150001, label)
        write(f, body)
        time.sleep(wait)
        fd = os.open(f, os.O_RDONLY)
        try:
            os.unlink(f)
            assert not os.path.exists(f)
            assert label not in os.listdir(work)
            assert os.pread(fd, 10, 0) == body[:10]
            chunks = []
            while True:
                part = os.read(fd, 65536)
                if not part:
                    break
                chunks.append(part)
            assert b"".join(chunks) == body, label
        finally:
            os.close(fd)
        assert not os.path.exists(f)
    # a file written, unlinked while open for writing, and written on
    f = os.path.join(work, "rw")
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"before")
        os.unlink(f)
        os.write(fd, b" after")
        assert os.pread(fd, 100, 0) == b"before after"
    finally:
        os.close(fd)
    time.sleep(0.5)
    assert os.listdir(work) == []


def test_open_unlink_fstat(work):
    """fstat(2) of an open, unlinked file answers (tools unlink temporary files they hold)."""
    for label, wait in (("uploaded", 0.6), ("pending", 0.0)):
        f = os.path.join(work, label)
        write(f, b"z" * 1000)
        time.sleep(wait)
        fd = os.open(f, os.O_RDONLY)
        try:
            os.unlink(f)
            st = os.fstat(fd)
            assert st.st_size == 1000 and stat.S_ISREG(st.st_mode), label
        finally:
            os.close(fd)


# ---------------------------------------------------------------- crashes, tampering, errors, two mounts

def test_kill_9_before_upload_then_remount(volume_factory, volume_kind, own_mounts, tmp_path):
    ref = volume_factory(volume_kind)
    m = own_mounts(ref, "--writeback-delay", "30")
    os.mkdir(m.path("sub"))
    keys_before = ref.raw.keys()
    files = {"small.txt": b"small\n", "big.bin": data(300001, "big"), "empty": b"",
             "sub/inner.txt": b"inner" * 1000, "renamed-dst": data(70000, "ren"), "mode600": b"secret"}
    for name, body in files.items():
        src = "renamed-src" if name == "renamed-dst" else name
        write(m.path(src), body)
    os.rename(m.path("renamed-src"), m.path("renamed-dst"))
    os.chmod(m.path("mode600"), 0o600)
    os.utime(m.path("small.txt"), ns=(1, 1_500_000_000_123_456_789))
    assert ref.raw.keys() == keys_before, "uploaded before the write-back delay: the test proves nothing"

    pid = m.daemon_pid()
    status = run_cli("status", m.mountpoint, "--json")  # the mount is found by its mount point
    assert json.loads(status.stdout)["pid"] == pid, status
    os.kill(pid, signal.SIGKILL)
    assert wait_gone([pid], 10)
    subprocess.run(["fusermount3", "-uz", m.mountpoint], check=True)
    assert not os.path.ismount(m.mountpoint)
    m.extra = []
    m.mount()

    def check(root):
        for name, body in files.items():
            assert read(os.path.join(root, name)) == body, name
        assert not os.path.exists(os.path.join(root, "renamed-src"))
        assert sorted(os.listdir(root)) == ["big.bin", "empty", "mode600", "renamed-dst", "small.txt", "sub"]
    check(m.mountpoint)
    assert stat.S_IMODE(os.stat(m.path("mode600")).st_mode) == 0o600
    assert os.stat(m.path("small.txt")).st_mtime_ns == 1_500_000_000_123_456_789
    m.umount()
    # the bucket itself holds it all, read without the mount
    out = tmp_path / "decrypted"
    result = run_cli("decrypt", ref.url, out, *ref.args)
    assert result.returncode == 0, result
    check(out)


@pytest.mark.expect_log_errors(r"failed authentication")
def test_flipped_bit_gives_eio(volume_factory, volume_kind, own_mounts):
    ref = volume_factory(volume_kind)
    m = own_mounts(ref)
    before = ref.raw.snapshot()
    body = data(3 * BLOCK + 1000, "tamper")
    write(m.path("victim.bin"), body)
    write(m.path("bystander.txt"), b"still fine")
    m.umount()
    after = ref.raw.snapshot()
    new = [k for k in after if after[k] != before.get(k)]
    key = max(new, key=lambda k: after[k][0])
    assert len(ref.raw.read(key)[0]) == fmt.Layout(BLOCK).object_size(len(body))
    ref.raw.flip(key, fmt.Layout(BLOCK).block_offset(1) + fmt.BLOCK_OVERHEAD + 100)
    # a mount from another cache directory: the first one's would trust its own saved
    # listings and cached blocks (the lease says nobody wrote since), and read the true bytes
    m = own_mounts(ref, name="elsewhere")
    assert read(m.path("bystander.txt")) == b"still fine"
    raises_errno(errno.EIO, read, m.path("victim.bin"))
    fd = os.open(m.path("victim.bin"), os.O_RDONLY)
    try:
        raises_errno(errno.EIO, os.pread, fd, 100, BLOCK + 50)
        for offset in (0, 2 * BLOCK, 3 * BLOCK):  # other blocks: right bytes or EIO, never wrong bytes
            try:
                assert os.pread(fd, 500, offset) == body[offset:offset + 500], offset
            except OSError as exc:
                assert exc.errno == errno.EIO
    finally:
        os.close(fd)
    proc = run("cat", m.path("victim.bin"), check=False)
    assert proc.returncode != 0 and b"input/output error" in proc.stderr.lower()
    log = m.log()
    named = [line for line in log.splitlines() if "failed authentication" in line]
    assert named, log
    assert any(key in line and re.search(r"\bblock 1\b", line) for line in named), log
    assert "victim.bin" not in log   # named by its object key: the log holds no plaintext name
    assert all(set(re.findall(r"\bblock (\d+)", line)) == {"1"} for line in named), named


def test_mount_errors(volume_kind, shared_mount, tmp_path):
    ref = shared_mount.ref
    missing = tmp_path / "missing"
    nonempty = tmp_path / "nonempty"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_bytes(b"keep")
    free = [tmp_path / f"mp{i}" for i in range(3)]
    for p in free:
        p.mkdir()
    if volume_kind == "s3":
        nowhere_url, nowhere_args = f"s3://{unique_bucket_name('missing')}/vol", ref.args
    else:
        nowhere_url, nowhere_args = f"file://{tmp_path / 'no-such-volume'}", []
    common = ("--cache-dir", str(tmp_path / "cache"), "--writeback-delay", WRITEBACK_DELAY)
    commands = [
        ("mount", ref.url, missing, *ref.args, *common),
        ("mount", ref.url, nonempty, *ref.args, *common),
        ("mount", nowhere_url, free[0], *nowhere_args, *common),
    ]
    if volume_kind == "s3":
        commands.append(("mount", ref.url, free[2], "--endpoint-url", f"http://127.0.0.1:{closed_port()}",
                         *common))
    results = run_cli_many(*commands)
    wrong = run_cli("mount", ref.url, free[1], *ref.args, *common, env={"CRYPTFS_PASSPHRASE": "not the passphrase"})
    assert_cli_error(wrong, 3, "wrong passphrase")
    assert_cli_error(results[0], 2, "does not exist", str(missing))
    assert_cli_error(results[1], 2, "not empty", str(nonempty))
    if volume_kind == "s3":
        assert_cli_error(results[2], 4, "bucket", "does not exist")
        assert_cli_error(results[3], 6, "cannot reach")
    else:
        assert_cli_error(results[2], 4, "no cryptfs volume")
    assert (nonempty / "keep.txt").read_bytes() == b"keep"
    assert not missing.exists()
    for p in [nonempty, *free]:
        assert not os.path.ismount(p), p
        assert not mount_pids(str(p)), p
        assert os.listdir(p) == ([] if p != nonempty else ["keep.txt"])


def test_two_mounts_see_each_other(volume_factory, volume_kind, own_mounts, tmp_path):
    """A read-write mount and a read-only one beside it (a second read-write mount is refused:
    test_lease.py); the read-only side sees the writer's changes within its attribute TTL, and
    a mount-free command that would write beside the writer is refused, naming it."""
    ref = volume_factory(volume_kind)
    a = own_mounts(ref, "--attr-ttl", "1", name="a")
    b = own_mounts(ref, "--attr-ttl", "1", "-o", "ro", name="b")

    def appears(path, body, timeout=8.0) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            try:
                if read(path) == body:
                    return time.monotonic() - start
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{path} did not appear within {timeout} s")

    assert not os.path.exists(b.path("from-a.txt"))  # B caches the miss and the listing
    assert os.listdir(b.mountpoint) == []
    write(a.path("from-a.txt"), b"written by A")
    os.mkdir(a.path("dir-a"))
    appears(b.path("from-a.txt"), b"written by A")
    assert os.path.isdir(b.path("dir-a"))
    assert sorted(os.listdir(b.mountpoint)) == ["dir-a", "from-a.txt"]

    body = data(BLOCK + 3, "b")
    write(tmp_path / "from-b.bin", body)
    refused = run_cli("put", tmp_path / "from-b.bin", ref.path("dir-a"), *ref.args)
    assert_cli_error(refused, 10, "is mounted read-write", "pid")
    write(a.path("dir-a", "from-b.bin"), body)
    appears(b.path("dir-a", "from-b.bin"), body)
    assert os.listdir(a.path("dir-a")) == ["from-b.bin"]
