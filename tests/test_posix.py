"""POSIX semantics of a real `-o allow_other` mount, checked as root and as an unprivileged user.

One mount per backend (local directory, moto S3); every test runs twice, its body in a child
process with the credentials of `who`: root, or uid 4242 (groups 4242 and 4343, not 4545).
The kernel checks access (`default_permissions`); the mount keeps what the kernel asks it to
store: types, modes, owners, rdev, times.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import socket
import stat
import tempfile
import time
import traceback

import pytest

from mountlib import MountedVolume, raises_errno, read, run, usable

pytestmark = [pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None
                                 or os.geteuid() != 0, reason="needs /dev/fuse, fusermount3 and root"),
              pytest.mark.usefixtures("hang_guard")]

USER = 4242            # an unprivileged uid (no passwd entry needed)
GROUP = 4343           # a supplementary group of USER
FOREIGN = 4545         # a group USER is not in
OTHER = 4444           # another unprivileged uid
CREDS = {"root": (0, 0, [0]), "user": (USER, USER, [USER, GROUP])}


@pytest.fixture(scope="module")
def posix_mount(volume_factory, volume_kind, tmp_path_factory):
    """One `-o allow_other` mount per backend, its mountpoint reachable by every user."""
    ref = volume_factory(volume_kind)
    base = tempfile.mkdtemp(prefix=f"posix-{volume_kind}-", dir="/tmp")
    os.chmod(base, 0o755)
    m = MountedVolume(ref, os.path.join(base, "mnt"), tmp_path_factory.mktemp("posix-cache"),
                      ("-o", "allow_other"))
    try:
        m.mount()
        os.chmod(m.mountpoint, 0o755)
        yield m
    finally:
        m.force_unmount()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def mnt(posix_mount):
    if not usable(posix_mount.mountpoint):
        posix_mount.force_unmount()
        posix_mount.mount()
    start = posix_mount.log_size()
    yield posix_mount
    problems = posix_mount.log_problems(start)
    assert not problems, "mount log:\n" + "\n".join(problems[:20])


@pytest.fixture(params=sorted(CREDS))
def who(request) -> str:
    return request.param


@pytest.fixture
def work(mnt, request, who) -> str:
    """A fresh directory everyone may write in (no sticky bit), named after the test."""
    path = mnt.path(f"{request.node.originalname}-{who}")
    os.mkdir(path)
    os.chmod(path, 0o777)
    return path


def as_who(who: str, func, *args):
    """func(*args) in a child process with `who`'s credentials; its result or its failure here."""
    uid, gid, groups = CREDS[who]
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only plain system calls, then _exit
        code = 0
        try:
            os.close(rfd)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            os.umask(0)
            out = pickle.dumps(("ok", func(*args)))
        except BaseException:
            out, code = pickle.dumps(("failed", traceback.format_exc())), 1
        with os.fdopen(wfd, "wb") as w:
            w.write(out)
        os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        raw = r.read()
    os.waitpid(pid, 0)
    status, value = pickle.loads(raw)
    assert status == "ok", f"as {who}:\n{value}"
    return value


def attrs(path) -> tuple:
    st = os.lstat(path)
    return stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_rdev


def bind_socket(path) -> None:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(path)
    finally:
        s.close()


# ---------------------------------------------------------------- special files

