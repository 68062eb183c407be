"""The cryptfs command end to end: real subprocesses against the local backend and a moto
S3 server over HTTP. Round trips first, then every documented failure: exit code, one
`cryptfs: error:` line, no traceback, and nothing stored damaged.
"""

import base64
import datetime
import os
import random
import signal
import stat
import subprocess
import time

import pytest

from conftest import (PASSPHRASE, assert_cli_error, assert_cli_ok, cli_command, cli_environ,
                      closed_port, run_cli, run_cli_many, unique_bucket_name)
from cryptfs import errors
from cryptfs import format as fmt
from cryptfs.progress import human
from cryptfs.transfer import PARTIAL_SUFFIX

BS = fmt.DEFAULT_BLOCK_SIZE
NON_UTF8 = os.fsdecode(b"caf\xe9-\xff.bin")          # not valid UTF-8
LONG = "L" * 251 + ".txt"                              # exactly 255 bytes
LONG_DIR = "\u00e9" * 127 + "d"                        # 255 bytes of UTF-8
TOO_LONG = "x" * 256
# Shared volumes use the smallest allowed RSA size: every command unwraps two RSA keys, and
# 2048-bit ones load four times faster. Default-size volumes are covered by the init and
# passwd tests (volume_url).
SHARED_INIT = ("--rsa-bits", "2048")
SIZES = {"empty": 0, "one": 1, "b65535": BS - 1, "b65536": BS, "b65537": BS + 1,
         "big.bin": 3 * 1024 * 1024 + 4321}


# ---------------------------------------------------------------- the source tree

def build_tree(root: str) -> None:
    """Nested directories, edge sizes, a 3 MiB file, a symlink, odd names, modes and mtimes."""
    rng = random.Random(20240601)
    os.makedirs(root)
    for name, size in SIZES.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(rng.randbytes(size))
    os.makedirs(os.path.join(root, "nested", "deeper"))
    os.makedirs(os.path.join(root, "nested", LONG_DIR))
    os.makedirs(os.path.join(root, "emptydir"))
    files = {
        "nested/deeper/deepest.txt": b"at the bottom\n",
        f"nested/{LONG_DIR}/inner.txt": b"inside a 255-byte directory name\n",
        LONG: b"a 255-byte name\n",
        NON_UTF8: b"a name that is not UTF-8\n",
        "run.sh": b"#!/bin/sh\necho hi\n",
    }
    for rel, data in files.items():
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
    os.symlink("nested/deeper/deepest.txt", os.path.join(root, "link"))
    for rel, mode in {"big.bin": 0o600, "run.sh": 0o755, "b65537": 0o640, "emptydir": 0o700,
                      "nested": 0o750}.items():
        os.chmod(os.path.join(root, rel), mode)
    # distinct nanosecond mtimes, set bottom-up so creating children does not move them
    t = 1_500_000_000_123_456_789
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in sorted(filenames) + sorted(dirnames):
            t += 1_000_001_001
            os.utime(os.path.join(dirpath, name), ns=(t, t), follow_symlinks=False)
    os.utime(root, ns=(t + 7, t + 7))


