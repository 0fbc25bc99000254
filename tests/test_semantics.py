# test_semantics.py: POSIX semantics through the mount, the reserved name, and real tools on top
import errno
import hashlib
import mmap
import os
import shutil
import sqlite3
import stat
import time

import pytest

from helpers import backing_size, expect_errno, fallocate, read_file, renameat2, run, write_file

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
# -- rename ---------------------------------------------------------------------------------------

def test_rename_plain_and_over_existing(mnt):
    write_file(mnt.path("a"), b"A" * 5000)
    write_file(mnt.path("b"), b"B" * 10)
    os.rename(mnt.path("a"), mnt.path("c"))
    assert not os.path.exists(mnt.path("a"))
    assert read_file(mnt.path("c")) == b"A" * 5000
    assert not os.path.exists(mnt.bpath("a")) and os.path.exists(mnt.bpath("c"))
    os.rename(mnt.path("c"), mnt.path("b"))
    assert sorted(os.listdir(mnt.mnt)) == ["b"]
    assert read_file(mnt.path("b")) == b"A" * 5000
    os.mkdir(mnt.path("d"))
    os.rename(mnt.path("b"), mnt.path("d", "b2"))
    assert read_file(mnt.path("d", "b2")) == b"A" * 5000
    mnt.remount()
    assert read_file(mnt.path("d", "b2")) == b"A" * 5000


def test_rename_noreplace_and_exchange(mnt):
    write_file(mnt.path("x"), b"x-content")
    write_file(mnt.path("y"), b"y-content, longer than x" * 300)
    expect_errno(errno.EEXIST, renameat2, mnt.path("x"), mnt.path("y"), RENAME_NOREPLACE)
    assert read_file(mnt.path("x")) == b"x-content"
    renameat2(mnt.path("x"), mnt.path("z"), RENAME_NOREPLACE)
    assert read_file(mnt.path("z")) == b"x-content"
    renameat2(mnt.path("z"), mnt.path("y"), RENAME_EXCHANGE)
    assert read_file(mnt.path("y")) == b"x-content"
    assert read_file(mnt.path("z")) == b"y-content, longer than x" * 300
    assert os.stat(mnt.path("z")).st_size == 24 * 300
    mnt.remount()
    assert read_file(mnt.path("y")) == b"x-content"
    assert read_file(mnt.path("z")) == b"y-content, longer than x" * 300


# -- links ----------------------------------------------------------------------------------------

def test_hard_link(mnt):
    a, b = mnt.path("a"), mnt.path("b")
    write_file(a, b"0123456789" * 1000)
    os.link(a, b)
    assert os.stat(a).st_nlink == 2 and os.stat(b).st_nlink == 2
    assert os.stat(a).st_ino == os.stat(b).st_ino
    assert os.stat(mnt.bpath("a")).st_ino == os.stat(mnt.bpath("b")).st_ino
    assert read_file(b) == b"0123456789" * 1000
    with open(a, "r+b") as f:
        f.seek(4094)
        f.write(b"THROUGH-A")
    exp = bytearray(b"0123456789" * 1000)
    exp[4094:4103] = b"THROUGH-A"
    assert read_file(b) == bytes(exp)
    with open(b, "ab") as f:
        f.write(b"END")
    assert read_file(a) == bytes(exp) + b"END"
    os.unlink(a)
    assert os.stat(b).st_nlink == 1
    assert read_file(b) == bytes(exp) + b"END"
    mnt.remount()
    assert read_file(b) == bytes(exp) + b"END"
    assert os.stat(b).st_nlink == 1


