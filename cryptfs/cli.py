"""The cryptfs command: subcommands, passphrase input, and the one place errors become exit codes."""

import argparse
import contextlib
import datetime
import getpass
import json
import logging
import os
import stat
import sys

from . import __version__, config, fsck, keys, lease, localstate, logs, transfer, volume
from . import format as fmt
from .progress import Bar, human
from .errors import (
    EXIT_ERROR,
    EXIT_INTEGRITY,
    EXIT_OK,
    EXIT_USAGE,
    CryptfsError,
    IntegrityError,
    IsADirectory,
    NotFound,
    UsageError,
)
from .store import Store, default_attrs
from .target import Target, for_init, locate

EPILOG = """\
Exit codes: 0 ok, 1 other error, 2 usage (bad option or value, missing local file, local
state another user owns or can write), 3 wrong passphrase or key mismatch, 4 not found,
5 integrity (tampered/foreign data; fsck found problems; decrypt could not restore some
files), 6 endpoint unreachable, 7 no credentials or access denied, 8 already exists,
9 local disk full, 10 in use (another read-write mount holds the volume's lease, or the
cache directory is in use).

The passphrase comes from --passphrase-file (or passphrase_file in the config or as a mount
option; a file readable by its owner alone), the systemd credential cryptfs-passphrase,
$CRYPTFS_PASSPHRASE, or a prompt; never from an argument. AWS credentials come from
boto3's usual chain (environment, --profile, role).

As a service: `mount -t cryptfs URL DIR -o KEY=VALUE,...` and /etc/fstab lines run the
mount.cryptfs helper (every volume setting is an -o option); a systemd unit runs
`cryptfs mount -f` (Type=notify). See docs/operations.md.
"""


# ---------------------------------------------------------------- passphrases


def read_passphrase(
    args,
    prompt: str = "Passphrase: ",
    confirm: bool = False,
    env: str = "CRYPTFS_PASSPHRASE",
    file_arg: str = "passphrase_file",
) -> bytes:
    path = getattr(args, file_arg, None) or (credential() if file_arg == "passphrase_file" else None)
    if path:
        try:
            with open(path, "rb") as f:
                private_to_owner(path, os.fstat(f.fileno()))
                value = f.read().rstrip(b"\r\n")
        except OSError as exc:
            raise UsageError(f"cannot read --{file_arg.replace('_', '-')} {path}: {exc.strerror}") from None
    elif os.environ.get(env) is not None:
        value = os.environ[env].encode()
    elif sys.stdin.isatty():
        value = getpass.getpass(prompt).encode()
        if confirm and getpass.getpass("Repeat: ").encode() != value:
            raise UsageError("passphrases do not match")
    else:
        raise UsageError(f"no passphrase: set {env}, use --{file_arg.replace('_', '-')}, or run on a terminal")
    if not value:
        raise UsageError("empty passphrase")
    return value


CREDENTIAL = "cryptfs-passphrase"  # systemd: LoadCredential=cryptfs-passphrase:/etc/cryptfs/vault.pass


def credential() -> str | None:
    """The passphrase file systemd passes a service ($CREDENTIALS_DIRECTORY), if it passed one."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    path = os.path.join(directory, CREDENTIAL) if directory else None
    return path if path and os.path.exists(path) else None


def private_to_owner(path: str, st: os.stat_result) -> None:
    """A passphrase file others can read (or change) is refused: it is the volume's one key."""
    if st.st_mode & 0o066:
        raise UsageError(
            f"passphrase file {path} can be read or changed by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"make it its owner's alone: chmod 600 {path}"
        )


# ---------------------------------------------------------------- opening


def settings_of(args) -> tuple[str, config.VolumeSettings]:
    url, settings = config.settings_for(args.url, config.load(args.config or config.default_path()))
    for name in ("endpoint_url", "region", "profile", "owner_fingerprint"):
        if getattr(args, name, None):
            setattr(settings, name, getattr(args, name))
    if args.path_style:
        settings.path_style = True
    if args.no_verify_tls:
        settings.verify_tls = False
    if args.retry_mode:
        settings.retry_mode = args.retry_mode
    return url, settings