def test_special_files_are_made_listed_renamed_changed_removed_and_kept(mnt, work, who):
    uid, gid, _ = CREDS[who]

    def make(work):
        os.mkfifo(os.path.join(work, "fifo"), 0o640)
        bind_socket(os.path.join(work, "sock"))
        os.chmod(os.path.join(work, "sock"), 0o755)
        made = ["fifo", "sock"]
        for name, kind, dev in (("chr", stat.S_IFCHR, os.makedev(1, 3)), ("blk", stat.S_IFBLK, os.makedev(8, 1))):
            if who == "root":
                os.mknod(os.path.join(work, name), kind | 0o600, dev)
                made.append(name)
            else:  # making a device node needs CAP_MKNOD
                raises_errno(errno.EPERM, os.mknod, os.path.join(work, name), kind | 0o600, dev)
        return made

    made = as_who(who, make, work)
    expected = {"fifo": (stat.S_IFIFO, 0o640, uid, gid, 0), "sock": (stat.S_IFSOCK, 0o755, uid, gid, 0),
                "chr": (stat.S_IFCHR, 0o600, 0, 0, os.makedev(1, 3)),
                "blk": (stat.S_IFBLK, 0o600, 0, 0, os.makedev(8, 1))}
    expected = {n: expected[n] for n in made}
    assert sorted(os.listdir(work)) == sorted(made)
    assert {n: attrs(os.path.join(work, n)) for n in made} == expected

    def change(work):
        p = os.path.join(work, "fifo")
        with open(os.open(p, os.O_RDWR | os.O_NONBLOCK), "r+b", buffering=0) as pipe:
            pipe.write(b"through the kernel")  # a FIFO on the mount is a pipe: nothing is stored
            assert pipe.read(100) == b"through the kernel"
        os.rename(p, os.path.join(work, "fifo2"))
        os.chmod(os.path.join(work, "fifo2"), 0o604)
        os.chown(os.path.join(work, "fifo2"), -1, GROUP if who == "user" else 7)
        os.unlink(os.path.join(work, "sock"))
        raises_errno(errno.ENOENT, os.lstat, os.path.join(work, "sock"))

    as_who(who, change, work)
    expected["fifo2"] = (stat.S_IFIFO, 0o604, uid, GROUP if who == "user" else 7, 0)
    del expected["fifo"], expected["sock"]
    if who == "root":
        os.rename(os.path.join(work, "chr"), os.path.join(work, "null"))
        os.chown(os.path.join(work, "null"), USER, GROUP)
        expected["null"] = expected.pop("chr")[:2] + (USER, GROUP, os.makedev(1, 3))
    mnt.remount("-o", "allow_other")
    assert sorted(os.listdir(work)) == sorted(expected)
    assert {n: attrs(os.path.join(work, n)) for n in expected} == expected
    for name in expected:
        os.unlink(os.path.join(work, name))
    assert os.listdir(work) == []


# ---------------------------------------------------------------- hard links

def test_hard_links_share_one_file(mnt, work, who):
    def go(work):
        p = lambda *parts: os.path.join(work, *parts)  # noqa: E731
        os.mkdir(p("d"))
        append(p("f"), b"one")
        os.link(p("f"), p("hl"))
        os.link(p("hl"), p("d", "hl2"))
        st = [os.stat(p(n)) for n in ("f", "hl", "d/hl2")]
        assert {s.st_ino for s in st} == {st[0].st_ino} and [s.st_nlink for s in st] == [3, 3, 3]
        append(p("hl"), b" two")                   # written through one name, read through the others
        assert read(p("f")) == read(p("d", "hl2")) == b"one two"
        os.chmod(p("d", "hl2"), 0o640)
        assert stat.S_IMODE(os.stat(p("f")).st_mode) == 0o640
        os.rename(p("hl"), p("hl3"))               # a name moves; the file and its count stay
        os.rename(p("hl3"), p("d", "hl2"))         # two names of one file: nothing happens
        assert os.stat(p("hl3")).st_nlink == 3
        ctime = os.stat(p("hl3")).st_ctime_ns
        time.sleep(0.02)
        os.unlink(p("f"))
        assert os.stat(p("hl3")).st_nlink == 2 and os.stat(p("hl3")).st_ctime_ns > ctime
        with open(p("hl3"), "r+b") as out:         # open under one name while another goes
            os.unlink(p("d", "hl2"))
            out.seek(0, 2)
            out.write(b" three")
        assert read(p("hl3")) == b"one two three" and os.stat(p("hl3")).st_nlink == 1
        append(p("other"), b"replaced")
        os.link(p("hl3"), p("d", "again"))
        os.rename(p("other"), p("d", "again"))     # replacing a name: one link fewer
        assert os.stat(p("hl3")).st_nlink == 1 and read(p("d", "again")) == b"replaced"
        os.link(p("hl3"), p("d", "kept"))
        raises_errno(errno.EEXIST, os.link, p("hl3"), p("d", "kept"))
        raises_errno(errno.EPERM, os.link, p("d"), p("dirlink"))  # directories have one name
        raises_errno(errno.ENOENT, os.link, p("absent"), p("x"))
        os.mkfifo(p("fifo"))
        os.link(p("fifo"), p("fifo2"))
        assert stat.S_ISFIFO(os.lstat(p("fifo2")).st_mode) and os.lstat(p("fifo")).st_nlink == 2
        return os.stat(p("hl3")).st_ino
    ino = as_who(who, go, work)
    mnt.remount("-o", "allow_other")
    names = {"hl3": b"one two three", "d/kept": b"one two three", "d/again": b"replaced"}
    for name, content in names.items():
        assert read(os.path.join(work, name)) == content
    assert os.stat(os.path.join(work, "hl3")).st_ino == os.stat(os.path.join(work, "d", "kept")).st_ino == ino
    assert os.stat(os.path.join(work, "hl3")).st_nlink == 2 and os.lstat(os.path.join(work, "fifo")).st_nlink == 2
    for name in ("hl3", "d/kept", "d/again", "fifo", "fifo2"):
        os.unlink(os.path.join(work, name))
    os.rmdir(os.path.join(work, "d"))
    mnt.umount()
    try:
        mnt.ref.assert_clean()  # nothing left behind: every file went with its last name
    finally:
        mnt.mount("-o", "allow_other")


