"""mount.cryptfs: what mount(8) runs for `mount -t cryptfs` and for an /etc/fstab line;
umount.fuse.cryptfs: what umount(8) runs for such a mount.

mount(8) calls `mount.cryptfs SOURCE MOUNTPOINT [-sfnvrw] [-N NS] [-o OPTIONS]` with no
PATH and HOME=/root. This turns that into `cryptfs mount`: every volume setting is an -o
option (`endpoint_url=...,cache_size_mb=512,passphrase_file=...`), `config=FILE` names the
config file, `log_file=FILE` and `syslog` say where the log goes, options meant for
mount(8) or systemd are dropped, the rest go to FUSE. The defaults that would follow HOME
are fixed places instead: /etc/cryptfs/config.yaml, /var/cache/cryptfs and
/var/lib/cryptfs for root. umount(8) calls `umount.fuse.cryptfs MOUNTPOINT [-flnrv]`: that
is `cryptfs umount`, which waits for the uploads.
"""

import os
import sys

from . import cli, control, mount

# options mount(8), systemd and fstab tooling act on themselves; never for FUSE
IGNORED = {"_netdev", "nofail", "auto", "noauto", "user", "users", "nouser", "owner", "group", "defaults", "rw"}
IGNORED_PREFIXES = ("x-", "comment=", "_")
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def translate(argv: list[str]) -> list[str]:
    """mount(8)'s arguments -> `cryptfs mount` arguments."""
    positional: list[str] = []
    options: list[str] = []
    flags: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "-o":
            options.extend(o for o in next(args, "").split(",") if o)
        elif arg.startswith("-o"):
            options.extend(o for o in arg[2:].split(",") if o)
        elif arg in ("-N", "-t"):
            next(args, None)  # a mount namespace, or the type (we know it)
        elif arg.startswith("-") and len(arg) > 1:
            for letter in arg[1:]:
                if letter == "v":
                    flags.append("-v")
                elif letter == "r":
                    options.append("ro")
                # s (sloppy), f (fake), n (no mtab), w (read-write): nothing to do
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise SystemExit("usage: mount.cryptfs SOURCE MOUNTPOINT [-o OPTIONS]  (see cryptfs mount --help)")
    out = ["mount", *positional, *(flags or ["-q"])]  # mount(8) helpers say nothing on success
    kept = []
    for option in options:
        key, _, value = option.partition("=")
        if option in IGNORED or option.startswith(IGNORED_PREFIXES):
            continue
        if key in ("config", "log_file"):
            out += ["--" + key.replace("_", "-"), value]
        elif option == "syslog":
            out.append("--syslog")
        else:
            kept.append(option)
    if kept:
        out += ["-o", ",".join(kept)]
    return out


def main(argv: list[str] | None = None) -> int:
    args = translate(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("PATH", SAFE_PATH)
    if os.geteuid() == 0:  # HOME is /root under mount(8), and may be unset under systemd
        os.environ.update(XDG_CONFIG_HOME="/etc", XDG_CACHE_HOME="/var/cache", XDG_STATE_HOME="/var/lib")
    return cli.main(args)


def umount_main(argv: list[str] | None = None) -> int:
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    if len(args) != 1:
        raise SystemExit("usage: umount.fuse.cryptfs MOUNTPOINT")
    os.environ.setdefault("PATH", SAFE_PATH)
    if not os.path.exists(control.socket_path(args[0])):  # no mount process: detach what is left
        return os.spawnv(os.P_WAIT, mount.fusermount(), ["fusermount", "-u", args[0]])
    return cli.main(["umount", args[0]])


if __name__ == "__main__":
    sys.exit(main())