def test_symlink(mnt):
    target = "some/../relative target/with spaces"
    os.symlink(target, mnt.path("l"))
    assert os.readlink(mnt.path("l")) == target
    assert os.readlink(mnt.bpath("l")) == target
    assert stat.S_ISLNK(os.lstat(mnt.path("l")).st_mode)
    assert os.lstat(mnt.path("l")).st_size == len(target)
    write_file(mnt.path("real"), b"via link")
    os.symlink("real", mnt.path("l2"))
    assert read_file(mnt.path("l2")) == b"via link"
    os.symlink("/absolute/nowhere", mnt.path("dangling"))
    assert os.readlink(mnt.path("dangling")) == "/absolute/nowhere"
    expect_errno(errno.ENOENT, os.stat, mnt.path("dangling"))
    mnt.remount()
    assert os.readlink(mnt.path("l")) == target


# -- directories and names ------------------------------------------------------------------------

def test_mkdir_rmdir_unlink(mnt):
    d = mnt.path("d")
    os.mkdir(d, 0o750)
    assert stat.S_ISDIR(os.stat(d).st_mode)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o750 & ~_umask()
    assert os.path.isdir(mnt.bpath("d"))
    write_file(os.path.join(d, "f"), b"x")
    expect_errno(errno.ENOTEMPTY, os.rmdir, d)
    expect_errno(errno.EEXIST, os.mkdir, d)
    expect_errno(errno.ENOTDIR, os.rmdir, os.path.join(d, "f"))
    expect_errno(errno.EISDIR, os.unlink, d)
    os.unlink(os.path.join(d, "f"))
    expect_errno(errno.ENOENT, os.unlink, os.path.join(d, "f"))
    assert not os.path.exists(mnt.bpath("d", "f"))
    os.rmdir(d)
    assert not os.path.exists(d) and not os.path.exists(mnt.bpath("d"))
    expect_errno(errno.ENOENT, os.rmdir, d)


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_readdir_many(mnt):
    names = sorted("file-%04d" % i for i in range(500))
    for n in names:
        write_file(mnt.path(n), n.encode())
    assert sorted(os.listdir(mnt.mnt)) == names
    mnt.remount()
    assert sorted(os.listdir(mnt.mnt)) == names
    assert read_file(mnt.path("file-0499")) == b"file-0499"


def test_chmod_chown_utime(mnt):
    p = mnt.path("f")
    write_file(p, b"abc")
    os.chmod(p, 0o640)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(mnt.bpath("f")).st_mode) == 0o640
    if os.geteuid() == 0:
        os.chown(p, 1234, 5678)
        st = os.stat(p)
        assert (st.st_uid, st.st_gid) == (1234, 5678)
        bst = os.stat(mnt.bpath("f"))
        assert (bst.st_uid, bst.st_gid) == (1234, 5678)
    os.chmod(p, 0o4755)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o4755
    atime_ns = 1_000_000_000 * 1_234_567_890 + 123_456_789
    mtime_ns = 1_000_000_000 * 1_111_111_111 + 987_654_321
    os.utime(p, ns=(atime_ns, mtime_ns))
    st = os.stat(p)
    assert st.st_atime_ns == atime_ns
    assert st.st_mtime_ns == mtime_ns
    d = mnt.path("d")
    os.mkdir(d)
    os.utime(d, ns=(atime_ns, mtime_ns))
    assert os.stat(d).st_mtime_ns == mtime_ns
    os.symlink("f", mnt.path("l"))
    os.utime(mnt.path("l"), ns=(atime_ns, mtime_ns), follow_symlinks=False)
    assert os.lstat(mnt.path("l")).st_mtime_ns == mtime_ns
    mnt.remount()
    st = os.stat(p)
    assert st.st_mtime_ns == mtime_ns and st.st_atime_ns == atime_ns
    assert stat.S_IMODE(st.st_mode) == 0o4755
    assert st.st_size == 3


def test_write_updates_mtime(mnt):
    p = mnt.path("f")
    write_file(p, b"abc")
    os.utime(p, ns=(10**9, 10**9))
    with open(p, "ab") as f:
        f.write(b"d")
    assert os.stat(p).st_mtime_ns > 10**9


