# test_tag_cache.py: the v2 tag cache (content.c: tag pages of recently touched groups kept in the
# daemon, exclusive mounts only) never changes what a user reads: contents stay exact through
# interleaved writes, reads, truncates, punches and zeroed ranges; a backing data page changed
# after its tag page was cached still fails with EIO; a backing change to a tag entry alone goes
# unnoticed only while the authentic tag is cached (docs/FORMAT.md, "The tag cache"), and a
# truncate, a fallocate or a lock drops the cached pages. Reads go O_DIRECT so each one reaches
# the daemon.
import errno
import mmap
import os
import random

import pytest

from helpers import CHUNK, FORMAT, KEYFSCTL, LAYOUT, direct_pread, fallocate, flip, read_file, run, write_file

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

GROUP = 128 * CHUNK     # the plaintext one v2 tag page covers

v2_only = pytest.mark.skipif(FORMAT != 2, reason="tag pages are format v2")


def _direct_read_all(path, size):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        return direct_pread(fd, size, 0)
    finally:
        os.close(fd)


def _expect_eio(fd, size, off):
    with pytest.raises(OSError) as ei:
        direct_pread(fd, size, off)
    assert ei.value.errno == errno.EIO, ei.value


def test_interleaved_writes_reads_truncates_punches_are_exact(mount):
    m = mount()
    rnd = random.Random(12)
    model = bytearray(os.urandom(2 * GROUP + 3 * CHUNK + 77))
    write_file(m.path("f"), bytes(model))
    w = os.open(m.path("f"), os.O_RDWR)
    r = os.open(m.path("f"), os.O_RDONLY | os.O_DIRECT)
    try:
        for step in range(300):
            op = rnd.choice(["write", "write", "write", "read", "read", "truncate", "punch", "zero"])
            size = len(model)
            if op == "write":
                # Whole chunks, parts of chunks, across a group boundary, past the end.
                off = rnd.choice([rnd.randrange(0, size + 1), rnd.randrange(0, 3 * GROUP) // CHUNK * CHUNK,
                                  GROUP - CHUNK, 2 * GROUP - 100])
                data = os.urandom(rnd.choice([1, 100, CHUNK, 2 * CHUNK, CHUNK + 1, 40000]))
                os.pwrite(w, data, off)
                if off > size:
                    model.extend(bytes(off - size))
                model[off:off + len(data)] = data
            elif op == "read":
                off = rnd.randrange(0, size + 1) // CHUNK * CHUNK
                n = rnd.choice([CHUNK, 2 * CHUNK, 64 * 1024, GROUP + CHUNK])
                os.fsync(w)     # the writeback cache hands its pages to the daemon first
                assert direct_pread(r, n, off) == bytes(model[off:off + n]), (step, off, n)
            elif op == "truncate":
                new = rnd.choice([rnd.randrange(0, 3 * GROUP), size + rnd.randrange(1, GROUP), GROUP, GROUP + 5])
                os.ftruncate(w, new)
                if new < size:
                    del model[new:]
                else:
                    model.extend(bytes(new - size))
            elif size > 0:
                off = rnd.randrange(0, size)
                n = rnd.randrange(1, 3 * CHUNK + 2)
                mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if op == "punch" else \
                    FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
                fallocate(w, mode, off, n)
                end = min(off + n, size)
                model[off:end] = bytes(end - off)
        os.fsync(w)
        assert direct_pread(r, len(model) + CHUNK, 0) == bytes(model)
    finally:
        os.close(r)
        os.close(w)
    # And from the backing file alone, as a new daemon reads it.
    m.umount()
    m.start()
    assert read_file(m.path("f")) == bytes(model)


def test_random_4k_writes_then_reads_are_exact(mount):
    # The bench's pattern: aligned 4 KiB writes all over a file of several groups, every tag
    # page rewritten whole many times, then each chunk read back through the cache and cold.
    m = mount()
    nchunks = 3 * 128 + 9
    model = bytearray(os.urandom(nchunks * CHUNK))
    write_file(m.path("f"), bytes(model))
    rnd = random.Random(4)
    fd = os.open(m.path("f"), os.O_RDWR | os.O_DIRECT)
    try:
        for _ in range(600):
            i = rnd.randrange(nchunks)
            data = os.urandom(CHUNK)
            buf = mmap.mmap(-1, CHUNK)
            buf.write(data)
            assert os.pwritev(fd, [buf], i * CHUNK) == CHUNK
            buf.close()
            model[i * CHUNK:(i + 1) * CHUNK] = data
            j = rnd.randrange(nchunks)
            assert direct_pread(fd, CHUNK, j * CHUNK) == bytes(model[j * CHUNK:(j + 1) * CHUNK])
    finally:
        os.close(fd)
    m.umount()
    m.start()
    assert _direct_read_all(m.path("f"), len(model)) == bytes(model)