def test_tools_keep_hard_links(mnt, work, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"shared")
    os.link(src / "a", src / "b")
    for tool in (["cp", "-a", str(src), os.path.join(work, "cp")],
                 ["rsync", "-aH", str(src) + "/", os.path.join(work, "rsync") + "/"]):
        if shutil.which(tool[0]):
            run(*tool)
    run("tar", "-C", str(tmp_path), "-cf", str(tmp_path / "t.tar"), "src")
    os.mkdir(os.path.join(work, "tar"))
    run("tar", "-C", os.path.join(work, "tar"), "-xf", str(tmp_path / "t.tar"))
    for copy in ("cp", "rsync", "tar/src"):
        if os.path.exists(os.path.join(work, copy)):
            a, b = (os.stat(os.path.join(work, copy, n)) for n in "ab")
            assert a.st_ino == b.st_ino and a.st_nlink == 2, copy


# ---------------------------------------------------------------- ownership

def test_chown_rules(mnt, work, who):
    theirs = os.path.join(work, "theirs")
    open(theirs, "wb").close()
    os.chown(theirs, OTHER, OTHER)

    def go(work):
        f = os.path.join(work, "f")
        open(f, "wb").close()
        if who == "root":  # root gives any owner and group
            os.chown(f, OTHER, FOREIGN)
            assert (os.stat(f).st_uid, os.stat(f).st_gid) == (OTHER, FOREIGN)
            os.chown(theirs, USER, -1)
            return
        raises_errno(errno.EPERM, os.chown, f, OTHER, -1)         # only root changes the owner
        raises_errno(errno.EPERM, os.chown, f, -1, FOREIGN)       # not one of the caller's groups
        os.chown(f, -1, GROUP)                                      # the owner picks one of theirs
        os.chown(f, USER, -1)                                       # "changing" to oneself is allowed
        assert (os.stat(f).st_uid, os.stat(f).st_gid) == (USER, GROUP)
        raises_errno(errno.EPERM, os.chown, theirs, -1, GROUP)    # not the owner
    as_who(who, go, work)
    assert os.stat(theirs).st_uid == (USER if who == "root" else OTHER)


def test_suid_and_sgid_are_cleared_on_chown_and_on_write_by_non_owner(mnt, work, who):
    mine, shared = os.path.join(work, "mine"), os.path.join(work, "shared")
    with open(shared, "wb") as out:
        out.write(b"root's")
    os.chown(shared, OTHER, GROUP)
    os.chmod(shared, 0o6777)

    def go(work):
        open(mine, "wb").close()
        os.chmod(mine, 0o6755)
        assert stat.S_IMODE(os.stat(mine).st_mode) == 0o6755
        os.chown(mine, -1, GROUP)
        assert stat.S_IMODE(os.stat(mine).st_mode) == 0o755
        with open(shared, "ab") as out:
            out.write(b" and a non-owner's")
        return stat.S_IMODE(os.stat(shared).st_mode)

    # a writer without CAP_FSETID clears both bits; root keeps them
    assert as_who(who, go, work) == (0o6777 if who == "root" else 0o777)
    mnt.remount("-o", "allow_other")
    assert stat.S_IMODE(os.stat(mine).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(shared).st_mode) == (0o6777 if who == "root" else 0o777)


def test_setgid_directory_gives_its_group(mnt, work, who):
    sgid = os.path.join(work, "sgid")
    os.mkdir(sgid)
    os.chown(sgid, 0, GROUP)
    os.chmod(sgid, 0o2777)

    def go(sgid):
        open(os.path.join(sgid, "f"), "wb").close()
        os.mkdir(os.path.join(sgid, "d"), 0o755)
        os.mkfifo(os.path.join(sgid, "p"))
    as_who(who, go, sgid)
    uid = CREDS[who][0]
    assert attrs(os.path.join(sgid, "f"))[2:4] == (uid, GROUP)
    assert attrs(os.path.join(sgid, "p"))[2:4] == (uid, GROUP)
    assert attrs(os.path.join(sgid, "d"))[1:4] == (0o2755, uid, GROUP)