def tree_entries(root: str) -> dict[str, os.stat_result]:
    """relative path -> lstat, for everything below root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = os.lstat(path)
    return out


def assert_same_file(expected: str, actual: str) -> None:
    a, b = os.lstat(expected), os.lstat(actual)
    assert stat.S_IFMT(a.st_mode) == stat.S_IFMT(b.st_mode), actual
    if stat.S_ISLNK(a.st_mode):
        assert os.readlink(expected) == os.readlink(actual), actual
    else:
        assert stat.S_IMODE(a.st_mode) == stat.S_IMODE(b.st_mode), actual
    if stat.S_ISREG(a.st_mode):
        with open(expected, "rb") as f, open(actual, "rb") as g:
            assert f.read() == g.read(), actual
    assert a.st_mtime_ns == b.st_mtime_ns, actual
    assert (a.st_uid, a.st_gid) == (b.st_uid, b.st_gid), actual


def assert_same_tree(expected: str, actual: str, root_attrs: bool = True) -> None:
    """Same names, types, bytes, modes, mtimes (ns) and owners; symlinks not followed."""
    want, got = tree_entries(expected), tree_entries(actual)
    assert sorted(got) == sorted(want)
    for rel in want:
        assert_same_file(os.path.join(expected, rel), os.path.join(actual, rel))
    if root_attrs:
        assert_same_file(expected, actual)


def partials(root: str) -> list[str]:
    return [os.path.join(d, n) for d, _, names in os.walk(root) for n in names if n.endswith(PARTIAL_SUFFIX)]


def display(name: str) -> str:
    """How cryptfs prints a name (bytes decoded with replacement)."""
    return os.fsencode(name).decode(errors="replace")


@pytest.fixture(scope="session")
def src_tree(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("tree") / "src")
    build_tree(root)
    return root


@pytest.fixture(scope="module")
def populated(volume_factory, volume_kind, src_tree):
    """A volume holding /src (the source tree), put once through the CLI; read-only for tests."""
    vol = volume_factory(volume_kind, extra_init_args=SHARED_INIT)
    vol.put_result = assert_cli_ok(vol.cli("put", src_tree, vol.url))
    return vol


@pytest.fixture(scope="module")
def scratch(volume_factory, volume_kind):
    """A volume for tests that change things; each test works in its own top directory."""
    return volume_factory(volume_kind, extra_init_args=SHARED_INIT)


@pytest.fixture(scope="module")
def s3_volume(volume_factory):
    """An S3 volume for the failures only S3 has (credentials, endpoint, multipart)."""
    return volume_factory("s3", extra_init_args=SHARED_INIT)


def write(path, data: bytes = b"", mode: int | None = None):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # a passphrase file is refused otherwise
    with open(fd, "wb") as f:
        f.write(data)
    if mode is not None:
        os.chmod(path, mode)
    return str(path)


# ---------------------------------------------------------------- init, info, fsck

def test_init_and_info(volume_url, tmp_path):
    vol = volume_url
    assert vol.init_output.startswith("Created cryptfs volume ")
    fp = vol.fingerprint
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    info, again, right_fp, wrong_fp = run_cli_many(
        ("info", vol.url, *vol.args),
        ("init", vol.url, *vol.args),
        ("ls", vol.url, "--owner-fingerprint", fp, *vol.args),
        ("ls", vol.url, "--owner-fingerprint", "sha256:" + "0" * 64, *vol.args))
    assert_cli_ok(info)
    assert f"owner key:     {fp}" in info.stdout
    assert "block size:    65536" in info.stdout
    assert "format:        cryptfs-volume version 2" in info.stdout
    assert "scrypt N=131072 r=8" in info.stdout
    assert f"recipient:     owner {fp}" in info.stdout
    assert_cli_error(again, errors.EXIT_EXISTS, "already exists")
    assert_cli_ok(right_fp)
    assert right_fp.stdout == ""
    assert_cli_error(wrong_fp, errors.EXIT_AUTH, "expected sha256:" + "0" * 64)
    vol.assert_clean()


def test_put_tree(populated, src_tree):
    files = sum(1 for st in tree_entries(src_tree).values() if not stat.S_ISDIR(st.st_mode))
    assert f"{files} file(s) stored" in populated.put_result.stderr


def test_ls(populated, src_tree):
    plain, long, one_file = run_cli_many(
        ("ls", populated.path("src"), *populated.args),
        ("ls", "-l", "-R", populated.url, *populated.args),
        ("ls", "-l", populated.path("src", "b65537"), *populated.args))
    names = sorted(os.listdir(src_tree), key=os.fsencode)
    isdir = {n: os.path.isdir(os.path.join(src_tree, n)) and not os.path.islink(os.path.join(src_tree, n))
             for n in names}
    assert_cli_ok(plain).stdout.splitlines() == [display(n) + ("/" if isdir[n] else "") for n in names]

    def long_line(path, name):
        st = os.lstat(path)
        size = 0 if stat.S_ISDIR(st.st_mode) else (
            len(os.fsencode(os.readlink(path))) if stat.S_ISLNK(st.st_mode) else st.st_size)
        when = datetime.datetime.fromtimestamp(st.st_mtime_ns / 1e9).strftime("%Y-%m-%d %H:%M")
        return f"{stat.filemode(st.st_mode)} {st.st_uid:>5} {st.st_gid:>5} {size:>12} {when} {display(name)}"

    assert assert_cli_ok(one_file).stdout.splitlines() == [long_line(os.path.join(src_tree, "b65537"), "b65537")]
    sections = {}
    for block in assert_cli_ok(long).stdout.split("\n\n"):
        if block:
            header, *lines = block.split("\n")
            sections[header] = lines
    assert sorted(sections) == sorted(["/:", "/src:", "/src/nested:", "/src/nested/deeper:",
                                       f"/src/nested/{LONG_DIR}:", "/src/emptydir:"])
    assert sections["/src:"] == [long_line(os.path.join(src_tree, n), n) for n in names]
    deepest = os.path.join(src_tree, "nested", "deeper", "deepest.txt")
    assert sections["/src/nested/deeper:"] == [long_line(deepest, "deepest.txt")]
    assert sections["/src/emptydir:"] == []


def test_get_file_and_tree(populated, src_tree, tmp_path):
    into_dir, as_name, tree = run_cli_many(
        (b"get", os.fsencode(populated.path("src", NON_UTF8)), str(tmp_path), *populated.args),
        ("get", populated.path("src", "big.bin"), str(tmp_path / "renamed.bin"), *populated.args),
        ("get", populated.path("src"), str(tmp_path / "tree"), *populated.args))
    for result in (into_dir, as_name, tree):
        assert_cli_ok(result)
    assert_same_file(os.path.join(src_tree, NON_UTF8), str(tmp_path / NON_UTF8))
    assert_same_file(os.path.join(src_tree, "big.bin"), str(tmp_path / "renamed.bin"))
    assert_same_tree(src_tree, str(tmp_path / "tree"))   # every size, the symlink, 255-byte names
    assert partials(str(tmp_path)) == []


def test_cat(populated, src_tree):
    names = ["empty", "big.bin", NON_UTF8]
    results = run_cli_many(*[(b"cat", os.fsencode(populated.path("src", n)), *populated.args) for n in names])
    for name, result in zip(names, results):
        assert_cli_ok(result)
        with open(os.path.join(src_tree, name), "rb") as f:
            assert result.stdout_bytes == f.read(), name


def _wait_for(path: str, proc: subprocess.Popen, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(path):
            return True
        time.sleep(0.0005)
    return False


def test_decrypt_resumable(populated, src_tree, tmp_path):
    """Interrupted (SIGINT, then SIGKILL) while writing the big file; resumed; then nothing to do."""
    dest = tmp_path / "restore"
    partial = str(dest / "src" / ("big.bin" + PARTIAL_SUFFIX))
    cmd = cli_command("decrypt", populated.url, str(dest), *populated.args)

    # SIGINT's disposition is set here: a suite started in the background inherits it ignored
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=cli_environ(None), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert _wait_for(partial, proc), "decrypt ended before the big file was being written"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    assert partials(str(dest)) == []
    assert os.path.exists(dest / "src" / "b65537") and not os.path.exists(dest / "src" / "big.bin")

    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=cli_environ(None))
    assert _wait_for(partial, proc), "decrypt ended before the big file was being written"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert os.path.exists(partial)  # a hard kill cannot clean up: the next run must

    total = sum(1 for st in tree_entries(src_tree).values() if not stat.S_ISDIR(st.st_mode))
    resumed = assert_cli_ok(populated.cli("decrypt", populated.url, str(dest)))
    written = int(resumed.stderr.split(" file(s) written")[0].split()[-1])
    assert 0 < written < total
    assert partials(str(dest)) == []
    assert_same_tree(src_tree, str(dest / "src"))
    assert sorted(os.listdir(dest)) == ["src"]

    again = assert_cli_ok(populated.cli("decrypt", populated.url, str(dest)))
    assert "0 file(s) written" in again.stderr
    assert_same_tree(src_tree, str(dest / "src"))


def test_decrypt_continues_past_bad_files(scratch, tmp_path):
    """A tampered block in one file and tampered attributes of another: every other file is
    restored, each bad one is named with its reason, exit 5; once the objects are put back a
    rerun restores just those two and exits 0."""
    vol = scratch
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    rng = random.Random(7)
    files = {"a.txt": b"first\n", "m-block.bin": rng.randbytes(2 * BS + 10), "n-attrs.txt": b"attrs\n",
             "sub/z.txt": b"last\n"}
    for rel, body in files.items():
        write(src / rel, body)
    assert_cli_ok(vol.cli("mkdir", "-p", vol.path("t_decrypt", "sub")))
    keys = {rel: _file_object(vol, lambda: assert_cli_ok(vol.cli("put", str(src / rel), vol.path("t_decrypt", rel))))
            for rel in files}
    originals = {rel: vol.raw.read(keys[rel]) for rel in ("m-block.bin", "n-attrs.txt")}
    vol.raw.flip(keys["m-block.bin"], fmt.HEADER_SIZE + fmt.block_ct_size(BS) + 100)   # block 1
    body, meta = originals["n-attrs.txt"]
    blob = bytearray(base64.b64decode(meta[fmt.META_ATTR]))
    blob[-1] ^= 1
    vol.raw.write(keys["n-attrs.txt"], body, {**meta, fmt.META_ATTR: base64.b64encode(bytes(blob)).decode()})
    dest = tmp_path / "restore"
    try:
        first = vol.cli("decrypt", vol.path("t_decrypt"), str(dest))
        assert_cli_error(first, errors.EXIT_INTEGRITY, "2 file(s) could not be restored")
        failed = [line for line in first.stderr.splitlines() if line.startswith("cryptfs: not restored: ")]
        assert len(failed) == 2, first
        assert failed[0].startswith("cryptfs: not restored: /t_decrypt/m-block.bin: block 1 failed"), first
        assert failed[1].startswith("cryptfs: not restored: /t_decrypt/n-attrs.txt: attribute blob"), first
        assert "2 file(s) written" in first.stderr
        assert sorted(os.listdir(dest)) == ["a.txt", "sub"] and os.listdir(dest / "sub") == ["z.txt"]
        assert_same_file(str(src / "a.txt"), str(dest / "a.txt"))
        assert_same_file(str(src / "sub/z.txt"), str(dest / "sub/z.txt"))
        again = vol.cli("decrypt", vol.path("t_decrypt"), str(dest))
        assert_cli_error(again, errors.EXIT_INTEGRITY, "2 file(s) could not be restored")
        assert "0 file(s) written" in again.stderr
    finally:
        for rel, (body, meta) in originals.items():
            vol.raw.write(keys[rel], body, meta)
    resumed = assert_cli_ok(vol.cli("decrypt", vol.path("t_decrypt"), str(dest)))
    assert "2 file(s) written" in resumed.stderr and "not restored" not in resumed.stderr
    assert partials(str(dest)) == []
    for rel in files:
        assert_same_file(str(src / rel), str(dest / rel))
    vol.assert_clean()


def test_fsck_clean(populated, src_tree):
    result = assert_cli_ok(populated.cli("fsck", populated.url))
    entries = tree_entries(src_tree)
    dirs = 2 + sum(1 for st in entries.values() if stat.S_ISDIR(st.st_mode))  # + root and src
    files = sum(1 for st in entries.values() if not stat.S_ISDIR(st.st_mode))
    nbytes = sum(len(os.fsencode(os.readlink(os.path.join(src_tree, rel)))) if stat.S_ISLNK(st.st_mode)
                 else st.st_size for rel, st in entries.items() if not stat.S_ISDIR(st.st_mode))
    assert result.stdout.strip() == f"{dirs} directories, {files} files, {nbytes} bytes ({human(nbytes)}) checked; 0 problem(s)"


def test_disk_full_during_get(populated, tmpfs):
    small = tmpfs("1m")
    with populated.intact():
        result = populated.cli("get", populated.path("src", "big.bin"), small)
        assert_cli_error(result, errors.EXIT_NO_SPACE, "disk full", "big.bin")
    assert os.listdir(small) == []       # neither the file nor a partial one


# ---------------------------------------------------------------- changing the tree

def test_put_variants(scratch, tmp_path):
    vol = scratch
    a = write(tmp_path / "a.txt", b"first a\n", 0o640)
    b = write(tmp_path / "b.txt", b"first b\n")
    assert_cli_ok(vol.cli("mkdir", vol.path("t_put")))
    assert_cli_ok(vol.cli("put", a, b, vol.path("t_put")))                      # several into a dir
    assert_cli_ok(vol.cli("put", "-q", a, vol.path("t_put", "renamed.txt")))   # to a new name
    write(tmp_path / "a.txt", b"second version of a\n")
    assert_cli_ok(vol.cli("put", a, vol.path("t_put")))                        # replace a file
    assert vol.listdir("t_put") == ["a.txt", "b.txt", "renamed.txt"]
    assert vol.read("t_put/a.txt") == b"second version of a\n"
    assert vol.read("t_put/renamed.txt") == b"first a\n"
    assert vol.entry("t_put/renamed.txt").attrs.mode == stat.S_IFREG | 0o640
    with vol.intact():
        missing, several = run_cli_many(
            ("put", a, vol.path("t_put", "no", "such", "dir"), *vol.args),
            ("put", a, b, vol.path("t_put", "a.txt"), *vol.args))
        assert_cli_error(missing, errors.EXIT_NOT_FOUND, "/t_put/no")
        assert_cli_error(several, errors.EXIT_USAGE, "not a directory")


def test_mkdir(scratch):
    vol = scratch
    assert_cli_ok(vol.cli("mkdir", vol.path("t_mkdir")))
    assert_cli_ok(vol.cli("mkdir", "-p", vol.path("t_mkdir", "a", "b", "c")))
    with vol.intact():
        again_p, exists, no_parent = run_cli_many(
            ("mkdir", "-p", vol.path("t_mkdir", "a", "b", "c"), *vol.args),
            ("mkdir", vol.path("t_mkdir", "a"), *vol.args),
            ("mkdir", vol.path("t_mkdir", "x", "y"), *vol.args))
        assert_cli_ok(again_p)
        assert_cli_error(exists, errors.EXIT_EXISTS, "already exists")
        assert_cli_error(no_parent, errors.EXIT_NOT_FOUND, "/t_mkdir/x")
    assert vol.listdir("t_mkdir") == ["a/"]
    assert vol.listdir("t_mkdir/a") == ["b/"]
    assert vol.listdir("t_mkdir/a/b") == ["c/"]
    assert vol.listdir("t_mkdir/a/b/c") == []
    assert vol.entry("t_mkdir/a/b/c").attrs.mode == stat.S_IFDIR | 0o755


def test_mv(scratch, tmp_path):
    vol = scratch
    local = tmp_path / "t_mv"
    os.makedirs(local / "dd" / "sub")
    write(local / "f1", b"file one\n", 0o600)
    write(local / "g", b"file g\n")
    write(local / "h", b"file h, to be replaced\n")
    write(local / "dd" / "sub" / "deep.txt", b"deep\n")
    write(local / "dd" / "top.txt", b"top\n")
    os.makedirs(local / "d")
    write(local / "d" / "keep", b"keep\n")
    os.utime(local / "f1", ns=(1_600_000_000_000_000_123,) * 2)
    assert_cli_ok(vol.cli("put", str(local), vol.path("t_mv")))
    u = lambda *p: vol.path("t_mv", *p)  # noqa: E731

    # independent moves, at once: a file into a directory, a directory rename, a file over a file
    for result in run_cli_many(("mv", u("f1"), u("d") + "/", *vol.args),
                               ("mv", u("dd"), u("ee"), *vol.args),
                               ("mv", u("g"), u("h"), *vol.args)):
        assert_cli_ok(result)
    for result in run_cli_many(("mv", u("d", "f1"), u("d", "f2"), *vol.args),   # rename in place
                               ("mv", u("ee"), u("d"), *vol.args)):              # into a non-empty dir
        assert_cli_ok(result)
    with vol.intact():
        into_itself, missing = run_cli_many(("mv", u("d"), u("d", "ee", "x"), *vol.args),
                                            ("mv", u("nothing"), u("d"), *vol.args))
        assert_cli_error(into_itself, errors.EXIT_USAGE, "into itself")
        assert_cli_error(missing, errors.EXIT_NOT_FOUND, "/t_mv/nothing")

    assert vol.listdir("t_mv") == ["d/", "h"]
    assert vol.listdir("t_mv/d") == ["ee/", "f2", "keep"]
    assert vol.listdir("t_mv/d/ee") == ["sub/", "top.txt"]
    assert vol.listdir("t_mv/d/ee/sub") == ["deep.txt"]
    for moved, original in [("d/f2", "f1"), ("h", "g"), ("d/ee/sub/deep.txt", "dd/sub/deep.txt"),
                            ("d/ee", "dd")]:
        entry, st = vol.entry("t_mv/" + moved), os.lstat(local / original)
        assert (entry.attrs.mode, entry.attrs.mtime_ns) == (st.st_mode, st.st_mtime_ns), moved  # kept
        if not entry.is_dir:
            assert vol.read("t_mv/" + moved) == (local / original).read_bytes(), moved
    vol.assert_clean()


def test_rm(scratch, src_tree):
    vol = scratch
    before = set(vol.raw.keys())
    assert_cli_ok(vol.cli("put", "-q", src_tree, vol.path("t_rm")))
    assert_cli_ok(vol.cli("rm", vol.path("t_rm", "b65537")))
    assert vol.entry("t_rm/b65537") is None and vol.entry("t_rm/b65536") is not None
    with vol.intact():
        is_dir, root, missing = run_cli_many(("rm", vol.path("t_rm", "nested"), *vol.args),
                                             ("rm", "-r", vol.url, *vol.args),
                                             ("rm", vol.path("t_rm", "b65537"), *vol.args))
        assert_cli_error(is_dir, errors.EXIT_USAGE, "is a directory")
        assert_cli_error(root, errors.EXIT_USAGE, "root")
        assert_cli_error(missing, errors.EXIT_NOT_FOUND, "/t_rm/b65537")
    assert_cli_ok(vol.cli("rm", "-r", vol.path("t_rm")))
    assert vol.entry("t_rm") is None
    assert set(vol.raw.keys()) == before  # nothing left behind
    vol.assert_clean()


def test_rmdir(scratch, tmp_path):
    vol = scratch
    local = tmp_path / "t_rmdir"
    os.makedirs(local / "full" / "sub")
    os.makedirs(local / "empty")
    write(local / "file")
    assert_cli_ok(vol.cli("put", str(local), vol.path("t_rmdir")))
    assert_cli_ok(vol.cli("rmdir", vol.path("t_rmdir", "empty")))
    assert vol.listdir("t_rmdir") == ["file", "full/"]
    with vol.intact():
        full, file_, gone = run_cli_many(("rmdir", vol.path("t_rmdir", "full"), *vol.args),
                                         ("rmdir", vol.path("t_rmdir", "file"), *vol.args),
                                         ("rmdir", vol.path("t_rmdir", "empty"), *vol.args))
        assert_cli_error(full, errors.EXIT_USAGE, "not empty")
        assert_cli_error(file_, errors.EXIT_USAGE, "not a directory")
        assert_cli_error(gone, errors.EXIT_NOT_FOUND, "/t_rmdir/empty")


def test_configured_volume_name(scratch, tmp_path):
    cfg = tmp_path / "cryptfs.yaml"
    endpoint = f"\n    endpoint_url: {scratch.endpoint}" if scratch.endpoint else ""
    cfg.write_text(f"volumes:\n  mine:\n    url: {scratch.url}{endpoint}\n    workers: 4\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"volumes:\n  mine:\n    url: {scratch.url}\n    colour: blue\n")
    good, wrong = run_cli_many(("mkdir", "-p", "mine/t_config/sub", "--config", str(cfg)),
                               ("ls", "mine", "--config", str(bad)))
    assert_cli_ok(good)
    assert scratch.listdir("t_config") == ["sub/"]
    assert_cli_error(wrong, errors.EXIT_USAGE, "unknown keys: colour")
    scratch.assert_clean()


def test_passwd(volume_url, tmp_path):
    vol = volume_url
    before = vol.raw.snapshot()
    new = "a new passphrase, longer than the old one"
    result = assert_cli_ok(vol.cli("passwd", vol.url, env={"CRYPTFS_NEW_PASSPHRASE": new}))
    assert "Passphrase changed" in result.stdout
    after = vol.raw.snapshot()
    assert sorted(after) == sorted(before)
    assert sorted(k for k in after if after[k] != before[k]) == ["cryptfs.volume", "cryptfs.volume.bak"]
    old_file = write(tmp_path / "old", PASSPHRASE.encode() + b"\n")
    new_file = write(tmp_path / "new", new.encode() + b"\n")
    old_env, new_arg = run_cli_many(("ls", vol.url, *vol.args),
                                    ("ls", vol.url, "--passphrase-file", new_file, *vol.args))
    assert_cli_error(old_env, errors.EXIT_AUTH, "wrong passphrase")
    assert_cli_ok(new_arg)
    # and back, both passphrases from files
    assert_cli_ok(vol.cli("passwd", vol.url, "--passphrase-file", new_file, "--new-passphrase-file", old_file))
    vol.store(passphrase=PASSPHRASE)   # opens with the old passphrase again
    vol.assert_clean()


# ---------------------------------------------------------------- failures

def test_wrong_passphrase_and_no_passphrase(scratch, tmp_path):
    vol = scratch
    wrong_file = write(tmp_path / "wrong", b"not it\n")
    empty_file = write(tmp_path / "empty", b"\n")
    with vol.intact():
        wrong, none, empty = run_cli_many(("ls", vol.url, "--passphrase-file", wrong_file, *vol.args),
                                          ("ls", vol.url, *vol.args),
                                          ("ls", vol.url, "--passphrase-file", empty_file, *vol.args),
                                          env={"CRYPTFS_PASSPHRASE": None})
        assert_cli_error(wrong, errors.EXIT_AUTH, "wrong passphrase")
        assert_cli_error(none, errors.EXIT_USAGE, "no passphrase")
        assert_cli_error(empty, errors.EXIT_USAGE, "empty passphrase")


def test_missing_volume_and_path(scratch, tmp_path):
    if scratch.kind == "local":
        nowhere = "file://" + str(tmp_path)
    else:
        nowhere = f"s3://{scratch.bucket}/elsewhere"
    with scratch.intact():
        no_volume, no_path, no_cat = run_cli_many(
            ("ls", nowhere, *scratch.args),
            ("get", scratch.path("no", "such"), str(tmp_path), *scratch.args),
            ("cat", scratch.path("nothing-here"), *scratch.args))
        assert_cli_error(no_volume, errors.EXIT_NOT_FOUND, "no cryptfs volume")
        assert_cli_error(no_path, errors.EXIT_NOT_FOUND, "/no: no such file or directory")
        assert_cli_error(no_cat, errors.EXIT_NOT_FOUND, "/nothing-here")


def test_name_too_long(scratch, tmp_path):
    src = write(tmp_path / "short", b"x")
    with scratch.intact():
        put, mkdir = run_cli_many(("put", src, scratch.path(TOO_LONG), *scratch.args),
                                  ("mkdir", scratch.path(TOO_LONG), *scratch.args))
        assert_cli_error(put, errors.EXIT_USAGE, "256 bytes, longer than 255")
        assert_cli_error(mkdir, errors.EXIT_USAGE, "256 bytes, longer than 255")


def _file_object(vol, make) -> str:
    """The one object key that `make()` adds to the volume."""
    before = set(vol.raw.keys())
    make()
    added = set(vol.raw.keys()) - before
    assert len(added) == 1, added
    return added.pop()


def test_tampered_block(scratch, tmp_path):
    vol = scratch
    data = random.Random(5).randbytes(2 * BS + 1000)   # three blocks
    key = _file_object(vol, lambda: assert_cli_ok(vol.cli("put", write(tmp_path / "victim.bin", data),
                                                          vol.path("t_tamper"))))
    original, meta = vol.raw.read(key)
    vol.raw.flip(key, fmt.HEADER_SIZE + fmt.block_ct_size(BS) + 100)   # inside block 1
    try:
        dest = tmp_path / "out"
        dest.mkdir()
        get, cat, fsck = run_cli_many(("get", vol.path("t_tamper"), str(dest), *vol.args),
                                      ("cat", vol.path("t_tamper"), *vol.args),
                                      ("fsck", vol.url, *vol.args))
        assert_cli_error(get, errors.EXIT_INTEGRITY, "t_tamper", "block 1")
        assert os.listdir(dest) == []                      # no partial or wrong file left
        assert_cli_error(cat, errors.EXIT_INTEGRITY, "t_tamper", "block 1")
        assert cat.stdout_bytes == data[:len(cat.stdout_bytes)]   # never wrong bytes
        assert len(cat.stdout_bytes) < BS * 2
        assert fsck.returncode == errors.EXIT_INTEGRITY, fsck
        assert "Traceback" not in fsck.stderr
        problems = [line for line in fsck.stdout.splitlines() if "t_tamper" in line]
        assert len(problems) == 1 and "block 1" in problems[0] and "/t_tamper:" in problems[0], fsck
        assert "1 problem(s)" in fsck.stdout
    finally:
        vol.raw.write(key, original, meta)
    vol.assert_clean()


def test_truncated_object(scratch, tmp_path):
    vol = scratch
    data = random.Random(6).randbytes(BS + 5000)
    key = _file_object(vol, lambda: assert_cli_ok(vol.cli("put", write(tmp_path / "cut.bin", data),
                                                          vol.path("t_trunc.bin"))))
    original, meta = vol.raw.read(key)
    try:
        vol.raw.truncate(key, fmt.HEADER_SIZE + fmt.block_ct_size(BS))   # drop the last block
        result = vol.cli("fsck", vol.url)
        assert result.returncode == errors.EXIT_INTEGRITY, result
        assert "Traceback" not in result.stderr
        assert "/t_trunc.bin:" in result.stdout and "1 problem(s)" in result.stdout, result
        vol.raw.truncate(key, 40)                                        # shorter than a header
        assert_cli_error(vol.cli("cat", vol.path("t_trunc.bin")), errors.EXIT_INTEGRITY, "t_trunc.bin")
        assert [kind for kind, where, _ in vol.fsck().problems if where == "/t_trunc.bin"] == ["metadata"]
    finally:
        vol.raw.write(key, original, meta)
    vol.assert_clean()


def test_foreign_objects(scratch):
    vol = scratch
    root_prefix = fmt.dir_prefix(vol.store().vk, fmt.ROOT_DIR_ID)
    foreign = ["foreign-notes.txt", root_prefix + "not-an-encrypted-name", "t/zz/stray"]
    for key in foreign:
        vol.raw.write(key, b"not cryptfs data\n", {"owner": "someone else"})
    try:
        ls, fsck = run_cli_many(("ls", vol.url, *vol.args), ("fsck", vol.url, *vol.args))
        assert_cli_ok(ls)
        assert ls.stdout.splitlines() == vol.listdir()
        assert fsck.returncode == errors.EXIT_INTEGRITY, fsck
        assert "Traceback" not in fsck.stderr
        for key in foreign:
            assert any(line.startswith("foreign: ") and key in line for line in fsck.stdout.splitlines()), fsck
        assert f"{len(foreign)} problem(s)" in fsck.stdout
    finally:
        for key in foreign:
            vol.raw.delete(key)
    vol.assert_clean()


# ---------------------------------------------------------------- S3 only

def test_missing_bucket(s3_volume):
    with s3_volume.intact():
        name = unique_bucket_name("missing")
        ls, init = run_cli_many(("ls", f"s3://{name}/vol", *s3_volume.args),
                                ("init", f"s3://{name}/vol", *s3_volume.args))
        assert_cli_error(ls, errors.EXIT_NOT_FOUND, f"bucket {name} does not exist")
        assert_cli_error(init, errors.EXIT_NOT_FOUND, f"bucket {name} does not exist")


def test_no_credentials(s3_volume, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None,
           "AWS_PROFILE": None, "HOME": str(home), "AWS_CONFIG_FILE": str(home / "nope"),
           "AWS_SHARED_CREDENTIALS_FILE": str(home / "nope2"), "AWS_EC2_METADATA_DISABLED": "true"}
    with s3_volume.intact():
        start = time.monotonic()
        result = s3_volume.cli("ls", s3_volume.url, env=env)
        assert_cli_error(result, errors.EXIT_ACCESS, "no aws credentials")
        assert time.monotonic() - start < 20
        profile = s3_volume.cli("ls", s3_volume.url, "--profile", "nosuchprofile", env=env)
        assert_cli_error(profile, errors.EXIT_ACCESS, "nosuchprofile")


def test_endpoint_unreachable(s3_volume, tmp_path):
    port = closed_port()
    cfg = tmp_path / "cryptfs.yaml"
    cfg.write_text(f"volumes:\n  dead:\n    url: {s3_volume.url}\n    endpoint_url: http://127.0.0.1:{port}\n"
                   "    max_attempts: 1\n")
    with s3_volume.intact():
        start = time.monotonic()
        result = run_cli("ls", "dead", "--config", str(cfg))
        assert_cli_error(result, errors.EXIT_NETWORK, "cannot reach", f"127.0.0.1:{port}")
        assert time.monotonic() - start < 15


def test_abandoned_multipart_upload(s3_volume, s3_client):
    vol = s3_volume
    key = "vol/t/abandoned-upload-object"
    upload = s3_client.create_multipart_upload(Bucket=vol.bucket, Key=key)["UploadId"]
    s3_client.upload_part(Bucket=vol.bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 1024)
    found = vol.cli("fsck", vol.url)
    assert found.returncode == errors.EXIT_INTEGRITY, found
    assert f"abandoned-upload: {key}: unfinished multipart upload {upload}" in found.stdout
    aborted = vol.cli("fsck", "--abort-uploads", vol.url)
    assert aborted.returncode == errors.EXIT_INTEGRITY, aborted
    assert f"abandoned-upload: {key}: unfinished multipart upload {upload} (aborted)" in aborted.stdout
    assert s3_client.list_multipart_uploads(Bucket=vol.bucket).get("Uploads", []) == []
    assert_cli_ok(vol.cli("fsck", vol.url))


# ---------------------------------------------------------------- bad input

# Every command with values it must refuse: (arguments, exit code, fragment of the error).
# In the arguments, {vol} is a volume's URL, {new} a place with no volume, {tmp} a scratch
# directory holding `file` and the configs below, {missing} a path that does not exist.
BAD_CONFIGS = {
    "lots.yaml": "volumes:\n  v:\n    url: {vol}\n    cache_size_mb: lots\n",
    "workers.yaml": "volumes:\n  v:\n    url: {vol}\n    workers: 0\n",
    "delay.yaml": "volumes:\n  v:\n    url: {vol}\n    writeback_delay: -1\n",
    "tls.yaml": "volumes:\n  v:\n    url: {vol}\n    verify_tls: 'yes'\n",
    "fsync.yaml": "volumes:\n  v:\n    url: {vol}\n    fsync: sometimes\n",
    "url.yaml": "volumes:\n  v:\n    url: 5\n",
    "list.yaml": "volumes:\n  - url: {vol}\n",
    "broken.yaml": "volumes: {{v: [\n",
}
BAD_INPUT = [
    ((), errors.EXIT_USAGE, "command"),
    (("bogus",), errors.EXIT_USAGE, "invalid choice"),
    (("init", "{new}", "--rsa-bits", "1024"), errors.EXIT_USAGE, "--rsa-bits must be a whole number from 2048"),
    (("init", "{new}", "--rsa-bits", "99999999"), errors.EXIT_USAGE, "--rsa-bits"),
    (("init", "{new}", "--rsa-bits", "lots"), errors.EXIT_USAGE, "--rsa-bits"),
    (("init", "{new}", "--block-size", "1000"), errors.EXIT_USAGE, "--block-size"),
    (("init", "{new}", "--block-size", "5000"), errors.EXIT_USAGE, "power of two"),
    (("init", "{new}", "--passphrase-file", "{missing}"), errors.EXIT_USAGE, "--passphrase-file"),
    (("init", "{new}", "--passphrase-file", "{tmp}"), errors.EXIT_USAGE, "--passphrase-file"),
    (("init", "ftp://host/x"), errors.EXIT_USAGE, "unsupported url scheme"),
    (("info", "{vol}", "--passphrase-file", "{missing}"), errors.EXIT_USAGE, "no such file"),
    (("info", "v", "--config", "{missing}"), errors.EXIT_USAGE, "not found"),
    (("info", "v", "--config", "{tmp}"), errors.EXIT_USAGE, "cannot be read"),
    (("info", "v", "--config", "{tmp}/lots.yaml"), errors.EXIT_USAGE, "cache_size_mb must be a whole number"),
    (("info", "v", "--config", "{tmp}/workers.yaml"), errors.EXIT_USAGE, "workers must be"),
    (("info", "v", "--config", "{tmp}/delay.yaml"), errors.EXIT_USAGE, "writeback_delay must be"),
    (("info", "v", "--config", "{tmp}/tls.yaml"), errors.EXIT_USAGE, "verify_tls must be true or false"),
    (("info", "v", "--config", "{tmp}/fsync.yaml"), errors.EXIT_USAGE, "fsync must be upload or journal"),
    (("info", "v", "--config", "{tmp}/url.yaml"), errors.EXIT_USAGE, "url must be"),
    (("info", "v", "--config", "{tmp}/list.yaml"), errors.EXIT_USAGE, "mapping"),
    (("info", "v", "--config", "{tmp}/broken.yaml"), errors.EXIT_USAGE, "not valid yaml"),
    (("ls", "{vol}", "--retry-mode", "eager"), errors.EXIT_USAGE, "invalid choice"),
    (("ls", "{vol}", "--no-such-flag"), errors.EXIT_USAGE, "unrecognized arguments"),
    (("ls", "no-such-volume-name"), errors.EXIT_USAGE, "neither a url"),
    (("put", "{missing}", "{vol}"), errors.EXIT_USAGE, "no such file"),
    (("put", "{tmp}/file"), errors.EXIT_USAGE, "arguments"),
    (("get", "{vol}/f", "{missing}/out"), errors.EXIT_USAGE, "destination directory"),
    (("cat", "s3:///no-bucket"), errors.EXIT_USAGE, "no bucket name"),
    (("mkdir", "file://elsewhere/x"), errors.EXIT_USAGE, "local path"),
    (("rm", "{vol}"), errors.EXIT_USAGE, "volume root"),
    (("rmdir", "{vol}"), errors.EXIT_USAGE, "volume root"),
    (("mv", "{vol}/f", "elsewhere"), errors.EXIT_USAGE, "within one volume"),
    (("decrypt", "{vol}", "{missing}/out"), errors.EXIT_USAGE, "destination directory"),
    (("fsck", "{vol}", "--abort-uploads=yes"), errors.EXIT_USAGE, "ignored explicit argument"),
    (("passwd", "{vol}", "--new-passphrase-file", "{missing}"), errors.EXIT_USAGE, "--new-passphrase-file"),
    (("mount", "{vol}", "{tmp}/mp", "--writeback-delay", "-1"), errors.EXIT_USAGE, "--writeback-delay"),
    (("mount", "{vol}", "{tmp}/mp", "--writeback-delay", "soon"), errors.EXIT_USAGE, "--writeback-delay"),
    (("mount", "{vol}", "{tmp}/mp", "--attr-ttl", "nan"), errors.EXIT_USAGE, "--attr-ttl"),
    (("mount", "{vol}", "{tmp}/mp", "--fsync", "never"), errors.EXIT_USAGE, "invalid choice"),
    (("mount", "{vol}", "{missing}"), errors.EXIT_USAGE, "does not exist"),
    (("mount", "{vol}", "{tmp}/mp", "--lease-duration", "1"), errors.EXIT_USAGE, "--lease-duration"),
    (("umount", "{tmp}", "--timeout", "-1"), errors.EXIT_USAGE, "--timeout"),
    (("umount", "{tmp}"), errors.EXIT_USAGE, "not mounted"),
]


@pytest.fixture(scope="module")
def bad_input(volume_factory, tmp_path_factory):
    """(volume, scratch directory) for the bad-input table: a local volume holding /f."""
    vol = volume_factory("local", extra_init_args=SHARED_INIT)
    tmp = tmp_path_factory.mktemp("bad-input")
    write(tmp / "file", b"a file\n")
    (tmp / "mp").mkdir()
    for name, text in BAD_CONFIGS.items():
        (tmp / name).write_text(text.format(vol=vol.url))
    assert_cli_ok(vol.cli("put", str(tmp / "file"), vol.path("f")))
    return vol, tmp


@pytest.mark.parametrize("argv, code, fragment", BAD_INPUT, ids=[" ".join(a[:1] + a[2:3]) or "none"
                                                                  for a, _, _ in BAD_INPUT])
def test_bad_input(bad_input, argv, code, fragment):
    """No traceback for any input: one `cryptfs: error:` line and the documented exit code."""
    vol, tmp = bad_input
    names = {"vol": vol.url, "new": "file://" + str(tmp / "new-volume"), "tmp": str(tmp),
             "missing": str(tmp / "missing")}
    with vol.intact():
        result = run_cli(*[a.format(**names) for a in argv])
        assert_cli_error(result, code, fragment)
    assert not os.path.exists(tmp / "new-volume") and not os.path.exists(tmp / "missing")
