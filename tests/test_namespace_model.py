"""Model-based stress test of the mount's namespace, in-process (no kernel), on both backends.

Several threads create, overwrite, append, rename, unlink, read-then-unlink, mkdir, rmdir,
rename directories over directories and list, each in its own subtree, while uploads
complete in the background (a short write-back delay, uploads slowed at random by a
FaultPlan at the one door to storage, listings trusted for 0.2 s so they are re-read while
uploads land). After every step the thread's subtree is checked against an in-memory model:
no name missing, none extra, types, sizes and contents exact. At the end the volume is
unmounted and mounted again from an empty cache directory, and the whole model is checked
against what the bucket holds.
"""

from __future__ import annotations

import errno
import random
import threading

import pytest

from cryptfs.backend.faults import FaultPlan
from fsapi import Ops, close_mount, open_mount

THREADS = 4
STEPS = 120
NAMES = ["a", "b", "c", "d", "e"]
DIRS = ["x", "y"]


class Model:
    """One thread's subtree: files (path -> bytes) and directories (paths), relative to its root."""

    def __init__(self, root: str):
        self.root = root
        self.files: dict[str, bytes] = {}
        self.dirs: set[str] = {""}

    def children(self, d: str) -> list[str]:
        pre = d + "/" if d else ""
        names = [p[len(pre):] for p in list(self.files) + list(self.dirs)
                 if p and p.startswith(pre) and "/" not in p[len(pre):]]
        return sorted(names)

    def abs(self, p: str) -> str:
        return self.root + ("/" + p if p else "")


def check_tree(ops: Ops, model: Model, problems: list, where: str) -> None:
    for d in sorted(model.dirs):
        try:
            seen = ops.listdir(model.abs(d))
        except OSError as exc:
            problems.append(f"{where}: listdir {d!r}: {exc}")
            continue
        want = model.children(d)
        if seen != want:
            problems.append(f"{where}: listdir {d!r}: missing {sorted(set(want) - set(seen))}, "
                            f"extra {sorted(set(seen) - set(want))}")
    for p, content in model.files.items():
        try:
            st = ops.stat(model.abs(p))
            got = ops.read_file(model.abs(p))
        except OSError as exc:
            problems.append(f"{where}: {p!r}: {exc}")
            continue
        if st["st_size"] != len(content) or got != content:
            problems.append(f"{where}: {p!r}: size {st['st_size']}, {len(got)} bytes read, "
                            f"expected {len(content)}")


def step(ops: Ops, model: Model, rng: random.Random, n: int) -> str:
    """One random operation, applied to the mount and the model alike; returns its description."""
    d = rng.choice(sorted(model.dirs))
    p = (d + "/" if d else "") + rng.choice(NAMES)
    q = (rng.choice(sorted(model.dirs)) + "/").lstrip("/") + rng.choice(NAMES)
    kind = rng.choice(["create", "create", "overwrite", "append", "append", "rename", "rename",
                       "unlink", "read_unlink", "mkdir", "rmdir", "rename_dir"])
    if p in model.dirs or q in model.dirs:
        kind = "rmdir" if kind in ("create", "overwrite", "append", "unlink", "read_unlink") else kind
    payload = f"{model.root}:{n}:".encode() * rng.choice([1, 3, 200, 5000])
    if kind in ("create", "overwrite"):
        if p in model.dirs:
            return "skip"
        ops.write_file(model.abs(p), payload)
        model.files[p] = payload
    elif kind == "append":
        ops.append(model.abs(p), payload)
        model.files[p] = model.files.get(p, b"") + payload
    elif kind == "rename":
        if p not in model.files or q in model.dirs:
            return "skip"
        ops.rename(model.abs(p), model.abs(q))
        if p != q:
            model.files[q] = model.files.pop(p)
    elif kind in ("unlink", "read_unlink"):
        if p not in model.files:
            return "skip"
        if kind == "read_unlink":
            assert ops.read_file(model.abs(p)) == model.files[p]
        ops.unlink(model.abs(p))
        del model.files[p]
    elif kind == "mkdir":
        name = (d + "/" if d else "") + rng.choice(DIRS)
        if name in model.dirs or name in model.files or name.count("/") > 1:
            return "skip"
        ops.mkdir(model.abs(name))
        model.dirs.add(name)
        p = name
    elif kind == "rmdir":
        cands = sorted(x for x in model.dirs if x)
        if not cands:
            return "skip"
        p = rng.choice(cands)
        if model.children(p):
            try:
                ops.rmdir(model.abs(p))
            except OSError as exc:
                if exc.errno != errno.ENOTEMPTY:
                    raise
                return f"rmdir {p} refused"
            raise AssertionError(f"rmdir of non-empty {p} succeeded")
        ops.rmdir(model.abs(p))
        model.dirs.discard(p)
    elif kind == "rename_dir":
        cands = sorted(x for x in model.dirs if x)
        if len(cands) < 2:
            return "skip"
        a, b = rng.sample(cands, 2)
        if b.startswith(a + "/") or a.startswith(b + "/"):
            return "skip"
        if model.children(b):
            try:
                ops.rename(model.abs(a), model.abs(b))
            except OSError as exc:
                if exc.errno != errno.ENOTEMPTY:
                    raise
                return f"rename {a} over non-empty {b} refused"
            raise AssertionError(f"rename of {a} over non-empty {b} succeeded")
        ops.rename(model.abs(a), model.abs(b))
        moved = {x for x in model.dirs if x == a or x.startswith(a + "/")}
        model.dirs -= moved | {b}
        model.dirs |= {b + x[len(a):] for x in moved}
        for f in [f for f in model.files if f.startswith(a + "/")]:
            model.files[b + f[len(a):]] = model.files.pop(f)
        p = f"{a} -> {b}"
    return f"{kind} {p}"


