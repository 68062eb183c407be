"""Running the mount as a service: found by its mount point, stopped by a signal, started by
mount(8) and systemd, watched with `cryptfs status`. Real mounts on moto's S3 server.

Uploads are slowed (CRYPTFS_FAULTS) where a test must catch them pending.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time

import pytest

from conftest import assert_cli_error, cli_command, cli_environ, run_cli
from mountlib import LOG_PROBLEM, MountedVolume, alive, data, mount_pids, wait_gone, write

pytestmark = [pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                                 reason="needs /dev/fuse and fusermount3"),
              pytest.mark.usefixtures("hang_guard")]

# an environment that shares nothing with the one the mount was started in
STRANGER = {"HOME": "/nonexistent", "XDG_CACHE_HOME": None, "XDG_STATE_HOME": None, "XDG_RUNTIME_DIR": None,
            "CRYPTFS_STATE_DIR": None, "CRYPTFS_CONFIG": None}


def slow_uploads(tmp_path, delay: float) -> dict:
    """CRYPTFS_FAULTS for a mount whose uploads each take `delay` seconds longer."""
    path = tmp_path / "faults.json"
    path.write_text(json.dumps({"rules": [{"ops": ["upload", "put"], "delay": delay}]}))
    return {"CRYPTFS_FAULTS": str(path)}


def cat(ref, path: str) -> bytes:
    result = ref.cli("cat", ref.path(path))
    assert result.returncode == 0, result
    return result.stdout_bytes


@pytest.fixture
def s3vol(volume_factory):
    return volume_factory("s3")


def own(ref, tmp_path, *extra, env=None, name="mnt") -> MountedVolume:
    m = MountedVolume(ref, tmp_path / name, tmp_path / (name + "-cache"), extra, env=env)
    return m


def assert_clean_log(m: MountedVolume) -> None:
    problems = m.log_problems()
    assert not problems, "mount log:\n" + "\n".join(problems[:20])


# ---------------------------------------------------------------- umount and status by mount point

def test_umount_from_another_environment_waits_for_uploads(s3vol, tmp_path):
    m = own(s3vol, tmp_path, "--writeback-delay", "30", env=slow_uploads(tmp_path, 1.0))
    m.mount()
    try:
        bodies = {f"file{i}": data(300_000 + i, f"svc{i}") for i in range(4)}
        for name, body in bodies.items():
            write(m.path(name), body)
        st = json.loads(run_cli("status", m.mountpoint, "--json", env=STRANGER).stdout)
        assert st["pending"]["files"] == 4 and st["pending"]["bytes"] == sum(map(len, bodies.values()))
        pid = m.daemon_pid()
        start = time.monotonic()
        result = run_cli("umount", m.mountpoint, env=STRANGER)
        took = time.monotonic() - start
        assert result.returncode == 0, (result, m.log())
        assert "uploading before unmount:" in result.stderr and "file(s)" in result.stderr, result
        assert f"cryptfs: unmounted {m.mountpoint}; 4 file(s)" in result.stderr, result
        assert took > 1.0, "returned before the slowed uploads could be done"
        assert not os.path.ismount(m.mountpoint)
        assert not alive(pid), "umount returned while the mount process still ran"
        for name, body in bodies.items():  # in the bucket, read without any mount
            assert cat(s3vol, name) == body, name
        assert_clean_log(m)
    finally:
        m.force_unmount()


@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
def test_relative_paths_of_mount_and_umount(s3vol, tmp_path, foreground):
    """`cryptfs mount URL mnt --cache-dir cache` from some directory: the mount process works
    from "/", so every path it keeps is made absolute first; umount by a relative mount point."""
    work = tmp_path / "here"
    (work / "mnt").mkdir(parents=True)
    m = MountedVolume(s3vol, work / "mnt", work / "cache")
    command = ("mount", s3vol.url, "mnt", *s3vol.args, "--cache-dir", "cache", "--writeback-delay", "30")
    proc = None
    if foreground:
        err = open(tmp_path / "foreground.log", "wb")
        proc = subprocess.Popen(cli_command(*command, "-f"), cwd=work, env=cli_environ(None),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 30
        while not os.path.ismount(m.mountpoint) and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        assert run_cli(*command, cwd=work).returncode == 0
    try:
        assert os.path.ismount(m.mountpoint)
        write(m.path("kept.txt"), b"made through relative paths\n")
        result = run_cli("umount", "mnt", cwd=work)
        assert result.returncode == 0, (result, m.log())
        assert "1 file(s)" in result.stderr, result
        assert cat(s3vol, "kept.txt") == b"made through relative paths\n"
        if proc is None:
            assert m.log_path(), "no mount.log under the cache directory"
            assert_clean_log(m)
        else:
            assert proc.wait(30) == 0
            logged = (tmp_path / "foreground.log").read_text(errors="replace")
            assert not LOG_PROBLEM.search(logged), logged
    finally:
        m.force_unmount()
        if proc is not None and proc.poll() is None:
            proc.kill()


def test_status_json_fields(s3vol, tmp_path):
    m = own(s3vol, tmp_path, "--writeback-delay", "30")
    m.mount()
    try:
        write(m.path("a"), data(100_000, "a"))
        os.sync()
        with open(m.path("a"), "rb") as f:
            f.read()
        st = json.loads(run_cli("status", m.mountpoint, "--json").stdout)
        assert st["volume"] == s3vol.url and st["mountpoint"] == m.mountpoint and st["state"] == "mounted"
        assert st["pid"] == m.daemon_pid() and st["read_only"] is False
        assert 0 <= st["uptime"] < 120 and st["started"] <= time.time()
        assert st["pending"]["files"] == 1 and st["pending"]["bytes"] == 100_000
        assert 0 <= st["pending"]["oldest_age"] < 60 and st["pending"]["oldest"] <= time.time()
        assert st["uploads_in_flight"] == 0 and st["open_modified"] == 0
        assert set(st["cache"]) >= {"memory_bytes", "memory_limit", "disk_bytes", "disk_limit",
                                    "memory_hit_rate", "disk_hit_rate"}
        assert st["requests"].get("list", 0) >= 1 and st["requests"].get("head", 0) >= 1, st["requests"]
        assert st["retries"] == 0 and st["failed_requests"] == 0 and st["errors"] == 0
        assert st["last_error"] is None and "conflicts" in st
        human = run_cli("status", m.mountpoint)
        assert human.returncode == 0 and "pending:      1 file(s)" in human.stdout, human
        m.umount()
        gone = run_cli("status", m.mountpoint)
        assert gone.returncode == 2 and "not mounted" in gone.stderr, gone
        assert_clean_log(m)
    finally:
        m.force_unmount()


def test_fusermount_with_pending_uploads_loses_nothing(s3vol, tmp_path):
    m = own(s3vol, tmp_path, "--writeback-delay", "30")
    m.mount()
    try:
        body = data(500_000, "fusermount")
        write(m.path("late"), body)
        pids = mount_pids(m.mountpoint)
        subprocess.run(["fusermount3", "-u", m.mountpoint], check=True)
        assert wait_gone(pids, 60)
        m.extra = []
        m.mount()
        assert open(m.path("late"), "rb").read() == body
        m.umount()
        assert cat(s3vol, "late") == body
        assert_clean_log(m)
    finally:
        m.force_unmount()


# ---------------------------------------------------------------- systemd: readiness and SIGTERM

def test_foreground_mount_notifies_ready_and_stops_cleanly_on_sigterm(s3vol, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    notify_path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(60)
    log = open(tmp_path / "foreground.log", "wb")
    proc = subprocess.Popen(cli_command("mount", "-f", s3vol.url, mnt, *s3vol.args, "--cache-dir", tmp_path / "c",
                                        "--writeback-delay", "30"),
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            env=cli_environ({"NOTIFY_SOCKET": notify_path, **slow_uploads(tmp_path, 0.5)}))
    try:
        message = listener.recv(4096).decode()
        assert "READY=1" in message.split("\n"), message
        assert os.path.ismount(mnt), "READY=1 before the mount answers"
        os.listdir(mnt)
        bodies = {f"f/{i}": data(200_000, f"term{i}") for i in range(3)}
        os.mkdir(mnt / "f")
        for name, body in bodies.items():
            write(mnt / name, body)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "foreground.log").read_text()
        assert "STOPPING=1" in listener.recv(4096).decode()
        output = (tmp_path / "foreground.log").read_text()
        assert not LOG_PROBLEM.search(output), output
        assert not os.path.ismount(mnt)
        for name, body in bodies.items():
            assert cat(s3vol, name) == body, name
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
            subprocess.run(["fusermount3", "-uz", mnt], capture_output=True, check=False)
        listener.close()
        log.close()


# ---------------------------------------------------------------- mount(8) and fstab

HELPERS = {"/sbin/mount.cryptfs": "main", "/sbin/umount.fuse.cryptfs": "umount_main"}


@pytest.fixture
def mount_helpers(tmp_path):
    """/sbin/mount.cryptfs and /sbin/umount.fuse.cryptfs running this tree's code, for the
    length of the test (then removed, or setup's links put back): mount(8) and umount(8)
    look for helpers there only. Helpers that are files, not links, are used as they are."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    made, before = {}, {}
    for path, func in HELPERS.items():
        if os.path.exists(path) and not os.path.islink(path):
            continue
        if os.path.islink(path):
            before[path] = os.readlink(path)  # setup's link to the installed helper: put back after
        script = tmp_path / os.path.basename(path)
        script.write_text(f"#!/bin/sh\nPYTHONPATH={repo} exec {shutil.which('python3') or 'python3'} -c "
                          f"'import sys; from cryptfs.mounthelper import {func}; sys.exit({func}())' \"$@\"\n")
        script.chmod(0o755)
        link = tmp_path / (script.name + ".link")
        os.symlink(script, link)
        os.replace(link, path)  # atomic, over a link another run left
        made[path] = str(script)
    try:
        yield
    finally:
        for path, script in made.items():
            if os.path.islink(path) and os.readlink(path) == script:
                if path in before:
                    os.symlink(before[path], path + ".back")
                    os.replace(path + ".back", path)
                else:
                    os.unlink(path)


def test_mount_t_cryptfs_with_fstab_options_and_umount_8(s3vol, tmp_path, mount_helpers):
    mnt, cache = tmp_path / "secure", tmp_path / "cache"
    mnt.mkdir()
    secret = tmp_path / "vault.pass"
    secret.write_text(s3vol.passphrase + "\n")
    secret.chmod(0o644)
    options = (f"_netdev,noauto,nofail,x-systemd.automount,x-systemd.idle-timeout=60,passphrase_file={secret},"
               f"endpoint_url={s3vol.endpoint},cache_dir={cache},writeback_delay=30,cache_size_mb=64")
    # what mount(8) gives a helper: no PATH, HOME=/root; AWS credentials as the service has them
    env = {"HOME": "/root", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
    refused = subprocess.run(["/usr/bin/mount", "-t", "cryptfs", s3vol.url, mnt, "-o", options],
                             env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "chmod 600" in refused.stderr and "mode 0644" in refused.stderr, refused
    assert not os.path.ismount(mnt)
    secret.chmod(0o600)
    done = subprocess.run(["/usr/bin/mount", "-t", "cryptfs", s3vol.url, mnt, "-o", options],
                          env=env, capture_output=True, text=True, timeout=120)
    m = MountedVolume(s3vol, mnt, cache)
    try:
        assert done.returncode == 0 and done.stderr == "", done
        found = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", mnt], capture_output=True, text=True)
        assert found.stdout.split() == [s3vol.url, "fuse.cryptfs"], found
        st = json.loads(run_cli("status", mnt, "--json", env=STRANGER).stdout)
        assert st["cache"]["disk_limit"] == 64 << 20  # a volume setting given as a mount option
        body = data(400_000, "fstab")
        write(mnt / "from-fstab", body)
        pid = st["pid"]
        result = subprocess.run(["/usr/bin/umount", mnt], env={"HOME": "/root"}, capture_output=True, text=True,
                                timeout=120)  # umount(8) runs umount.fuse.cryptfs, which waits
        assert result.returncode == 0, (result, m.log())
        assert not os.path.ismount(mnt) and not alive(pid)
        assert cat(s3vol, "from-fstab") == body
        # what mount.fuse3 runs for `mount -t fuse.cryptfs`: `cryptfs SOURCE MOUNTPOINT -o OPTIONS`
        again = run_cli(s3vol.url, mnt, "-o", options.replace("cache_size_mb=64", "ro"), env=env)
        assert again.returncode == 0 and again.stderr == "", again
        assert open(mnt / "from-fstab", "rb").read() == body
        assert run_cli("umount", mnt).returncode == 0
        assert_clean_log(m)
    finally:
        m.force_unmount()


def test_passphrase_from_systemd_credentials(s3vol, tmp_path):
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "cryptfs-passphrase").write_text(s3vol.passphrase)
    (creds / "cryptfs-passphrase").chmod(0o400)
    result = s3vol.cli("ls", s3vol.url, env={"CRYPTFS_PASSPHRASE": None, "CREDENTIALS_DIRECTORY": str(creds)})
    assert result.returncode == 0, result


# ---------------------------------------------------------------- errors and logs

LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} cryptfs\[(\d+)\]: (DEBUG|INFO|WARNING|ERROR|CRITICAL): ")


def test_failed_mount_says_why_on_the_terminal_and_logs_with_time_and_pid(s3vol, tmp_path):
    m = own(s3vol, tmp_path)
    result = run_cli(*m.mount_command("-o", "no_such_option"))
    line = assert_cli_error(result, 2, "FUSE could not mount", "unknown option", "no_such_option", "log: ")
    assert m.log_path() in line
    foreground = run_cli(*m.mount_command("-f", "-o", "no_such_option"))
    assert_cli_error(foreground, 2, "FUSE could not mount", "unknown option")
    m.mount()
    try:
        pid = m.daemon_pid()
        m.umount()
        lines = open(m.log_path()).read().splitlines()
        assert lines and all(LOG_LINE.match(x) for x in lines), lines
        assert any(f"[{pid}]: INFO: mounted {s3vol.url} on {m.mountpoint}" in x for x in lines), lines
        assert not any("max threads" in x for x in lines), lines  # libfuse's noise, below INFO
        assert len({LOG_LINE.match(x).group(1) for x in lines}) == 2  # each line says which mount
    finally:
        m.force_unmount()


def test_log_file_rotates_and_stays_private(tmp_path):
    import logging

    from cryptfs import logs
    handler = logs.PrivateRotatingFile(str(tmp_path / "mount.log"), maxBytes=2000, backupCount=2)
    handler.setFormatter(logging.Formatter(logs.FILE_FORMAT))
    logger = logging.getLogger("test-rotation")
    logger.addHandler(handler)
    try:
        for i in range(100):
            logger.warning("line %d %s", i, "x" * 50)
    finally:
        logger.removeHandler(handler)
        handler.close()
    names = sorted(os.listdir(tmp_path))
    assert names == ["mount.log", "mount.log.1", "mount.log.2"], names
    for name in names:
        assert os.path.getsize(tmp_path / name) <= 2000
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600
    assert "line 99" in (tmp_path / "mount.log").read_text()


# ---------------------------------------------------------------- progress

def test_progress_bar_on_a_terminal_only(volume_factory, tmp_path):
    import pty

    ref = volume_factory("local")
    src = tmp_path / "upload.bin"
    src.write_bytes(data(3_000_000, "progress"))

    def put(name, *extra, terminal):
        main, side = pty.openpty()
        proc = subprocess.Popen(cli_command("put", src, ref.path(name), *ref.args, *extra), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=side if terminal else subprocess.PIPE,
                                env=cli_environ({"COLUMNS": "120"}))
        os.close(side)
        seen = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the other side closed
                break
            if not chunk:
                break
            seen += chunk
        out, err = proc.communicate(timeout=120)
        os.close(main)
        assert proc.returncode == 0, (out, err, seen)
        return (seen if terminal else err).decode(errors="replace")

    drawn = put("a", terminal=True)
    assert "upload.bin" in drawn and "2.9/2.9 MiB" in drawn and "1 file(s) stored" in drawn, drawn
    assert put("b", terminal=False) == "1 file(s) stored\n"
    assert put("c", "-q", terminal=True) == ""


# ---------------------------------------------------------------- local disk bounds

def test_min_free_turns_writes_away_before_the_disk_is_full(volume_factory, tmp_path):
    import errno

    ref = volume_factory("local")
    m = own(ref, tmp_path, "--min-free", "1000TiB", "--cache-size", "1MiB")
    m.mount()
    try:
        with pytest.raises(OSError) as info:
            with open(m.path("big"), "wb") as f:
                f.write(data(6_000_000, "floor"))
        assert info.value.errno == errno.ENOSPC
        st = json.loads(run_cli("status", m.mountpoint, "--json").stdout)
        assert st["cache"]["min_free"] == 1000 << 40 and st["cache"]["disk_limit"] == 1 << 20
        assert st["cache"]["disk_free"] > 0
        os.mkdir(m.path("still-usable"))
        m.umount()
        assert "min_free" in open(m.log_path()).read()
        assert_clean_log(m)
    finally:
        m.force_unmount()


def test_config_sizes_take_units_and_errors_name_file_key_and_what_is_allowed(tmp_path):
    from cryptfs import config
    from cryptfs.errors import UsageError

    good = tmp_path / "good.yaml"
    good.write_text("volumes:\n  v:\n    url: s3://b/v\n    cache_size: 2GiB\n    min_free: 500 MB\n")
    v = config.load(str(good))["v"]
    assert (v.cache_size, v.min_free, config.cache_bytes(v)) == (2 << 30, 500_000_000, 2 << 30)
    for key, value, allowed in [("cache_size", "lots", "with a unit (KiB, MiB, GiB"),
                                ("cache_size_mb", "lots", "a whole number from 0"),
                                ("workers", 0, "a whole number from 1 to 256"),
                                ("fsync", "sometimes", "upload or journal"),
                                ("path_style", "maybe", "true or false")]:
        bad = tmp_path / f"{key}.yaml"
        bad.write_text(f"volumes:\n  v:\n    url: s3://b/v\n    {key}: {value}\n")
        with pytest.raises(UsageError) as info:
            config.load(str(bad))
        message = str(info.value)
        assert str(bad) in message and f"'v': {key}" in message and allowed in message, message


def test_control_sockets_of_dead_mounts_are_swept(tmp_path):
    """A mount killed with kill -9 leaves its socket behind; the next mount removes it (nobody
    accepts on it), and leaves the sockets of live mounts alone."""
    from cryptfs import control

    os.makedirs(control.run_dir(), exist_ok=True)
    dead = os.path.join(control.run_dir(), f"test-dead-{os.getpid()}.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(dead)
    s.close()  # the file stays; connecting to it is refused
    live = control.Server(str(tmp_path / "live"), lambda: {})
    try:
        assert os.path.exists(live.path)
        other = control.Server(str(tmp_path / "other"), lambda: {})
        try:
            assert not os.path.exists(dead)
            assert os.path.exists(live.path)
        finally:
            other.close()
    finally:
        live.close()
        if os.path.exists(dead):
            os.unlink(dead)
