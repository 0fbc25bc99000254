# test_multiuser.py: allow_other,default_permissions: ownership of new files, setgid dirs, access checks
import errno
import os
import stat
import tempfile

import pytest

from helpers import keyfsctl, need_root, py_as, read_file, write_file

U1, G1 = 12345, 12345
U2, G2 = 12346, 12346
SGID_GROUP = 777


def world_mount(world_tmp, mount, opts=(), mnt_mode=None):
    """A fresh local volume (keystore and backing dir) and its mount, all under world_tmp; root only."""
    need_root()
    keystore = os.path.join(world_tmp, "keystore")
    backing = os.path.join(world_tmp, "backing")
    keyfsctl("init", backing, "--kms", "local", "--keystore", keystore, "--key", "test", "--create-key")
    mnt = os.path.join(world_tmp, "mnt")
    os.mkdir(mnt)
    if mnt_mode is not None:
        os.chmod(mnt, mnt_mode)
    return mount(backing=backing, mnt=mnt, opts=list(opts))


@pytest.fixture
def mu(world_tmp, mount):
    """A volume and mount under a world-traversable dir, mounted allow_other,default_permissions."""
    m = world_mount(world_tmp, mount, ["allow_other", "default_permissions"], mnt_mode=0o755)
    os.chmod(m.mnt, 0o755)
    return m


def _owner(p):
    st = os.lstat(p)
    return st.st_uid, st.st_gid


def test_user_creates_file_and_dir(mu):
    d = mu.path("open")
    os.mkdir(d)
    os.chmod(d, 0o777)
    f = os.path.join(d, "userfile")
    assert py_as(U1, G1, "fd = os.open(%r, os.O_CREAT | os.O_WRONLY, 0o644)\n"
                         "os.write(fd, b'mine')\nos.close(fd)" % f) == ("ok", None)
    assert _owner(f) == (U1, G1)
    assert _owner(mu.bpath("open", "userfile")) == (U1, G1)
    assert read_file(f) == b"mine"
    sub = os.path.join(d, "userdir")
    assert py_as(U1, G1, "os.mkdir(%r)" % sub) == ("ok", None)
    assert _owner(sub) == (U1, G1)
    assert _owner(mu.bpath("open", "userdir")) == (U1, G1)
    link = os.path.join(d, "userlink")
    assert py_as(U1, G1, "os.symlink('userfile', %r)" % link) == ("ok", None)
    assert _owner(link) == (U1, G1)
    assert _owner(mu.bpath("open", "userlink")) == (U1, G1)
    fifo = os.path.join(d, "userfifo")
    assert py_as(U1, G1, "os.mkfifo(%r)" % fifo) == ("ok", None)
    assert _owner(mu.bpath("open", "userfifo")) == (U1, G1)
    # The user's own file: write and read back.
    assert py_as(U1, G1, "with open(%r, 'r+b') as f:\n    f.seek(2)\n    f.write(b'NE!')\n"
                         "with open(%r, 'rb') as f:\n    return f.read().decode()" % (f, f)) == ("ok", "miNE!")
    mu.remount()
    assert _owner(f) == (U1, G1)
    assert read_file(f) == b"miNE!"


def test_setgid_dir(mu):
    d = mu.path("shared")
    os.mkdir(d)
    os.chown(d, 0, SGID_GROUP)
    os.chmod(d, 0o2777)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o2777
    f = os.path.join(d, "f")
    assert py_as(U1, G1, "open(%r, 'wb').close()" % f) == ("ok", None)
    assert _owner(f) == (U1, SGID_GROUP)
    assert _owner(mu.bpath("shared", "f")) == (U1, SGID_GROUP)
    sub = os.path.join(d, "sub")
    assert py_as(U1, G1, "os.mkdir(%r, 0o755)" % sub) == ("ok", None)
    assert _owner(sub) == (U1, SGID_GROUP)
    # A new directory in a setgid directory inherits the setgid bit.
    assert os.stat(sub).st_mode & stat.S_ISGID
    assert os.stat(mu.bpath("shared", "sub")).st_mode & stat.S_ISGID


def test_user_cannot_read_root_0600(mu):
    p = mu.path("secret")
    write_file(p, b"root only")
    os.chmod(p, 0o600)
    assert py_as(U1, G1, "open(%r, 'rb').read()" % p) == ("errno", errno.EACCES)
    assert py_as(U1, G1, "open(%r, 'r+b')" % p) == ("errno", errno.EACCES)
    assert py_as(U1, G1, "os.truncate(%r, 0)" % p) == ("errno", errno.EACCES)
    assert py_as(U1, G1, "os.chmod(%r, 0o666)" % p) == ("errno", errno.EPERM)
    # stat is allowed (the mount root is 0755).
    assert py_as(U1, G1, "return os.stat(%r).st_size" % p) == ("ok", 9)
    assert read_file(p) == b"root only"


