# test_multiuser.py: allow_other,default_permissions: ownership of new files, setgid dirs, access checks
import errno
import os
import stat
import struct
import tempfile

import pytest

from helpers import expect_errno, keyfsctl, need_root, py_as, read_file, write_file

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


# ---- POSIX ACLs: kept on the backing file, read back exactly, and enforced ----

ACL_ACCESS = "system.posix_acl_access"
ACL_DEFAULT = "system.posix_acl_default"
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
ACL_UNDEF_ID = 0xFFFFFFFF


def acl_value(*entries):
    """The xattr value of a POSIX ACL (version 2): (tag, perm, id) entries, sorted as the kernel wants."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in entries)


def acl_u1_none_u2_read():
    """rw-r----- with U1 named and given nothing, U2 named and given read: the mode bits alone would let
    neither read (other has nothing), so only U2's entry, honoured, lets U2 in."""
    return acl_value((ACL_USER_OBJ, 6, ACL_UNDEF_ID), (ACL_USER, 0, U1), (ACL_USER, 4, U2),
                     (ACL_GROUP_OBJ, 4, ACL_UNDEF_ID), (ACL_MASK, 4, ACL_UNDEF_ID), (ACL_OTHER, 0, ACL_UNDEF_ID))


def read_as(uid, gid, path):
    return py_as(uid, gid, "return open(%r, 'rb').read().decode()" % path)


def test_acl_set_through_mount_reads_back_and_is_enforced(mu):
    f = mu.path("acl")
    write_file(f, b"for some")
    os.chmod(f, 0o640)
    assert read_as(U2, G2, f) == ("errno", errno.EACCES)
    acl = acl_u1_none_u2_read()
    os.setxattr(f, ACL_ACCESS, acl)
    assert os.getxattr(f, ACL_ACCESS) == acl
    assert os.getxattr(mu.bpath("acl"), ACL_ACCESS) == acl
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640
    assert read_as(U2, G2, f) == ("ok", "for some")
    assert read_as(U1, G1, f) == ("errno", errno.EACCES)
    # chmod moves the mask with the group bits: U2's entry now grants nothing.
    os.chmod(f, 0o600)
    masked = acl_value((ACL_USER_OBJ, 6, ACL_UNDEF_ID), (ACL_USER, 0, U1), (ACL_USER, 4, U2),
                       (ACL_GROUP_OBJ, 4, ACL_UNDEF_ID), (ACL_MASK, 0, ACL_UNDEF_ID), (ACL_OTHER, 0, ACL_UNDEF_ID))
    assert os.getxattr(f, ACL_ACCESS) == masked
    assert read_as(U2, G2, f) == ("errno", errno.EACCES)
    # Without the ACL the mode bits alone decide again.
    os.removexattr(f, ACL_ACCESS)
    expect_errno(errno.ENODATA, os.getxattr, f, ACL_ACCESS)
    os.chmod(f, 0o644)
    assert read_as(U1, G1, f) == ("ok", "for some")


def test_acl_set_on_backing_side_reads_back_and_is_enforced(world_tmp, mount):
    m = world_mount(world_tmp, mount, opts=["allow_other", "default_permissions"])
    backing, mnt = m.backing, m.mnt
    os.chmod(m.mnt, 0o755)
    write_file(m.path("f"), b"kept")
    d = m.path("d")
    os.mkdir(d, 0o755)
    m.umount()
    acl = acl_u1_none_u2_read()
    dacl = acl_value((ACL_USER_OBJ, 7, ACL_UNDEF_ID), (ACL_USER, 5, U1), (ACL_GROUP_OBJ, 5, ACL_UNDEF_ID),
                     (ACL_MASK, 5, ACL_UNDEF_ID), (ACL_OTHER, 5, ACL_UNDEF_ID))
    bf = os.path.join(backing, "f")
    os.chmod(bf, 0o640)
    os.setxattr(bf, ACL_ACCESS, acl)
    os.setxattr(os.path.join(backing, "d"), ACL_DEFAULT, dacl)
    m = mount(backing=backing, mnt=mnt, opts=["allow_other", "default_permissions"])
    assert os.getxattr(m.path("f"), ACL_ACCESS) == acl
    assert os.getxattr(d, ACL_DEFAULT) == dacl
    expect_errno(errno.ENODATA, os.getxattr, d, ACL_ACCESS)
    assert read_as(U1, G1, m.path("f")) == ("errno", errno.EACCES)
    assert read_as(U2, G2, m.path("f")) == ("ok", "kept")
    # A file made in d inherits the default ACL, as the backing filesystem makes it.
    write_file(os.path.join(d, "child"), b"x")
    assert os.getxattr(os.path.join(d, "child"), ACL_ACCESS) == os.getxattr(os.path.join(backing, "d", "child"),
                                                                         ACL_ACCESS)
    assert read_as(U1, G1, os.path.join(d, "child")) == ("ok", "x")
