#!/usr/bin/env python3
"""Benchmark of `cryptfs put` / `cryptfs get` against plain boto3, on a local moto S3 server.

What it measures (one run, everything against the same server, each cryptfs workload with
its boto3 baseline run right next to it, because the machine may be busy with other work):

1. Throughput: `cryptfs put` and `cryptfs get` of a random file (default 1 GiB) as
   subprocesses, against boto3 `upload_file` / `download_file` (default TransferConfig) of
   the same bytes, also as subprocesses. MB/s from each process's wall time (the cryptfs
   figure includes its fixed start-up cost: Python, scrypt unlock, volume open; that cost
   is measured separately), the ratio cryptfs/boto3, peak RSS of every process, and the
   S3 requests of each workload counted from the server's request log.
2. Key costs, in-process: RSA-OAEP unwrap of a data key (cryptfs.keys.unwrap, 3072-bit
   key, 200 iterations) and the scrypt unlock of the volume's owner key.
3. Memory check (default 2 GiB): peak RSS of `cryptfs put` and `cryptfs get` against the
   200 MiB budget, and evidence that no plaintext temporary file is written: the files
   each process has open for writing (sampled every 50 ms), the bytes it wrote to local
   disk (rusage), and /tmp, $TMPDIR and the working directory listed before and after.

Usage:  python3 bench/bench_cli.py [--size 1G] [--rss-size 2G] [--skip-rss] [--out FILE]
Results are printed and written as Markdown to bench/results/cli.md (see --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from benchlib import (BUCKET, COUNT_HEADERS, MiB, PASSPHRASE, Measured, Moto, RequestLog, StepFailed,  # noqa: E402
                      Workdir, cryptfs_cmd, files_equal, human_size, install_signal_exit, machine_info,
                      mbps, md_table, parse_size, run, run_measured, s3_client, write_random_file,
                      write_results)

RSS_BUDGET_KIB = 200 * 1024
VOLUME = "cli-vol"

# The baselines run as their own processes, like cryptfs, so wall time and peak RSS compare.
BOTO_PUT = """
import sys, time, boto3
from boto3.s3.transfer import TransferConfig
endpoint, bucket, key, path = sys.argv[1:5]
client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
t0 = time.monotonic()
client.upload_file(path, bucket, key, Config=TransferConfig())
print(time.monotonic() - t0)
"""
BOTO_GET = """
import sys, time, boto3
from boto3.s3.transfer import TransferConfig
endpoint, bucket, key, path = sys.argv[1:5]
client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
t0 = time.monotonic()
client.download_file(bucket, key, path, Config=TransferConfig())
print(time.monotonic() - t0)
"""
BOTO_GET_ONE = """
import sys, time, boto3
endpoint, bucket, key, path = sys.argv[1:5]
client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
t0 = time.monotonic()
body = client.get_object(Bucket=bucket, Key=key)["Body"]
with open(path, "wb") as f:
    for chunk in iter(lambda: body.read(8 << 20), b""):
        f.write(chunk)
