"""Tampered tree objects are refused alike by the mount, `get`/`ls` and `fsck`.

One verification path (store.py) serves all three: a directory entry is read whole, so its
body is checked; a directory is entered only through the entry it points back to; a file's
stored header is checked whichever block is read first. Run on both backends.
"""

import errno
import os

import pytest

from cryptfs import format as fmt
from conftest import run_cli
from fsapi import Ops, close_mount, open_mount

B = fmt.DEFAULT_BLOCK_SIZE


def _new_keys(ref, before):
    return sorted(k for k in ref.raw.snapshot() if k not in before)


def _mounted(ref, tmp_path, name):
    return open_mount(ref, str(tmp_path / name))


def _errno_of(call):
    try:
        call()
    except OSError as exc:
        return exc.errno
    return 0


@pytest.mark.expect_log_errors(r"directory entry|stale directory|not followed")
def test_swapped_directory_entry_body(volume_factory, volume_kind, tmp_path):
    """d1's entry object keeps its metadata but carries d2's body: every reader refuses d1."""
    ref = volume_factory(volume_kind)
    mount = _mounted(ref, tmp_path, "c1")
    ops = Ops(mount.fs)
    ops.mkdir("/d1")
    ops.write_file("/d1/f", b"one")
    ops.mkdir("/d2")
    close_mount(mount)
    e1, e2 = ref.entry("d1"), ref.entry("d2")
    body2, _ = ref.raw.read(e2.key)
    _, meta1 = ref.raw.read(e1.key)
    ref.raw.write(e1.key, body2, meta1)

    problems = [(kind, where) for kind, where, _ in ref.fsck().problems]
    assert problems[0] == ("metadata", "/d1"), problems
    # d1's directory is unreachable now: an orphan (its back-pointer proves it ours)
    assert [kind for kind, _ in problems[1:]] == ["orphan-directory"], problems
    assert run_cli("get", ref.path("d1/f"), str(tmp_path / "out"), *ref.args).returncode == 5
    listing = run_cli("ls", "-l", ref.path(""), *ref.args)
    assert listing.returncode == 0 and "d2" in listing.stdout and "d1" not in listing.stdout, listing
    mount = _mounted(ref, tmp_path, "c2")
    try:
        ops = Ops(mount.fs)
        assert _errno_of(lambda: ops.read_file("/d1/f")) == errno.EIO
        assert ops.listdir("/") == ["d2"]  # the bad entry is skipped, not fatal to its directory
    finally:
        close_mount(mount)


@pytest.mark.expect_log_errors(r"stale directory|not followed")
def test_directory_without_back_pointer_is_not_entered(volume_factory, volume_kind, tmp_path):
    ref = volume_factory(volume_kind)
    mount = _mounted(ref, tmp_path, "c1")
    Ops(mount.fs).mkdir("/d1")
    Ops(mount.fs).write_file("/d1/f", b"one")
    close_mount(mount)
    entry = ref.entry("d1")
    ref.raw.delete(ref.store().backptr_key(entry.obj_id))

    assert "stale-directory" in [kind for kind, _, _ in ref.fsck().problems]
    assert run_cli("get", ref.path("d1/f"), str(tmp_path / "out"), *ref.args).returncode == 5
    mount = _mounted(ref, tmp_path, "c2")
    try:
        ops = Ops(mount.fs)
        assert _errno_of(lambda: ops.read_file("/d1/f")) == errno.EIO
        assert _errno_of(lambda: ops.listdir("/d1")) == errno.EIO
        assert _errno_of(lambda: ops.write_file("/d1/g", b"x")) == errno.EIO
    finally:
        close_mount(mount)


@pytest.mark.expect_log_errors(r"stale directory|not followed")
def test_old_entry_restored_after_a_rename(volume_factory, volume_kind, tmp_path):
    """`mv d1 d3`, then the old d1 entry object is put back: d3 works, d1 is never followed,
    and removing d1 takes only the stale entry."""
    ref = volume_factory(volume_kind)
    mount = _mounted(ref, tmp_path, "c1")
    ops = Ops(mount.fs)
    ops.mkdir("/d1")
    ops.write_file("/d1/f", b"one")
    close_mount(mount)
    old = ref.entry("d1")
    saved = ref.raw.read(old.key)
    mount = _mounted(ref, tmp_path, "c2")
    Ops(mount.fs).rename("/d1", "/d3")
    close_mount(mount)
    ref.raw.write(old.key, *saved)

    report = ref.fsck()
    assert [(kind, where) for kind, where, _ in report.problems] == [("stale-directory", "/d1")], report.problems
    assert run_cli("get", ref.path("d1/f"), str(tmp_path / "o1"), *ref.args).returncode == 5
    assert run_cli("get", ref.path("d3/f"), str(tmp_path / "o3"), *ref.args).returncode == 0
    assert (tmp_path / "o3").read_bytes() == b"one"
    mount = _mounted(ref, tmp_path, "c3")
    try:
        ops = Ops(mount.fs)
        assert ops.read_file("/d3/f") == b"one"
        assert _errno_of(lambda: ops.read_file("/d1/f")) == errno.EIO
        assert _errno_of(lambda: ops.rename("/d1", "/d4")) == errno.EIO  # would steal d3's directory
        ops.write_file("/d3/g", b"two")
    finally:
        close_mount(mount)
    assert ref.read("d3/f") == b"one" and ref.read("d3/g") == b"two"
    assert run_cli("rm", "-r", ref.path("d1"), *ref.args).returncode == 5  # never through d1
    assert ref.read("d3/f") == b"one"


HEADER_EDITS = {
    "file-id": lambda h: h[:8] + bytes(16) + h[24:],
    "commitment": lambda h: h[:24] + bytes(32) + h[56:],
    "flags": lambda h: h[:6] + b"\x01\x00" + h[8:],
}


@pytest.mark.expect_log_errors(r"header|commitment|flags")
@pytest.mark.parametrize("edit", sorted(HEADER_EDITS))
def test_altered_header_refused_on_any_read(volume_factory, volume_kind, tmp_path, edit):
    """A read that starts past block 0 checks the stored header too (once per version)."""
    ref = volume_factory(volume_kind)
    data = os.urandom(40 * B)  # past the reader's first chunk
    mount = _mounted(ref, tmp_path, "c1")
    Ops(mount.fs).write_file("/f", data)
    close_mount(mount)
    key = ref.entry("f").key
    body, meta = ref.raw.read(key)
    ref.raw.write(key, HEADER_EDITS[edit](body[:fmt.HEADER_SIZE]) + body[fmt.HEADER_SIZE:], meta)

    assert [kind for kind, _, _ in ref.fsck().problems] == ["content"]
    assert run_cli("get", ref.path("f"), str(tmp_path / "out"), *ref.args).returncode == 5
    mount = _mounted(ref, tmp_path, "c2")
    try:
        fh = mount.fs.open("/f", os.O_RDONLY)
        for offset in (30 * B, 0):
            with pytest.raises(OSError) as caught:
                mount.fs.read("/f", 100, offset, fh)
            assert caught.value.errno == errno.EIO
        mount.fs.release("/f", fh)
    finally:
        close_mount(mount)