def open_target(
    args, url: str | None = None, settings: config.VolumeSettings | None = None, writes: bool = False
) -> tuple[Store, Target]:
    """The volume a command names. A command that `writes` holds the volume's lease until it
    ends (lease.held_by_command): refused while a read-write mount holds it."""
    base_url, found = settings_of(args)
    settings = settings or found
    target = locate(url or base_url, settings)
    if not getattr(args, "passphrase_file", None) and settings.passphrase_file:
        args.passphrase_file = settings.passphrase_file
    vol = volume.open_volume(target.backend, target.prefix, read_passphrase(args), settings.owner_fingerprint)
    store = Store(vol, workers=settings.workers)
    if writes:
        args.held.enter_context(lease.held_by_command(store, f"cryptfs {args.command}", args.break_lease))
    return store, target


def parent_and_name(store: Store, parts: list[bytes]):
    if not parts:
        raise UsageError("this needs a path inside the volume, not its root")
    return store.resolve(parts[:-1]), parts[-1]


def show(parts: list[bytes]) -> str:
    return "/" + b"/".join(parts).decode(errors="replace")


def local_destination(dest: str) -> str:
    """`dest` when its directory exists; a missing one is a mistake on the command line."""
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise UsageError(f"destination directory {parent} does not exist")
    return dest


# ---------------------------------------------------------------- commands


def cmd_init(args) -> int:
    url, settings = settings_of(args)
    passphrase = read_passphrase(args, "New passphrase: ", confirm=True)
    backend, prefix = for_init(url, settings)
    vol = volume.create(backend, prefix, passphrase, block_size=args.block_size, rsa_bits=args.rsa_bits)
    Store(vol).init_root(default_attrs(stat.S_IFDIR | 0o755))
    print(f"Created cryptfs volume {vol.url}")
    print(f"Owner key fingerprint: {vol.owner_fingerprint()}")
    print(
        "Keep the passphrase safe: it alone recovers this volume. Record the fingerprint to "
        "check the volume later (owner_fingerprint in the config, or --owner-fingerprint)."
    )
    return EXIT_OK


def cmd_info(args) -> int:
    store, _ = open_target(args)
    body = store.vol.body
    print(f"volume:        {store.vol.url}")
    print(f"volume id:     {body['volume_id']}")
    print(f"format:        {body['format']} version {body['version']}")
    print(f"generation:    {body['generation']}")
    print(f"created:       {body['created']}")
    print(f"block size:    {body['block_size']}")
    print(f"owner key:     {body['owner_fingerprint']}")
    print(f"content key:   {body['content_fingerprint']}")
    print(f"key derivation: scrypt N={body['owner_private_key']['n']} r={body['owner_private_key']['r']}")
    for r in body["recipients"]:
        print(f"recipient:     {r['name']} {r['fingerprint']}")
    print(f"lease:         {lease.describe(*lease.read(store))}")
    return EXIT_OK


def _mode_string(mode: int) -> str:
    return stat.filemode(mode)


def _ls_line(entry, long: bool, name: str) -> str:
    if not long:
        return name + ("/" if entry.is_dir else "")
    a = entry.attrs
    when = datetime.datetime.fromtimestamp(a.mtime_ns / 1e9).strftime("%Y-%m-%d %H:%M")
    return f"{_mode_string(a.mode)} {a.uid:>5} {a.gid:>5} {entry.size:>12} {when} {name}"


def cmd_ls(args) -> int:
    store, target = open_target(args)
    entry = store.resolve(target.parts)
    if not entry.is_dir:
        print(_ls_line(entry, args.long, entry.name.decode(errors="replace")))
        return EXIT_OK
    todo = [(entry, show(target.parts))]
    while todo:
        directory, path = todo.pop(0)
        if args.recursive:
            print(f"{path}:")
        children = sorted(
            store.list_entries(directory.obj_id) if args.long or args.recursive else _names_only(store, directory),
            key=lambda e: e.name,
        )
        for child in children:
            print(_ls_line(child, args.long, child.name.decode(errors="replace")))
            if args.recursive and child.is_dir:
                todo.append((child, path.rstrip("/") + "/" + child.name.decode(errors="replace")))
        if args.recursive:
            print()
    return EXIT_OK


