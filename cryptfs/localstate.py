"""Local state on this machine (cache, journal, mount log, known volumes): private
directories (0700) and files (0600), and a check before anything that exists is reused.

A directory or file made in advance by another user, or one others can write to, is refused:
that user could read the mount log or change the journal and cached state.
"""

import errno
import os
import stat

from .errors import UsageError


def check(path: str, st: os.stat_result) -> None:
    """UsageError unless `path` (with stat `st`) is this user's and nobody else can write to it."""
    if st.st_uid != os.geteuid():
        raise UsageError(f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}); "
                         "refusing to keep local state there")
    if st.st_mode & 0o022:
        raise UsageError(f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                         "refusing to keep local state there")


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
