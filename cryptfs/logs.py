"""Log records: levels, and the one switch that lets plaintext names into them.

Log records (the mount log, what -v prints) never hold plaintext names, contents or
credentials: code that would name a file logs its object key, or `shown(path)`, which is a
placeholder unless --log-names was given. The HTTP libraries stay at WARNING or above at
every level, since their debug lines carry request headers (SigV4 Authorization).
"""

import logging
import logging.handlers
import os
import sys
import threading

from . import localstate
from .errors import UsageError

HTTP_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")
FUSE_LOGGER = "fuse"  # mfusepy: logs each failing operation's arguments (paths) at debug level
LIBFUSE_LOGGER = "libfuse"  # what libfuse (and anything else) writes to the mount process's stderr
# a log file of the mount: every line says when, which process, how serious
FILE_FORMAT = "%(asctime)s cryptfs[%(process)d]: %(levelname)s: %(message)s"
SYSLOG_FORMAT = "cryptfs[%(process)d]: %(levelname)s: %(message)s"
ROTATE_BYTES = 10 << 20  # a mount log is rotated at this size, keeping ROTATE_KEEP old ones
ROTATE_KEEP = 3
SYSLOG_SOCKET = "/dev/log"
# libfuse says this on every mount (its default thread limit is out of its own range): noise
LIBFUSE_NOISE = ("Ignoring invalid max threads value",)

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


class PrivateRotatingFile(logging.handlers.RotatingFileHandler):
    """A rotated log file, each one opened as local state (0600, ours, not a symlink)."""

    def _open(self):
        return os.fdopen(localstate.private_file(self.baseFilename, os.O_WRONLY | os.O_APPEND), "a", encoding="utf-8")


def send_to(log_file: str | None, syslog: bool) -> None:
    """Send every record to `log_file` (rotated) or to syslog instead of stderr."""
    if syslog:
        if not os.path.exists(SYSLOG_SOCKET):
            raise UsageError(f"--syslog: no syslog socket at {SYSLOG_SOCKET} (is a syslog daemon running?)")
        handler: logging.Handler = logging.handlers.SysLogHandler(
            SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
        handler.setFormatter(logging.Formatter(SYSLOG_FORMAT))
    elif log_file:
        handler = PrivateRotatingFile(log_file, maxBytes=ROTATE_BYTES, backupCount=ROTATE_KEEP)
        handler.setFormatter(logging.Formatter(FILE_FORMAT))
    else:
        return
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    logging.raiseExceptions = False  # a record that cannot be written is dropped, not printed to stderr


class StderrToLog:
    """Lines written to file descriptors 1 and 2 (libfuse's messages, a crash's traceback)
    become log records, so the log file has one format. `last` keeps libfuse's latest line,
    the reason a mount failed."""

    def __init__(self, foreground: bool = False):
        self.last = ""
        self._log = logging.getLogger(LIBFUSE_LOGGER)
        # in the foreground, records still go to the real stderr, and it is back after close()
        self._saved = (os.dup(1), os.dup(2)) if foreground else None
        if self._saved is not None:
            for handler in logging.getLogger().handlers:
                if type(handler) is logging.StreamHandler and handler.stream is sys.stderr:
                    handler.setStream(os.fdopen(os.dup(self._saved[1]), "w", buffering=1))
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._reader = os.fdopen(read_fd, "r", encoding="utf-8", errors="replace")
        self._thread = threading.Thread(target=self._forward, name="stderr", daemon=True)
        self._thread.start()

    def _forward(self) -> None:
        for line in self._reader:
            line = line.rstrip()
            if not line:
                continue
            if line.startswith(LIBFUSE_NOISE):
                self._log.debug("%s", line)
                continue
            self.last = line
            self._log.warning("%s", line)

    def close(self) -> None:
        """Everything written so far is logged (call before the process ends)."""
        sys.stdout.flush()
        sys.stderr.flush()
        out, err = self._saved or (os.open(os.devnull, os.O_WRONLY),) * 2
        os.dup2(out, 1)
        os.dup2(err, 2)
        self._thread.join(2)
