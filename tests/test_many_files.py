# test_many_files.py: trees far larger than the daemon's fd limit, and the *at() safety of reopening evicted fds
import errno
import os
import re

import pytest

import conftest
from helpers import read_file, write_file

# The daemon runs under a hard fd limit it cannot raise: without CAP_SYS_RESOURCE, as on a
# machine or in a unit that caps it. Without CAP_DAC_READ_SEARCH it cannot open by handle and
# reopens by parent and name instead.
LIMITED = ["prlimit", "--nofile=%d:%d", "setpriv", "--bounding-set=%s", "--"]
DROP = {"handle": "-sys_resource", "name": "-sys_resource,-dac_read_search"}
MODE_LINE = {"handle": "reopened by file handle", "name": "reopened by parent and name"}


@pytest.fixture
def limited(mount, monkeypatch):
    """Factory: limited(limit, mode) -> Mount of a fresh volume, daemon under `ulimit -n limit`."""
    def factory(limit, mode="handle"):
        prefix = [a % (limit, limit) if "%d" in a else a for a in LIMITED]
        prefix = [a % DROP[mode] if "%s" in a else a for a in prefix]
        orig = conftest.Mount.argv
        monkeypatch.setattr(conftest.Mount, "argv", lambda self: prefix + orig(self))
        m = mount()
        monkeypatch.setattr(conftest.Mount, "argv", orig)
        with open("/proc/%d/limits" % m.proc.pid) as f:
            line = [x for x in f if x.startswith("Max open files")][0]
        assert line.split()[3:5] == [str(limit), str(limit)], line
        return m
    return factory


def daemon_fds(m):
    return os.listdir("/proc/%d/fd" % m.proc.pid)


def daemon_fd_targets(m):
    out = []
    for n in daemon_fds(m):
        try:
            out.append(os.readlink("/proc/%d/fd/%s" % (m.proc.pid, n)))
        except FileNotFoundError:
            pass
    return out


def content(k):
    """Distinct bytes of a size that crosses chunk boundaries for some k."""
    return (b"%06d:" % k) * (k * 131 % 1500 + 1)


def raise_err(e):
    raise e


def test_walk_50000_files_with_1024_fds(limited):
    """50,000 files (49 per fd) walked, stat'ed, read and added to under `ulimit -n 1024`."""
    m = limited(1024)
    ndirs, per_dir = 50, 1000
    # Empty backing files are valid keyfs files (no header yet): made directly, they are fast.
    for d in range(ndirs):
        os.mkdir(m.bpath("d%02d" % d))
        for f in range(per_dir):
            os.close(os.open(m.bpath("d%02d" % d, "f%04d" % f), os.O_CREAT | os.O_WRONLY, 0o644))
    os.mkdir(m.path("data"))
    for k in range(100):
        write_file(m.path("data", "c%03d" % k), content(k))

    max_fds = 0
    seen = 0
    for _ in range(2):      # the second walk finds every fd evicted: getattr reopens
        seen = 0
        for root, dirs, files in os.walk(m.mnt, onerror=raise_err):
            for name in files:
                st = os.lstat(os.path.join(root, name))
                rel = os.path.relpath(os.path.join(root, name), m.mnt)
                want = len(content(int(name[1:]))) if rel.startswith("data/") else 0
                assert st.st_size == want, rel
                seen += 1
            max_fds = max(max_fds, len(daemon_fds(m)))
        assert seen == ndirs * per_dir + 100
    assert max_fds <= 1024

    # The cache is full of other inodes now: opening needs a reopen of each.
    for k in range(100):
        assert read_file(m.path("data", "c%03d" % k)) == content(k)
    # Creating files and dirs while the cache is full.
    for d in range(10):
        os.mkdir(m.path("new%d" % d))
        for f in range(30):
            write_file(m.path("new%d" % d, "n%d" % f), content(d * 30 + f))
    for d in range(10):
        assert sorted(os.listdir(m.path("new%d" % d))) == sorted("n%d" % f for f in range(30))
        for f in range(30):
            assert read_file(m.path("new%d" % d, "n%d" % f)) == content(d * 30 + f)
    # Renames through the mount, then used after their fds were evicted.
    os.rename(m.path("data", "c001"), m.path("new0", "moved"))
    for root, dirs, files in os.walk(m.path("d00"), onerror=raise_err):
        for name in files:
            os.lstat(os.path.join(root, name))
    assert read_file(m.path("new0", "moved")) == content(1)
    assert len(daemon_fds(m)) <= 1024
    # The cache alone kept the daemon under its limit: it never ran out.
    assert "out of file descriptors" not in m.stderr()
    assert MODE_LINE["handle"] in m.stderr()     # logged at the first lookup


