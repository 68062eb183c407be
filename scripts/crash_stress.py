"""Kill the mount at random points of ordinary workloads and check that nothing closed is lost.

For each workload, `--kills` times: mount, run the workload until a random moment, kill -9
the mount process, remount (which recovers the journal), check every file the workload
had closed (and every name it had finished changing) through the mount, unmount (which
must exit 0), and run `cryptfs fsck` (which must exit 0). Each workload keeps its own
record of what it finished, written only after the call that finished it returned.

    python3 scripts/crash_stress.py --backend local --kills 20
    python3 scripts/crash_stress.py --backend s3 --kills 5 --workloads editor,mkdir

Starts its own moto S3 server on 127.0.0.1 for --backend s3, and stops it. Prints a table
(workload, kills, files checked, files lost, fsck exit codes) and exits 1 on any loss.
"""

import argparse
import hashlib
import os
import random
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

PASSPHRASE = "crash stress passphrase"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write(path: str, data: bytes, fsync: bool = False) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


class Stop(Exception):
    pass


# ---------------------------------------------------------------- workloads
#
# Each has run(mnt, stop) (returns when stop is set or the mount is gone) and
# check(mnt) -> (files checked, problems). `done` holds only what finished.

class Rsync:
    """`rsync -a` of 1,500 small files, killed part-way. rsync reports a file before its
    receiver has renamed it into place, so what rsync printed proves nothing closed: every
    file present must be byte-exact (rsync's own temporary files aside), and once a pass
    completes, every file."""
    name = "rsync"

    def __init__(self, work):
        self.src = os.path.join(work, "rsync-src")
        rng = random.Random(1)
        self.names = []
        for i in range(1500):
            d = f"d{i % 30:02d}"
            os.makedirs(os.path.join(self.src, d), exist_ok=True)
            self.names.append(f"{d}/f{i:04d}")
            write(os.path.join(self.src, self.names[-1]), rng.randbytes(rng.randint(0, 6000)))
        self.complete = False

    def run(self, mnt, stop):
        proc = subprocess.Popen(["rsync", "-a", self.src + "/", os.path.join(mnt, "rsync")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not stop.is_set():
            time.sleep(0.05)
        if proc.poll() == 0:
            self.complete = True
        proc.kill()
        proc.wait()

    def check(self, mnt):
        problems, checked = [], 0
        for name in self.names:
            path = os.path.join(mnt, "rsync", name)
            if not os.path.exists(path):
                if self.complete:
                    problems.append(f"{name}: missing after a complete pass")
                continue
            checked += 1
            try:
                if read(path) != read(os.path.join(self.src, name)):
                    problems.append(f"{name}: wrong bytes")
            except OSError as exc:
                problems.append(f"{name}: {exc}")
        return checked, problems


class SmallFiles:
    """1,500 small files copied one by one; each counts once its close() returned."""
    name = "small-files"

    def __init__(self, work):
        rng = random.Random(3)
        self.files = {f"d{i % 30:02d}/f{i:04d}": rng.randbytes(rng.randint(0, 6000)) for i in range(1500)}
        self.done: set[str] = set()
        self.round = 0

    def run(self, mnt, stop):
        self.round += 1
        try:
            for name, body in self.files.items():
                if stop.is_set():
                    return
                path = os.path.join(mnt, "small", f"r{self.round}", name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write(path, body)
                self.done.add(f"r{self.round}/{name}")
        except OSError:
            return

    def check(self, mnt):
        problems = []
        for rel in sorted(self.done):
            try:
                if read(os.path.join(mnt, "small", rel)) != self.files[rel.split("/", 1)[1]]:
                    problems.append(f"{rel}: wrong bytes")
            except OSError as exc:
                problems.append(f"{rel}: {exc}")
        return len(self.done), problems


class BigCopy:
    name = "cp-150MiB"

    def __init__(self, work, size=150 * 1024 * 1024):
        self.src = os.path.join(work, "big-src")
        with open(self.src, "wb") as f:
            rng = random.Random(2)
            for _ in range(size // (1 << 20)):
                f.write(rng.randbytes(1 << 20))
        self.want = digest(read(self.src))
        self.done: list[str] = []
        self.n = 0

    def run(self, mnt, stop):
        while not stop.is_set():
            self.n += 1
            name = f"big-{self.n}"
            if subprocess.run(["cp", self.src, os.path.join(mnt, name)], stderr=subprocess.DEVNULL).returncode:
                return
            self.done.append(name)

    def check(self, mnt):
        problems = []
        for name in self.done:
            try:
                with open(os.path.join(mnt, name), "rb") as f:
                    h = hashlib.sha256()
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                if h.hexdigest() != self.want:
                    problems.append(f"{name}: wrong bytes")
            except OSError as exc:
                problems.append(f"{name}: {exc}")
        for name in self.done[:-1]:  # keep the bucket small: only the newest copy stays
            try:
                os.unlink(os.path.join(mnt, name))
            except OSError as exc:
                problems.append(f"{name}: unlink {exc}")
        self.done = self.done[-1:]
        return len(self.done), problems


class Multipart(BigCopy):
    name = "multipart-40MiB"

    def __init__(self, work):
        super().__init__(work, 40 * 1024 * 1024)


class Renames:
    """Directories with files, renamed around; a rename in flight may land either way."""
    name = "dir-renames"

    def __init__(self, work):
        self.files = {f"f{i}": random.Random(i).randbytes(3000 + i) for i in range(5)}
        self.where: dict[str, str] = {}      # directory -> its current name
        self.moving: dict[str, str] = {}     # directory -> name it was being renamed to
        self.n = 0

    def run(self, mnt, stop):
        base = os.path.join(mnt, "ren")
        try:
            os.makedirs(base, exist_ok=True)
            for d in ("a", "b", "c"):
                if d not in self.where:
                    os.mkdir(os.path.join(base, d + "0"))
                    for f, body in self.files.items():
                        write(os.path.join(base, d + "0", f), body)
                    self.where[d] = d + "0"
            while not stop.is_set():
                d = random.choice(sorted(self.where))
                self.n += 1
                new = f"{d}{self.n}"
                self.moving = {d: new}
                os.rename(os.path.join(base, self.where[d]), os.path.join(base, new))
                self.where[d], self.moving = new, {}
        except OSError:
            return

    def check(self, mnt):
        problems, checked = [], 0
        base = os.path.join(mnt, "ren")
        for d, name in list(self.where.items()):
            names = [name] + ([self.moving[d]] if d in self.moving else [])
            found = [n for n in names if os.path.isdir(os.path.join(base, n))]
            if len(found) != 1:
                problems.append(f"directory {d}: found as {found} of {names}")
                continue
            self.where[d] = found[0]
            for f, body in self.files.items():
                checked += 1
                try:
                    if read(os.path.join(base, found[0], f)) != body:
                        problems.append(f"{found[0]}/{f}: wrong bytes")
                except OSError as exc:
                    problems.append(f"{found[0]}/{f}: {exc}")
        self.moving = {}
        return checked, problems


class EditorSaves:
    """Save as editors do: write a temporary file, fsync, rename it over the document."""
    name = "editor-saves"

    def __init__(self, work):
        self.saved: str | None = None
        self.saving: str | None = None
        self.n = 0

    def run(self, mnt, stop):
        doc, tmp = os.path.join(mnt, "notes.txt"), os.path.join(mnt, ".notes.txt.swp")
        try:
            while not stop.is_set():
                self.n += 1
                body = (f"version {self.n}\n" * random.randint(1, 3000)).encode()
                self.saving = digest(body)
                write(tmp, body, fsync=True)
                os.rename(tmp, doc)
                self.saved, self.saving = self.saving, None
        except OSError:
            return

    def check(self, mnt):
        if self.saved is None:
            return 0, []
        try:
            got = digest(read(os.path.join(mnt, "notes.txt")))
        except OSError as exc:
            return 1, [f"notes.txt: {exc}"]
        ok = got in (self.saved, self.saving)
        if ok:
            self.saved = got
        self.saving = None
        return 1, [] if ok else ["notes.txt: neither the last saved nor the saving version"]


class MkdirStorm:
    name = "mkdir-rmdir"

    def __init__(self, work):
        self.live: set[str] = set()
        self.pending: str | None = None
        self.n = 0

    def run(self, mnt, stop):
        base = os.path.join(mnt, "storm")
        try:
            os.makedirs(base, exist_ok=True)
            while not stop.is_set():
                self.n += 1
                if self.live and random.random() < 0.45:
                    d = random.choice(sorted(self.live))
                    self.pending = d
                    os.rmdir(os.path.join(base, d))
                    self.live.discard(d)
                else:
                    d = f"d{self.n}"
                    self.pending = d
                    os.mkdir(os.path.join(base, d))
                    self.live.add(d)
                self.pending = None
        except OSError:
            return

    def check(self, mnt):
        base = os.path.join(mnt, "storm")
        found = set(os.listdir(base)) if os.path.isdir(base) else set()
        extra, missing = found - self.live, self.live - found
        problems = [f"{d}: unexpected" for d in extra if d != self.pending] + \
                   [f"{d}: missing" for d in missing if d != self.pending]
        self.live, self.pending = found, None
        return len(found), problems


WORKLOADS = {w.name: w for w in (Rsync, SmallFiles, BigCopy, Renames, EditorSaves, MkdirStorm, Multipart)}
SHORT = {"rsync": "rsync", "small": "small-files", "cp": "cp-150MiB", "renames": "dir-renames",
         "editor": "editor-saves", "mkdir": "mkdir-rmdir", "multipart": "multipart-40MiB"}


# ---------------------------------------------------------------- the volume and its mount

class Volume:
    def __init__(self, work, backend):
        self.work = work
        self.env = dict(os.environ, CRYPTFS_PASSPHRASE=PASSPHRASE, CRYPTFS_STATE_DIR=os.path.join(work, "state"),
                        CRYPTFS_CONFIG=os.path.join(work, "none.yaml"))
        self.server = None
        self.args: list[str] = []
        if backend == "s3":
            port = free_port()
            endpoint = f"http://127.0.0.1:{port}"
            self.env.update(AWS_ACCESS_KEY_ID="stress", AWS_SECRET_ACCESS_KEY="stress", AWS_DEFAULT_REGION="us-east-1",
                            AWS_EC2_METADATA_DISABLED="true")
            for name in ("AWS_PROFILE", "AWS_CA_BUNDLE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
                self.env.pop(name, None)
            self.server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env)
            wait_http(endpoint)
            import boto3
            boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="stress", aws_secret_access_key="stress",
                         region_name="us-east-1").create_bucket(Bucket="stress")
            self.url, self.args = "s3://stress/vol", ["--endpoint-url", endpoint]
        else:
            os.makedirs(os.path.join(work, "storage"))
            self.url = "file://" + os.path.join(work, "storage", "vol")
        self.mnt = os.path.join(work, "mnt")
        self.cache = os.path.join(work, "cache")
        os.makedirs(self.mnt)
        self.cli("init", self.url, "--rsa-bits", "2048")

    def cli(self, *args, check=True) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "cryptfs", *args, *self.args], env=self.env,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if check and proc.returncode:
            raise SystemExit(f"cryptfs {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def mount(self):
        self.cli("mount", self.url, self.mnt, "--cache-dir", self.cache, "--writeback-delay", "0.3")

    def pid(self) -> int:
        want = self.mnt.encode()
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    args = read(f"/proc/{name}/cmdline").split(b"\0")
                except OSError:
                    continue
                if b"cryptfs" in args and b"mount" in args and want in args:
                    return int(name)
        raise SystemExit("mount process not found")

    def kill(self):
        pid = self.pid()
        os.kill(pid, signal.SIGKILL)
        for _ in range(200):
            if not os.path.exists(f"/proc/{pid}") or read(f"/proc/{pid}/stat").split(b") ")[1][:1] == b"Z":
                break
            time.sleep(0.05)
        subprocess.run(["fusermount3", "-uz", self.mnt], check=False, capture_output=True)

    def umount(self) -> int:
        return self.cli("umount", self.mnt, "--timeout", "300", check=False).returncode

    def fsck(self) -> tuple[int, list[str]]:
        proc = self.cli("fsck", self.url, check=False)
        return proc.returncode, [line for line in proc.stdout.splitlines() if "checked;" not in line]

    def close(self):
        if os.path.ismount(self.mnt):
            self.cli("umount", self.mnt, "--timeout", "120", check=False)
        if self.server is not None:
            self.server.terminate()
            self.server.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str) -> None:
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/", timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the S3 server did not start")


def stress(vol: Volume, workload, kills: int, max_delay: float) -> dict:
    row = {"workload": workload.name, "kills": 0, "checked": 0, "lost": 0, "umount": set(), "fsck": set(),
           "problems": []}
    for _ in range(kills):
        vol.mount()
        stop = threading.Event()
        runner = threading.Thread(target=workload.run, args=(vol.mnt, stop), daemon=True)
        runner.start()
        time.sleep(random.uniform(0.2, max_delay))
        vol.kill()
        stop.set()
        runner.join(60)
        row["kills"] += 1
        vol.mount()
        checked, problems = workload.check(vol.mnt)
        row["checked"] += checked
        row["lost"] += len(problems)
        row["problems"] += problems
        row["umount"].add(vol.umount())
        code, found = vol.fsck()
        row["fsck"].add(code)
        row["problems"] += [f"fsck: {line}" for line in found]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["local", "s3"], default="local")
    parser.add_argument("--kills", type=int, default=20, help="kills per workload (default 20)")
    parser.add_argument("--workloads", default=",".join(SHORT), help=f"comma-separated, of {', '.join(SHORT)}")
    parser.add_argument("--max-delay", type=float, default=4.0, help="longest run before a kill, seconds")
    args = parser.parse_args()
    names = [SHORT.get(n, n) for n in args.workloads.split(",") if n]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(unknown)}")
    work = tempfile.mkdtemp(prefix="cryptfs-crash-")
    vol = Volume(work, args.backend)
    rows = []
    try:
        for name in names:
            rows.append(stress(vol, WORKLOADS[name](work), args.kills, args.max_delay))
            r = rows[-1]
            print(f"{r['workload']:16} kills {r['kills']:3}  checked {r['checked']:6}  lost {r['lost']:3}  "
                  f"umount exit {sorted(r['umount'])}  fsck exit {sorted(r['fsck'])}", flush=True)
            for p in r["problems"][:10]:
                print(f"    {p}", flush=True)
    finally:
        vol.close()
        shutil.rmtree(work, ignore_errors=True)
    bad = any(r["lost"] or r["umount"] != {0} or r["fsck"] != {0} for r in rows)
    print("FAILED: files lost or fsck/umount failed" if bad else "ok: nothing lost, every fsck clean")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