# ---------------------------------------------------------------- times

def test_ctime_moves_with_every_change(mnt, work, who):
    def go(work):
        f, d, g = os.path.join(work, "f"), os.path.join(work, "d"), os.path.join(work, "d", "g")
        os.mkdir(d)
        append(f, b"x")
        cur = {"f": f, "d": d}
        steps = [("chmod", "f", lambda: os.chmod(cur["f"], 0o600)),
                 ("chown", "f", lambda: os.chown(cur["f"], -1, GROUP if who == "user" else 7)),
                 ("utime", "f", lambda: os.utime(cur["f"], ns=(1, 2))),
                 ("write", "f", lambda: append(cur["f"], b"more")),
                 ("truncate", "f", lambda: os.truncate(cur["f"], 1)),
                 ("rename", "f", lambda: (os.rename(f, g), cur.update(f=g))),
                 ("create in dir", "d", lambda: append(os.path.join(d, "h"), b"")),
                 ("mkfifo in dir", "d", lambda: os.mkfifo(os.path.join(d, "p"))),
                 ("unlink in dir", "d", lambda: os.unlink(os.path.join(d, "p"))),
                 ("chmod dir", "d", lambda: os.chmod(d, 0o700))]
        stuck = []
        for what, which, step in steps:
            before = os.stat(cur[which]).st_ctime_ns
            time.sleep(0.02)
            step()
            if os.stat(cur[which]).st_ctime_ns <= before:
                stuck.append(what)
        return stuck
    assert as_who(who, go, work) == []


def append(path, data: bytes) -> None:
    with open(path, "ab") as out:
        out.write(data)


def test_utimensat_permissions(mnt, work, who):
    writable, readonly = os.path.join(work, "writable"), os.path.join(work, "readonly")
    for path, mode in ((writable, 0o666), (readonly, 0o644)):
        open(path, "wb").close()
        os.chown(path, OTHER, OTHER)
        os.chmod(path, mode)

    def go(work):
        os.utime(writable)                                  # UTIME_NOW: any writer
        os.utime(writable, ns=(5, 6)) if who == "root" else \
            raises_errno(errno.EPERM, os.utime, writable, ns=(5, 6))  # explicit times: the owner
        if who == "root":
            os.utime(readonly)
        else:
            raises_errno(errno.EACCES, os.utime, readonly)
        mine = os.path.join(work, "mine")
        open(mine, "wb").close()
        os.chmod(mine, 0o444)
        os.utime(mine, ns=(7 * 10 ** 9, 8 * 10 ** 9))       # the owner, even without write permission
        return os.stat(mine).st_atime_ns, os.stat(mine).st_mtime_ns
    assert as_who(who, go, work) == (7 * 10 ** 9, 8 * 10 ** 9)
    assert (os.stat(writable).st_mtime_ns == 6) == (who == "root")


# ---------------------------------------------------------------- access checks on names

def test_directories_the_caller_cannot_write(mnt, work, who):
    closed = os.path.join(work, "closed")
    os.mkdir(closed)
    open(os.path.join(closed, "f"), "wb").close()
    os.mkdir(os.path.join(closed, "sub"))
    os.chmod(closed, 0o755)
    sticky = os.path.join(work, "sticky")
    os.mkdir(sticky)
    os.chmod(sticky, 0o1777)
    for name in ("theirs", "theirs2"):
        open(os.path.join(sticky, name), "wb").close()
        os.chown(os.path.join(sticky, name), OTHER, OTHER)

    def go(work):
        c = lambda *p: os.path.join(closed, *p)  # noqa: E731
        s = lambda *p: os.path.join(sticky, *p)  # noqa: E731
        attempts = [lambda: append(c("new"), b""), lambda: os.mkdir(c("d")),
                    lambda: os.symlink("f", c("l")), lambda: os.mkfifo(c("p")),
                    lambda: os.rename(c("f"), os.path.join(work, "out")),
                    lambda: os.rename(c("sub"), c("sub2")),
                    lambda: os.unlink(c("new")), lambda: os.rmdir(c("d"))]
        if who == "root":
            for attempt in attempts:
                attempt()
        else:
            for attempt in attempts[:6] + [lambda: os.unlink(c("f")), lambda: os.rmdir(c("sub"))]:
                raises_errno(errno.EACCES, attempt)
        # sticky: only the owner of a name (or of the directory) removes or renames it
        open(s("mine"), "wb").close()
        if who == "user":
            raises_errno(errno.EPERM, os.unlink, s("theirs"))
            raises_errno(errno.EPERM, os.rename, s("theirs2"), s("moved"))
            raises_errno(errno.EPERM, os.rename, s("mine"), s("theirs"))
        else:
            os.unlink(s("theirs"))
            os.rename(s("theirs2"), s("moved"))
        os.rename(s("mine"), s("mine2"))
        os.unlink(s("mine2"))
        return sorted(os.listdir(closed)), sorted(os.listdir(sticky))
    names, in_sticky = as_who(who, go, work)
    assert in_sticky == (["theirs", "theirs2"] if who == "user" else ["moved"])
    assert names == (["f", "sub"] if who == "user" else ["l", "p", "sub2"])


