"""A backend wrapper that can pause, slow or fail requests: for tests and fault drills.

Tests in the same process add rules directly (`FaultPlan.pause/slow/fail`). A mount in
another process reads its rules from the JSON file named by $CRYPTFS_FAULTS, re-read when
it changes, so a test can open and close a window from outside:

    {"rules": [{"ops": ["upload", "put"], "delay": 0.5, "jitter": 0.2,
                "pause_file": "/tmp/hold", "arrived_file": "/tmp/held",
                "fail_rate": 0.0, "key_contains": ""}]}

`pause_file`: requests matching the rule wait while that file exists; `arrived_file` is
created when one starts waiting (so a test knows the request is in flight).
`_lock` guards the rule list; requests wait outside it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field

from ..errors import BackendError
from .base import Backend

log = logging.getLogger(__name__)

# "multipart": a multipart upload was created, before its id reaches the caller and any part is sent
OPS = ("get", "head", "put", "upload", "multipart", "copy", "delete", "list")


@dataclass
class Rule:
    ops: frozenset
    delay: float = 0.0
    jitter: float = 0.0
    fail_rate: float = 0.0
    fail_times: int = 0  # fail the next n matching requests
    gate: threading.Event | None = None  # cleared: matching requests wait
    pause_file: str | None = None
    arrived_file: str | None = None
    arrived: threading.Event = field(default_factory=threading.Event)  # set when a request matched
    key_contains: str = ""
    seen: int = field(default=0)

    def matches(self, op: str, key: str) -> bool:
        return op in self.ops and self.key_contains in key


class FaultPlan:
    def __init__(self, path: str | None = None):
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self._path = path
        self._file_rules: list[Rule] = []
        self._file_stamp: tuple | None = None

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def pause(self, *ops: str, key_contains: str = "") -> Rule:
        """Matching requests wait until `rule.gate` is set; `rule.arrived` tells one is waiting."""
        return self.add(Rule(frozenset(ops), gate=threading.Event(), key_contains=key_contains))

    def slow(self, *ops: str, delay: float, jitter: float = 0.0) -> Rule:
        return self.add(Rule(frozenset(ops), delay=delay, jitter=jitter))

    def fail(self, *ops: str, times: int = 1, rate: float = 0.0) -> Rule:
        return self.add(Rule(frozenset(ops), fail_times=times, fail_rate=rate))

    def clear(self) -> None:
        with self._lock:
            for rule in self._rules:
                if rule.gate is not None:
                    rule.gate.set()
            self._rules.clear()

    def _load_file(self) -> list[Rule]:
        if self._path is None:
            return []
        try:
            st = os.stat(self._path)
        except OSError:
            return []
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._file_stamp:
            try:
                with open(self._path) as f:
                    doc = json.load(f)
                rules = [
                    Rule(
                        frozenset(r.get("ops", OPS)),
                        delay=float(r.get("delay", 0)),
                        jitter=float(r.get("jitter", 0)),
                        fail_rate=float(r.get("fail_rate", 0)),
                        pause_file=r.get("pause_file"),
                        arrived_file=r.get("arrived_file"),
                        key_contains=r.get("key_contains", ""),
                    )
                    for r in doc.get("rules", [])
                ]
            except (OSError, ValueError, AttributeError) as exc:
                log.warning("fault rules in %s unreadable: %s", self._path, exc)
                rules = []
            self._file_rules, self._file_stamp = rules, stamp
        return self._file_rules

    def before(self, op: str, key: str) -> None:
        """Apply every matching rule to one request: wait, sleep, or raise."""
        with self._lock:
            rules = [r for r in self._rules if r.matches(op, key)]
            if self._path:
                rules += [r for r in self._load_file() if r.matches(op, key)]
            fail = False
            for r in rules:
                r.seen += 1
                if r.fail_times > 0:
                    r.fail_times -= 1
                    fail = True
                elif r.fail_rate and random.random() < r.fail_rate:
                    fail = True
        for r in rules:
            r.arrived.set()
            if r.pause_file and os.path.exists(r.pause_file) and r.arrived_file:
                with open(r.arrived_file, "a"):
                    pass
            if r.gate is not None:
                r.gate.wait()
            while r.pause_file and os.path.exists(r.pause_file):
                time.sleep(0.02)
            if r.delay or r.jitter:
                time.sleep(r.delay + random.uniform(0, r.jitter))
        if fail:
            raise BackendError(f"injected failure of {op} {key}")


class FaultyBackend(Backend):
    """Passes every call to `inner` after `plan` has had its say."""

    def __init__(self, inner: Backend, plan: FaultPlan):
        self.inner, self.plan = inner, plan
        self.url = inner.url

    def get(self, key, start=0, end=None, if_match=None):
        self.plan.before("get", key)
        return self.inner.get(key, start, end, if_match)

    def head(self, key):
        self.plan.before("head", key)
        return self.inner.head(key)

    def put(self, key, data, metadata=None, if_none_match=False, if_match=None):
        self.plan.before("put", key)
        return self.inner.put(key, data, metadata, if_none_match, if_match)

    def upload(self, key, stream, size, metadata=None, if_none_match=False, if_match=None, progress=None, started=None):
        self.plan.before("upload", key)

        def begun(upload_id):
            self.plan.before("multipart", key)  # the upload exists; the caller does not know its id yet
            if started:
                started(upload_id)

        return self.inner.upload(key, stream, size, metadata, if_none_match, if_match, progress, begun)

    def copy(self, src, dst, metadata, if_match=None):
        self.plan.before("copy", dst)
        return self.inner.copy(src, dst, metadata, if_match)

    def delete(self, key):
        self.plan.before("delete", key)
        return self.inner.delete(key)

    def list(self, prefix):
        self.plan.before("list", prefix)
        return self.inner.list(prefix)

    def pending_uploads(self, prefix):
        return self.inner.pending_uploads(prefix)

    def abort_upload(self, upload):
        return self.inner.abort_upload(upload)

    def check(self):
        return self.inner.check()

    def close(self):
        return self.inner.close()

    def __getattr__(self, name):  # backend-specific extras (the local backend's root, say)
        return getattr(self.inner, name)


def from_environment(backend: Backend) -> Backend:
    """The backend, wrapped when $CRYPTFS_FAULTS names a rule file."""
    path = os.environ.get("CRYPTFS_FAULTS")
    return FaultyBackend(backend, FaultPlan(path)) if path else backend