def _names_only(store, directory):
    from .store import Entry

    return [
        Entry(directory.obj_id, name, "", is_dir, b"", 0, info.etag, info.last_modified, None)
        for name, info, is_dir in store.list_dir(directory.obj_id)
    ]


def cmd_put(args) -> int:
    for src in args.sources:
        if not os.path.lexists(src):
            raise UsageError(f"{src}: no such file or directory")
    store, target = open_target(args, writes=True)
    try:
        dest = store.resolve(target.parts)
    except NotFound:
        dest = None
    sent = 0
    if dest is not None and dest.is_dir:
        for src in args.sources:
            name = os.fsencode(os.path.basename(os.path.normpath(src)))
            sent += transfer.put_path(store, src, dest, name, args.quiet)
    else:
        if len(args.sources) > 1:
            raise UsageError(f"{target.display} is not a directory; several sources need one")
        parent, name = parent_and_name(store, target.parts)
        sent += transfer.put_path(store, args.sources[0], parent, name, args.quiet)
    if not args.quiet:
        print(f"{sent} file(s) stored", file=sys.stderr)
    return EXIT_OK


def cmd_get(args) -> int:
    dest = local_destination(args.dest)
    store, target = open_target(args)
    entry = store.resolve(target.parts)
    if os.path.isdir(dest) and not entry.is_dir:
        dest = os.path.join(dest, os.fsdecode(entry.name))
    transfer.get_entry(store, entry, dest, show(target.parts), args.quiet)
    return EXIT_OK


def cmd_cat(args) -> int:
    store, target = open_target(args)
    entry = store.resolve(target.parts)
    if entry.is_dir:
        raise IsADirectory(f"{show(target.parts)} is a directory")
    out = sys.stdout.buffer
    try:
        for chunk in store.iter_plain(entry):
            out.write(chunk)
    except CryptfsError as exc:
        raise exc.about(show(target.parts)) from None
    out.flush()
    return EXIT_OK


def cmd_mkdir(args) -> int:
    store, target = open_target(args, writes=True)
    if args.parents:
        entry = store.root()
        for i, name in enumerate(target.parts):
            try:
                entry, _ = store.lookup(entry.obj_id, name)
            except NotFound:
                entry = store.mkdir(entry.obj_id, name, default_attrs(stat.S_IFDIR | 0o755))
            if not entry.is_dir:
                raise UsageError(f"{show(target.parts[: i + 1])} is not a directory")
        return EXIT_OK
    parent, name = parent_and_name(store, target.parts)
    store.mkdir(parent.obj_id, name, default_attrs(stat.S_IFDIR | 0o755))
    return EXIT_OK


def _remove_tree(store: Store, entry) -> None:
    if entry.is_dir:
        for child in store.list_entries(entry.obj_id):
            _remove_tree(store, child)
    store.remove(entry)


def cmd_rm(args) -> int:
    store, target = open_target(args, writes=True)
    entry = store.resolve(target.parts)
    if not target.parts:
        raise UsageError("refusing to remove the volume root")
    if entry.is_dir and not args.recursive:
        raise IsADirectory(f"{show(target.parts)} is a directory (use -r)")
    _remove_tree(store, entry)
    return EXIT_OK


def cmd_rmdir(args) -> int:
    store, target = open_target(args, writes=True)
    entry = store.resolve(target.parts)
    if not entry.is_dir:
        raise UsageError(f"{show(target.parts)} is not a directory")
    if not target.parts:
        raise UsageError("refusing to remove the volume root")
    store.remove(entry)
    return EXIT_OK


