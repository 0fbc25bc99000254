# test_writeback.py: kill-priv v2 (no GETXATTR before every write) and the -o writeback cache:
# nothing acknowledged lost across a lock, O_APPEND, write-only handles, exact sizes.
import errno
import os
import stat
import threading

import pytest

from helpers import KEYFSCTL, keyfsctl, need_root, read_file, run, run_as, write_file

NOBODY = 65534
MODES = [(), ("writeback",)]


def requests(m, opcode):
    """How many requests of this opcode the -d log of mount m shows so far."""
    with open(m.log, errors="replace") as f:
        return sum(1 for line in f if "opcode: %s " % opcode in line)


def ctl(*args):
    r = run([KEYFSCTL, *args], timeout=30)
    assert r.returncode == 0, r
    return r


def test_no_getxattr_before_each_write(mount):
    m = mount(extra_args=["-d"], allow_errors=True)
    before = requests(m, "GETXATTR")
    fd = os.open(m.path("f"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for k in range(50):
            os.pwrite(fd, b"x" * 100, k * 100)
    finally:
        os.close(fd)
    # The kernel asks once per inode whose attributes it (re)learnt, not once per write.
    assert requests(m, "GETXATTR") - before <= 2
    assert read_file(m.path("f")) == b"x" * 5000


@pytest.mark.parametrize("opts", MODES)
def test_write_by_non_owner_drops_suid_and_sgid(world_tmp, mount, opts):
    need_root()
    keystore, backing = os.path.join(world_tmp, "keystore"), os.path.join(world_tmp, "backing")
    keyfsctl("init", backing, "--kms", "local", "--keystore", keystore, "--key", "test", "--create-key")
    os.mkdir(os.path.join(world_tmp, "mnt"))
    m = mount(backing=backing, mnt=os.path.join(world_tmp, "mnt"), opts=("allow_other",) + opts)
    os.chmod(m.mnt, 0o755)
    for name in ("w", "t", "o"):
        write_file(m.path(name), b"data")
        os.chmod(m.path(name), 0o6777)
    for argv in (["sh", "-c", "echo x >> " + m.path("w")], ["truncate", "-s", "1", m.path("t")],
                 ["sh", "-c", "echo y > " + m.path("o")]):
        r = run_as(NOBODY, NOBODY, argv)
        assert r.returncode == 0, r
    for name in ("w", "t", "o"):
        assert stat.S_IMODE(os.stat(m.path(name)).st_mode) == 0o777, name
        assert stat.S_IMODE(os.stat(m.bpath(name)).st_mode) == 0o777, name
    # Root keeps them (CAP_FSETID), as on any Linux filesystem.
    write_file(m.path("r"), b"data")
    os.chmod(m.path("r"), 0o6777)
    write_file(m.path("r"), b"more", mode="ab")
    assert stat.S_IMODE(os.stat(m.path("r")).st_mode) == 0o6777
    assert read_file(m.path("w")) == b"datax\n"


def test_writeback_option_asks_the_kernel(mount):
    m = mount(opts=("writeback",), extra_args=["-d"], allow_errors=True)
    fd = os.open(m.path("f"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for k in range(256):
            os.write(fd, b"y" * 16)
    finally:
        os.close(fd)
    # 256 small writes merge into one page written back.
    assert requests(m, "WRITE") <= 2
    assert read_file(m.path("f")) == b"y" * 4096


@pytest.mark.parametrize("opts", MODES)
def test_lock_right_after_cached_writes_loses_nothing(mount, opts):
    m = mount(opts=opts)
    data = os.urandom(3 * 4096 + 123)
    fd = os.open(m.path("f"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for off in range(0, len(data), 1000):
            assert os.pwrite(fd, data[off:off + 1000], off) == len(data[off:off + 1000])
        ctl("lock", m.mnt)
        # The lock wrote the dirty pages back before refusing writes: close reports nothing.
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"z" * 10, 0)
        assert e.value.errno == errno.ENOKEY
    finally:
        os.close(fd)
    with pytest.raises(OSError) as e:
        read_file(m.path("f"))
    assert e.value.errno == errno.ENOKEY
    assert os.stat(m.path("f")).st_size == len(data)
    ctl("unlock", m.mnt)
    assert read_file(m.path("f")) == data


@pytest.mark.parametrize("opts", MODES)
def test_append_from_two_fds(mount, opts):
    m = mount(opts=opts)
    write_file(m.path("f"), b"")
    fds = [os.open(m.path("f"), os.O_WRONLY | os.O_APPEND) for _ in range(2)]
    recs = [[b"%c%05d\n" % (ord("a") + n, k) for k in range(500)] for n in range(2)]

    def writer(n):
        for rec in recs[n]:
            assert os.write(fds[n], rec) == len(rec)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for fd in fds:
        os.close(fd)
    got = read_file(m.path("f"))
    assert len(got) == 2 * 500 * 7
    lines = got.splitlines(keepends=True)
    for n in range(2):
        assert [r for r in lines if r[:1] == recs[n][0][:1]] == recs[n]


@pytest.mark.parametrize("opts", MODES)
def test_write_only_partial_pages(mount, opts):
    m = mount(opts=opts)
    base = os.urandom(10000)
    write_file(m.path("f"), base)
    fd = os.open(m.path("f"), os.O_WRONLY)
    try:
        os.pwrite(fd, b"A" * 10, 5)          # inside page 0
        os.pwrite(fd, b"B" * 100, 4090)      # across pages 0 and 1
        os.pwrite(fd, b"C" * 7, 9998)        # across the end
    finally:
        os.close(fd)
    want = bytearray(base)
    want[5:15] = b"A" * 10
    want[4090:4190] = b"B" * 100
    want[9998:] = b"C" * 7
    assert read_file(m.path("f")) == bytes(want)


@pytest.mark.parametrize("opts", MODES)
def test_sizes_exact_after_truncate_and_extend(mount, opts):
    m = mount(opts=opts)
    data = os.urandom(20000)
    fd = os.open(m.path("f"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, data, 0)
        assert os.fstat(fd).st_size == 20000
        os.ftruncate(fd, 5000)
        assert os.fstat(fd).st_size == 5000
        assert os.pread(fd, 30000, 0) == data[:5000]
        os.pwrite(fd, b"E", 9999)
        assert os.stat(m.path("f")).st_size == 10000
        os.ftruncate(fd, 12000)
        assert os.pread(fd, 30000, 0) == data[:5000] + b"\0" * 4999 + b"E" + b"\0" * 2000
        os.fsync(fd)
    finally:
        os.close(fd)
    assert os.stat(m.path("f")).st_size == 12000
