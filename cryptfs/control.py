"""The control socket: how `cryptfs umount` and `cryptfs status` reach a running mount.

One Unix socket per mount, named by a hash of the mount point under a directory chosen by
the user id alone (/run/cryptfs for root), so any caller finds it whatever its HOME or
other environment. The protocol is JSON lines: the client sends one request, the mount
answers with one line ("status") or, for "wait", a line saying it listens, then a progress
line every half second until the unmount has uploaded what it could, then a last line with
the outcome. The mount process keeps that connection open until it exits, so its end tells
the client that the lease is released and the process gone.
"""

import hashlib
import json
import logging
import os
import socket
import threading
from typing import Callable, Iterator

from . import localstate
from .errors import CryptfsError

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.5


def run_dir() -> str:
    """Where control sockets live: by user id, never by environment."""
    uid = os.geteuid()
    if uid == 0:
        return "/run/cryptfs"
    if os.path.isdir(f"/run/user/{uid}"):
        return f"/run/user/{uid}/cryptfs"
    return f"/tmp/cryptfs-{uid}"


def socket_path(mountpoint: str) -> str:
    digest = hashlib.sha256(os.fsencode(os.path.realpath(mountpoint))).hexdigest()[:24]
    return os.path.join(run_dir(), digest + ".sock")


class Server:
    """Answers requests for one mount. `status()` builds what `cryptfs status` shows; the
    unmount's outcome is `finish(failed)`, which ends every waiting client's stream."""

    def __init__(self, mountpoint: str, status: Callable[[], dict]):
        self.path = socket_path(mountpoint)
        self.status = status
        self.outcome: dict | None = None
        self._finished = threading.Event()
        self._held: list[socket.socket] = []  # answered waiters: closed only by the process's exit
        localstate.private_dir(run_dir())
        _sweep()
        try:
            os.unlink(self.path)  # left by a mount that died (the mount point is not mounted now)
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(8)
        threading.Thread(target=self._accept, name="control", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="control-client", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            request = json.loads(conn.makefile("rb").readline() or b"{}")
            if request.get("op") == "status":
                conn.sendall(_line(self.status()))
            elif request.get("op") == "wait":
                conn.sendall(_line({"waiting": True}))  # the client unmounts only after this
                while not self._finished.wait(PROGRESS_INTERVAL):
                    conn.sendall(_line({"progress": self.status()["pending"]}))
                conn.sendall(_line({"done": self.outcome}))
                self._held.append(conn)
                return
            else:
                conn.sendall(_line({"error": f"unknown request {request!r}"}))
        except (OSError, ValueError) as exc:  # the client went away, or sent no JSON
            log.debug("control client: %s", exc)
        except Exception:  # a status that cannot be built must not end the mount
            log.exception("control request failed")
        conn.close()

    def finish(self, outcome: dict) -> None:
        """The unmount is over: `outcome["failed"]` closed files stay in the journal (None: no
        unmount ran); "files" and "bytes" were to upload when it began."""
        self.outcome = outcome
        self._finished.set()

    def close(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._sock.close()


def _sweep() -> None:
    """Remove the sockets of mounts that died (kill -9, a crash): nobody accepts on them."""
    try:
        names = [n for n in os.listdir(run_dir()) if n.endswith(".sock")]
    except OSError:
        return
    for name in names:
        path = os.path.join(run_dir(), name)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(0.5)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            try:
                os.unlink(path)
                log.info("removed the control socket of a mount that is gone: %s", path)
            except FileNotFoundError:
                pass
        except OSError:
            pass  # alive but busy, or not ours to judge
        finally:
            probe.close()


def _line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


class NoMount(CryptfsError):
    pass


def connect(mountpoint: str, timeout: float | None = 10.0) -> socket.socket:
    path = socket_path(mountpoint)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise NoMount(
            f"no cryptfs mount process answers for {mountpoint} ({path}: {exc.strerror}); "
            "it is not a cryptfs mount of this user, or its process has died"
        ) from None
    return sock


def request(mountpoint: str, op: str) -> dict:
    with connect(mountpoint) as sock:
        sock.sendall(_line({"op": op}))
        line = sock.makefile("rb").readline()
    if not line:
        raise NoMount(f"the mount process of {mountpoint} closed its control socket without answering")
    return json.loads(line)


def wait(sock: socket.socket) -> Iterator[dict]:
    """Ask the mount to report until it ends; once this returns, the mount has taken the
    request, so it reports the outcome of an unmount started now. Then: each line it sends,
    until it closes the connection as it exits."""
    sock.sendall(_line({"op": "wait"}))
    lines = sock.makefile("rb")
    if json.loads(lines.readline() or b"{}") != {"waiting": True}:
        raise NoMount("the mount process did not take the request to report its unmount")
    return (json.loads(line) for line in lines)
