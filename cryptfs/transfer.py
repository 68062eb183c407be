"""Copying between local files and a volume: put, get and whole-volume decrypt (resumable).

Plaintext only streams through memory: uploads encrypt while reading, downloads decrypt
into a partial file next to the destination, renamed into place when complete.
"""

import errno
import hashlib
import os
import stat
import sys
from dataclasses import dataclass, field

from . import format as fmt
from .errors import EXIT_INTEGRITY, CryptfsError, IsADirectory, NoSpace, NotADirectory, NotFound
from .progress import Bar
from .store import Entry, Store, entry_attrs, now_ns

PARTIAL_SUFFIX = ".cryptfs-partial"
NAME_MAX = 255


def partial_path(dest: str) -> str:
    """Where a download is written before it is renamed to `dest`: next to it, and still a
    valid name when `dest`'s own name is near the 255-byte limit."""
    directory, base = os.path.split(dest)
    name = os.fsencode(base) + PARTIAL_SUFFIX.encode()
    if len(name) > NAME_MAX:
        name = b"." + hashlib.sha256(os.fsencode(base)).hexdigest()[:32].encode() + PARTIAL_SUFFIX.encode()
    return os.path.join(directory, os.fsdecode(name))


def attrs_of(st: os.stat_result) -> fmt.Attrs:
    return fmt.Attrs(st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, now_ns())


# ---------------------------------------------------------------- put


def put_path(store: Store, src: str, parent: Entry, name: bytes, quiet: bool = False) -> int:
    """Upload a file, symlink or directory tree as `name` in directory `parent`; returns files sent."""
    st = os.lstat(src)
    existing = _lookup(store, parent, name)
    if stat.S_ISDIR(st.st_mode):
        if existing is None:
            existing = store.mkdir(parent.obj_id, name, attrs_of(st))
        elif not existing.is_dir:
            raise NotADirectory(f"{name.decode(errors='replace')} exists and is not a directory")
        sent = 0
        for child in sorted(os.listdir(src)):
            sent += put_path(store, os.path.join(src, child), existing, os.fsencode(child), quiet)
        return sent
    if existing is not None and existing.is_dir:
        raise IsADirectory(f"{name.decode(errors='replace')} is a directory")
    if stat.S_ISLNK(st.st_mode):
        store.write_bytes(parent.obj_id, name, os.fsencode(os.readlink(src)), attrs_of(st), existing)
        return 1
    if not stat.S_ISREG(st.st_mode):
        print(f"cryptfs: skipping {src}: not a regular file, directory or symlink", file=sys.stderr)
        return 0
    with open(src, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        bar = Bar(src, size, quiet)
        try:
            store.write_stream(parent.obj_id, name, f, size, attrs_of(st), existing, progress=bar.advance)
        finally:
            bar.close()
    return 1


def _lookup(store: Store, parent: Entry, name: bytes) -> Entry | None:
    try:
        return store.lookup(parent.obj_id, name)[0]
    except NotFound:
        return None


# ---------------------------------------------------------------- get and decrypt


@dataclass
class Restored:
    """What a decrypt did: files written, and files it could not restore with the reason."""

    written: int = 0
    failed: list[tuple[str, CryptfsError]] = field(default_factory=list)  # (volume path, error)


def get_entry(
    store: Store, entry: Entry, dest: str, where: str, quiet: bool = False, restored: Restored | None = None
) -> int:
    """Download an entry (recursively for directories) to local path `dest`; returns files
    written. `where` is the entry's path in the volume, for messages.

    With `restored` (decrypt) files that already hold what the volume says (same size and
    mtime) are skipped, and a file or entry whose data fails its checks is recorded there
    and skipped, so the rest is restored and a rerun retries just those; otherwise the
    first error ends the download.
    """
    if entry.is_dir:
        os.makedirs(dest, exist_ok=True)
        written = 0
        skipped: list[tuple[bytes, CryptfsError]] | None = [] if restored is not None else None
        children = store.list_entries(entry.obj_id, skipped)
        for name, exc in skipped or ():
            if restored is not None:
                restored.failed.append((_join(where, name), exc))
        for child in sorted(children, key=lambda e: e.name):
            written += get_entry(
                store, child, os.path.join(dest, os.fsdecode(child.name)), _join(where, child.name), quiet, restored
            )
        _apply_attrs(dest, entry.attrs, follow=True)
        return written
    if restored is not None and _unchanged(dest, entry):
        return 0
    try:
        _get_file(store, entry, dest, quiet)
    except CryptfsError as exc:
        if restored is None or exc.exit_code != EXIT_INTEGRITY:
            raise exc.about(where) from None
        restored.failed.append((where, exc))
        return 0
    if restored is not None:
        restored.written += 1
    return 1


def _join(where: str, name: bytes) -> str:
    return where.rstrip("/") + "/" + name.decode(errors="replace")


def _get_file(store: Store, entry: Entry, dest: str, quiet: bool) -> None:
    """One file or symlink to `dest`, written under a temporary name and renamed into place
    when complete, so a partly written file never stands under the real name."""
    if entry.is_symlink or entry.is_special:
        if os.path.lexists(dest):
            os.unlink(dest)
        attrs = entry_attrs(entry)
        if entry.is_symlink:
            os.symlink(store.read_all(entry), dest)
        else:
            try:
                os.mknod(dest, attrs.mode, attrs.rdev)
            except PermissionError:  # device nodes need root
                print(f"cryptfs: skipping {dest}: making a device node needs root", file=sys.stderr)
                return
        _apply_attrs(dest, attrs, follow=not entry.is_symlink)
        return
    partial = partial_path(dest)
    bar = Bar(os.fsdecode(entry.name), entry.size, quiet)
    try:
        with open(partial, "wb") as out:
            for chunk in store.iter_plain(entry):
                out.write(chunk)
                bar.advance(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        bar.close()
        _apply_attrs(partial, entry.attrs, follow=True)
        os.replace(partial, dest)
    except OSError as exc:
        _discard(partial)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"local disk full while writing {dest}; nothing was left behind") from None
        raise
    except BaseException:
        _discard(partial)
        raise
    finally:
        bar.close()


def _unchanged(dest: str, entry: Entry) -> bool:
    """Whether `dest` already holds this entry (resumed decrypt): same size and mtime."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return False
    return st.st_mtime_ns == entry_attrs(entry).mtime_ns and (entry.is_symlink or st.st_size == entry.size)


def _apply_attrs(path: str, attrs: fmt.Attrs | None, follow: bool) -> None:
    if attrs is None:
        return
    if follow:  # symlinks have no mode of their own on Linux
        os.chmod(path, stat.S_IMODE(attrs.mode))
    if os.geteuid() == 0:
        try:
            os.chown(path, attrs.uid, attrs.gid, follow_symlinks=follow)
        except OSError:
            pass
    os.utime(path, ns=(attrs.mtime_ns, attrs.mtime_ns), follow_symlinks=follow)


def _discard(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