def test_xattr_user(mnt):
    p = mnt.path("f")
    write_file(p, b"data")
    os.setxattr(p, "user.one", b"value one")
    os.setxattr(p, "user.two", b"\x00\x01binary\xff")
    os.setxattr(p, "user.empty", b"")
    assert os.getxattr(p, "user.one") == b"value one"
    assert os.getxattr(p, "user.two") == b"\x00\x01binary\xff"
    assert os.getxattr(p, "user.empty") == b""
    assert sorted(x for x in os.listxattr(p) if x.startswith("user.")) == ["user.empty", "user.one", "user.two"]
    # Metadata is in clear by design: the backing file carries the same xattr.
    assert os.getxattr(mnt.bpath("f"), "user.one") == b"value one"
    expect_errno(errno.EEXIST, os.setxattr, p, "user.one", b"x", os.XATTR_CREATE)
    expect_errno(errno.ENODATA, os.setxattr, p, "user.nope", b"x", os.XATTR_REPLACE)
    os.setxattr(p, "user.one", b"replaced", os.XATTR_REPLACE)
    assert os.getxattr(p, "user.one") == b"replaced"
    os.removexattr(p, "user.one")
    expect_errno(errno.ENODATA, os.getxattr, p, "user.one")
    expect_errno(errno.ENODATA, os.removexattr, p, "user.one")
    assert sorted(x for x in os.listxattr(p) if x.startswith("user.")) == ["user.empty", "user.two"]
    assert read_file(p) == b"data"
    d = mnt.path("d")
    os.mkdir(d)
    os.setxattr(d, "user.dir", b"on a dir")
    mnt.remount()
    assert os.getxattr(p, "user.two") == b"\x00\x01binary\xff"
    assert os.getxattr(d, "user.dir") == b"on a dir"


def test_security_xattr_fails_fast(mnt):
    p = mnt.path("f")
    write_file(p, b"data")
    t0 = time.monotonic()
    for _ in range(20):
        with pytest.raises(OSError) as ei:
            os.getxattr(p, "security.capability")
        assert ei.value.errno in (errno.EOPNOTSUPP, errno.ENODATA)
    assert time.monotonic() - t0 < 2


def test_reserved_name_at_root(mnt):
    r = mnt.path(".keyfs")
    assert ".keyfs" not in os.listdir(mnt.mnt)
    write_file(mnt.path("visible"), b"x")
    assert os.listdir(mnt.mnt) == ["visible"]
    expect_errno(errno.ENOENT, os.open, r, os.O_RDONLY)
    expect_errno(errno.ENOENT, os.stat, r)
    expect_errno(errno.ENOENT, os.lstat, r)
    expect_errno(errno.ENOENT, os.unlink, r)
    expect_errno(errno.ENOENT, os.getxattr, r, "user.x")
    expect_errno(errno.EPERM, os.open, r, os.O_CREAT | os.O_WRONLY, 0o644)
    expect_errno(errno.EPERM, os.mkdir, r)
    expect_errno(errno.EPERM, os.symlink, "target", r)
    expect_errno(errno.EPERM, os.link, mnt.path("visible"), r)
    expect_errno(errno.EPERM, os.rename, mnt.path("visible"), r)
    expect_errno(errno.EPERM, os.mkfifo, r)
    # Nothing happened to the real volume description.
    with open(os.path.join(mnt.backing, ".keyfs"), "rb") as f:
        assert b"volume=" in f.read()
    assert read_file(mnt.path("visible")) == b"x"
    # Only the root is special.
    os.mkdir(mnt.path("sub"))
    write_file(mnt.path("sub", ".keyfs"), b"allowed in a subdir")
    assert read_file(mnt.path("sub", ".keyfs")) == b"allowed in a subdir"
    assert os.listdir(mnt.path("sub")) == [".keyfs"]
    os.rename(mnt.path("sub", ".keyfs"), mnt.path("sub", "moved"))
    os.mkdir(mnt.path("sub", ".keyfs"))
    assert os.path.isdir(mnt.path("sub", ".keyfs"))
    expect_errno(errno.EPERM, os.rename, mnt.path("sub", ".keyfs"), r)
    assert sorted(os.listdir(mnt.mnt)) == ["sub", "visible"]