def test_user_cannot_write_root_dir(mu):
    d = mu.path("rootdir")
    os.mkdir(d)
    os.chmod(d, 0o755)
    assert py_as(U1, G1, "open(%r, 'wb')" % os.path.join(d, "x")) == ("errno", errno.EACCES)
    assert py_as(U1, G1, "os.mkdir(%r)" % os.path.join(d, "x")) == ("errno", errno.EACCES)
    assert os.listdir(d) == []


def _sticky_unlink_errno(base):
    """What the kernel answers when U2 unlinks U1's file in a 01777 dir under base."""
    d = os.path.join(base, "sticky")
    os.mkdir(d)
    os.chmod(d, 0o1777)
    f = os.path.join(d, "owned-by-u1")
    assert py_as(U1, G1, "open(%r, 'wb').close()" % f) == ("ok", None)
    res = py_as(U2, G2, "os.unlink(%r)" % f)
    assert os.path.exists(f)
    # The owner may.
    assert py_as(U1, G1, "os.unlink(%r)" % f) == ("ok", None)
    return res


def test_sticky_dir(mu):
    with tempfile.TemporaryDirectory(dir="/tmp") as ref:
        os.chmod(ref, 0o755)
        expected = _sticky_unlink_errno(ref)
    assert expected[0] == "errno" and expected[1] in (errno.EPERM, errno.EACCES), expected
    assert _sticky_unlink_errno(mu.mnt) == expected


def test_user_0444_create_then_write(mu):
    d = mu.path("open")
    os.mkdir(d)
    os.chmod(d, 0o777)
    f = os.path.join(d, "ro")
    # POSIX: the descriptor that created a 0444 file may write it.
    assert py_as(U1, G1, "fd = os.open(%r, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o444)\n"
                         "os.write(fd, b'x' * 5000)\nos.pwrite(fd, b'Y', 4095)\n"
                         "r = os.pread(fd, 3, 4094)\nos.close(fd)\nreturn r.decode()" % f) == ("ok", "xYx")
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o444
    assert py_as(U1, G1, "return len(open(%r, 'rb').read())" % f) == ("ok", 5000)
    assert py_as(U1, G1, "open(%r, 'r+b')" % f) == ("errno", errno.EACCES)
    # The owner may chmod and utime, not give the file away.
    assert py_as(U1, G1, "os.chmod(%r, 0o600)" % f) == ("ok", None)
    assert py_as(U1, G1, "os.utime(%r, ns=(5 * 10**9, 6 * 10**9))" % f) == ("ok", None)
    assert os.stat(f).st_mtime_ns == 6 * 10**9
    assert py_as(U1, G1, "os.chown(%r, %d, -1)" % (f, U2)) == ("errno", errno.EPERM)
    assert py_as(U2, G2, "os.utime(%r, ns=(1, 1))" % f) == ("errno", errno.EPERM)
    assert _owner(f) == (U1, G1)


def test_allow_other_without_default_permissions(world_tmp, mount):
    # allow_other alone must not let every user read every file: the daemon runs as root.
    m = world_mount(world_tmp, mount, ["allow_other"])
    os.chmod(m.mnt, 0o755)
    p = m.path("secret")
    write_file(p, b"root only")
    os.chmod(p, 0o600)
    assert py_as(U1, G1, "open(%r, 'rb').read()" % p) == ("errno", errno.EACCES)
    assert py_as(U1, G1, "open(%r, 'wb')" % p) == ("errno", errno.EACCES)
    assert py_as(U1, G1, "open(%r, 'wb')" % m.path("new")) == ("errno", errno.EACCES)
    assert py_as(U1, G1, "os.unlink(%r)" % p) == ("errno", errno.EACCES)
    assert py_as(U1, G1, "os.chmod(%r, 0o666)" % p) == ("errno", errno.EPERM)
    assert read_file(p) == b"root only"


def test_no_allow_other_refuses_other_users(world_tmp, mount):
    m = world_mount(world_tmp, mount)
    os.chmod(m.mnt, 0o777)
    write_file(m.path("f"), b"x")
    os.chmod(m.path("f"), 0o644)
    assert py_as(U1, G1, "os.stat(%r)" % m.path("f")) == ("errno", errno.EACCES)
