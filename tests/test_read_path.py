# test_read_path.py: the read side's per-open-file size cache (contents.c file_size_cached) never
# answers with a size another operation changed, and a lock refuses reads through a handle
# whose cache is full; reads whose backing tag pages are not cached (content.c
# entries_read_before) return the exact bytes. Reads go O_DIRECT so each one reaches the daemon
# (the kernel's page cache would otherwise answer them and hide the daemon's side).
import errno
import os
import random

from helpers import KEYFSCTL, direct_pread, need_root, read_file, run, write_file


def test_read_after_another_handle_grows_and_shrinks_the_file(mount):
    m = mount()
    first, more = os.urandom(4096), os.urandom(3 * 4096 + 100)
    write_file(m.path("f"), first)
    fd = os.open(m.path("f"), os.O_RDONLY | os.O_DIRECT)
    try:
        # Fills the cache: backing size of one 4 KiB chunk.
        assert direct_pread(fd, 8192, 0) == first
        assert direct_pread(fd, 4096, 4096) == b""
        # Grown through another handle, written back to the daemon.
        w = os.open(m.path("f"), os.O_WRONLY)
        try:
            os.pwrite(w, more, 4096)
            os.fsync(w)
        finally:
            os.close(w)
        assert direct_pread(fd, 4 * 4096, 4096) == more
        assert direct_pread(fd, 4096, 4 * 4096) == more[3 * 4096:]
        # Shrunk by path: a cached size would read past the new end (or fail the shorter file).
        os.truncate(m.path("f"), 4096 + 10)
        assert direct_pread(fd, 8192, 0) == first + more[:10]
        assert direct_pread(fd, 4096, 8192) == b""
        # Emptied and written again: the new bytes, exactly.
        with open(m.path("f"), "wb") as f:
            f.write(b"new")
        assert direct_pread(fd, 4096, 0) == b"new"
    finally:
        os.close(fd)
    assert read_file(m.path("f")) == b"new"


def test_lock_refuses_reads_through_a_handle_with_a_cached_size(mount):
    m = mount(allow_errors=True)
    data = os.urandom(2 * 4096)
    write_file(m.path("f"), data)
    fd = os.open(m.path("f"), os.O_RDONLY | os.O_DIRECT)
    try:
        assert direct_pread(fd, 8192, 0) == data
        r = run([KEYFSCTL, "lock", m.mnt], timeout=30)
        assert r.returncode == 0, r
        for off in (0, 4096):
            try:
                got = direct_pread(fd, 4096, off)
            except OSError as e:
                assert e.errno == errno.ENOKEY, e
            else:
                raise AssertionError("read at %d while locked returned %r" % (off, got[:16]))
        r = run([KEYFSCTL, "unlock", m.mnt], timeout=30)
        assert r.returncode == 0, r
        assert direct_pread(fd, 8192, 0) == data
    finally:
        os.close(fd)


def test_reads_with_the_backing_cache_dropped_are_exact(mount):
    # Tag pages not cached: the entries are asked for without waiting, the data pages are read
    # ahead, then both are read for real. Every 4 KiB page, and reads across chunk and group
    # boundaries (v2: 128 chunks a group), at random, each from a cold backing cache.
    need_root()
    m = mount()
    data = os.urandom(300 * 4096 + 123)
    write_file(m.path("f"), data)
    rng = random.Random(12)
    reads = [(k * 4096, 4096) for k in rng.sample(range(301), 40)]
    reads += [(127 * 4096 + 100, 2 * 4096), (255 * 4096, 3 * 4096), (0, 300 * 4096 + 123), (300 * 4096, 4096)]
    fd = os.open(m.path("f"), os.O_RDONLY | os.O_DIRECT)
    try:
        for i, (off, size) in enumerate(reads):
            if i % 4 == 0 or size > 4096:
                os.sync()
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("1")
            got = direct_pread(fd, (size + 4095) // 4096 * 4096 + 4096, off)
            # O_DIRECT reads whole pages: compare what the file holds from off on.
            assert got[:size] == data[off:off + size], (off, size)
            assert len(got) == min(len(data) - off, (size + 4095) // 4096 * 4096 + 4096), (off, size)
    finally:
        os.close(fd)