def cmd_mv(args) -> int:
    store, src = open_target(args, writes=True)
    _, dst_settings = settings_of(args)
    dst = locate(config.settings_for(args.dest, {})[0], dst_settings) if "://" in args.dest else None
    if dst is None or dst.backend.url != src.backend.url or dst.prefix != src.prefix:
        raise UsageError("mv moves within one volume: give the destination as a URL in the same volume")
    entry = store.resolve(src.parts)
    if not src.parts:
        raise UsageError("cannot move the volume root")
    try:
        target = store.resolve(dst.parts)
    except NotFound:
        target = None
    if (
        target is not None
        and target.is_dir
        and not entry.is_dir
        or target is not None
        and target.is_dir
        and entry.is_dir
        and not store.is_empty(target.obj_id)
    ):
        parent, name = target, src.parts[-1]
        target = _lookup(store, parent, name)
    else:
        parent, name = parent_and_name(store, dst.parts)
    if entry.is_dir and _is_inside(store, parent, entry):
        raise UsageError("cannot move a directory into itself")
    store.rename(entry, parent.obj_id, name, target)
    return EXIT_OK


def _lookup(store, parent, name):
    try:
        return store.lookup(parent.obj_id, name)[0]
    except NotFound:
        return None


def _is_inside(store: Store, parent, moved) -> bool:
    """Whether directory `parent` is `moved` or below it (walks back-pointers to the root)."""
    dir_id = parent.obj_id
    for _ in range(4096):
        if dir_id == moved.obj_id:
            return True
        if dir_id == fmt.ROOT_DIR_ID:
            return False
        loc = store.read_backptr(dir_id)
        if loc is None:
            raise NotFound("a directory on the way to the root has no back-pointer (run fsck)")
        dir_id = loc[0]
    return True


def cmd_decrypt(args) -> int:
    local_destination(args.dest)
    store, target = open_target(args)
    entry = store.resolve(target.parts)
    done = transfer.Restored()
    transfer.get_entry(store, entry, args.dest, show(target.parts), args.quiet, done)
    if not args.quiet:
        print(f"cryptfs: {done.written} file(s) written to {args.dest} (unchanged files skipped)", file=sys.stderr)
    for where, exc in sorted(done.failed, key=lambda failure: failure[0]):
        print(f"cryptfs: not restored: {where}: {exc}", file=sys.stderr)
    if done.failed:
        raise IntegrityError(
            f"{len(done.failed)} file(s) could not be restored (listed above); "
            "the rest is restored, and a rerun retries only those"
        )
    return EXIT_OK


def cmd_fsck(args) -> int:
    store, _ = open_target(args, writes=args.repair or args.abort_uploads)
    bar = Bar("checking", None, args.quiet)
    try:
        report = fsck.check(
            store,
            repair=args.repair,
            abort_uploads=args.abort_uploads,
            on_file=lambda r: bar.update(r.bytes, label=f"{r.directories} directories, {r.files} files"),
        )
    finally:
        bar.close()
    for kind, where, detail in report.problems:
        print(f"{kind}: {where}: {detail}")
    for line in report.repaired:
        print(f"repaired: {line}")
    print(
        f"{report.directories} directories, {report.files} files, {report.bytes} bytes "
        f"({human(report.bytes)}) checked; "
        f"{len(report.problems)} problem(s)" + (f", {len(report.repaired)} repaired" if args.repair else "")
    )
    if args.repair and report.problems and len(report.repaired) == len(report.problems):
        return EXIT_OK  # everything found was repaired
    return EXIT_OK if report.clean else EXIT_INTEGRITY


def cmd_passwd(args) -> int:
    store, _ = open_target(args)
    new = read_passphrase(
        args, "New passphrase: ", confirm=True, env="CRYPTFS_NEW_PASSPHRASE", file_arg="new_passphrase_file"
    )
    store.vol.change_passphrase(new)
    print("Passphrase changed; no file was re-encrypted.")
    return EXIT_OK