def test_statfs(mnt):
    sv = os.statvfs(mnt.mnt)
    bs = os.statvfs(mnt.backing)
    assert sv.f_bsize > 0 and sv.f_blocks > 0
    assert sv.f_bavail <= sv.f_bfree <= sv.f_blocks
    assert sv.f_namemax > 0
    assert sv.f_blocks * sv.f_frsize == bs.f_blocks * bs.f_frsize


def test_fifo(mnt):
    p = mnt.path("fifo")
    os.mkfifo(p, 0o600)
    assert stat.S_ISFIFO(os.stat(p).st_mode)
    assert stat.S_ISFIFO(os.lstat(mnt.bpath("fifo")).st_mode)
    fd = os.open(p, os.O_RDWR | os.O_NONBLOCK)
    try:
        assert os.write(fd, b"through the pipe") == 16
        assert os.read(fd, 100) == b"through the pipe"
    finally:
        os.close(fd)
    mnt.remount()
    assert stat.S_ISFIFO(os.stat(p).st_mode)


# -- tools ----------------------------------------------------------------------------------------

def _make_tree(root):
    """A deterministic tree with sizes around chunk edges, symlinks, modes and mtimes."""
    import random
    rng = random.Random(42)
    os.makedirs(root)
    for d in range(6):
        dd = os.path.join(root, "dir%d" % d, "sub%d" % (d % 3))
        os.makedirs(dd)
        for i in range(15):
            n = rng.choice([0, 1, 100, 4095, 4096, 4097, 9000, 70000])
            write_file(os.path.join(dd, "f%02d.bin" % i), rng.randbytes(n))
        os.chmod(os.path.join(dd, "f00.bin"), 0o600)
        os.chmod(os.path.join(dd, "f01.bin"), 0o755)
        os.symlink("f02.bin", os.path.join(dd, "link"))
        os.utime(os.path.join(dd, "f03.bin"), ns=(1_500_000_000 * 10**9, 1_500_000_000 * 10**9))


def _tree_digest(root):
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for n in sorted(files) + sorted(d for d in dirs if os.path.islink(os.path.join(dirpath, d))):
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", hashlib.sha256(f.read()).hexdigest(), stat.S_IMODE(st.st_mode),
                                st.st_size)
    return out


def test_cp_a(mnt, tmp_path):
    src = str(tmp_path / "src")
    _make_tree(src)
    r = run(["cp", "-a", src, mnt.path("copy")])
    assert r.returncode == 0, r.stderr
    assert _tree_digest(mnt.path("copy")) == _tree_digest(src)
    f3 = os.path.join("dir0", "sub0", "f03.bin")
    assert os.stat(mnt.path("copy", f3)).st_mtime_ns == 1_500_000_000 * 10**9
    mnt.remount()
    assert _tree_digest(mnt.path("copy")) == _tree_digest(src)
    # And back out again.
    r = run(["cp", "-a", mnt.path("copy"), str(tmp_path / "back")])
    assert r.returncode == 0, r.stderr
    assert _tree_digest(str(tmp_path / "back")) == _tree_digest(src)


def test_tar_extract(mnt, tmp_path):
    src = str(tmp_path / "src")
    _make_tree(src)
    if os.path.isdir("/usr/share/doc/bash"):
        shutil.copytree("/usr/share/doc/bash", os.path.join(src, "bashdoc"), symlinks=True)
    tarball = str(tmp_path / "t.tar")
    r = run(["tar", "-C", str(tmp_path), "-cf", tarball, "src"])
    assert r.returncode == 0, r.stderr
    r = run(["tar", "-C", mnt.mnt, "-xf", tarball])
    assert r.returncode == 0, r.stderr
    assert _tree_digest(mnt.path("src")) == _tree_digest(src)
    r = run(["tar", "-C", mnt.mnt, "-df", tarball])
    assert r.returncode == 0, r.stdout + r.stderr
    mnt.remount()
    assert _tree_digest(mnt.path("src")) == _tree_digest(src)