print(time.monotonic() - t0)
"""
BOTO_START = """
import sys, boto3
boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1").head_bucket(Bucket=sys.argv[2])
"""


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Workdir("cryptfs-bench-cli.", keep=args.keep)
        self.work.apply_to_this_process()
        self.source = self.work.snapshot_source(args.rev)
        self.moto = Moto(self.work.path, self.work.env)
        self.data = os.path.join(self.work.path, "data")
        os.makedirs(self.data)
        self.rows: list[list] = []       # throughput table
        self.rss_rows: list[list] = []   # memory check table
        self.checks: list[tuple[str, str]] = []
        self.problems: list[str] = []
        self.load_at_start = os.getloadavg()
        self.notes: list[str] = []

    # ------------------------------------------------------------ helpers

    @property
    def url(self) -> str:
        return f"s3://{BUCKET}/{VOLUME}"

    def cryptfs(self, *args, watch: bool = True) -> Measured:
        return run_measured(cryptfs_cmd(*args, "--endpoint-url", self.endpoint), self.work.env,
                            self.work.path, watch=watch, timeout=self.args.timeout)

    def boto(self, script: str, *args, watch: bool = True) -> Measured:
        return run_measured([sys.executable, "-c", script, self.endpoint, BUCKET, *map(str, args)],
                            self.work.env, self.work.path, watch=watch, timeout=self.args.timeout)

    def measured_step(self, label: str, m: Measured) -> Measured:
        if m.timed_out:
            self.problem(f"{label}: no result after {self.args.timeout:.0f} s (hang?): {' '.join(m.cmd)}")
        elif m.rc != 0:
            self.problem(f"{label}: exit {m.rc}: {' '.join(m.cmd)}\n{m.stderr[-3000:]}")
        return m

    def problem(self, text: str) -> None:
        print(f"PROBLEM: {text}", file=sys.stderr)
        self.problems.append(text)

    def row(self, workload: str, tool: str, size: int, m: Measured, counts, ratio=None):
        if tool.startswith("cryptfs") and m.max_rss_kib and m.max_rss_kib >= RSS_BUDGET_KIB:
            self.problem(f"{tool} of {human_size(size)}: peak RSS {_mib(m.max_rss_kib)} MiB, over the 200 MiB "
                         f"budget (highest after the scrypt unlock: {_mib(m.peak_after_startup())} MiB)")
        self.rows.append([workload, tool, human_size(size), round(m.wall, 2), round(mbps(size, m.wall), 1),
                          ratio, _mib(m.max_rss_kib), _mib(m.peak_after_startup()), *counts.cells()])

    # ------------------------------------------------------------ phases

    def setup(self) -> None:
        self.endpoint = self.moto.start()
        self.log = RequestLog(self.moto.log_path)
        s3_client(self.endpoint).create_bucket(Bucket=BUCKET)
        run(cryptfs_cmd("init", self.url, "--endpoint-url", self.endpoint), self.work.env, cwd=self.work.path,
            timeout=300)
        print(f"moto server {self.endpoint} (pid {self.moto.proc.pid}), work dir {self.work.path}", file=sys.stderr)

    def throughput(self, size: int) -> None:
        src = os.path.join(self.data, "src.bin")
        print(f"== throughput: writing {human_size(size)} of random data", file=sys.stderr)
        write_random_file(src, size)
        name = "file.bin"
        pairs = [("put", self.put_pair), ("get", self.get_pair)]
        for _ in range(self.args.repeat):
            for workload, fn in pairs:
                fn(src, name, size)
        os.unlink(src)

    def put_pair(self, src: str, name: str, size: int) -> None:
        print("   cryptfs put", file=sys.stderr)
        self.log.mark()
        c = self.measured_step("cryptfs put", self.cryptfs("put", "-q", src, f"{self.url}/{name}"))
        c_counts = self.log.take()
        print("   boto3 upload_file", file=sys.stderr)
        b = self.measured_step("boto3 upload_file", self.boto(BOTO_PUT, f"plain/{name}", src))
        b_counts = self.log.take()
        ratio = round(b.wall / c.wall, 2) if c.ok and b.ok else None
        self.row("put", "cryptfs put", size, c, c_counts, ratio)
        self.row("put", "boto3 upload_file", size, b, b_counts)
        self.transfer_only("upload_file", size, b)

    def get_pair(self, src: str, name: str, size: int) -> None:
        dst_c = os.path.join(self.data, "get-cryptfs.bin")
        dst_b = os.path.join(self.data, "get-boto3.bin")
        print("   cryptfs get", file=sys.stderr)
        self.log.mark()
        c = self.measured_step("cryptfs get", self.cryptfs("get", "-q", f"{self.url}/{name}", dst_c))
        c_counts = self.log.take()
        print("   boto3 download_file", file=sys.stderr)
        b = self.measured_step("boto3 download_file", self.boto(BOTO_GET, f"plain/{name}", dst_b))
        b_counts = self.log.take()
        ratio = round(b.wall / c.wall, 2) if c.ok and b.ok else None
        self.row("get", "cryptfs get", size, c, c_counts, ratio)
        self.row("get", "boto3 download_file", size, b, b_counts)
        self.transfer_only("download_file", size, b)
        if self.args.single_get:
            # Reference only: one streamed GET. moto reads the whole object for every ranged
            # GET, so this shows what the server does without ranges.
            print("   boto3 get_object (one GET, reference)", file=sys.stderr)
            unlink_if_exists(dst_b)
            o = self.measured_step("boto3 get_object", self.boto(BOTO_GET_ONE, f"plain/{name}", dst_b))
            self.row("get", "(reference) boto3 get_object, one streamed GET", size, o, self.log.take())
        if c.ok:
            same = files_equal(src, dst_c)
            self.checks.append((f"`cryptfs get` of {human_size(size)} returns the bytes put", "yes" if same else "NO"))
            if not same:
                self.problem(f"cryptfs get of {human_size(size)} returned different bytes than were put")
        for p in (dst_c, dst_b):
            if os.path.exists(p):
                os.unlink(p)

    def transfer_only(self, what: str, size: int, m: Measured) -> None:
        try:
            seconds = float(m.stdout.strip().splitlines()[-1])
            self.notes.append(f"boto3 {what} alone (without Python start-up and client creation): "
                              f"{seconds:.2f} s, {mbps(size, seconds):.1f} MB/s")
        except (ValueError, IndexError):
            pass

    def fixed_costs(self) -> list[list]:
        """Start-up: `cryptfs ls` of the volume root vs. a boto3 process doing one HEAD."""
        c_runs, b_runs = [], []
        self.log.mark()
        for _ in range(3):
            c_runs.append(self.measured_step("cryptfs ls", self.cryptfs("ls", self.url)))
        c_counts = self.log.take()
        for _ in range(3):
            b_runs.append(self.measured_step("boto3 start", self.boto(BOTO_START)))
        b_counts = self.log.take()
        return [["`cryptfs ls` of the volume root (start-up, scrypt unlock, volume open, one listing)",
                 round(statistics.median(m.wall for m in c_runs), 2),
                 _mib(max(m.max_rss_kib or 0 for m in c_runs)), _per_run(c_counts, 3)],
                ["python + boto3 client + one HEAD", round(statistics.median(m.wall for m in b_runs), 2),
                 _mib(max(m.max_rss_kib or 0 for m in b_runs)), _per_run(b_counts, 3)]]

    def key_costs(self) -> list[list]:
        from cryptfs import keys
        rows = []
        print("== key costs", file=sys.stderr)
        priv = keys.generate_rsa(3072)
        wrapped = keys.wrap(priv.public_key(), os.urandom(32), keys.DATA_KEY_LABEL)
        times = []
        for _ in range(self.args.unwrap_iterations):
            t0 = time.perf_counter()
            keys.unwrap(priv, wrapped, keys.DATA_KEY_LABEL)
            times.append(time.perf_counter() - t0)
        times.sort()
        ms = [t * 1000 for t in times]
        rows.append([f"RSA-OAEP unwrap of a data key (3072-bit, {len(ms)} iterations)",
                     f"{statistics.mean(ms):.2f}", f"{statistics.median(ms):.2f}",
                     f"{ms[int(0.95 * (len(ms) - 1))]:.2f}", f"{ms[0]:.2f}"])
        # The real volume's owner key blob, as `cryptfs` unlocks it at every start.
        raw = s3_client(self.endpoint).get_object(Bucket=BUCKET, Key=f"{VOLUME}/cryptfs.volume")["Body"].read()
        blob = json.loads(raw)["body"]["owner_private_key"]
        unlock = []
        for _ in range(3):
            t0 = time.perf_counter()
            keys.unlock_private_key(blob, PASSPHRASE.encode())
            unlock.append((time.perf_counter() - t0) * 1000)
        unlock.sort()
        rows.append([f"scrypt unlock of the owner key (N={blob['n']}, r={blob['r']}, p={blob['p']}; 3 runs)",
                     f"{statistics.mean(unlock):.0f}", f"{statistics.median(unlock):.0f}", "–", f"{unlock[0]:.0f}"])
        return rows

    def rss_check(self, size: int) -> None:
        src = os.path.join(self.data, "big.bin")
        dst = os.path.join(self.data, "big-cryptfs.bin")
        dst_b = os.path.join(self.data, "big-boto3.bin")
        print(f"== memory check: writing {human_size(size)} of random data", file=sys.stderr)
        write_random_file(src, size)
        name = "big.bin"

        before = self.snapshot()
        print("   cryptfs put", file=sys.stderr)
        self.log.mark()
        c = self.measured_step("cryptfs put (memory check)", self.cryptfs("put", "-q", src, f"{self.url}/{name}",
                                                                          watch=True))
        c_counts = self.log.take()
        after = self.snapshot()
        self.rss_entry("put", "cryptfs put", size, c, c_counts, before, after, allowed=set())
        print("   boto3 upload_file", file=sys.stderr)
        b = self.measured_step("boto3 upload_file (memory check)", self.boto(BOTO_PUT, f"plain/{name}", src))
        self.rss_entry("put", "boto3 upload_file", size, b, self.log.take())

        before = self.snapshot()
        print("   cryptfs get", file=sys.stderr)
        c = self.measured_step("cryptfs get (memory check)", self.cryptfs("get", "-q", f"{self.url}/{name}", dst,
                                                                          watch=True))
        c_counts = self.log.take()
        after = self.snapshot()
        self.rss_entry("get", "cryptfs get", size, c, c_counts, before, after, allowed={dst})
        if c.ok:
            same = files_equal(src, dst)
            self.checks.append((f"`cryptfs get` of {human_size(size)} returns the bytes put", "yes" if same else "NO"))
            if not same:
                self.problem(f"cryptfs get of {human_size(size)} returned different bytes than were put")
        unlink_if_exists(dst)
        print("   boto3 download_file", file=sys.stderr)
        b = self.measured_step("boto3 download_file (memory check)", self.boto(BOTO_GET, f"plain/{name}", dst_b))
        self.rss_entry("get", "boto3 download_file", size, b, self.log.take())
        unlink_if_exists(dst_b)
        os.unlink(src)

    def snapshot(self) -> dict:
        """Files in the working directory (not the server's spool), $TMPDIR, and /tmp's top level."""
        files = {}
        for root, dirs, names in os.walk(self.work.path):
            if root == self.work.path and "moto-tmp" in dirs:
                dirs.remove("moto-tmp")
            for n in names:
                if root == self.work.path and (n == "moto.log" or n.startswith("run-")):
                    continue  # the server's request log; this script's own capture files
                p = os.path.join(root, n)
                try:
                    files[p] = os.lstat(p).st_size
                except OSError:
                    pass
        try:
            top = set(os.listdir("/tmp"))
        except OSError:
            top = set()
        return {"files": files, "tmp": top}

    def rss_entry(self, workload, tool, size, m: Measured, counts, before=None, after=None, allowed=None):
        budget = ""
        if tool.startswith("cryptfs"):
            over = m.max_rss_kib is not None and m.max_rss_kib >= RSS_BUDGET_KIB
            budget = "over budget" if over else "within"
            if over:
                self.problem(f"{tool} of {human_size(size)}: peak RSS {_mib(m.max_rss_kib)} MiB, over the 200 MiB "
                             f"budget (highest after the scrypt unlock: {_mib(m.peak_after_startup())} MiB)")
        writes = "–"
        if before is not None:
            partials = {p + ".cryptfs-partial" for p in allowed} | {
                os.path.join(os.path.dirname(p), "." + os.path.basename(p)) for p in allowed}
            opened = sorted(p for p in m.opened_for_writing
                            if p not in allowed and not any(p.startswith(q) for q in partials))
            new_files = sorted((p, s) for p, s in after["files"].items()
                               if p not in allowed and s > before["files"].get(p, -1) and s > 64 * 1024)
            new_tmp = sorted(after["tmp"] - before["tmp"])
            tmpdir_files = [p for p in after["files"] if p.startswith(self.work.tmp + os.sep)]
            writes = f"{(m.disk_write_bytes or 0) / MiB:.1f}"
            allowed_bytes = size if allowed else 0
            extra = (m.disk_write_bytes or 0) - allowed_bytes
            self.checks.append((f"{tool} {human_size(size)}: files it had open for writing "
                                f"(besides the destination)", ", ".join(opened) or "none"))
            self.checks.append((f"{tool} {human_size(size)}: bytes written to local disk by the process",
                                f"{(m.disk_write_bytes or 0) / MiB:.1f} MiB (destination: "
                                f"{allowed_bytes / MiB:.0f} MiB)"))
            self.checks.append((f"{tool} {human_size(size)}: new files > 64 KiB in the work dir besides the "
                                f"destination; files left in its $TMPDIR",
                                (", ".join(f"{p} ({s} B)" for p, s in new_files) or "none") + "; " +
                                (", ".join(tmpdir_files) or "none")))
            self.checks.append((f"{tool} {human_size(size)}: new entries in /tmp (any process on the machine)",
                                ", ".join(new_tmp) or "none"))
            if opened or new_files or tmpdir_files or extra > 16 * MiB:
                self.problem(f"{tool} of {human_size(size)} wrote more than its destination: opened {opened}, "
                             f"new files {new_files}, $TMPDIR {tmpdir_files}, disk writes "
                             f"{(m.disk_write_bytes or 0) / MiB:.1f} MiB")
        self.rss_rows.append([workload, tool, human_size(size), round(m.wall, 2), round(mbps(size, m.wall), 1),
                              _mib(m.max_rss_kib), _mib(m.peak_after_startup()), budget or "–", writes,
                              *counts.cells()])

    # ------------------------------------------------------------ report

    def report(self, key_rows, fixed_rows, moto_hwm) -> str:
        a = self.args
        out = ["# cryptfs CLI benchmark: `cryptfs put`/`get` against boto3", ""]
        out += [f"- {k}: {v}" for k, v in machine_info(self.load_at_start, self.source)]
        out += [
                f"- S3 endpoint: moto server on 127.0.0.1 (one process, its own temp dir); "
                f"peak RSS of the server during the run {moto_hwm} MiB",
                f"- command: `{' '.join(['python3', 'bench/bench_cli.py', *sys.argv[1:]])}` (size "
                f"{human_size(a.size)}, memory check {human_size(a.rss_size)})", ""]
        out += ["## Throughput", "",
                "Each row is one process: `python -m cryptfs put|get` or a Python process running boto3 "
                "`upload_file`/`download_file` with the default TransferConfig, against the same server, "
                "one right after the other. MB/s = 10^6 bytes per second of the process's wall time "
                "(start-up included for both). cryptfs/boto3 = cryptfs throughput over boto3 throughput. "
                "Request counts come from the server's request log (GET excludes listings, counted as LIST). "
                "The (reference) row is one streamed `get_object` of the boto3 object: moto reads the whole "
                "object for every ranged GET, so downloads made of many ranged GETs are slow on this server "
                "whatever the client.", "",
                md_table(["workload", "tool", "size", "wall s", "MB/s", "cryptfs/boto3", "peak RSS MiB",
                          "peak RSS after unlock MiB", *COUNT_HEADERS], self.rows), ""]
        out += [f"- {n}" for n in self.notes] + [""]
        out += ["## Fixed costs", "",
                "Every cryptfs command unlocks the owner key with scrypt (N=2^17, r=8: 128 MiB of memory, "
                "freed afterwards), so its peak RSS has this floor whatever it does next.", "",
                md_table(["what", "median wall s", "peak RSS MiB", "requests per run"], fixed_rows), ""]
        out += ["## Key costs (in-process)", "",
                md_table(["operation", "mean ms", "median ms", "p95 ms", "min ms"], key_rows), ""]
        if self.rss_rows:
            out += [f"## Memory check ({human_size(a.rss_size)})", "",
                    "Budget: cryptfs put/get stay under 200 MiB resident whatever the file size, and write no "
                    "plaintext temporary file (only the destination, through its `.cryptfs-partial` name). "
                    "Peak RSS is the whole process's (from `/usr/bin/time -v`). \"After unlock\" is the highest "
                    "VmRSS sampled every 50 ms once the scrypt buffer was freed: the transfer's own share. Disk "
                    "writes = bytes the process caused to be written to local disk (rusage block output × 512).", "",
                    md_table(["workload", "tool", "size", "wall s", "MB/s", "peak RSS MiB",
                              "peak RSS after unlock MiB", "200 MiB budget",
                              "disk writes MiB", *COUNT_HEADERS], self.rss_rows), ""]
        if self.checks:
            out += ["## Checks", "", md_table(["check", "result"], [list(c) for c in self.checks]), ""]
        out += ["## Problems", ""]
        out += [f"- {p.splitlines()[0]}" for p in self.problems] or ["none"]
        out += [""]
        return "\n".join(out)


def unlink_if_exists(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _mib(kib: int | None):
    return None if kib is None else round(kib / 1024, 1)


def _per_run(counts, n: int) -> str:
    from benchlib import METHODS
    return ", ".join(f"{m} {counts[m] / n:g}" for m in METHODS if counts[m]) or "none"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=parse_size("1G"),
                   help="file size for the throughput comparison (default 1G; K/M/G suffixes)")
    p.add_argument("--rss-size", type=parse_size, default=parse_size("2G"),
                   help="file size for the peak-RSS / no-temp-file check (default 2G)")
    p.add_argument("--skip-rss", action="store_true", help="skip the memory check")
    p.add_argument("--repeat", type=int, default=1, help="throughput pairs to run (default 1)")
    p.add_argument("--no-single-get", dest="single_get", action="store_false",
                   help="skip the reference row: one streamed get_object of the same object")
    p.add_argument("--unwrap-iterations", type=int, default=200)
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a step counts as hung")
    p.add_argument("--out", default="cli.md", help="results file name in bench/results/ (default cli.md)")
    p.add_argument("--findings", default="/tmp/bench_findings.md",
                   help="where problems (crash, wrong data, hang, RSS over budget) are appended")
    p.add_argument("--rev", help="benchmark this git revision of cryptfs/ (default: the working tree as it is "
                   "at the start; either way a copy is run, so edits during the run do not count)")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    args = p.parse_args(argv)
    install_signal_exit()
    bench = Bench(args)
    fixed_rows, key_rows, moto_hwm = [], [], None
    try:
        bench.setup()
        fixed_rows = bench.fixed_costs()
        bench.throughput(args.size)
        key_rows = bench.key_costs()
        if not args.skip_rss:
            bench.rss_check(args.rss_size)
        moto_hwm = _mib(bench.moto.rss_kib())
    except StepFailed as exc:
        bench.problem(str(exc))
    except Exception:  # noqa: BLE001 - a fault of this script: report it with what was measured
        bench.problem("benchmark script error (not necessarily cryptfs):\n" + traceback.format_exc())
    finally:
        bench.moto.stop()
        bench.work.remove()
    text = bench.report(key_rows, fixed_rows, moto_hwm)
    print(text)
    path = write_results(args.out, text)
    print(f"results written to {path}", file=sys.stderr)
    if bench.problems:
        with open(args.findings, "a") as f:
            f.write(f"\n## bench_cli.py ({time.strftime('%Y-%m-%d %H:%M')})\n\n")
            for prob in bench.problems:
                f.write(f"- {prob}\n")
        print(f"problems appended to {args.findings}", file=sys.stderr)
    return 1 if bench.problems else 0


if __name__ == "__main__":
    sys.exit(main())
