"""Log records: levels, and the one switch that lets plaintext names into them.

Log records (the mount log, what -v prints) never hold plaintext names, contents or
credentials: code that would name a file logs its object key, or `shown(path)`, which is a
placeholder unless --log-names was given. The HTTP libraries stay at WARNING or above at
every level, since their debug lines carry request headers (SigV4 Authorization).
"""

import logging
import os

HTTP_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")
FUSE_LOGGER = "fuse"  # mfusepy: logs each failing operation's arguments (paths) at debug level

_names = False


def configure(verbose: bool, names: bool = False, level: int | None = None) -> None:
    """Log to stderr at DEBUG (verbose) or `level` (default WARNING)."""
    global _names
    _names = names
    logging.basicConfig(format="cryptfs: %(levelname)s: %(message)s")
    logging.getLogger().setLevel(logging.DEBUG if verbose else level or logging.WARNING)
    for name in HTTP_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.CRITICAL)
    logging.getLogger(FUSE_LOGGER).setLevel(logging.DEBUG if names else logging.INFO)
    if names:
        logging.getLogger(__name__).warning("--log-names: file names are written to the log in plaintext")


def shown(path) -> str:
    """A plaintext name or path as a log record may show it: only with --log-names."""
    if not _names:
        return "<name hidden>"
    return os.fsdecode(path) if isinstance(path, bytes) else str(path)
