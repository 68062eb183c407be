"""What a running mount counts for `cryptfs status`: storage requests by type, retries,
failed requests, and the errors it logged (the last one with its time).

Counting sits in a backend wrapper, so every request through `Store` is seen once, and in
a logging handler, so "errors" are exactly the ERROR lines of the mount log.
"""

import logging
import threading
import time
from collections import Counter

from .errors import AlreadyExists, NotFound, PreconditionFailed

# what a backend is asked for; everything else passes through uncounted
REQUESTS = ("get", "head", "put", "upload", "copy", "delete", "list", "pending_uploads", "abort_upload")
ORDINARY = (NotFound, PreconditionFailed, AlreadyExists)  # answers, not failures


class Counters:
    def __init__(self):
        self.started = time.time()
        self.requests: Counter[str] = Counter()
        self.failed_requests = 0
        self.retries = 0
        self.errors = 0
        self.last_error: dict | None = None
        self._lock = threading.Lock()

    def request(self, kind: str, failed: bool) -> None:
        with self._lock:
            self.requests[kind] += 1
            self.failed_requests += failed

    def retried(self, attempts: int) -> None:
        with self._lock:
            self.retries += attempts

    def error(self, message: str) -> None:
        with self._lock:
            self.errors += 1
            self.last_error = {"time": time.time(), "message": message}

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "requests": dict(sorted(self.requests.items())),
                "failed_requests": self.failed_requests,
                "retries": self.retries,
                "errors": self.errors,
                "last_error": self.last_error,
            }


class CountingBackend:
    """A backend that counts each request, and each one that failed."""

    def __init__(self, backend, counters: Counters):
        self._backend, self._counters = backend, counters
        hook = getattr(backend, "on_retries", None)
        if hook is not None:
            hook(counters.retried)

    def __getattr__(self, name):
        value = getattr(self._backend, name)
        if name not in REQUESTS:
            return value

        def counted(*args, **kwargs):
            try:
                result = value(*args, **kwargs)
            except ORDINARY:
                self._counters.request(name, False)
                raise
            except Exception:
                self._counters.request(name, True)
                raise
            self._counters.request(name, False)
            return result

        return counted


class ErrorCounter(logging.Handler):
    """Counts the ERROR (and worse) records of the mount log, keeping the last one."""

    def __init__(self, counters: Counters):
        super().__init__(logging.ERROR)
        self.counters = counters

    def emit(self, record: logging.LogRecord) -> None:
        self.counters.error(record.getMessage())
