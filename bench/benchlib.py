"""Shared pieces of the cryptfs benchmarks (bench_cli.py, bench_mount.py).

- `Moto`: a moto S3 server on 127.0.0.1 and a free port, its werkzeug request log in a
  file, stopped by its PID. `RequestLog` counts that log's lines by method between phases.
- `run_measured`: runs a command and returns wall time, exit code, peak RSS and the bytes
  it wrote to local disk (from `/usr/bin/time -v`, or wait4's rusage when that is missing),
  optionally sampling the process's open files while it runs.
- `Workdir`: a temporary directory with the environment every command gets (dummy AWS
  credentials, the passphrase, a private CRYPTFS_STATE_DIR, no user config file).
- Markdown helpers.

Nothing here asserts anything about timing: these are benchmarks, not tests.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
KiB, MiB, GiB = 1024, 1024 ** 2, 1024 ** 3
MB = 1000 ** 2
PASSPHRASE = "benchmark passphrase, not for real data"
BUCKET = "cryptfs-bench"
TIME = "/usr/bin/time"

# Environment variables that would point boto3 somewhere else or change its behaviour.
AWS_INTERFERENCE = ["AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CA_BUNDLE", "AWS_SESSION_TOKEN",
                    "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN",
                    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
                    "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "CRYPTFS_NEW_PASSPHRASE"]


# ---------------------------------------------------------------- sizes and formatting

def parse_size(text: str) -> int:
    """'1G', '512M', '2GiB', '64k' or a plain byte count (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    scale = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def human_size(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def mbps(size: int, seconds: float) -> float:
    return size / MB / seconds if seconds > 0 else float("inf")


def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.2f}".rstrip("0").rstrip(".") if abs(v) < 100 else f"{v:.0f}"
        return str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def git_commit_of(rev: str) -> str:
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", rev], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "cryptfs"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out + (" (cryptfs/ modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(load_at_start: tuple | None = None, source: str | None = None) -> list[tuple[str, str]]:
    """Lines for a results header; `load_at_start` is os.getloadavg() taken when the run began."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    mem = "unknown"
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 1024 / 1024:.1f} GiB"
    versions = []
    for mod in ("cryptfs", "boto3", "moto", "cryptography"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001 - informational only
            versions.append(f"{mod} ?")
    return [("date", datetime.datetime.now().strftime("%Y-%m-%d %H:%M")),
            ("cryptfs source", source or git_commit()),
            ("machine", f"{os.cpu_count()} CPUs ({cpu}), {mem} RAM, {platform.system()} {platform.release()}"),
            ("python", platform.python_version()),
            ("versions", ", ".join(versions)),
            ("load average (1, 5, 15 min) at start", " ".join(f"{x:.2f}" for x in load_at_start or os.getloadavg())),
            ("load average at end", " ".join(f"{x:.2f}" for x in os.getloadavg()))]


# ---------------------------------------------------------------- the S3 server and its log

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOG_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" (\d{3})')
METHODS = ["GET", "LIST", "PUT", "POST", "HEAD", "DELETE"]


@dataclass
class Counts:
    """S3 requests seen by the server in one phase. GET excludes listings, counted as LIST
    (GET on the bucket with list-type=2 or ?uploads). `errors`: responses >= 400."""
    by_method: dict = field(default_factory=dict)
    errors: int = 0

    def __getitem__(self, method: str) -> int:
        return self.by_method.get(method, 0)

    @property
    def total(self) -> int:
        return sum(self.by_method.values())

    def __add__(self, other: "Counts") -> "Counts":
        merged = dict(self.by_method)
        for k, v in other.by_method.items():
            merged[k] = merged.get(k, 0) + v
        return Counts(merged, self.errors + other.errors)

    def cells(self) -> list:
        return [self[m] for m in METHODS] + [self.total]

    def short(self) -> str:
        parts = [f"{m} {self[m]}" for m in METHODS if self[m]]
        return ", ".join(parts) or "none"


COUNT_HEADERS = ["GET", "LIST", "PUT", "POST", "HEAD", "DELETE", "all"]


class RequestLog:
    """Counts the server's request-log lines by method since the last mark."""

    def __init__(self, path: str):
        self.path = path
        self.offset = 0

    def _size(self) -> int:
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0

    def settle(self, quiet: float = 0.4, timeout: float = 15.0) -> None:
        """Wait until the log stops growing (requests are logged when they complete)."""
        deadline = time.monotonic() + timeout
        last, since = self._size(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self._size()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return

    def mark(self) -> None:
        self.settle()
        self.offset = self._size()

    def take(self) -> Counts:
        """Requests since the last mark (or take); moves the mark to the end."""
        self.settle()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        # only complete lines
        cut = data.rfind(b"\n") + 1
        self.offset += cut
        counts = Counts()
        for line in data[:cut].decode("utf-8", "replace").splitlines():
            m = LOG_LINE.search(line)
            if not m:
                continue
            method, target, status = m.group(1), m.group(2), int(m.group(3))
            if method == "GET" and ("list-type=" in target or re.search(r"[?&]uploads(&|=|$)", target)):
                method = "LIST"
            counts.by_method[method] = counts.by_method.get(method, 0) + 1
            if status >= 400:
                counts.errors += 1
        return counts


class Moto:
    """`moto_server -H 127.0.0.1 -p PORT`, request log to `<dir>/moto.log`; stop() by PID."""

    def __init__(self, directory: str, env: dict):
        self.directory = directory
        self.log_path = os.path.join(directory, "moto.log")
        self.tmp = os.path.join(directory, "moto-tmp")  # where moto spools object bodies
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""

    def start(self) -> str:
        os.makedirs(self.tmp, exist_ok=True)
        env = dict(self.env, TMPDIR=self.tmp)
        for _ in range(5):
            port = free_port()
            log = open(self.log_path, "ab")
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
            log.close()
            self.endpoint = f"http://127.0.0.1:{port}"
            if self._wait_ready():
                return self.endpoint
            self.stop()
        raise RuntimeError(f"moto server did not start; see {self.log_path}")

    def _wait_ready(self) -> bool:
        for _ in range(300):
            if self.proc.poll() is not None:
                return False
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
                return True
            except urllib.error.HTTPError:
                return True
            except OSError:
                time.sleep(0.1)
        return False

    def rss_kib(self) -> int | None:
        return proc_status(self.proc.pid, "VmHWM") if self.proc else None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self.proc = None


# ---------------------------------------------------------------- processes

def proc_status(pid: int, field_name: str) -> int | None:
    """A kB field of /proc/<pid>/status (VmHWM, VmRSS), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def written_files(pid: int) -> set[str]:
    """Regular files (paths) the process has open for writing right now."""
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if not target.startswith("/") or target.startswith(("/dev/", "/proc/")):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                flags = _fdinfo_flags(f.read())
            if flags & 0o3:  # O_WRONLY or O_RDWR
                out.add(target)
        except (OSError, ValueError):
            continue
    return out


def _fdinfo_flags(text: str) -> int:
    for line in text.splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    return 0


@dataclass
class Measured:
    cmd: list
    rc: int
    wall: float
    max_rss_kib: int | None
    disk_write_bytes: int | None   # block-layer writes the process caused (rusage oublock * 512)
    stdout: str
    stderr: str
    opened_for_writing: set = field(default_factory=set)
    hwm_samples_kib: int | None = None
    timed_out: bool = False
    rss_series: list = field(default_factory=list)   # (seconds since start, VmRSS KiB), with watch

    def peak_after_startup(self, drop_kib: int = 64 * 1024) -> int | None:
        """Highest VmRSS sampled after start-up: after the first sample at least `drop_kib` below
        the highest value seen so far (the scrypt unlock allocates 128 MiB and frees it once the
        key is unlocked). None when no such drop was seen."""
        top = 0
        for i, (_, kib) in enumerate(self.rss_series):
            if top and kib <= top - drop_kib:
                return max(k for _, k in self.rss_series[i:])
            top = max(top, kib)
        return None

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out


def _parse_time_v(path: str) -> tuple[int | None, int | None]:
    rss = out = None
    with contextlib.suppress(OSError):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("Maximum resident set size (kbytes):"):
                    rss = int(line.rsplit(":", 1)[1])
                elif line.startswith("File system outputs:"):
                    out = int(line.rsplit(":", 1)[1]) * 512
    return rss, out


def run_measured(cmd: list, env: dict, workdir: str, cwd: str | None = None, watch: bool = False,
                 timeout: float = 3600) -> Measured:
    """Run `cmd` (stdin /dev/null, output captured to files) and measure it.

    Runs in `cwd`, by default `workdir`. Peak RSS and disk writes come from `/usr/bin/time -v` when it exists, else from wait4's
    rusage. With `watch`, a thread samples the process every 50 ms for regular files it has
    open for writing and for VmHWM.
    """
    fd, base = tempfile.mkstemp(prefix="run-", dir=workdir)
    os.close(fd)
    out_path, err_path, tv_path = base + ".out", base + ".err", base + ".time"
    own = {base, out_path, err_path, tv_path}  # the capture files it inherits as stdout/stderr
    use_time = os.access(TIME, os.X_OK)
    full = [TIME, "-v", "-o", tv_path, *cmd] if use_time else list(cmd)
    seen: set[str] = set()
    hwm = [0]
    rss_series: list[tuple[float, int]] = []
    stop = threading.Event()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.monotonic()
        # cwd: never the repository, whose cryptfs/ would shadow the copy on PYTHONPATH for `-m`
        proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd or workdir)

        def sampler():
            while not stop.is_set():
                pids = children_of(proc.pid) if use_time else [proc.pid]
                for pid in pids:
                    seen.update(written_files(pid) - own)
                    v = proc_status(pid, "VmHWM")
                    if v:
                        hwm[0] = max(hwm[0], v)
                    r = proc_status(pid, "VmRSS")
                    if r:
                        rss_series.append((time.monotonic() - t0, r))
                stop.wait(0.05)
        thread = threading.Thread(target=sampler, daemon=True) if watch else None
        if thread:
            thread.start()
        timed_out = False
        rusage = None
        try:
            if use_time:
                proc.wait(timeout)
            else:
                _, status, rusage = _wait4(proc, timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_tree(proc, use_time)
        except BaseException:  # interrupted: do not leave the process behind
            _kill_tree(proc, use_time)
            stop.set()
            raise
        wall = time.monotonic() - t0
        stop.set()
        if thread:
            thread.join()
    if use_time:
        rss, written = _parse_time_v(tv_path)
        rc = proc.returncode
    else:
        rss = rusage.ru_maxrss if rusage else None
        written = rusage.ru_oublock * 512 if rusage else None
        rc = proc.returncode if proc.returncode is not None else -1
    with open(out_path, "rb") as f:
        stdout = f.read().decode("utf-8", "replace")
    with open(err_path, "rb") as f:
        stderr = f.read().decode("utf-8", "replace")
    for p in (base, out_path, err_path, tv_path):
        with contextlib.suppress(OSError):
            os.unlink(p)
    return Measured(list(cmd), rc, wall, rss, written, stdout, stderr, seen, hwm[0] or None, timed_out,
                    rss_series)


def _kill_tree(proc: subprocess.Popen, use_time: bool) -> None:
    """Kill the process this module started (and, under /usr/bin/time, the command it runs)."""
    for pid in (children_of(proc.pid) if use_time else []):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        proc.kill()
    with contextlib.suppress(Exception):
        proc.wait(30)


def _wait4(proc: subprocess.Popen, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return pid, status, rusage
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        time.sleep(0.02)


def run(cmd: list, env: dict, cwd: str | None = None, timeout: float = 3600,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run a command, capturing output; with `check`, a failure raises StepFailed."""
    try:
        result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, env=env, cwd=cwd,
                                timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise StepFailed(f"{' '.join(map(str, cmd))}: no result after {timeout:.0f} s (hang?)") from exc
    if check and result.returncode != 0:
        raise StepFailed(f"{' '.join(map(str, cmd))}: exit {result.returncode}\n"
                         f"{result.stderr.decode('utf-8', 'replace')[-3000:]}")
    return result


class StepFailed(Exception):
    """A step of a benchmark failed (a crash, a non-zero exit, a hang)."""


# ---------------------------------------------------------------- the working directory

class Workdir:
    """A temporary directory and the environment for every command run against the server."""

    def __init__(self, prefix: str, keep: bool = False, base: str | None = None):
        self.path = tempfile.mkdtemp(prefix=prefix, dir=base)
        self.keep = keep
        self.state = os.path.join(self.path, "state")
        self.tmp = os.path.join(self.path, "tmp")  # TMPDIR of the cryptfs processes
        os.makedirs(self.state)
        os.makedirs(self.tmp)
        env = dict(os.environ)
        for name in AWS_INTERFERENCE:
            env.pop(name, None)
        env.update({
            "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.path.join(self.path, "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": os.path.join(self.path, "no-aws-credentials"),
            "CRYPTFS_PASSPHRASE": PASSPHRASE,
            "CRYPTFS_STATE_DIR": self.state,
            "CRYPTFS_CONFIG": os.path.join(self.path, "no-config.yaml"),
            "TMPDIR": self.tmp,
            "PYTHONDONTWRITEBYTECODE": "1",
        })
        self.env = env

    def snapshot_source(self, rev: str | None) -> str:
        """Copy the cryptfs package to the working directory and run that copy (PYTHONPATH),
        so edits made to the tree while the benchmark runs do not mix versions. `rev`: a git
        revision (git archive); None: the working tree as it is now. Returns a description."""
        src = os.path.join(self.path, "src")
        os.makedirs(src)
        commit = git_commit_of(rev or "HEAD")
        if rev:
            archive = subprocess.run(["git", "-C", REPO, "archive", rev, "cryptfs"], capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", src], input=archive.stdout, check=True)
            what = f"git {rev} ({commit})"
        else:
            shutil.copytree(os.path.join(REPO, "cryptfs"), os.path.join(src, "cryptfs"),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            diff = subprocess.run(["git", "-C", REPO, "diff", "HEAD", "--", "cryptfs"], capture_output=True).stdout
            what = f"working tree at {commit}" + (
                f" with uncommitted changes to cryptfs/ (diff sha256 {hashlib.sha256(diff).hexdigest()[:12]})"
                if diff else ", no uncommitted changes to cryptfs/")
        self.env["PYTHONPATH"] = src + (os.pathsep + self.env["PYTHONPATH"] if self.env.get("PYTHONPATH") else "")
        # Commands must run outside the repository (python -m puts the current directory first
        # on sys.path): check that they get the copy.
        where = subprocess.run([sys.executable, "-c", "import cryptfs; print(cryptfs.__file__)"], env=self.env,
                               cwd=self.path, capture_output=True, text=True).stdout.strip()
        if not where.startswith(src + os.sep):
            raise RuntimeError(f"cryptfs is imported from {where!r}, not from the copy in {src}")
        sys.path.insert(0, src)
        for name in [m for m in sys.modules if m == "cryptfs" or m.startswith("cryptfs.")]:
            del sys.modules[name]
        return what

    def apply_to_this_process(self) -> None:
        """The same AWS settings for in-process boto3 (the baselines) and cryptfs.keys."""
        for name in AWS_INTERFERENCE:
            os.environ.pop(name, None)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                     "AWS_EC2_METADATA_DISABLED", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            os.environ[name] = self.env[name]

    def remove(self) -> None:
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)


def cryptfs_cmd(*args) -> list:
    return [sys.executable, "-m", "cryptfs", *map(str, args)]


def write_random_file(path: str, size: int, chunk: int = 8 * MiB) -> None:
    """`size` random bytes (os.urandom), written in chunks; fsynced so it is on disk."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def files_equal(a: str, b: str) -> bool:
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


def s3_client(endpoint: str):
    import boto3
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def install_signal_exit() -> None:
    """SIGTERM/SIGHUP raise SystemExit so cleanup in `finally` blocks runs."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def write_results(name: str, text: str) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
