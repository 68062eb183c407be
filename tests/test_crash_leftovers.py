"""What a killed mount leaves behind is settled by the next mount, or by `fsck --repair`.

A multipart upload's id is journaled before any part is sent and aborted at recovery; a
mkdir records its intent before its first write, so a back-pointer without an entry is
removed; `fsck --repair` removes or links only what it can prove is this volume's.
"""

import json
import os
import signal
import stat
import subprocess
import threading
import time

import pytest

from conftest import run_cli
from cryptfs import format as fmt
from mountlib import data, read, wait_gone


def _kill(m) -> None:
    pid = m.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    assert wait_gone([pid], 10)
    subprocess.run(["fusermount3", "-uz", m.mountpoint], check=True)


def _pause_rule(tmp_path, **rule):
    hold, arrived = tmp_path / "hold", tmp_path / "arrived"
    hold.write_text("")
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"rules": [{**rule, "pause_file": str(hold), "arrived_file": str(arrived)}]}))
    return {"CRYPTFS_FAULTS": str(faults)}, arrived


def _wait_for(path, timeout=60) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _fsck(ref, *extra):
    return run_cli("fsck", *extra, ref.url, *ref.args)


def test_kill_during_multipart_upload_leaves_no_upload(volume_factory, own_mounts, s3_client, tmp_path):
    ref = volume_factory("s3")
    env, arrived = _pause_rule(tmp_path, ops=["multipart"])
    m = own_mounts(ref, env=env)
    body = data(20 * 1024 * 1024, "multipart")
    with open(m.path("big.bin"), "wb") as f:
        f.write(body)
    _wait_for(arrived)  # the upload exists, its id not journaled yet (only that one is coming)
    uploads = s3_client.list_multipart_uploads(Bucket=ref.raw.bucket).get("Uploads", [])
    assert len(uploads) == 1, uploads
    _kill(m)
    assert "abandoned-upload" in _fsck(ref).stdout

    m.env = None
    m.mount()
    assert read(m.path("big.bin")) == body
    m.umount()
    assert s3_client.list_multipart_uploads(Bucket=ref.raw.bucket).get("Uploads", []) == []
    result = _fsck(ref)
    assert result.returncode == 0, result


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_kill_between_the_writes_of_a_mkdir(volume_factory, own_mounts, tmp_path, kind):
    """Killed after the back-pointer was stored, before the entry: the remount removes it."""
    ref = volume_factory(kind)
    store = ref.store()
    env, arrived = _pause_rule(tmp_path, ops=["put"], key_contains=store.entry_key(fmt.ROOT_DIR_ID, b"newdir"))
    m = own_mounts(ref, env=env)
    errors = []
    maker = threading.Thread(target=lambda: _catch(errors, os.mkdir, m.path("newdir")), daemon=True)
    maker.start()
    _wait_for(arrived)
    _kill(m)
    maker.join(10)
    found = _fsck(ref)
    assert found.returncode == 5 and "orphan-directory" in found.stdout, found

    m.env = None
    m.mount()
    assert not os.path.exists(m.path("newdir"))
    os.mkdir(m.path("newdir"))
    m.umount()
    result = _fsck(ref)
    assert result.returncode == 0, result


def _catch(errors, fn, *args):
    try:
        fn(*args)
    except OSError as exc:
        errors.append(exc)


def _attrs(mode):
    now = time.time_ns()
    return fmt.Attrs(mode, 0, 0, now, now)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_fsck_repair(volume_factory, tmp_path, kind):
    """Each leftover is reported, then repaired; what is not provably ours stays."""
    ref = volume_factory(kind)
    store = ref.store()
    root = fmt.ROOT_DIR_ID
    store.write_backptr(fmt.new_dir_id(), root, b"never-made", _attrs(stat.S_IFDIR | 0o755))  # empty orphan
    lost = store.mkdir(root, b"lost-dir", _attrs(stat.S_IFDIR | 0o755))                    # orphan with a file
    store.write_bytes(lost.obj_id, b"kept.txt", b"keep me", _attrs(stat.S_IFREG | 0o644))
    store.delete_key(lost.key)
    d1 = store.mkdir(root, b"d1", _attrs(stat.S_IFDIR | 0o755))                            # stale after a rename
    saved = ref.raw.read(d1.key)
    store.rename(d1, root, b"d3")
    ref.raw.write(d1.key, *saved)
    gone = store.mkdir(root, b"no-backptr", _attrs(stat.S_IFDIR | 0o755))                  # its only way in
    store.delete_key(store.backptr_key(gone.obj_id))
    ref.raw.write("t/foreign-object", b"not ours")

    found = _fsck(ref)
    assert found.returncode == 5, found
    for kind_ in ("orphan-directory", "stale-directory", "foreign"):
        assert kind_ in found.stdout, found
    repaired = _fsck(ref, "--repair")
    assert repaired.returncode == 5, repaired  # the foreign object is not ours to remove
    assert repaired.stdout.count("repaired: ") == 4, repaired
    after = _fsck(ref)
    problems = [line for line in after.stdout.splitlines() if ": " in line and "checked" not in line]
    assert problems == ["foreign: t/foreign-object: object is not part of this volume's tree (foreign, "
                        "orphaned, or left by an interrupted operation)"] or \
        [p.split(":")[0] for p in problems] == ["foreign"], after
    assert ref.read(f"lost+found/dir-{lost.obj_id.hex()[:16]}/kept.txt") == b"keep me"
    assert sorted(ref.listdir("")) == ["d3/", "lost+found/", "no-backptr/"]