def cmd_mount(args) -> int:
    from . import mount

    _, settings = settings_of(args)
    options = mount.parse_options(args.options or [])
    for name in sorted(set(options) & (config.FIELDS - {"url"})):  # a volume setting as a mount option
        setattr(settings, name, config.from_text(name, options.pop(name), f"-o {name}"))
    for name in (
        "cache_dir",
        "cache_size",
        "min_free",
        "staging_size",
        "writeback_delay",
        "fsync",
        "attr_ttl",
        "lease_duration",
    ):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if settings.cache_dir:  # the mount process works from "/": a relative path would move
        settings.cache_dir = os.path.abspath(os.path.expanduser(settings.cache_dir))
    if "debug" in options and not args.log_names:
        raise UsageError("-o debug logs every file name in plaintext; add --log-names to allow that")
    mountpoint = mount.check_mountpoint(args.mountpoint, nonempty=bool(options.get("nonempty")))
    store, target = open_target(args, settings=settings)
    if target.parts:
        raise UsageError("mount the volume root (a URL without a path inside the volume)")
    if options.get("allow_other"):
        options["default_permissions"] = True
    root = localstate.cache_dir(store.vol.volume_id, settings.cache_dir)
    logs.configure(args.verbose, args.log_names, logging.INFO)
    log_file = os.path.abspath(args.log_file) if args.log_file else None
    code = mount.daemonize_and_run(
        store,
        settings,
        mountpoint,
        options,
        args.foreground,
        log_file or (None if args.foreground else os.path.join(root, "mount.log")),
        syslog=args.syslog,
        break_lease=args.break_lease,
        shared=args.shared,
    )
    if code == 0 and not args.foreground and not args.quiet:
        print(f"Mounted {store.vol.url.rstrip('/')} on {mountpoint}", file=sys.stderr)
    return code


def cmd_umount(args) -> int:
    from . import mount

    return mount.unmount(args.mountpoint, args.timeout, args.quiet)


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _rate(r: float | None) -> str:
    return "-" if r is None else f"{r:.0%}"


def cmd_status(args) -> int:
    from . import control

    mountpoint = os.path.abspath(args.mountpoint)
    if not os.path.ismount(mountpoint):
        raise UsageError(f"{mountpoint} is not mounted")
    st = control.request(mountpoint, "status")
    if args.json:
        print(json.dumps(st, indent=2))
        return EXIT_OK
    p, c = st["pending"], st["cache"]
    print(f"volume:       {st['volume']} ({'read-only' if st['read_only'] else 'read-write'})")
    print(f"mounted on:   {st['mountpoint']} (pid {st['pid']}, {st['state']})")
    print(f"up since:     {_when(st['started'])} ({datetime.timedelta(seconds=int(st['uptime']))})")
    oldest = f", oldest {p['oldest_age']:.0f} s old" if p["oldest"] is not None else ""
    print(f"pending:      {p['files']} file(s), {human(p['bytes'])}{oldest}")
    print(f"uploading:    {st['uploads_in_flight']} now; {st['open_modified']} open file(s) changed")
    print(
        f"cache:        memory {human(c['memory_bytes'])} of {human(c['memory_limit'])}, "
        f"hit rate {_rate(c['memory_hit_rate'])}; disk {human(c['disk_bytes'])} of "
        f"{human(c['disk_limit'])}, hit rate {_rate(c['disk_hit_rate'])}"
    )
    requests = ", ".join(f"{k} {v}" for k, v in st["requests"].items()) or "none"
    print(f"requests:     {requests}")
    print(f"retries:      {st['retries']}; failed requests: {st['failed_requests']}; errors logged: {st['errors']}")
    if st["last_error"]:
        print(f"last error:   {_when(st['last_error']['time'])}: {st['last_error']['message']}")
    return EXIT_OK


# ---------------------------------------------------------------- parser


