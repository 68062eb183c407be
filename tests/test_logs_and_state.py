"""What cryptfs leaves on this machine besides the files it is asked to write: log records
hold no plaintext name, content or credential at any level, and local state (cache
directory, journal, mount log, known volumes) is private, made 0700/0600, and refused when
another user made it in advance or can write to it.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat

import pytest

from conftest import assert_cli_error, assert_cli_ok, run_cli
from cryptfs import errors
from mountlib import MountedVolume, raises_errno, read, write

pytestmark = [pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                                 reason="needs /dev/fuse and fusermount3"),
              pytest.mark.usefixtures("hang_guard")]

SECRET = "plaintext-secret-name"     # in every name used below; must never reach a log record
CONTENT = b"plaintext secret content 0123456789\n"
CREDENTIALS = ("Authorization", "Credential=", "testing")   # moto's dummy keys are "testing"


def assert_clean_log(text: str) -> None:
    for fragment in (SECRET, CONTENT.decode().strip(), *CREDENTIALS):
        assert fragment not in text, (fragment, text[-3000:])


def exercise(m: MountedVolume) -> None:
    """Operations that succeed and fail, each naming SECRET."""
    os.mkdir(m.path(SECRET + "-dir"))
    write(m.path(SECRET + "-dir", SECRET + ".txt"), CONTENT)
    assert read(m.path(SECRET + "-dir", SECRET + ".txt")) == CONTENT
    os.rename(m.path(SECRET + "-dir", SECRET + ".txt"), m.path(SECRET + "-moved.txt"))
    os.chmod(m.path(SECRET + "-moved.txt"), 0o600)
    for failing in (lambda: os.stat(m.path(SECRET + "-missing")), lambda: os.mkdir(m.path(SECRET + "-dir")),
                    lambda: os.rmdir(m.path(SECRET + "-missing-dir")), lambda: os.link(
                        m.path(SECRET + "-moved.txt"), m.path(SECRET + "-dir"))):  # EEXIST
        with pytest.raises(OSError):
            failing()
    assert SECRET + "-moved.txt" in os.listdir(m.mountpoint)


@pytest.mark.expect_log_errors(r"failed authentication")
def test_verbose_mount_logs_no_names_or_credentials(volume_factory, own_mounts):
    ref = volume_factory("s3")
    m = own_mounts(ref, "-v")
    exercise(m)
    before = ref.raw.snapshot()
    write(m.path(SECRET + "-tampered.bin"), CONTENT * 3000)
    m.umount()
    tampered = [k for k, v in ref.raw.snapshot().items() if before.get(k) != v and v[0] > 100_000]
    assert len(tampered) == 1, tampered
    ref.raw.flip(tampered[0], 5000)
    m = own_mounts(ref, "-v", name="elsewhere")  # not trusting the first mount's saved listings
    assert read(m.path(SECRET + "-moved.txt")) == CONTENT
    raises_errno(errno.EIO, read, m.path(SECRET + "-tampered.bin"))   # logged, by object key
    m.umount()
    with open(m.log_path(), errors="replace") as f:
        text = f.read()
    assert "unmount: everything uploaded" in text
    assert any(tampered[0] in line and "failed authentication" in line for line in text.splitlines()), text
    assert_clean_log(text)


@pytest.mark.parametrize("names", [False, True])
def test_failed_operation_log_line(caplog, monkeypatch, names):
    """A failing FUSE operation is logged with its path only under --log-names."""
    from cryptfs import fs, logs
    from cryptfs.errors import IntegrityError

    class Ops:
        @fs.op
        def open(self, path, flags):
            raise IntegrityError("block 3 failed authentication (object t/abc/def)")

    monkeypatch.setattr(logs, "_names", names)
    with pytest.raises(OSError) as info:
        Ops().open("/" + SECRET + "/file.txt", 0)
    assert info.value.errno == errno.EIO
    [record] = [r for r in caplog.records if r.name == "cryptfs.fs"]
    assert "block 3 failed authentication (object t/abc/def)" in record.getMessage()
    assert (SECRET in record.getMessage()) == names


def test_verbose_commands_log_no_names_or_credentials(volume_factory, tmp_path):
    ref = volume_factory("s3")
    src = tmp_path / (SECRET + ".txt")
    write(src, CONTENT)
    put = assert_cli_ok(ref.cli("put", "-v", str(src), ref.url))
    get = assert_cli_ok(ref.cli("get", "-v", ref.path(SECRET + ".txt"), str(tmp_path / "back")))
    ls = assert_cli_ok(ref.cli("ls", "-v", "-l", ref.url))
    missing = ref.cli("cat", "-v", ref.path(SECRET + "-missing"))
    assert_cli_error(missing, errors.EXIT_NOT_FOUND, SECRET)   # the command's own error names it
    assert (tmp_path / "back").read_bytes() == CONTENT
    assert SECRET in ls.stdout                                  # output, not a log
    for result in (put, get, ls):
        assert_clean_log(result.stderr)
    assert_clean_log(missing.stderr.replace(missing.stderr.strip().splitlines()[-1], ""))


def test_log_names_is_explicit(volume_factory, tmp_path):
    ref = volume_factory("local")
    allowed = assert_cli_ok(ref.cli("ls", "--log-names", ref.url))
    assert "--log-names: file names are written to the log in plaintext" in allowed.stderr
    m = MountedVolume(ref, tmp_path / "mnt", tmp_path / "cache")
    debug = run_cli(*m.mount_command("-o", "debug"))
    assert_cli_error(debug, errors.EXIT_USAGE, "-o debug", "--log-names")
    assert not os.path.ismount(m.mountpoint)


def modes_under(root) -> dict[str, int]:
    out = {".": os.lstat(root).st_mode}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = os.lstat(path).st_mode
    return out


def test_local_state_is_private(volume_factory, own_mounts):
    ref = volume_factory("local")
    m = own_mounts(ref, "--writeback-delay", "30")
    write(m.path("big.bin"), os.urandom(300_000))
    m.remount()
    read(m.path("big.bin"))           # blocks into the disk cache
    write(m.path("pending.txt"), b"x")  # staging and journal hold it until the unmount
    modes = modes_under(m.cache_dir)
    m.umount()
    modes.update(modes_under(m.cache_dir))
    assert any("blocks/" in p for p in modes) and any(p.endswith("attrs.db") for p in modes), modes
    assert any(p.endswith("mount.log") for p in modes) and any("staging/" in p for p in modes), modes
    state = os.environ["CRYPTFS_STATE_DIR"]
    modes.update({os.path.join("state", p): mode for p, mode in modes_under(state).items()})
    wrong = {p: oct(mode) for p, mode in modes.items()
             if stat.S_IMODE(mode) != (0o700 if stat.S_ISDIR(mode) else 0o600)}
    assert not wrong, wrong


@pytest.mark.parametrize("where", ["cache root", "volume directory", "mount log", "writable root"])
def test_foreign_local_state_refused(volume_factory, tmp_path, where):
    ref = volume_factory("local")
    m = MountedVolume(ref, tmp_path / "mnt", tmp_path / "cache")
    volume_dir = os.path.join(m.cache_dir, ref.store().vol.volume_id)
    os.makedirs(volume_dir, mode=0o700)
    log = os.path.join(volume_dir, "mount.log")
    if where == "cache root":
        os.chown(m.cache_dir, 65534, 65534)
    elif where == "volume directory":
        os.chown(volume_dir, 65534, 65534)
    elif where == "mount log":
        write(log, b"")
        os.chmod(log, 0o644)
        os.chown(log, 65534, 65534)
    else:
        os.chmod(m.cache_dir, 0o777)
    result = run_cli(*m.mount_command())
    if where == "writable root":
        assert_cli_error(result, errors.EXIT_USAGE, m.cache_dir, "writable by other users")
    else:
        assert_cli_error(result, errors.EXIT_USAGE, "belongs to uid 65534")
    assert not os.path.ismount(m.mountpoint)
    assert os.listdir(volume_dir) == (["mount.log"] if where == "mount log" else [])
    if where == "mount log":
        assert os.path.getsize(log) == 0