def evict(m, n=600):
    """Fill the fd cache (limit 256: at most 192 kept) with n other files, looked up by lstat."""
    os.mkdir(m.bpath("fill"))
    for k in range(n):
        os.close(os.open(m.bpath("fill", "x%d" % k), os.O_CREAT | os.O_WRONLY, 0o644))
    for k in range(n):
        os.lstat(m.path("fill", "x%d" % k))


@pytest.mark.parametrize("mode", ["handle", "name"])
def test_evicted_file_replaced_by_symlink_is_not_followed(limited, mode):
    """A file whose fd was closed, renamed away in the backing dir and replaced by a symlink to
    another file of the volume: the old node never reaches the symlink's target."""
    m = limited(256, mode)
    write_file(m.path("a"), b"A" * 5000)
    write_file(m.path("b"), b"B-secret")
    os.chmod(m.path("b"), 0o640)
    held = os.open(m.path("a"), os.O_PATH)     # a node reference without an open file
    try:
        evict(m)
        assert m.bpath("a") not in daemon_fd_targets(m), "the fd of 'a' was not evicted"
        os.rename(m.bpath("a"), m.bpath("a-moved"))
        os.symlink(m.bpath("b"), m.bpath("a"))
        b_mode = os.lstat(m.bpath("b")).st_mode
        proc = "/proc/self/fd/%d" % held
        if mode == "handle":
            # A handle names the inode itself, like the fd it stands for: still file 'a'.
            assert os.fstat(held).st_size == 5000
            os.chmod(proc, 0o600)
            assert os.lstat(m.bpath("a-moved")).st_mode & 0o777 == 0o600
            assert read_file(proc) == b"A" * 5000
        else:
            # By name the entry is verified: another inode there now means ESTALE.
            for fn in (lambda: os.fstat(held), lambda: os.chmod(proc, 0o600), lambda: read_file(proc)):
                with pytest.raises(OSError) as e:
                    fn()
                assert e.value.errno == errno.ESTALE
        assert os.lstat(m.bpath("b")).st_mode == b_mode
    finally:
        os.close(held)
    assert read_file(m.path("b")) == b"B-secret"
    assert MODE_LINE[mode] in m.stderr()


@pytest.mark.parametrize("mode", ["handle", "name"])
def test_rename_and_unlinked_open_file_after_eviction(limited, mode):
    """Renames through the mount are followed by a reopen; an open file keeps working when its
    name is gone."""
    m = limited(256, mode)
    os.mkdir(m.path("d1"))
    os.mkdir(m.path("d2"))
    write_file(m.path("d1", "f"), b"F" * 3000)
    held = os.open(m.path("d1", "f"), os.O_PATH)
    try:
        rename_and_unlink(m, held)
    finally:
        os.close(held)
    assert read_file(m.path("d2", "f2")) == b"F" * 3000
    assert os.listdir(m.path("d3")) == []


def rename_and_unlink(m, held):
    with open(m.path("d1", "g"), "wb") as g:
        g.write(b"G" * 100)
        os.rename(m.path("d1", "f"), m.path("d2", "f2"))
        os.rename(m.path("d1"), m.path("d3"))
        os.unlink(m.path("d3", "g"))
        evict(m)
        assert os.fstat(held).st_size == 3000
        assert read_file("/proc/self/fd/%d" % held) == b"F" * 3000
        os.fchmod(g.fileno(), 0o604)
        g.write(b"g" * 50)
        g.flush()
        assert os.fstat(g.fileno()).st_size == 150
        assert os.fstat(g.fileno()).st_mode & 0o777 == 0o604


def test_running_out_of_fds_is_logged_once(limited):
    """Open files pin fds the cache cannot close: when they exhaust the limit, the user gets
    EMFILE (nothing else is possible) and the daemon says so, once, with what to do."""
    m = limited(256)
    os.mkdir(m.path("o"))
    for k in range(300):
        write_file(m.path("o", "f%d" % k), b"x")
    files, failures = [], 0
    try:
        for k in range(300):
            try:
                files.append(open(m.path("o", "f%d" % k), "rb"))
            except OSError as e:
                assert e.errno == errno.EMFILE
                failures += 1
    finally:
        for f in files:
            f.close()
    assert failures > 0 and len(files) > 64
    lines = [x for x in m.stderr().splitlines() if "out of file descriptors" in x]
    assert len(lines) == 1, lines
    assert re.search(r"EMFILE, limit 256\).*LimitNOFILE=", lines[0]), lines[0]
    # Everything works again once the files are closed.
    for k in range(300):
        assert read_file(m.path("o", "f%d" % k)) == b"x"
