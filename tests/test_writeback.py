# test_writeback.py: kill-priv v2 (no GETXATTR before every write) and the writeback cache (the
# default): nothing acknowledged lost across a lock, O_APPEND, write-only handles, exact sizes.
import ctypes
import errno
import fcntl
import mmap
import os
import platform
import select
import stat
import struct
import threading
import time

import pytest

from helpers import KEYFSCTL, backing_size, keyfsctl, need_root, read_file, run, run_as, write_file

NOBODY = 65534
MODES = [("nowriteback",), ()]


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


@pytest.mark.parametrize("opts", [(), ("writeback",)])
def test_writeback_option_asks_the_kernel(mount, opts):
    m = mount(opts=opts, extra_args=["-d"], allow_errors=True)
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


def test_nowriteback_sends_every_write(mount):
    m = mount(opts=("nowriteback",), extra_args=["-d"], allow_errors=True)
    before = requests(m, "WRITE")
    fd = os.open(m.path("f"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for k in range(64):
            os.write(fd, b"y" * 16)
    finally:
        os.close(fd)
    assert requests(m, "WRITE") - before == 64
    assert read_file(m.path("f")) == b"y" * 1024


REC = 32


def record(k):
    return b"%010d:" % k + b"r" * (REC - 12) + b"\n"


def write_records_across_lock(m, flags):
    """A writer thread writes numbered records, noting when each write() returned; the lock is
    requested mid-stream. Returns (records acknowledged, times, lock sent at, errno the writer
    stopped on, fsync error or 0, size stat saw while locked)."""
    fd = os.open(m.path("f"), os.O_CREAT | os.O_WRONLY | flags, 0o644)
    times, stopped = [], []

    def writer():
        try:
            for k in range(1000000):
                os.write(fd, record(k))
                times.append(time.monotonic())
        except OSError as e:
            stopped.append(e.errno)

    t = threading.Thread(target=writer)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while len(times) < 3000 and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(times) >= 3000, "the writer did not get going"
        sent = time.monotonic()
        ctl("lock", m.mnt)
        t.join(30)
        assert not t.is_alive(), "writes kept succeeding on a locked mount"
        locked_size = os.stat(m.path("f")).st_size
        try:
            os.fsync(fd)
            synced = 0
        except OSError as e:
            synced = e.errno
    finally:
        t.join(30)
        os.close(fd)
    return len(times), times, sent, stopped, synced, locked_size


@pytest.mark.parametrize("flags", [0, os.O_APPEND], ids=["seq", "append"])
@pytest.mark.parametrize("opts", MODES)
def test_records_acknowledged_before_the_lock_survive_it(mount, opts, flags):
    m = mount(opts=opts)
    n, times, sent, stopped, synced, locked_size = write_records_across_lock(m, flags)
    # The writer stopped on the lock's errno, not on anything else.
    assert stopped == [errno.ENOKEY]
    # A concurrent write() that returned success is either written or its loss is reported.
    assert synced in (0, errno.EIO)
    ctl("unlock", m.mnt)
    got = read_file(m.path("f"))
    before = sum(1 for t in times if t < sent)
    assert before >= 3000
    assert got[:before * REC] == b"".join(record(k) for k in range(before))
    if synced == 0:
        # Nothing lost: every acknowledged record is there, and nothing else; the size the
        # kernel showed while locked is the backing file's.
        assert got == b"".join(record(k) for k in range(n))
        assert locked_size == n * REC
        assert os.stat(m.bpath("f")).st_size == backing_size(n * REC)


@pytest.mark.parametrize("opts", MODES)
def test_write_after_the_lock_fails_even_after_stat(mount, opts):
    m = mount(opts=opts)
    data = os.urandom(6000)
    fd = os.open(m.path("f"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, data, 0)
        ctl("lock", m.mnt)
        # Names and sizes stay readable; what the kernel learns from them must not let a
        # cached write() skip asking for the attributes through its descriptor.
        assert os.stat(m.path("f")).st_size == 6000
        assert os.listdir(m.mnt) == ["f"]
        assert os.fstat(fd).st_size == 6000
        for off, chunk in ((8192, b"n" * 4096), (0, b"p" * 4096), (6000, b"a" * 10)):
            with pytest.raises(OSError) as e:
                os.pwrite(fd, chunk, off)
            assert e.value.errno == errno.ENOKEY
        assert os.stat(m.path("f")).st_size == 6000
        os.fsync(fd)
    finally:
        os.close(fd)
    ctl("unlock", m.mnt)
    assert read_file(m.path("f")) == data


@pytest.mark.parametrize("opts", MODES)
def test_sizes_after_truncating_dirty_pages_and_locking(mount, opts):
    m = mount(opts=opts)
    data = os.urandom(10000)
    fd = os.open(m.path("f"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, 3000)
        os.pwrite(fd, b"X", 5000)
        os.ftruncate(fd, 7000)
        assert os.fstat(fd).st_size == 7000
        ctl("lock", m.mnt)
        # Written back before the lock: the kernel's size, the plaintext size and the backing
        # file agree.
        assert os.stat(m.path("f")).st_size == 7000
        assert os.stat(m.bpath("f")).st_size == backing_size(7000)
        os.fsync(fd)
    finally:
        os.close(fd)
    ctl("unlock", m.mnt)
    assert read_file(m.path("f")) == data[:3000] + b"\0" * 2000 + b"X" + b"\0" * 1999


# ---- a write() the kernel checked before the lock and that dirties its page after it ----

UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_COPY = 0xC028AA03
UFFD_EVENT_PAGEFAULT = 0x12
NR_USERFAULTFD = {"x86_64": 323, "aarch64": 282}


def userfault_page():
    """An anonymous page whose first touch waits for us (userfaultfd): (uffd, address)."""
    nr = NR_USERFAULTFD.get(platform.machine())
    if nr is None or os.geteuid() != 0:
        pytest.skip("userfaultfd for kernel accesses needs root on x86_64 or aarch64")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    uffd = libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK)
    if uffd < 0:
        pytest.skip("userfaultfd: %s" % os.strerror(ctypes.get_errno()))
    fcntl.ioctl(uffd, UFFDIO_API, bytearray(struct.pack("QQQ", 0xAA, 0, 0)), True)
    addr = libc.mmap(None, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    fcntl.ioctl(uffd, UFFDIO_REGISTER, bytearray(struct.pack("QQQQ", addr, mmap.PAGESIZE, 1, 0)), True)
    return uffd, addr


def test_write_stalled_across_the_lock_is_reported_by_fsync(mount):
    """The one race no FUSE daemon can close (docs/LOCKING.md): a write() that passed the
    kernel's attribute check before the lock began and dirties its page after the lock's last
    write-back pass. Its source buffer faults, and we hold the fault until the lock is done."""
    assert mmap.PAGESIZE == 4096
    uffd, addr = userfault_page()
    m = mount()
    old = os.urandom(8192)
    write_file(m.path("f"), old)
    fd = os.open(m.path("f"), os.O_WRONLY)
    result = []
    src = (ctypes.c_char * 4096).from_buffer_copy(b"N" * 4096)
    t = threading.Thread(target=lambda: result.append(
        os.pwrite(fd, memoryview((ctypes.c_char * 4096).from_address(addr)).cast("B"), 0)))
    try:
        t.start()
        # The write() waits in the copy from its buffer: past the attribute check, inode locked.
        ready, _, _ = select.select([uffd], [], [], 30)
        assert ready, "the write never touched its buffer"
        msg = os.read(uffd, 32)
        assert msg[0] == UFFD_EVENT_PAGEFAULT
        ctl("lock", m.mnt)
        fcntl.ioctl(uffd, UFFDIO_COPY, bytearray(struct.pack("QQQQq", addr, ctypes.addressof(src), 4096, 0, 0)),
                    True)
        t.join(30)
        # It returned success: its page is dirty now, after the write-back, and the keys are gone.
        assert result == [4096]
        with pytest.raises(OSError) as e:
            os.fsync(fd)
        assert e.value.errno == errno.EIO
        assert os.stat(m.path("f")).st_size == 8192
    finally:
        t.join(30)
        os.close(fd)
        os.close(uffd)
    ctl("unlock", m.mnt)
    # Lost, as fsync said; what was there before is intact.
    assert read_file(m.path("f")) == old


@pytest.mark.parametrize("opts", MODES)
def test_seek_data_sees_cached_writes_of_another_descriptor(mount, opts):
    # What a sparse-aware copy (cp, tar) of a file being written relies on: data the kernel
    # still caches is data, not a hole.
    m = mount(opts=opts)
    w = os.open(m.path("f"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.ftruncate(w, 1 << 20)
        os.pwrite(w, b"d" * 100, 512 * 1024 + 10)
        r = os.open(m.path("f"), os.O_RDONLY)
        try:
            assert os.lseek(r, 0, os.SEEK_DATA) == 512 * 1024
            assert os.lseek(r, 512 * 1024, os.SEEK_HOLE) == 512 * 1024 + 4096
            assert os.pread(r, 100, 512 * 1024 + 10) == b"d" * 100
        finally:
            os.close(r)
    finally:
        os.close(w)


def cachestat(path):
    """(dirty, under write-back) pages of a file in the page cache: the cachestat syscall (Linux 6.5)."""
    if platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("cachestat's syscall number is known here for x86_64 and aarch64 only")
    nr = 451
    libc = ctypes.CDLL(None, use_errno=True)
    rng = struct.pack("QQ", 0, 0)           # the whole file
    out = ctypes.create_string_buffer(5 * 8)
    fd = os.open(path, os.O_RDONLY)
    try:
        r = libc.syscall(nr, fd, ctypes.c_char_p(rng), out, 0)
        if r < 0:
            e = ctypes.get_errno()
            if e == errno.ENOSYS:
                pytest.skip("this kernel has no cachestat (Linux 6.5)")
            raise OSError(e, os.strerror(e))
    finally:
        os.close(fd)
    _, dirty, writeback, _, _ = struct.unpack("5Q", out.raw)
    return dirty, writeback


WRITEOUT_EVERY = 8 << 20        # fs/contents.c


@pytest.mark.parametrize("opts", [(), ("nowriteback",)], ids=["writeback", "nowriteback"])
def test_a_big_write_starts_the_backing_write_out_as_it_goes(mount, opts):
    """fs/contents.c, writeout_note: large writes start the backing file's write-out every 8 MiB, so
    an fsync after a big write finds at most the last 8 MiB (and their tag pages) still dirty."""
    m = mount(opts=opts)
    mib = b"\x5a" * (1 << 20)
    fd = os.open(m.path("big"), os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        for _ in range(40):
            os.write(fd, mib)
        # What the kernel still caches on the mount's side goes to keyfs now, without an fsync
        # (which would write the backing file out too): sync_file_range on the mount's file.
        libc = ctypes.CDLL(None, use_errno=True)
        wait_write_wait = 1 | 2 | 4         # SYNC_FILE_RANGE_WAIT_BEFORE | _WRITE | _WAIT_AFTER
        assert libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), wait_write_wait) == 0
        assert cachestat(m.path("big"))[0] == 0
        dirty, _ = cachestat(m.bpath("big"))
    finally:
        os.close(fd)
    assert os.stat(m.path("big")).st_size == 40 << 20
    # Old: every one of the backing file's 10,000-odd pages of data waits for an fsync.
    assert dirty * 4096 <= WRITEOUT_EVERY + (1 << 20), "%d backing pages still dirty" % dirty
    assert read_file(m.path("big")) == mib * 40