def test_errors_a_local_filesystem_gives(mnt, work, who):
    def go(work):
        p = lambda *parts: os.path.join(work, *parts)  # noqa: E731
        os.mkdir(p("d"))
        os.mkdir(p("d", "sub"))
        open(p("d", "sub", "f"), "wb").close()
        open(p("f"), "wb").close()
        long = "n" * 256
        for call in (lambda: os.mkdir(p(long)), lambda: open(p(long), "wb"), lambda: os.mkfifo(p(long)),
                     lambda: os.symlink("f", p(long)), lambda: os.rename(p("f"), p(long)),
                     lambda: os.unlink(p(long)), lambda: os.rmdir(p(long)), lambda: os.stat(p(long))):
            raises_errno(errno.ENAMETOOLONG, call)
        os.mkdir(p("n" * 255))  # the longest name is fine
        os.rmdir(p("n" * 255))
        too_long = p(*(["x" * 200] * 21))  # over PATH_MAX
        raises_errno(errno.ENAMETOOLONG, os.mkdir, too_long)
        os.symlink("loop2", p("loop1"))
        os.symlink("loop1", p("loop2"))
        raises_errno(errno.ELOOP, open, p("loop1"))
        raises_errno(errno.ELOOP, os.mkdir, p("loop1", "x"))
        raises_errno(errno.ENOTDIR, os.mkdir, p("f", "x"))
        raises_errno(errno.ENOTDIR, open, p("f", "x"), "wb")
        raises_errno(errno.ENOTDIR, os.rmdir, p("f"))
        raises_errno(errno.ENOTDIR, os.rename, p("d"), p("f"))
        raises_errno(errno.EISDIR, os.rename, p("f"), p("d"))
        raises_errno(errno.EISDIR, os.unlink, p("d"))
        for call in (lambda: os.mkdir(p("d")), lambda: os.mkdir(p("f")), lambda: os.symlink("x", p("f")),
                     lambda: os.mkfifo(p("d")), lambda: os.open(p("f"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)):
            raises_errno(errno.EEXIST, call)
        raises_errno(errno.ENOTEMPTY, os.rmdir, p("d"))
        os.mkdir(p("e"))
        raises_errno(errno.ENOTEMPTY, os.rename, p("e"), p("d"))
        raises_errno(errno.EINVAL, os.rename, p("d"), p("d", "sub", "inside"))
        raises_errno(errno.EINVAL, os.rmdir, p("d", "."))
        raises_errno(errno.ENOENT, os.rename, p("absent"), p("x"))
        os.rename(p("d", "sub", "f"), p("moved"))  # across directories: never EXDEV
        os.rename(p("d", "sub"), p("e", "sub"))
        return sorted(os.listdir(work))
    assert as_who(who, go, work) == ["d", "e", "f", "loop1", "loop2", "moved"]


def test_directory_link_counts(mnt, work, who):
    """A directory has 2 links and one more per subdirectory (its ".."), through mkdir,
    rename across directories and rmdir (files do not count)."""
    def go(work):
        a, b = os.path.join(work, "a"), os.path.join(work, "b")
        os.mkdir(a)
        os.mkdir(b)
        os.mkdir(os.path.join(a, "sub"))
        open(os.path.join(a, "file"), "wb").close()
        links = lambda: (os.lstat(a).st_nlink, os.lstat(b).st_nlink)  # noqa: E731
        counts = [links()]
        os.rename(os.path.join(a, "sub"), os.path.join(b, "sub"))
        counts.append(links())
        os.rmdir(os.path.join(b, "sub"))
        counts.append(links())
        return counts
    assert as_who(who, go, work) == [(3, 2), (2, 3), (2, 2)]