class Parser(argparse.ArgumentParser):
    """A command-line mistake is one line and the usage exit code, like every other error."""

    def error(self, message):
        print(f"cryptfs: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def number(kind: type, low: float, high: float | None, flag: str):
    """An argparse type: a number in [low, high]; out of range is a UsageError naming the flag."""
    return lambda text: config.parse_number(text, kind, low, high, flag)


def setting(name: str):
    """An argparse type for a flag that overrides the config setting `name`, checked alike."""
    return number(*config.NUMBERS[name], "--" + name.replace("_", "-"))


def size(flag: str):
    """An argparse type: a size in bytes, with or without a unit (config.parse_size)."""
    return lambda text: config.parse_size(text, flag)


def block_size(text: str) -> int:
    size = config.parse_number(text, int, 1 << 12, 1 << 24, "--block-size")
    if size & (size - 1):
        raise UsageError(f"--block-size must be a power of two from 4096 to 16777216, not {size}")
    return size


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    g = common.add_argument_group("volume access")
    g.add_argument(
        "--config",
        metavar="FILE",
        help="YAML config with named volumes (default $CRYPTFS_CONFIG or ~/.config/cryptfs/config.yaml)",
    )
    g.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint (MinIO, Ceph, moto, ...)")
    g.add_argument("--region", help="S3 region")
    g.add_argument("--profile", help="AWS profile for credentials")
    g.add_argument("--path-style", action="store_true", help="path-style S3 addressing")
    g.add_argument("--no-verify-tls", action="store_true", help="do not verify the endpoint's TLS certificate")
    g.add_argument("--retry-mode", choices=["standard", "adaptive"], help="botocore retry mode")
    g.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE")
    g.add_argument("--owner-fingerprint", metavar="FP", help="refuse a volume signed by another owner key")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    g.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    g.add_argument(
        "--log-names",
        action="store_true",
        help="let plaintext file names into log records, for debugging (they are left out otherwise, at every level)",
    )

    parser = Parser(
        prog="cryptfs",
        description="End-to-end encrypted files on S3 or a local directory.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cryptfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name, func, help_text, example, writes=False):
        p = sub.add_parser(
            name,
            parents=[common],
            help=help_text,
            description=help_text,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        if writes:
            p.add_argument(
                "--break-lease",
                action="store_true",
                help="take the volume's lease even from a read-write mount that holds it or did not "
                "release it (that mount's unfinished uploads are then kept aside, never replayed)",
            )
        return p

    url_help = "s3://bucket/prefix[/path], file:///dir[/path], or a configured volume name[/path]"
    p = add(
        "init",
        cmd_init,
        "create a volume (asks the new passphrase twice)",
        "cryptfs init s3://my-bucket/vault --endpoint-url http://127.0.0.1:9000",
    )
    p.add_argument("url", help="where the volume goes: s3://bucket[/prefix] or file:///dir")
    p.add_argument(
        "--block-size",
        type=block_size,
        default=fmt.DEFAULT_BLOCK_SIZE,
        help="plaintext block size: a power of two from 4 KiB to 16 MiB (default 64 KiB)",
    )
    p.add_argument(
        "--rsa-bits",
        type=number(int, keys.MIN_RSA_BITS, keys.MAX_RSA_BITS, "--rsa-bits"),
        default=keys.DEFAULT_RSA_BITS,
        help=f"RSA key size, {keys.MIN_RSA_BITS} to {keys.MAX_RSA_BITS} (default {keys.DEFAULT_RSA_BITS})",
    )

    p = add("info", cmd_info, "show a volume's keys, format and settings", "cryptfs info s3://my-bucket/vault")
    p.add_argument("url", help=url_help)

    p = add("ls", cmd_ls, "list a directory", "cryptfs ls -l s3://my-bucket/vault/docs")
    p.add_argument("url", help=url_help)
    p.add_argument("-l", "--long", action="store_true", help="mode, owner, size, mtime")
    p.add_argument("-R", "--recursive", action="store_true", help="list subdirectories too")

    p = add(
        "put",
        cmd_put,
        "upload files or directory trees (recursive)",
        "cryptfs put ~/Documents s3://my-bucket/vault/docs",
        writes=True,
    )
    p.add_argument("sources", nargs="+", help="local files or directories")
    p.add_argument("url", help="destination in the volume (a directory, or the new name)")

    p = add("get", cmd_get, "download a file or directory tree", "cryptfs get s3://my-bucket/vault/docs/report.pdf .")
    p.add_argument("url", help=url_help)
    p.add_argument("dest", help="local destination")

    p = add("cat", cmd_cat, "write a file's contents to stdout", "cryptfs cat s3://my-bucket/vault/docs/notes.txt")
    p.add_argument("url", help=url_help)

    p = add("mkdir", cmd_mkdir, "create a directory", "cryptfs mkdir -p s3://my-bucket/vault/a/b", True)
    p.add_argument("url", help=url_help)
    p.add_argument("-p", "--parents", action="store_true", help="create missing parents; no error if it exists")

    p = add("rm", cmd_rm, "remove a file (or a tree with -r)", "cryptfs rm -r s3://my-bucket/vault/old", True)
    p.add_argument("url", help=url_help)
    p.add_argument("-r", "--recursive", action="store_true", help="remove directories and their contents")

    p = add("rmdir", cmd_rmdir, "remove an empty directory", "cryptfs rmdir s3://my-bucket/vault/empty", True)
    p.add_argument("url", help=url_help)

    p = add(
        "mv",
        cmd_mv,
        "rename or move within a volume",
        "cryptfs mv s3://my-bucket/vault/a.txt s3://my-bucket/vault/docs/",
        writes=True,
    )
    p.add_argument("url", help=url_help)
    p.add_argument("dest", help="destination URL in the same volume")

    p = add(
        "decrypt",
        cmd_decrypt,
        "decrypt a whole volume (or a subtree) to a local folder; resumable",
        "cryptfs decrypt s3://my-bucket/vault ./restore",
    )
    p.add_argument("url", help=url_help)
    p.add_argument("dest", help="local folder")

    p = add(
        "fsck",
        cmd_fsck,
        "verify every entry, attribute and block; exit 5 when problems are found",
        "cryptfs fsck s3://my-bucket/vault",
        writes=True,
    )
    p.add_argument("url", help=url_help)
    p.add_argument(
        "--repair",
        action="store_true",
        help="fix what is provably this volume's: remove stale entries and empty orphaned "
        "directories, link other orphaned directories into /lost+found, abort our "
        "unfinished uploads (run with the volume unmounted)",
    )
    p.add_argument(
        "--abort-uploads",
        action="store_true",
        help="abort every unfinished multipart upload under the volume's prefix, ours or not",
    )

    p = add(
        "passwd", cmd_passwd, "change the passphrase (nothing is re-encrypted)", "cryptfs passwd s3://my-bucket/vault"
    )
    p.add_argument("url", help=url_help)
    p.add_argument(
        "--new-passphrase-file",
        metavar="FILE",
        help="read the new passphrase from FILE (or set $CRYPTFS_NEW_PASSPHRASE)",
    )
    p = add(
        "mount",
        cmd_mount,
        "mount a volume as a directory (returns once mounted; -f stays in front)",
        "cryptfs mount s3://my-bucket/vault ~/secure --endpoint-url http://127.0.0.1:9000",
    )
    p.add_argument("url", help="the volume: s3://bucket[/prefix], file:///dir, or a configured volume name")
    p.add_argument("mountpoint", help="an existing empty directory")
    p.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="stay in the foreground (as a systemd Type=notify service: READY=1 once mounted), log to stderr",
    )
    p.add_argument(
        "--log-file",
        metavar="FILE",
        help="log here, rotated at 10 MiB, 3 kept (default <cache dir>/<volume id>/mount.log; with -f, stderr)",
    )
    p.add_argument("--syslog", action="store_true", help="log to syslog (/dev/log, facility daemon) instead")
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        metavar="OPT[,OPT...]",
        help="mount options: any volume setting of the config file as KEY=VALUE (cache_size=2GiB, "
        "passphrase_file=FILE, endpoint_url=URL, ...), ro, allow_other, nonempty, and other FUSE options",
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="base of the volumes' local state: each volume's block cache, staging files, journal and mount.log "
        "go in DIR/<volume id> (default ~/.cache/cryptfs)",
    )
    p.add_argument(
        "--cache-size",
        type=size("--cache-size"),
        metavar="SIZE",
        help="bound of the ciphertext block cache on disk, with a unit: 512MiB, 2GiB (default 2GiB; 0: none)",
    )
    p.add_argument(
        "--min-free",
        type=size("--min-free"),
        metavar="SIZE",
        help="free space to leave on the cache directory's disk: writes get ENOSPC and the block cache "
        "shrinks below it (default 0: until the disk is full)",
    )
    p.add_argument(
        "--staging-size",
        type=size("--staging-size"),
        metavar="SIZE",
        help="bound of the staging files (files written and not yet uploaded): a write beyond it waits "
        "while closed files upload, and gets ENOSPC if files still open fill it (default: none)",
    )
    p.add_argument(
        "--writeback-delay", type=setting("writeback_delay"), help="seconds after close before uploading (default 2)"
    )
    p.add_argument(
        "--fsync",
        choices=["upload", "journal"],
        help="what fsync waits for: the upload to S3 (default) or the local journal",
    )
    p.add_argument(
        "--attr-ttl", type=setting("attr_ttl"), help="seconds listings and attributes are trusted (default 5)"
    )
    p.add_argument(
        "--lease-duration",
        type=setting("lease_duration"),
        metavar="S",
        help="seconds the read-write lease lasts unrenewed (default 60, renewed every third; at least 3)",
    )
    p.add_argument(
        "--shared",
        action="store_true",
        help="several read-write mounts (machines) on one volume: every commit is conditional, a lost "
        "race keeps both versions (a conflict copy); refused on an endpoint without conditional writes",
    )
    p.add_argument(
        "--break-lease",
        action="store_true",
        help="take the volume's lease even from a live holder: if that mount still runs, both may "
        "write until its next renewal; its pending uploads are not replayed",
    )

    p = sub.add_parser(
        "umount",
        help="unmount, waiting until pending uploads are done",
        description="unmount, waiting until pending uploads are done",
        epilog="example:\n  cryptfs umount ~/secure",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=cmd_umount, verbose=False, log_names=False)
    p.add_argument("mountpoint", help="where the volume is mounted")
    p.add_argument(
        "--timeout", type=number(float, 0, None, "--timeout"), help="give up waiting after this many seconds"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")

    p = sub.add_parser(
        "status",
        help="what a mount is doing: pending uploads, cache, requests, errors",
        description="what a mount is doing: pending uploads, cache, requests, errors "
        "(asked of the mount process through its control socket; exit 2 when nothing is mounted there, "
        "1 when the mount does not answer)",
        epilog="example:\n  cryptfs status ~/secure --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=cmd_status, verbose=False, log_names=False)
    p.add_argument("mountpoint", help="where the volume is mounted")
    p.add_argument("--json", action="store_true", help="every field as JSON, for scripts")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    commands = next(a for a in parser._actions if a.dest == "command").choices or {}
    if len(argv) >= 2 and argv[0] not in commands and not argv[0].startswith("-") and os.path.isdir(argv[1]):
        from . import mounthelper  # `cryptfs SOURCE MOUNTPOINT -o ...`: how mount.fuse3 runs a fuse.cryptfs mount

        return mounthelper.main(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) and EXIT_USAGE
    except UsageError as exc:  # a value the type check of its flag refused
        print(f"cryptfs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    logs.configure(args.verbose, args.log_names)
    try:
        with contextlib.ExitStack() as args.held:  # what the command holds (its lease) until it ends
            return args.func(args)
    except CryptfsError as exc:
        print(f"cryptfs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cryptfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except OSError as exc:
        print(f"cryptfs: error: {exc.strerror or exc}{': ' + exc.filename if exc.filename else ''}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