def test_fsck_repair_aborts_only_our_uploads(volume_factory, s3_client):
    ref = volume_factory("s3")
    store = ref.store()
    bucket, prefix = ref.raw.bucket, ref.raw.prefix
    ours = prefix + store.entry_key(fmt.ROOT_DIR_ID, b"interrupted.bin")
    theirs = prefix + "t/someone-elses-upload"
    for key in (ours, theirs):
        s3_client.create_multipart_upload(Bucket=bucket, Key=key)
    repaired = _fsck(ref, "--repair")
    left = [u["Key"] for u in s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    assert left == [theirs], (left, repaired)
    assert "aborted multipart upload" in repaired.stdout and repaired.returncode == 5, repaired
    s3_client.abort_multipart_upload(Bucket=bucket, Key=theirs,
                                     UploadId=s3_client.list_multipart_uploads(Bucket=bucket)["Uploads"][0]["UploadId"])
    assert _fsck(ref).returncode == 0


def test_fsck_repair_refused_while_mounted(volume_factory, own_mounts):
    ref = volume_factory("local")
    m = own_mounts(ref)
    refused = _fsck(ref, "--repair")
    assert refused.returncode == 10 and "mounted read-write" in refused.stderr, refused
    m.umount()
    assert _fsck(ref, "--repair").returncode == 0


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_kill_between_the_deletes_of_an_rmdir(volume_factory, own_mounts, tmp_path, kind):
    """Killed after the entry was deleted, before the back-pointer: the remount removes it."""
    ref = volume_factory(kind)
    m = own_mounts(ref)
    os.mkdir(m.path("gone"))
    os.mkdir(m.path("kept"))
    m.umount()
    store = ref.store()
    child = ref.entry("gone").obj_id
    env, arrived = _pause_rule(tmp_path, ops=["delete"], key_contains=store.backptr_key(child))
    m.env = env
    m.mount()
    remover = threading.Thread(target=lambda: _catch([], os.rmdir, m.path("gone")), daemon=True)
    remover.start()
    _wait_for(arrived)
    _kill(m)
    remover.join(10)
    found = _fsck(ref)
    assert found.returncode == 5 and "orphan-directory" in found.stdout, found

    m.env = None
    m.mount()
    assert sorted(os.listdir(m.mountpoint)) == ["kept"]
    m.umount()
    result = _fsck(ref)
    assert result.returncode == 0, result


def test_journal_of_the_previous_release_is_uploaded(volume_factory, own_mounts):
    """Journal records were untyped dicts (version 1, no commit condition): a journal left by
    that release is still uploaded by the next mount."""
    import sqlite3

    ref = volume_factory("local")
    m = own_mounts(ref, "--writeback-delay", "60")
    small, large = data(1000, 1), data(3 << 20, 2)  # inline in the record, and a staging file
    with open(m.path("small"), "wb") as f:
        f.write(small)
    with open(m.path("large"), "wb") as f:
        f.write(large)
    _kill(m)
    db = sqlite3.connect(os.path.join(m.cache_dir, ref.store().vol.volume_id, "journal", "journal.db"))
    rows = db.execute("SELECT uid, record FROM pending").fetchall()
    assert len(rows) == 2
    for uid, raw in rows:
        record = json.loads(raw)
        assert record["version"] == 2 and record["expect"] is None
        old = {k: v for k, v in record.items() if k not in ("expect", "upload", "obsolete")}
        db.execute("UPDATE pending SET record=? WHERE uid=?", (json.dumps({**old, "version": 1}), uid))
    db.commit()
    db.close()
    m.mount()
    assert read(m.path("small")) == small and read(m.path("large")) == large
    assert "finished 2 upload(s) left by an earlier mount" in m.log()
    m.umount()
    assert ref.read("small") == small and ref.read("large") == large
    ref.assert_clean()
