"""Local state on this machine (cache, journal, mount log, known volumes): private
directories (0700) and files (0600), and a check before anything that exists is reused.

A directory or file made in advance by another user, or one others can write to, is refused:
that user could read the mount log or change the journal and cached state.
"""

import errno
import os
import stat

from .errors import NoSpace, UsageError

# bytes the cache directory's disk keeps free (min_free); set once by the mount
_min_free = 0


def keep_free(nbytes: int) -> None:
    global _min_free
    _min_free = nbytes


def free_bytes(fd_or_path) -> int:
    st = os.fstatvfs(fd_or_path) if isinstance(fd_or_path, int) else os.statvfs(fd_or_path)
    return st.f_bavail * st.f_frsize


def room_for(fd_or_path, nbytes: int) -> bool:
    """Whether writing `nbytes` more there leaves min_free on its disk."""
    return not _min_free or free_bytes(fd_or_path) - nbytes >= _min_free


def check_room(fd: int, nbytes: int) -> None:
    """NoSpace, as from a full disk, when a staging write would go below min_free."""
    if not room_for(fd, nbytes):
        raise NoSpace(f"the cache disk would have less than min_free ({_min_free} bytes) left")


def dir_usage(path: str) -> int:
    """Bytes the files directly in `path` take on disk (holes of sparse files not counted)."""
    total = 0
    with os.scandir(path) as entries:
        for e in entries:
            try:
                if e.is_file(follow_symlinks=False):
                    total += e.stat(follow_symlinks=False).st_blocks * 512
            except FileNotFoundError:  # uploaded and removed meanwhile
                pass
    return total


def check(path: str, st: os.stat_result) -> None:
    """UsageError unless `path` (with stat `st`) is this user's and nobody else can write to it."""
    if st.st_uid != os.geteuid():
        raise UsageError(
            f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}); "
            "refusing to keep local state there"
        )
    if st.st_mode & 0o022:
        raise UsageError(
            f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); refusing to keep local state there"
        )


def private_dir(path: str) -> str:
    """`path`, made 0700 (its parents as ordinary directories), or checked when it exists."""
    try:
        os.mkdir(path, 0o700)
        return path
    except FileNotFoundError:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return private_dir(path)
    except FileExistsError:
        pass
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path} is not a directory")
    check(path, st)
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def private_file(path: str, flags: int) -> int:
    """A descriptor of `path` opened with `flags`, created 0600, or checked when it exists."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(f"{path} is a symbolic link; refusing to keep local state there") from None
        raise
    try:
        st = os.fstat(fd)
        check(path, st)
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def cache_dir(volume_id: str, base: str | None) -> str:
    """The volume's cache directory (block cache, staging, journal, mount log), made private."""
    base = base or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cryptfs")
    return private_dir(os.path.join(private_dir(base), volume_id))
