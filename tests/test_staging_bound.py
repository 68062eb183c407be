"""The staging bound (staging_size): writes beyond it wait while closed files upload, sooner
than their write-back delay, instead of filling the disk; files still open that fill it alone
get ENOSPC. The mount's layers in-process, on both backends, with uploads slowed at the one
door to storage."""

from __future__ import annotations

import errno
import os
import threading
import time

from cryptfs import localstate
from cryptfs.backend.faults import FaultPlan
from cryptfs.handles import MAX_DIRTY_BLOCKS
from fsapi import Ops, close_mount, open_mount

MiB = 1 << 20
BOUND = 6 * MiB
FILE = 2 * MiB + 1  # above the size journaled inline: each closed file keeps a staging file
IN_MEMORY = MAX_DIRTY_BLOCKS * 64 * 1024  # what an open file holds in memory before staging it


def test_writes_wait_for_uploads_at_the_staging_bound(volume_factory, volume_kind, tmp_path):
    ref = volume_factory(volume_kind)
    plan = FaultPlan()
    plan.slow("upload", "put", delay=0.05)
    mount = open_mount(ref, str(tmp_path / "cache"), plan, writeback_delay=600, staging_size=BOUND)
    ops = Ops(mount.fs)
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], localstate.dir_usage(mount.staging))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    bodies = {f"/f{i}": os.urandom(FILE) for i in range(8)}
    try:
        start = time.monotonic()
        for path, body in bodies.items():
            ops.write_file(path, body)
        took = time.monotonic() - start
        # the write-back delay is 600 s: the writes went on because uploads were hurried
        assert took < 60, took
        # a file open for writing that fills the bound alone: that write gets ENOSPC, as on a
        # full local disk; what was written before it stays, and the mount goes on
        fh = ops.open("/big", os.O_WRONLY | os.O_CREAT)
        chunk, failed, written = os.urandom(128 * 1024), None, 0
        try:
            for i in range(80):  # 10 MiB
                mount.fs.write("/big", chunk, i * len(chunk), fh)
                written += 1
        except OSError as exc:
            failed = exc
        finally:
            ops.close("/big", fh)
        assert failed is not None and failed.errno == errno.ENOSPC, failed
        assert BOUND // 2 < written * len(chunk) <= BOUND + IN_MEMORY
        ops.write_file("/after", b"the mount still writes\n")
    finally:
        stop.set()
        sampler.join()
        close_mount(mount)
    # within the bound, give or take what a file holds in memory before its close
    assert peak[0] <= BOUND + IN_MEMORY, peak[0]
    reader = open_mount(ref, str(tmp_path / "other-cache"))
    try:
        check = Ops(reader.fs)
        for path, body in bodies.items():
            assert check.read_file(path) == body, path
        assert check.read_file("/after") == b"the mount still writes\n"
        assert check.read_file("/big") == chunk * written
    finally:
        close_mount(reader)
