"""Exception hierarchy, with the errno (FUSE boundary) and exit code (CLI boundary) of each.

This is the one mapping: the mount returns an error's `errno` (fs.op turns it into the
OSError FUSE expects) and the CLI exits with its `exit_code`; nothing else picks either.
"""

import errno

# Exit codes of the cryptfs command; docs and README repeat this table.
EXIT_OK = 0
EXIT_ERROR = 1  # anything not listed below
EXIT_USAGE = 2  # bad command line
EXIT_AUTH = 3  # wrong passphrase, key that does not match
EXIT_NOT_FOUND = 4  # volume, bucket, path missing
EXIT_INTEGRITY = 5  # tampered, foreign or undecryptable data; fsck found problems
EXIT_NETWORK = 6  # endpoint unreachable
EXIT_ACCESS = 7  # no credentials, access denied
EXIT_EXISTS = 8  # init over a volume, target exists
EXIT_NO_SPACE = 9  # local disk full
EXIT_IN_USE = 10  # the volume's lease is held by another read-write mount; the cache dir is in use


class CryptfsError(Exception):
    """Base of every error cryptfs reports to a user."""

    errno = errno.EIO
    exit_code = EXIT_ERROR

    def about(self, where: str) -> "CryptfsError":
        """This error, its message led by the path it concerns: for what a command prints,
        never for log records (they name no plaintext path)."""
        self.args = (f"{where}: {self}",)
        return self


class UsageError(CryptfsError):
    errno = errno.EINVAL
    exit_code = EXIT_USAGE


class FormatError(CryptfsError):
    """Bytes that are not (or not this version of) the cryptfs format."""

    errno = errno.EIO
    exit_code = EXIT_INTEGRITY


class IntegrityError(CryptfsError):
    """Authentication failed: tampered, truncated, swapped or foreign data."""

    errno = errno.EIO
    exit_code = EXIT_INTEGRITY


class NameTooLong(CryptfsError):
    errno = errno.ENAMETOOLONG
    exit_code = EXIT_USAGE


class WrongPassphrase(CryptfsError):
    errno = errno.EACCES
    exit_code = EXIT_AUTH


class KeyMismatch(CryptfsError):
    """The bucket's volume config does not match the keys this side knows."""

    errno = errno.EACCES
    exit_code = EXIT_AUTH


class NotFound(CryptfsError):
    errno = errno.ENOENT
    exit_code = EXIT_NOT_FOUND


class VolumeNotFound(NotFound):
    pass


class BucketNotFound(NotFound):
    pass


class AlreadyExists(CryptfsError):
    errno = errno.EEXIST
    exit_code = EXIT_EXISTS


class PreconditionFailed(CryptfsError):
    """A conditional write lost a race (If-Match / If-None-Match)."""

    errno = errno.EAGAIN
    exit_code = EXIT_ERROR


class InvalidArgument(CryptfsError):
    """A call this filesystem does not accept in that form (RENAME_EXCHANGE, readlink of a file)."""

    errno = errno.EINVAL
    exit_code = EXIT_USAGE


class NotPermitted(CryptfsError):
    """What POSIX forbids outright (a hard link to a directory, an unknown node type)."""

    errno = errno.EPERM
    exit_code = EXIT_ACCESS


class Unsupported(CryptfsError):
    """What the volume cannot store (extended attributes)."""

    errno = errno.ENOTSUP
    exit_code = EXIT_ERROR


class BadHandle(CryptfsError):
    errno = errno.EBADF
    exit_code = EXIT_ERROR


class FileTooLarge(CryptfsError):
    """Larger than the largest file whose object the bucket can hold."""

    errno = errno.EFBIG
    exit_code = EXIT_USAGE


class Busy(CryptfsError):
    """The root cannot be renamed, removed or replaced."""

    errno = errno.EBUSY
    exit_code = EXIT_USAGE


class NotADirectory(CryptfsError):
    errno = errno.ENOTDIR
    exit_code = EXIT_USAGE


class IsADirectory(CryptfsError):
    errno = errno.EISDIR
    exit_code = EXIT_USAGE


class DirectoryNotEmpty(CryptfsError):
    errno = errno.ENOTEMPTY
    exit_code = EXIT_USAGE


class AccessDenied(CryptfsError):
    errno = errno.EACCES
    exit_code = EXIT_ACCESS


class NoCredentials(AccessDenied):
    pass


class Unreachable(CryptfsError):
    errno = errno.EIO
    exit_code = EXIT_NETWORK


class BackendError(CryptfsError):
    errno = errno.EIO
    exit_code = EXIT_ERROR


class UploadFailed(BackendError):
    """A file's upload failed; it stays in the journal and is retried."""


class NoSpace(CryptfsError):
    errno = errno.ENOSPC
    exit_code = EXIT_NO_SPACE


class InUse(CryptfsError):
    """The volume's lease is held by another read-write mount, or a cache directory is in use."""

    errno = errno.EBUSY
    exit_code = EXIT_IN_USE


class ReadOnly(CryptfsError):
    """A write-only or read-only side asked to do what it cannot."""

    errno = errno.EROFS
    exit_code = EXIT_ACCESS