def test_git(mnt):
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    repo = mnt.path("repo")
    os.mkdir(repo)
    env = dict(os.environ, HOME=mnt.mnt, GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.org")
    for i in range(20):
        write_file(os.path.join(repo, "file%d.txt" % i), ("line %d\n" % i).encode() * (i * 300 + 1))

    def git_run(*args):
        r = run([git, *args], env=env, cwd=repo)
        assert r.returncode == 0, "git %s: %s %s" % (" ".join(args), r.stdout, r.stderr)
        return r.stdout

    git_run("init", "-q")
    git_run("add", ".")
    git_run("commit", "-q", "-m", "first")
    write_file(os.path.join(repo, "file3.txt"), b"changed\n")
    git_run("commit", "-q", "-am", "second")
    assert git_run("log", "--format=%s").split() == ["second", "first"]
    git_run("fsck", "--full", "--strict")
    mnt.remount()
    git_run("fsck", "--full", "--strict")
    assert git_run("status", "--porcelain") == ""
    assert git_run("show", "HEAD~1:file3.txt") == "line 3\n" * 901


def test_sqlite(mnt):
    db = mnt.path("test.db")
    con = sqlite3.connect(db)
    try:
        con.execute("create table t (id integer primary key, v text)")
        with con:
            con.executemany("insert into t (v) values (?)", (("value %d" % i * 3,) for i in range(1000)))
    finally:
        con.close()
    mnt.remount()
    con = sqlite3.connect(db)
    try:
        assert con.execute("select count(*) from t").fetchone()[0] == 1000
        assert con.execute("pragma integrity_check").fetchone()[0] == "ok"
        assert con.execute("select v from t where id = 500").fetchone()[0] == "value 499" * 3
    finally:
        con.close()


def test_rsync(mnt, tmp_path):
    rsync = shutil.which("rsync")
    if rsync is None:
        pytest.skip("rsync is not installed")
    src = str(tmp_path / "src")
    _make_tree(src)
    r = run([rsync, "-a", src + "/", mnt.path("dst") + "/"])
    assert r.returncode == 0, r.stderr
    assert _tree_digest(mnt.path("dst")) == _tree_digest(src)
    # A checksum pass finds nothing to transfer.
    r = run([rsync, "-a", "--checksum", "--itemize-changes", "--dry-run", src + "/", mnt.path("dst") + "/"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", r.stdout
    # Modify one file in the source, sync again (temp file + rename path).
    write_file(os.path.join(src, "dir1", "sub1", "f05.bin"), b"new content")
    r = run([rsync, "-a", src + "/", mnt.path("dst") + "/"])
    assert r.returncode == 0, r.stderr
    mnt.remount()
    assert _tree_digest(mnt.path("dst")) == _tree_digest(src)


def test_mmap_read_write(mnt):
    p = mnt.path("m")
    data = bytearray(os.urandom(3 * 4096 + 100))
    write_file(p, data)
    fd = os.open(p, os.O_RDWR)
    try:
        with mmap.mmap(fd, len(data), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            assert m[:] == bytes(data)
            m[4090:4110] = b"W" * 20
            m[-5:] = b"TAIL!"
            m.flush()
        data[4090:4110] = b"W" * 20
        data[-5:] = b"TAIL!"
        assert os.pread(fd, len(data) + 10, 0) == bytes(data)
    finally:
        os.close(fd)
    assert os.stat(p).st_size == len(data)
    mnt.remount()
    assert read_file(p) == bytes(data)
    with open(p, "rb") as f:
        with mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            assert m[:] == bytes(data)


# -- fallocate, copy_file_range, partial time updates ---------------------------------------------

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_COLLAPSE_RANGE = 8


def test_fallocate(mnt):
    p = mnt.path("f")
    write_file(p, b"abc")
    fd = os.open(p, os.O_RDWR)
    try:
        fallocate(fd, 0, 0, 10000)
        assert os.fstat(fd).st_size == 10000
        assert os.pread(fd, 20000, 0) == b"abc" + bytes(9997)
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 50000)
        assert os.fstat(fd).st_size == 10000
        # Punch and zero-range work (test_fallocate.py); collapsing a range stays refused.
        expect_errno(errno.EOPNOTSUPP, fallocate, fd, FALLOC_FL_COLLAPSE_RANGE, 0, 4096)
        assert os.pread(fd, 3, 0) == b"abc"
    finally:
        os.close(fd)
    assert os.stat(mnt.bpath("f")).st_size == backing_size(10000)
    mnt.remount()
    assert read_file(p) == b"abc" + bytes(9997)


def test_copy_file_range_and_sendfile(mnt):
    src, dst, dst2 = mnt.path("src"), mnt.path("dst"), mnt.path("dst2")
    data = os.urandom(100000)
    write_file(src, data)
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_CREAT | os.O_WRONLY, 0o644)
    fo2 = os.open(dst2, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        done = 0
        while done < len(data):
            n = os.copy_file_range(fi, fo, len(data) - done, done, done)
            assert n > 0
            done += n
        done = 0
        while done < len(data):
            n = os.sendfile(fo2, fi, done, len(data) - done)
            assert n > 0
            done += n
    finally:
        for fd in (fi, fo, fo2):
            os.close(fd)
    assert read_file(dst) == data
    assert read_file(dst2) == data
    # Copying through the mount copies plaintext, never the other file's ciphertext.
    assert read_file(mnt.bpath("dst")) != read_file(mnt.bpath("src"))


def test_touch_partial_times(mnt):
    p = mnt.path("f")
    write_file(p, b"x")
    os.utime(p, ns=(111 * 10**9, 222 * 10**9))
    # touch -m leaves atime alone (UTIME_OMIT), touch -a leaves mtime alone.
    r = run(["touch", "-m", "-d", "@333", p])
    assert r.returncode == 0, r.stderr
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (111 * 10**9, 333 * 10**9)
    r = run(["touch", "-a", "-d", "@444", p])
    assert r.returncode == 0, r.stderr
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (444 * 10**9, 333 * 10**9)
    # UTIME_NOW for both.
    before = time.time_ns()
    os.utime(p)
    st = os.stat(p)
    assert st.st_mtime_ns >= before - 10**9 and st.st_atime_ns >= before - 10**9
    mnt.remount()
    st2 = os.stat(p)
    assert st2.st_mtime_ns == st.st_mtime_ns


def test_hard_link_across_dirs_after_remount(mnt):
    os.mkdir(mnt.path("d1"))
    os.mkdir(mnt.path("d2"))
    write_file(mnt.path("d1", "a"), b"shared" * 1000)
    os.link(mnt.path("d1", "a"), mnt.path("d2", "b"))
    mnt.remount()
    # Both names map to one inode after a fresh lookup: writes through one show in the other.
    assert os.stat(mnt.path("d1", "a")).st_ino == os.stat(mnt.path("d2", "b")).st_ino
    with open(mnt.path("d2", "b"), "r+b") as f:
        f.write(b"SHARED")
    assert read_file(mnt.path("d1", "a")) == b"SHARED" + b"shared" * 999
    os.truncate(mnt.path("d1", "a"), 6)
    assert read_file(mnt.path("d2", "b")) == b"SHARED"
    assert os.stat(mnt.path("d2", "b")).st_size == 6
