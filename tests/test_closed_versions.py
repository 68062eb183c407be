"""A closed file's journaled version survives a crash while the file is changed again.

The journal record of a close names the staging file; changes after that close would
overwrite it in place, so the first one copies it aside first. A crash before the next
close then recovers exactly the closed version, never a mix with unclosed writes.
In-process (the mount's layers, no FUSE), both backends.
"""

import os

import pytest

from cryptfs import format as fmt
from fsapi import Ops, close_mount, open_mount

B = fmt.DEFAULT_BLOCK_SIZE
CLOSED = os.urandom(40 * B + 123)  # beyond the inline limit: journaled by staging file


def _crash(mount) -> None:
    """Stop a mount's threads without unmounting: what kill -9 leaves is its cache directory."""
    mount.fs.wb.stop()
    mount.fs._stop.set()


@pytest.mark.parametrize("change", ["overwrite", "truncate", "o_trunc", "append"])
def test_crash_after_changes_to_a_closed_file_recovers_the_closed_version(volume_factory, volume_kind,
                                                                           tmp_path, change):
    ref = volume_factory(volume_kind)
    cache = str(tmp_path / "cache")
    mount = open_mount(ref, cache, writeback_delay=600)
    ops = Ops(mount.fs)
    ops.write_file("/f", CLOSED)
    assert ref.entry("f") is None, "uploaded already: the test proves nothing"
    flags = os.O_WRONLY | (os.O_TRUNC if change == "o_trunc" else 0)
    fh = mount.fs.open("/f", flags)
    if change == "overwrite":
        for i in range(0, 40, 2):  # enough blocks to evict dirty ones into the staging file
            mount.fs.write("/f", os.urandom(B), i * B, fh)
    elif change == "truncate":
        mount.fs.truncate("/f", 5 * B + 7, fh)
    elif change == "append":
        mount.fs.write("/f", os.urandom(100 * B), len(CLOSED), fh)
    else:
        mount.fs.write("/f", os.urandom(70 * B), 0, fh)
    _crash(mount)  # before the next close

    again = open_mount(ref, cache)
    try:
        assert Ops(again.fs).read_file("/f") == CLOSED
    finally:
        close_mount(again)
    assert ref.read("f") == CLOSED
    assert not [n for n in os.listdir(again.staging)], "staging left behind"
    ref.assert_clean()


def test_changes_after_a_close_then_closed_upload_the_new_version(volume_factory, tmp_path):
    ref = volume_factory("local")
    mount = open_mount(ref, str(tmp_path / "cache"), writeback_delay=600)
    ops = Ops(mount.fs)
    ops.write_file("/f", CLOSED)
    fh = mount.fs.open("/f", os.O_WRONLY)
    mount.fs.write("/f", b"x" * B, 3 * B, fh)
    ops.close("/f", fh)
    assert [n for n in os.listdir(mount.staging) if ".closed" in n] == [], "kept copy outlived the next close"
    close_mount(mount)
    want = bytearray(CLOSED)
    want[3 * B:4 * B] = b"x" * B
    assert ref.read("f") == bytes(want)
