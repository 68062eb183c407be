"""A full cache disk, on a real mount whose --cache-dir is a small tmpfs, on both backends:
ENOSPC reaches the writer, the mount stays usable (lists, reads, deletes, mkdir), a failed
file's staging is removed and nothing of it is stored, and what was stored before is intact."""

import errno
import glob
import os
import shutil
import time

import pytest

from mountlib import MountedVolume, data, read, write

CACHE_SIZE = "20m"
BIG = 50 * 1024 * 1024
CHUNK = 1024 * 1024


def fill(path: str, flags: int) -> tuple[int, int]:
    """Write up to BIG bytes into an open file until the cache disk is full; (fd, bytes written)."""
    fd = os.open(path, flags, 0o644)
    written, chunk = 0, data(CHUNK, "fill")
    with pytest.raises(OSError) as info:
        while written < BIG:
            written += os.write(fd, chunk)
    assert info.value.errno == errno.ENOSPC, info.value
    return fd, written


def close_fails(fd: int) -> None:
    with pytest.raises(OSError) as info:
        os.close(fd)
    assert info.value.errno == errno.ENOSPC, info.value


def soon(check, timeout: float = 5.0) -> bool:
    """RELEASE follows close(2) asynchronously, and the kernel keeps names for a second."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.parametrize("keep_pending", [False, True], ids=["keep-uploaded", "keep-pending"])
def test_full_cache_disk(volume_factory, volume_kind, tmpfs, tmp_path, hang_guard, keep_pending):
    ref = volume_factory(volume_kind)
    elsewhere = tmp_path / "from-elsewhere.txt"
    elsewhere.write_bytes(b"written by another client\n")
    assert ref.cli("put", str(elsewhere), ref.path("from-elsewhere.txt")).returncode == 0
    cache = tmpfs(CACHE_SIZE)
    # keep-pending: keep.bin's closed version is still in the journal when the append to it fails
    delay = ["--writeback-delay", "120"] if keep_pending else []
    m = MountedVolume(ref, tmp_path / "mnt", cache, ["--attr-ttl", "0.2", *delay])
    keep, other = data(300_000, 1), data(1000, 2)
    try:
        m.mount()
        with open(m.path("keep.bin"), "wb") as f:
            f.write(keep)
            if not keep_pending:
                f.flush()
                os.fsync(f.fileno())
        with open(m.path("other.txt"), "wb") as f:
            f.write(other)
            f.flush()
            os.fsync(f.fileno())   # in the bucket before the disk fills
        empty_use = shutil.disk_usage(cache).used

        # a new file: ENOSPC to the writer, the rest of the mount works while the disk is full
        fd, written = fill(m.path("big"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        assert 0 < written < BIG
        assert shutil.disk_usage(cache).free < 2 * CHUNK
        assert sorted(os.listdir(m.mountpoint)) == ["big", "from-elsewhere.txt", "keep.bin", "other.txt"]
        assert os.stat(m.path("from-elsewhere.txt")).st_size == len(elsewhere.read_bytes())
        assert read(m.path("from-elsewhere.txt")) == elsewhere.read_bytes()
        assert read(m.path("keep.bin")) == keep
        os.mkdir(m.path("made-while-full"))
        os.unlink(m.path("other.txt"))
        close_fails(fd)
        assert soon(lambda: not os.path.exists(m.path("big")))    # nothing of it was stored
        assert soon(lambda: shutil.disk_usage(cache).used < empty_use + CHUNK)  # its staging is gone

        # an existing file appended to until the disk is full keeps its stored version
        fd, _ = fill(m.path("keep.bin"), os.O_WRONLY | os.O_APPEND)
        assert os.listdir(m.path("made-while-full")) == []
        close_fails(fd)
        assert read(m.path("keep.bin")) == keep

        # a new file removed while open, after its writes failed
        fd, _ = fill(m.path("big2"), os.O_WRONLY | os.O_CREAT)
        os.unlink(m.path("big2"))
        close_fails(fd)
        assert soon(lambda: shutil.disk_usage(cache).used < empty_use + CHUNK)

        write(m.path("small-after.txt"), b"written after the disk filled\n")
        m.umount()
        assert not glob.glob(os.path.join(cache, "*", "staging", "*"))
        assert ref.listdir() == ["from-elsewhere.txt", "keep.bin", "made-while-full/", "small-after.txt"]
        assert ref.read("keep.bin") == keep
        assert ref.read("small-after.txt") == b"written after the disk filled\n"
        ref.assert_clean()

        m.mount()
        assert sorted(os.listdir(m.mountpoint)) == ["from-elsewhere.txt", "keep.bin", "made-while-full",
                                                    "small-after.txt"]
        assert read(m.path("keep.bin")) == keep
        write(m.path("after-remount.txt"), b"healthy\n")
        m.umount()
        assert ref.read("after-remount.txt") == b"healthy\n"
        ref.assert_clean()
        assert not m.log_problems(0)
    finally:
        m.force_unmount()