def _filled(m, name, data):
    """Write data, then read it all once through the daemon, so that its tag pages are cached."""
    write_file(m.path(name), data)
    fd = os.open(m.path(name), os.O_RDONLY | os.O_DIRECT)
    assert direct_pread(fd, len(data), 0) == data
    return fd


@v2_only
def test_data_page_changed_after_its_tag_page_was_cached_fails(mount):
    m = mount(allow_errors=True)
    data = os.urandom(GROUP + 4 * CHUNK)
    fd = _filled(m, "f", data)
    try:
        flip(m.bpath("f"), LAYOUT.data_offset(3) + 100)
        flip(m.bpath("f"), LAYOUT.data_offset(128 + 1))
        _expect_eio(fd, CHUNK, 3 * CHUNK)
        _expect_eio(fd, CHUNK, (128 + 1) * CHUNK)
        # The chunks around them still read.
        assert direct_pread(fd, CHUNK, 2 * CHUNK) == data[2 * CHUNK:3 * CHUNK]
        assert direct_pread(fd, CHUNK, 128 * CHUNK) == data[128 * CHUNK:129 * CHUNK]
        # Both a tag entry and its data page changed (a chunk copied from elsewhere): EIO too.
        flip(m.bpath("f"), LAYOUT.tag_offset(5) + 3)
        flip(m.bpath("f"), LAYOUT.data_offset(5) + 7)
        _expect_eio(fd, CHUNK, 5 * CHUNK)
    finally:
        os.close(fd)


@v2_only
def test_tag_entry_changed_alone_while_cached_goes_unnoticed(mount):
    # What docs/FORMAT.md says: while the daemon caches a tag page, it checks the data pages
    # against the authentic entries it holds, so a backing change to an entry alone (the data
    # page untouched) is not seen until the page leaves the cache. A remount sees it.
    m = mount(allow_errors=True)
    data = os.urandom(4 * CHUNK)
    fd = _filled(m, "f", data)
    try:
        flip(m.bpath("f"), LAYOUT.tag_offset(2) + 1)
        assert direct_pread(fd, CHUNK, 2 * CHUNK) == data[2 * CHUNK:3 * CHUNK]
    finally:
        os.close(fd)
    m.umount()
    m.start()
    fd = os.open(m.path("f"), os.O_RDONLY | os.O_DIRECT)
    try:
        _expect_eio(fd, CHUNK, 2 * CHUNK)
        assert direct_pread(fd, CHUNK, CHUNK) == data[CHUNK:2 * CHUNK]
    finally:
        os.close(fd)


@v2_only
@pytest.mark.parametrize("how", ["truncate", "punch", "lock"])
def test_truncate_fallocate_and_lock_drop_the_cached_tag_pages(mount, how):
    m = mount(allow_errors=True)
    data = os.urandom(6 * CHUNK)
    fd = _filled(m, "f", data)
    try:
        if how == "truncate":
            os.truncate(m.path("f"), 8 * CHUNK)
            data += bytes(2 * CHUNK)
        elif how == "punch":
            w = os.open(m.path("f"), os.O_RDWR)
            try:
                fallocate(w, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4 * CHUNK, CHUNK)
            finally:
                os.close(w)
            data = data[:4 * CHUNK] + bytes(CHUNK) + data[5 * CHUNK:]
        else:
            assert run([KEYFSCTL, "lock", m.mnt], timeout=30).returncode == 0
            assert run([KEYFSCTL, "unlock", m.mnt], timeout=30).returncode == 0
        # The entry alone changed: seen at once, as the tag page is read from the backing again.
        flip(m.bpath("f"), LAYOUT.tag_offset(1) + 1)
        _expect_eio(fd, CHUNK, CHUNK)
        assert direct_pread(fd, CHUNK, 0) == data[:CHUNK]
        assert direct_pread(fd, len(data) - 2 * CHUNK, 2 * CHUNK) == data[2 * CHUNK:]
    finally:
        os.close(fd)


def test_appends_across_groups_after_a_shrink_read_holes_where_nothing_was_written(mount):
    # A shrink leaves old entries in the last tag page; growing past them by a write must read
    # them as holes, with the tag page cached or not.
    m = mount()
    old = os.urandom(GROUP + 10 * CHUNK)
    fd = _filled(m, "f", old)
    try:
        os.truncate(m.path("f"), 3 * CHUNK + 5)
        assert direct_pread(fd, 4 * CHUNK, 0) == old[:3 * CHUNK + 5]
        tail = os.urandom(CHUNK)
        w = os.open(m.path("f"), os.O_WRONLY)
        try:
            os.pwrite(w, tail, GROUP + 2 * CHUNK)
            os.fsync(w)
        finally:
            os.close(w)
        want = old[:3 * CHUNK + 5] + bytes(GROUP + 2 * CHUNK - (3 * CHUNK + 5)) + tail
        assert direct_pread(fd, len(want) + CHUNK, 0) == want
    finally:
        os.close(fd)
    m.umount()
    m.start()
    assert read_file(m.path("f")) == want
