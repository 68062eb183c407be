"""Blocks of one version of a file never pass as blocks of another.

A write into an existing file keeps its data key and header, so without more a block saved
from an older version would authenticate in the newer one. The tag table (format version 2)
lists each block of a version; these tests splice pieces of an older version into a newer
one, on both backends, and check that the mount, `get` and `fsck` all refuse the result.
"""

import errno
import os

import pytest

from cryptfs import format as fmt
from cryptfs.errors import IntegrityError
from conftest import run_cli
from fsapi import Ops, close_mount, open_mount

B = fmt.DEFAULT_BLOCK_SIZE
SIZE = 3 * B + 100


def _two_versions(ref, tmp_path):
    """Write a file, then overwrite its block 1 in place; (key, old body, new body, new metadata, data)."""
    before = ref.raw.snapshot()
    mount = open_mount(ref, str(tmp_path / "cache1"))
    data = bytearray(os.urandom(SIZE))
    Ops(mount.fs).write_file("/f", bytes(data))
    close_mount(mount)
    key = max((k for k in ref.raw.snapshot() if k not in before), key=lambda k: ref.raw.snapshot()[k][0])
    old, _ = ref.raw.read(key)

    mount = open_mount(ref, str(tmp_path / "cache2"))
    ops = Ops(mount.fs)
    fh = ops.open("/f", os.O_RDWR)
    patch = os.urandom(B)
    mount.fs.write("/f", patch, B, fh)
    ops.close("/f", fh)
    close_mount(mount)
    data[B:2 * B] = patch
    new, meta = ref.raw.read(key)
    assert new[:fmt.HEADER_SIZE] == old[:fmt.HEADER_SIZE], "the overwrite kept the data key"
    assert ref.read("f") == bytes(data)
    return key, old, new, meta, bytes(data)


def _splice(layout, old, new, piece):
    if piece == "table":
        start = layout.table_extent(SIZE)[0]
        return new[:start] + old[start:]
    index = {"block-1": 1, "last-block": 3}[piece]
    lo, hi = layout.blocks_extent(index, index + 1, SIZE)
    return new[:lo] + old[lo:hi] + new[hi:]


@pytest.mark.expect_log_errors(r"another version|failed authentication")
@pytest.mark.parametrize("piece", ["block-1", "table"])
def test_spliced_version_refused_everywhere(volume_factory, volume_kind, tmp_path, piece):
    ref = volume_factory(volume_kind)
    key, old, new, meta, data = _two_versions(ref, tmp_path)
    layout = ref.store().layout
    if piece == "block-1":
        assert old[slice(*layout.blocks_extent(1, 2, SIZE))] != new[slice(*layout.blocks_extent(1, 2, SIZE))]
    ref.raw.write(key, _splice(layout, old, new, piece), meta)

    with pytest.raises(IntegrityError):          # the library path `get` uses
        ref.store().read_all(ref.entry("f"))
    result = run_cli("get", ref.path("f"), str(tmp_path / "out"), *ref.args)
    assert result.returncode == 5, result
    report = ref.fsck()
    assert [kind for kind, _, _ in report.problems] == ["content"], report.problems

    mount = open_mount(ref, str(tmp_path / "cache3"))
    try:
        fh = mount.fs.open("/f", os.O_RDONLY)
        with pytest.raises(OSError) as caught:
            mount.fs.read("/f", B, B, fh)
        assert caught.value.errno == errno.EIO
        for offset in (0, 2 * B, 3 * B):          # elsewhere: right bytes or EIO, never wrong bytes
            try:
                assert mount.fs.read("/f", 100, offset, fh) == data[offset:offset + 100]
            except OSError as exc:
                assert exc.errno == errno.EIO
        mount.fs.release("/f", fh)
    finally:
        close_mount(mount)


@pytest.mark.expect_log_errors(r"another version|failed authentication")
def test_spliced_basis_block_is_not_carried_into_a_new_version(volume_factory, tmp_path):
    """An overwrite of block 0 copies blocks 1..3 from the stored object: a spliced block among
    them must fail the upload, not be sealed into the next version's table."""
    ref = volume_factory("local")
    key, old, new, meta, _ = _two_versions(ref, tmp_path)
    ref.raw.write(key, _splice(ref.store().layout, old, new, "block-1"), meta)
    mount = open_mount(ref, str(tmp_path / "cache3"))
    try:
        ops = Ops(mount.fs)
        fh = ops.open("/f", os.O_RDWR)
        mount.fs.write("/f", b"x" * B, 0, fh)  # a whole block: nothing read before the upload
        with pytest.raises(OSError) as caught:
            mount.fs.fsync("/f", 0, fh)
        assert caught.value.errno == errno.EIO
        mount.fs.release("/f", fh)
    finally:
        close_mount(mount)
    spliced_or_unchanged = ref.raw.read(key)[0]
    assert spliced_or_unchanged == _splice(ref.store().layout, old, new, "block-1")


def test_version_1_volume_reads_and_writes(tmp_path, monkeypatch):
    """Volumes made before the tag table keep working (and keep version 1's limits)."""
    import stat
    from cryptfs import fsck, volume
    from cryptfs.backend.local import LocalBackend
    from cryptfs.store import Store
    monkeypatch.setenv("CRYPTFS_STATE_DIR", str(tmp_path / "state"))
    os.makedirs(tmp_path / "v1")
    vol = volume.create(LocalBackend(str(tmp_path / "v1")), "", b"pass", rsa_bits=2048, version=1)
    store = Store(vol)
    assert store.layout == fmt.Layout(B, 1)
    store.init_root(fmt.Attrs(stat.S_IFDIR | 0o755, 0, 0, 1, 1))
    data = os.urandom(2 * B + 5)
    entry = store.write_bytes(fmt.ROOT_DIR_ID, b"f", data, fmt.Attrs(stat.S_IFREG | 0o644, 0, 0, 1, 1))
    assert entry.size == len(data)
    again = Store(volume.open_volume(LocalBackend(str(tmp_path / "v1")), "", b"pass"))
    assert again.read_all(again.resolve([b"f"])) == data
    assert fsck.check(again).clean
