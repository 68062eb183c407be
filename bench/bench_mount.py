#!/usr/bin/env python3
"""Benchmark of a `cryptfs mount` driven with ordinary programs, against plain boto3.

A fresh volume on a local moto S3 server, mounted in the background with default options
(`--cache-dir` in a temporary directory). Workloads, in order, each followed right away by
its plain-boto3 baseline on the same server (the machine may be busy with other work):

1. Sequential write of a 512 MiB random file: `dd bs=1M` into the mount, then `sync FILE`
   (its fsync uploads the file), then `cryptfs umount`; the mount process's peak RSS
   (VmHWM, sampled) over the write. Baseline: one `put_object` of the same bytes.
2. Cold read after a remount with the block cache (`<cache-dir>/<volume id>/blocks`)
   removed: `dd bs=1M` to /dev/null. Baseline: `get_object` and reading the body.
3. Warm read: the same `dd` again (the kernel page cache). Baseline: `get_object` again.
4. `cp -r` of 3,000 small files (1-8 KiB random, 30 directories), then `cryptfs umount`
   (returns once everything is uploaded). Baseline: 3,000 sequential `put_object`.
5. `ls -lR` of the whole mount after a remount. Baseline: `list_objects_v2` of 3,000 keys.
6. `rsync -a` of the same tree into the mount (then `cryptfs umount`), and a second
   `rsync -a` after a remount, which should transfer nothing. Baselines: 3,000
   `put_object`, and `list_objects_v2` (what a quick check against S3 needs).

Every workload's S3 requests are counted by method from the server's request log. Data
read back is compared with the source after the timed phases. Results are printed and
written as Markdown to bench/results/mount.md (see --out).

Usage:  python3 bench/bench_mount.py [--size 512M] [--files 3000] [--dirs 30] [--out FILE]
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import re
import subprocess
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from benchlib import (BUCKET, COUNT_HEADERS, KiB, MiB, Counts, Moto, RequestLog, StepFailed,  # noqa: E402
                      Workdir, cryptfs_cmd, human_size, install_signal_exit, machine_info, mbps, md_table,
                      parse_size, proc_status, run, s3_client, write_random_file, write_results)

VOLUME = "mount-vol"
RSS_BUDGET_KIB = 200 * 1024


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Workdir("cryptfs-bench-mount.", keep=args.keep)
        self.work.apply_to_this_process()
        self.source = self.work.snapshot_source(args.rev)
        self.moto = Moto(self.work.path, self.work.env)
        self.data = os.path.join(self.work.path, "data")
        self.tree = os.path.join(self.data, "tree")
        self.big = os.path.join(self.data, "big.bin")
        self.mnt = os.path.join(self.work.path, "mnt")
        self.cache = os.path.join(self.work.path, "cache")
        os.makedirs(self.data)
        os.makedirs(self.mnt)
        self.mounted = False
        self.mount_pid: int | None = None
        self.rows: list[list] = []        # main table
        self.req_rows: list[list] = []    # request counts
        self.rss_rows: list[list] = []    # mount process memory per mount session
        self.checks: list[list] = []
        self.problems: list[str] = []
        self.load_at_start = os.getloadavg()
        self.session = ""

    # ------------------------------------------------------------ plumbing

    @property
    def url(self) -> str:
        return f"s3://{BUCKET}/{VOLUME}"

    def problem(self, text: str) -> None:
        print(f"PROBLEM: {text}", file=sys.stderr)
        self.problems.append(text)

    def sh(self, cmd: list, timeout: float | None = None) -> tuple[float, subprocess.CompletedProcess]:
        """Run a program; a failure or hang becomes StepFailed with the mount log's tail."""
        t0 = time.monotonic()
        try:
            result = run(cmd, self.work.env, cwd=self.work.path, timeout=timeout or self.args.timeout)
        except StepFailed as exc:
            raise StepFailed(f"{exc}\n--- mount.log (tail) ---\n{self.mount_log_tail()}") from None
        return time.monotonic() - t0, result

    def mount_log_tail(self, lines: int = 30) -> str:
        try:
            with open(os.path.join(self.cache, self.volume_id, "mount.log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except (OSError, AttributeError):
            return "(no mount log)"

    def mount(self, session: str) -> None:
        self.sh(cryptfs_cmd("mount", self.url, self.mnt, "--endpoint-url", self.endpoint,
                            "--cache-dir", self.cache), timeout=180)
        self.mounted = True
        self.session = session
        pids = glob.glob(os.path.join(self.work.state, "mounts", "*.pid"))
        self.mount_pid = None
        if len(pids) == 1:
            with open(pids[0]) as f:
                self.mount_pid = int(f.read().strip())

    def umount(self) -> float:
        """`cryptfs umount`; returns seconds until it returned (pending uploads included)."""
        hwm = proc_status(self.mount_pid, "VmHWM") if self.mount_pid else None
        t, _ = self.sh(cryptfs_cmd("umount", self.mnt))
        self.mounted = False
        self.rss_rows.append([self.session, _mib(hwm)])
        return t

    def cleanup(self) -> None:
        if self.mounted or os.path.ismount(self.mnt):
            subprocess.run(cryptfs_cmd("umount", "--timeout", "120", self.mnt), env=self.work.env,
                           cwd=self.work.path, capture_output=True, timeout=300)
            if os.path.ismount(self.mnt):
                subprocess.run(["fusermount3", "-u", self.mnt], capture_output=True, timeout=60)
            if os.path.ismount(self.mnt):
                subprocess.run(["fusermount3", "-uz", self.mnt], capture_output=True, timeout=60)
            # the mount process this script started, if it is still there
            if self.mount_pid and _alive(self.mount_pid):
                try:
                    os.kill(self.mount_pid, 15)
                except OSError:
                    pass
        self.moto.stop()
        self.work.remove()

    def requests(self, workload: str, tool: str, counts: Counts) -> None:
        self.req_rows.append([workload, tool, *counts.cells()])
        if counts.errors and tool.startswith("cryptfs"):
            self.checks.append([f"{workload}: S3 responses >= 400 seen (404s of lookups are normal)",
                                str(counts.errors)])

    # ------------------------------------------------------------ setup

    def setup(self) -> None:
        self.endpoint = self.moto.start()
        self.log = RequestLog(self.moto.log_path)
        self.s3 = s3_client(self.endpoint)
        self.s3.create_bucket(Bucket=BUCKET)
        self.sh(cryptfs_cmd("init", self.url, "--endpoint-url", self.endpoint), timeout=300)
        _, info = self.sh(cryptfs_cmd("info", self.url, "--endpoint-url", self.endpoint), timeout=300)
        self.volume_id = re.search(r"^volume id:\s*(\S+)", info.stdout.decode(), re.M).group(1)
        print(f"moto server {self.endpoint} (pid {self.moto.proc.pid}), work dir {self.work.path}",
              file=sys.stderr)
        print(f"== writing {human_size(self.args.size)} random file and a {self.args.files}-file tree",
              file=sys.stderr)
        write_random_file(self.big, self.args.size)
        rng = random.Random(20240611)
        self.tree_files: list[tuple[str, bytes]] = []
        per_dir = -(-self.args.files // self.args.dirs)
        for i in range(self.args.files):
            d = os.path.join(self.tree, f"dir{i // per_dir:02d}")
            os.makedirs(d, exist_ok=True)
            body = os.urandom(rng.randint(1 * KiB, 8 * KiB))
            path = os.path.join(d, f"file{i % per_dir:03d}.dat")
            with open(path, "wb") as f:
                f.write(body)
            self.tree_files.append((os.path.relpath(path, self.tree), body))
        self.tree_bytes = sum(len(b) for _, b in self.tree_files)
        with open(self.big, "rb") as f:
            self.big_bytes = f.read()  # for the boto3 baselines; also puts the file in the page cache

    # ------------------------------------------------------------ workloads

    def big_file(self) -> None:
        size = self.args.size
        target = os.path.join(self.mnt, "big.bin")
        print("== sequential write", file=sys.stderr)
        self.mount("sequential write (dd + sync)")
        peak = [0]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                v = proc_status(self.mount_pid, "VmHWM") if self.mount_pid else None
                if v:
                    peak[0] = max(peak[0], v)
                stop.wait(0.1)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        self.log.mark()
        try:
            t_dd, _ = self.sh(["dd", f"if={self.big}", f"of={target}", "bs=1M"])
            t_sync, _ = self.sh(["sync", target])
        finally:
            stop.set()
            sampler.join()
        c_write = self.log.take()
        t_umount = self.umount()
        c_umount = self.log.take()
        write_hwm = peak[0] or None

        t_put = self.baseline(lambda: self.s3.put_object(Bucket=BUCKET, Key="plain/big.bin", Body=self.big_bytes))
        b_put = self.log.take()

        self.rows.append([f"sequential write {human_size(size)}: dd bs=1M until close", round(t_dd, 2),
                          round(mbps(size, t_dd), 1), "put_object", round(t_put, 2), round(mbps(size, t_put), 1),
                          round(t_put / t_dd, 2)])
        self.rows.append([f"sequential write {human_size(size)}: dd + `sync FILE` (fsync uploads)",
                          round(t_dd + t_sync, 2), round(mbps(size, t_dd + t_sync), 1), "put_object", round(t_put, 2),
                          round(mbps(size, t_put), 1), round(t_put / (t_dd + t_sync), 2)])
        total = t_dd + t_sync + t_umount
        self.rows.append([f"sequential write {human_size(size)}: dd + sync + `cryptfs umount` returned "
                          f"(umount alone {t_umount:.2f} s)", round(total, 2), round(mbps(size, total), 1),
                          "put_object", round(t_put, 2), round(mbps(size, t_put), 1), round(t_put / total, 2)])
        self.requests(f"sequential write {human_size(size)} (dd + sync)", "cryptfs", c_write)
        self.requests(f"sequential write {human_size(size)}: umount", "cryptfs", c_umount)
        self.requests(f"sequential write {human_size(size)}", "boto3 put_object", b_put)
        self.rss_rows[-1].append(_mib(write_hwm))
        if write_hwm and write_hwm >= RSS_BUDGET_KIB:
            self.problem(f"mount process peak RSS {_mib(write_hwm)} MiB during the {human_size(size)} sequential "
                         f"write (over 200 MiB)")

        # cold read: remount with the block cache removed
        print("== cold read", file=sys.stderr)
        blocks = os.path.join(self.cache, self.volume_id, "blocks")
        subprocess.run(["rm", "-rf", blocks], check=True)
        self.mount("cold + warm read (dd)")
        self.log.mark()
        t_cold, _ = self.sh(["dd", f"if={target}", "of=/dev/null", "bs=1M"])
        c_cold = self.log.take()
        t_get, b_get = self.get_baseline("plain/big.bin")
        self.rows.append([f"cold read {human_size(size)} after remount, block cache removed (dd bs=1M)",
                          round(t_cold, 2), round(mbps(size, t_cold), 1), "get_object + read", round(t_get, 2),
                          round(mbps(size, t_get), 1), round(t_get / t_cold, 2)])
        self.requests(f"cold read {human_size(size)}", "cryptfs", c_cold)
        self.requests(f"cold read {human_size(size)}", "boto3 get_object", b_get)
        # Reference: the same server read the way the mount reads (ranged GETs of the reader's run
        # size, as many at once as its prefetch window holds). moto reads the whole object for
        # every ranged GET, so this is what the server allows a client reading in ranges.
        rng, par = self.reader_shape()
        t_rng = self.ranged_get_baseline("plain/big.bin", size, rng, par)
        b_rng = self.log.take()
        self.rows.append([f"(reference) cold read as above vs. boto3 ranged GETs like the mount's", round(t_cold, 2),
                          round(mbps(size, t_cold), 1), f"get_object, {human_size(rng)} ranges, {par} at a time",
                          round(t_rng, 2), round(mbps(size, t_rng), 1), round(t_rng / t_cold, 2)])
        self.requests(f"cold read {human_size(size)} (reference)", f"boto3 ranged get_object ×{par}", b_rng)

        print("== warm read", file=sys.stderr)
        self.log.mark()
        t_warm, _ = self.sh(["dd", f"if={target}", "of=/dev/null", "bs=1M"])
        c_warm = self.log.take()
        t_get2, b_get2 = self.get_baseline("plain/big.bin")
        self.rows.append([f"warm read {human_size(size)} (second dd, page cache)", round(t_warm, 2),
                          round(mbps(size, t_warm), 1), "get_object + read", round(t_get2, 2),
                          round(mbps(size, t_get2), 1), round(t_get2 / t_warm, 2)])
        self.requests(f"warm read {human_size(size)}", "cryptfs", c_warm)
        self.requests(f"warm read {human_size(size)}", "boto3 get_object", b_get2)

        # correctness, outside the timed phases
        self.log.mark()
        same = subprocess.run(["cmp", "-s", self.big, target]).returncode == 0
        self.log.take()
        self.checks.append([f"{human_size(size)} file read back through the mount equals what was written",
                            "yes" if same else "NO"])
        if not same:
            self.problem(f"the {human_size(size)} file read through the mount differs from what dd wrote")
        self.umount()
        self.log.take()

    def get_baseline(self, key: str) -> tuple[float, Counts]:
        def get():
            body = self.s3.get_object(Bucket=BUCKET, Key=key)["Body"]
            while body.read(8 * MiB):
                pass
        t = self.baseline(get)
        return t, self.log.take()

    @staticmethod
    def reader_shape() -> tuple[int, int]:
        """(bytes per ranged GET, GETs at once) of the mount's sequential reader, from its constants."""
        try:
            from cryptfs import reader
            return reader.CHUNK_BLOCKS * reader.MAX_RUN * 64 * KiB, max(1, reader.MAX_WINDOW // reader.MAX_RUN)
        except (ImportError, AttributeError):
            return 16 * MiB, 4

    def ranged_get_baseline(self, key: str, size: int, rng: int, par: int) -> float:
        import concurrent.futures as cf

        def one(start):
            end = min(start + rng, size) - 1
            body = self.s3.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={start}-{end}")["Body"]
            while body.read(8 * MiB):
                pass

        def all_ranges():
            with cf.ThreadPoolExecutor(par) as pool:
                list(pool.map(one, range(0, size, rng)))
        return self.baseline(all_ranges)

    def baseline(self, fn) -> float:
        self.log.mark()
        t0 = time.monotonic()
        fn()
        return time.monotonic() - t0

    def put_tree_baseline(self, prefix: str) -> float:
        def put_all():
            for rel, body in self.tree_files:
                self.s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{rel}", Body=body)
        return self.baseline(put_all)

    def list_baseline(self, prefix: str) -> tuple[float, int]:
        n = [0]

        def list_all():
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
                n[0] += len(page.get("Contents", []))
        return self.baseline(list_all), n[0]

    def small_files(self) -> None:
        n, nd = self.args.files, self.args.dirs
        what = f"{n} files, {nd} dirs, {self.tree_bytes / MiB:.1f} MiB"
        print("== cp -r", file=sys.stderr)
        self.mount("cp -r small files")
        self.log.mark()
        t_cp, _ = self.sh(["cp", "-r", self.tree, os.path.join(self.mnt, "cp")])
        c_cp = self.log.take()
        t_um = self.umount()
        c_um = self.log.take()
        t_b = self.put_tree_baseline("plain/cp")
        b = self.log.take()
        self.rows.append([f"`cp -r` {what}: until cp returns", round(t_cp, 2), f"{n / t_cp:.0f} files/s",
                          f"{n} × put_object", round(t_b, 2), f"{n / t_b:.0f} files/s", round(t_b / t_cp, 2)])
        self.rows.append([f"`cp -r` {what}: until `cryptfs umount` returned (all uploaded; umount alone "
                          f"{t_um:.2f} s)", round(t_cp + t_um, 2), f"{n / (t_cp + t_um):.0f} files/s",
                          f"{n} × put_object", round(t_b, 2), f"{n / t_b:.0f} files/s", round(t_b / (t_cp + t_um), 2)])
        self.requests("cp -r (until cp returns)", "cryptfs", c_cp)
        self.requests("cp -r: umount (uploads)", "cryptfs", c_um)
        self.requests(f"cp -r: {n} × put_object", "boto3", b)

        print("== ls -lR after remount", file=sys.stderr)
        self.mount("ls -lR, then rsync -a")
        self.log.mark()
        t_ls, ls = self.sh(["ls", "-lR", self.mnt])
        c_ls = self.log.take()
        t_lb, listed = self.list_baseline("plain/cp")
        b_ls = self.log.take()
        self.rows.append([f"`ls -lR` of the mount after remount ({n} files + 1 big)", round(t_ls, 2), None,
                          f"list_objects_v2 ({listed} keys)", round(t_lb, 2), None, round(t_lb / t_ls, 2)])
        self.requests("ls -lR after remount", "cryptfs", c_ls)
        self.requests("list_objects_v2", "boto3", b_ls)
        files_listed = sum(1 for line in ls.stdout.decode(errors="replace").splitlines() if line.startswith("-"))
        self.checks.append(["files shown by `ls -lR` after remount", f"{files_listed} (expected {n + 1})"])
        if files_listed != n + 1:
            self.problem(f"ls -lR after remount shows {files_listed} files, expected {n + 1}")

        print("== rsync -a", file=sys.stderr)
        self.log.mark()
        t_rs, rs = self.sh(["rsync", "-a", "--stats", self.tree + "/", os.path.join(self.mnt, "rsync") + "/"])
        c_rs = self.log.take()
        t_um2 = self.umount()
        c_um2 = self.log.take()
        t_rb = self.put_tree_baseline("plain/rsync")
        b_rs = self.log.take()
        self.rows.append([f"`rsync -a` {what}: until rsync returns", round(t_rs, 2), f"{n / t_rs:.0f} files/s",
                          f"{n} × put_object", round(t_rb, 2), f"{n / t_rb:.0f} files/s", round(t_rb / t_rs, 2)])
        self.rows.append([f"`rsync -a` {what}: until `cryptfs umount` returned (umount alone {t_um2:.2f} s)",
                          round(t_rs + t_um2, 2), f"{n / (t_rs + t_um2):.0f} files/s", f"{n} × put_object",
                          round(t_rb, 2), f"{n / t_rb:.0f} files/s", round(t_rb / (t_rs + t_um2), 2)])
        self.requests("rsync -a (until rsync returns)", "cryptfs", c_rs)
        self.requests("rsync -a: umount (uploads)", "cryptfs", c_um2)
        self.requests(f"rsync -a: {n} × put_object", "boto3", b_rs)
        self.checks.append(["first `rsync -a`: regular files transferred", f"{_transferred(rs)} (expected {n})"])

        print("== second rsync -a after remount", file=sys.stderr)
        self.mount("second rsync -a, then verify")
        self.log.mark()
        t_rs2, rs2 = self.sh(["rsync", "-a", "--stats", self.tree + "/", os.path.join(self.mnt, "rsync") + "/"])
        c_rs2 = self.log.take()
        t_lb2, listed2 = self.list_baseline("plain/rsync")
        b_rs2 = self.log.take()
        moved = _transferred(rs2)
        self.rows.append([f"second `rsync -a` after remount (nothing to transfer)", round(t_rs2, 2), None,
                          f"list_objects_v2 ({listed2} keys)", round(t_lb2, 2), None, round(t_lb2 / t_rs2, 2)])
        self.requests("second rsync -a after remount", "cryptfs", c_rs2)
        self.requests("list_objects_v2", "boto3", b_rs2)
        self.checks.append(["second `rsync -a` after remount: regular files transferred", f"{moved} (expected 0)"])
        if moved != 0:
            self.problem(f"a second rsync -a after remount transferred {moved} files (expected 0)")

        # correctness, outside the timed phases
        self.log.mark()
        for sub in ("cp", "rsync"):
            diff = subprocess.run(["diff", "-r", self.tree, os.path.join(self.mnt, sub)], capture_output=True,
                                  timeout=self.args.timeout)
            ok = diff.returncode == 0
            self.checks.append([f"tree copied with {'cp -r' if sub == 'cp' else 'rsync -a'} equals the source "
                                f"after remount (diff -r)", "yes" if ok else "NO"])
            if not ok:
                self.problem(f"diff -r of the {sub} tree through the mount: "
                             f"{diff.stdout.decode(errors='replace')[:2000]}")
        self.log.take()
        self.umount()
        self.log.take()

    # ------------------------------------------------------------ report

    def report(self, moto_hwm) -> str:
        a = self.args
        out = ["# cryptfs mount benchmark", ""]
        out += [f"- {k}: {v}" for k, v in machine_info(self.load_at_start, self.source)]
        out += [
                "- S3 endpoint: moto server on 127.0.0.1 (one process, its own temp dir); "
                f"peak RSS of the server during the run {moto_hwm} MiB",
                "- mount: `cryptfs mount URL MNT --endpoint-url ... --cache-dir <tmp>` (background, default "
                "options: write-back delay 2 s, fsync uploads, attribute TTL 5 s, 8 workers)",
                f"- command: `{' '.join(['python3', 'bench/bench_mount.py', *sys.argv[1:]])}` (size "
                f"{human_size(a.size)}, {a.files} files in {a.dirs} directories)", ""]
        out += ["## Workloads", "",
                "cryptfs/boto3 = cryptfs speed over the boto3 baseline's speed (boto3 s / cryptfs s): above 1, "
                "the mount was faster. The baseline runs in the benchmark process with one boto3 client, right "
                "after the workload, against the same server. MB/s = 10^6 bytes per second.", "",
                md_table(["workload", "cryptfs s", "cryptfs rate", "boto3 baseline", "boto3 s", "boto3 rate",
                          "cryptfs/boto3"], self.rows), ""]
        out += ["## S3 requests per workload", "",
                "Counted from the server's request log between phases (GET excludes listings, counted as LIST; "
                "POST = multipart create/complete, PUT includes upload parts and copies).", "",
                md_table(["workload", "tool", *COUNT_HEADERS], self.req_rows), ""]
        out += ["## Mount process memory", "",
                "Peak resident set (VmHWM of the mount process) per mount session, read just before "
                "`cryptfs umount`; the write session also sampled every 100 ms during dd + sync. Only the "
                "write is held to the 200 MiB budget here: reads may fill the decrypted-block memory cache "
                "(`memory_cache_mb`, default 256).", "",
                md_table(["mount session", "peak RSS MiB at umount", "peak RSS MiB during the write"],
                         [r + [None] * (3 - len(r)) for r in self.rss_rows]), ""]
        out += ["## Checks", "", md_table(["check", "result"], self.checks), ""]
        out += ["## Problems", ""]
        out += [f"- {p.splitlines()[0]}" for p in self.problems] or ["none"]
        out += [""]
        return "\n".join(out)


def _transferred(result: subprocess.CompletedProcess) -> int | None:
    m = re.search(r"Number of regular files transferred:\s*([\d,]+)", result.stdout.decode(errors="replace"))
    return int(m.group(1).replace(",", "")) if m else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _mib(kib):
    return None if kib is None else round(kib / 1024, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=parse_size("512M"),
                   help="size of the sequentially written and read file (default 512M)")
    p.add_argument("--files", type=int, default=3000, help="small files in the tree (default 3000)")
    p.add_argument("--dirs", type=int, default=30, help="directories they are spread over (default 30)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a step counts as hung")
    p.add_argument("--out", default="mount.md", help="results file name in bench/results/ (default mount.md)")
    p.add_argument("--findings", default="/tmp/bench_findings.md",
                   help="where problems (crash, wrong data, hang, RSS over budget) are appended")
    p.add_argument("--rev", help="benchmark this git revision of cryptfs/ (default: the working tree as it is "
                   "at the start; either way a copy is run, so edits during the run do not count)")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    args = p.parse_args(argv)
    if not os.path.exists("/dev/fuse"):
        print("bench_mount: /dev/fuse is missing", file=sys.stderr)
        return 2
    install_signal_exit()
    bench = Bench(args)
    moto_hwm = None
    try:
        bench.setup()
        bench.big_file()
        bench.small_files()
        moto_hwm = _mib(bench.moto.rss_kib())
    except StepFailed as exc:
        bench.problem(str(exc))
    except Exception:  # noqa: BLE001 - a fault of this script: report it with what was measured
        bench.problem("benchmark script error (not necessarily cryptfs):\n" + traceback.format_exc())
    finally:
        bench.cleanup()
    text = bench.report(moto_hwm)
    print(text)
    path = write_results(args.out, text)
    print(f"results written to {path}", file=sys.stderr)
    if bench.problems:
        with open(args.findings, "a") as f:
            f.write(f"\n## bench_mount.py ({time.strftime('%Y-%m-%d %H:%M')})\n\n")
            for prob in bench.problems:
                f.write(f"- {prob}\n")
        print(f"problems appended to {args.findings}", file=sys.stderr)
    return 1 if bench.problems else 0


if __name__ == "__main__":
    sys.exit(main())