def run_model(ops: Ops, models: list[Model], seed: int) -> list[str]:
    problems: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        rng = random.Random(seed * 100 + i)
        model = models[i]
        for n in range(STEPS):
            try:
                what = step(ops, model, rng, n)
            except (OSError, AssertionError) as exc:
                with lock:
                    problems.append(f"{model.root} step {n}: {exc!r}")
                continue
            mine: list[str] = []
            check_tree(ops, model, mine, f"{model.root} step {n} after {what}")
            if mine:
                with lock:
                    problems.extend(mine)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return problems


@pytest.mark.parametrize("seed", [1, 2])
def test_namespace_against_model(volume_factory, volume_kind, tmp_path, seed):
    ref = volume_factory(volume_kind)
    plan = FaultPlan()
    plan.slow("upload", "put", "copy", delay=0.0, jitter=0.03)  # uploads land at random moments
    mount = open_mount(ref, str(tmp_path / "cache"), plan)
    ops = Ops(mount.fs)
    models = [Model(f"/t{i}") for i in range(THREADS)]
    for m in models:
        ops.mkdir(m.root)
    try:
        problems = run_model(ops, models, seed)
    finally:
        close_mount(mount)
    # after unmount, from an empty cache: what the bucket holds
    again = open_mount(ref, str(tmp_path / "cache2"))
    try:
        for m in models:
            check_tree(Ops(again.fs), m, problems, f"{m.root} after remount")
    finally:
        close_mount(again)
    assert not problems, f"{len(problems)} inconsistencies:\n" + "\n".join(problems[:40])


def test_read_moves_atime_relatime_without_a_write(volume_factory, tmp_path):
    ref = volume_factory("local")
    plan = FaultPlan()
    mount = open_mount(ref, str(tmp_path / "cache"), plan)
    ops = Ops(mount.fs)
    try:
        ops.write_file("/f", b"data")
        mount.fs.fsync("/f", 0, fh := mount.fs.open("/f", 0))
        mount.fs.release("/f", fh)
        mount.fs.utimens("/f", (1_000_000_000_000_000_000, 1_500_000_000_000_000_000))
        writes = plan.slow("put", "upload", "copy", "delete", delay=0.0)
        assert ops.read_file("/f") == b"data"
        st = ops.stat("/f")
        assert st["st_atime"] > 1_500_000_000_000_000_000 and st["st_mtime"] == 1_500_000_000_000_000_000
        moved = st["st_atime"]
        assert ops.read_file("/f") == b"data"
        assert ops.stat("/f")["st_atime"] == moved  # newer than mtime and ctime: relatime keeps it
        assert writes.seen == 0  # atime moved in memory: no upload per read
    finally:
        close_mount(mount)
