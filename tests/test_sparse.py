# test_sparse.py: sparse files: huge truncates stay small on disk, holes read as zeros, SEEK_DATA/HOLE
import errno
import os

import pytest

from helpers import CHUNK, backing_size, read_file, write_file

G = 1 << 30
M = 1 << 20


def _pread_exact(path, n, off):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def test_truncate_10g(mnt):
    p = mnt.path("big")
    open(p, "wb").close()
    os.truncate(p, 10 * G)
    assert os.stat(p).st_size == 10 * G
    b = os.stat(mnt.bpath("big"))
    assert b.st_size == backing_size(10 * G)
    assert b.st_blocks * 512 < M, "backing of a 10 GiB hole uses %d bytes" % (b.st_blocks * 512)
    assert _pread_exact(p, 4096, 0) == bytes(4096)
    assert _pread_exact(p, 4096, 5 * G) == bytes(4096)
    assert _pread_exact(p, 1, 10 * G - 1) == b"\0"
    assert _pread_exact(p, 100, 10 * G - 1) == b"\0"
    assert _pread_exact(p, 100, 10 * G) == b""

    data = b"hello in the middle of nowhere" * 50
    fd = os.open(p, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, 5 * G + 100) == len(data)
    finally:
        os.close(fd)
    assert os.stat(p).st_size == 10 * G
    assert _pread_exact(p, len(data), 5 * G + 100) == data
    assert _pread_exact(p, 100, 5 * G) == bytes(100)
    assert _pread_exact(p, 10, 5 * G + 100 + len(data)) == bytes(10)
    assert os.stat(mnt.bpath("big")).st_blocks * 512 < M
    mnt.remount()
    assert os.stat(p).st_size == 10 * G
    assert _pread_exact(p, len(data), 5 * G + 100) == data
    assert _pread_exact(p, 4096, 0) == bytes(4096)
    assert _pread_exact(p, 1, 10 * G - 1) == b"\0"


def test_truncate_up_unaligned_keeps_data(mnt):
    p = mnt.path("f")
    data = os.urandom(5000)
    write_file(p, data)
    new = 3 * M + 77
    os.truncate(p, new)
    assert os.stat(p).st_size == new
    assert os.stat(mnt.bpath("f")).st_size == backing_size(new)
    got = read_file(p)
    assert got[:5000] == data
    assert got[5000:] == bytes(new - 5000)
    mnt.remount()
    assert read_file(p) == data + bytes(new - 5000)


def test_write_at_1m_into_empty_file(mnt):
    p = mnt.path("f")
    fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        assert os.pwrite(fd, b"tail", M) == 4
    finally:
        os.close(fd)
    assert os.stat(p).st_size == M + 4
    assert os.stat(mnt.bpath("f")).st_size == backing_size(M + 4)
    assert read_file(p) == bytes(M) + b"tail"
    mnt.remount()
    assert read_file(p) == bytes(M) + b"tail"


def _backing_supports_seek_data(d):
    probe = os.path.join(d, ".seekprobe")
    fd = os.open(probe, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.pwrite(fd, b"x", 1 << 20)
        return os.lseek(fd, 0, os.SEEK_DATA) == 1 << 20
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(probe)


def _sparse_with_write(mnt, off, n):
    if not _backing_supports_seek_data(os.path.dirname(mnt.backing)):
        pytest.skip("the backing filesystem does not report holes")
    p = mnt.path("sparse")
    open(p, "wb").close()
    os.truncate(p, 10 * G)
    fd = os.open(p, os.O_RDWR)
    if n:
        assert os.pwrite(fd, b"d" * n, off) == n
    return fd


def test_seek_data_hole_never_hides_data(mnt):
    # What sparse-aware copies rely on: holes may be reported as data, data never as a hole;
    # and a 10 GiB file with one small write has holes worth the name.
    off, n = 5 * G + 100, 200
    fd = _sparse_with_write(mnt, off, n)
    try:
        pos, segments = 0, []
        while pos < 10 * G:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                assert e.errno == errno.ENXIO
                break
            assert d >= pos
            h = os.lseek(fd, d, os.SEEK_HOLE)
            assert d < h <= 10 * G
            segments.append((d, h))
            pos = h
            assert len(segments) < 10, segments
        covered = [s for s in segments if s[0] <= off and off + n <= s[1]]
        assert covered, "the written range %d+%d is not inside any data segment: %s" % (off, n, segments)
        assert sum(h - d for d, h in segments) <= 4 * CHUNK, "holes reported as data: %s" % segments
        with pytest.raises(OSError) as ei:
            os.lseek(fd, 10 * G, os.SEEK_DATA)
        assert ei.value.errno == errno.ENXIO
        assert os.lseek(fd, 10 * G - 1, os.SEEK_HOLE) in (10 * G - 1, 10 * G)
    finally:
        os.close(fd)


def test_seek_data_hole_exact_chunks(mnt):
    # A full chunk of zero bytes is a hole (format.h), so answers are exact at chunk granularity.
    off = 5 * G + 100
    fd = _sparse_with_write(mnt, 0, 0)
    try:
        # A whole file of holes: no data anywhere, like ext4 answers.
        with pytest.raises(OSError) as ei:
            os.lseek(fd, 0, os.SEEK_DATA)
        assert ei.value.errno == errno.ENXIO
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0

        assert os.pwrite(fd, b"data" * 50, off) == 200
        chunk = off // CHUNK * CHUNK
        assert os.lseek(fd, 0, os.SEEK_DATA) == chunk
        assert os.lseek(fd, chunk + 17, os.SEEK_DATA) == chunk + 17
        assert os.lseek(fd, chunk, os.SEEK_HOLE) == chunk + CHUNK
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        with pytest.raises(OSError) as ei:
            os.lseek(fd, chunk + 2 * CHUNK, os.SEEK_DATA)
        assert ei.value.errno == errno.ENXIO
    finally:
        os.close(fd)


@pytest.mark.parametrize("off", [(1 << 32) - 10, (1 << 40) + CHUNK - 6], ids=["4GiB", "1TiB"])
def test_write_at_large_offset(mnt, off):
    # 64-bit offsets: a write that straddles a chunk boundary far out, in a sparse file.
    p = mnt.path("far")
    data = b"0123456789abcdef" * 2
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        assert os.pwrite(fd, data, off) == len(data)
        assert os.fstat(fd).st_size == off + len(data)
        assert os.pread(fd, len(data) + 20, off - 10) == bytes(10) + data
    finally:
        os.close(fd)
    b = os.stat(mnt.bpath("far"))
    assert b.st_size == backing_size(off + len(data))
    assert b.st_blocks * 512 < M
    mnt.remount()
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.pread(fd, len(data) + 20, off - 10) == bytes(10) + data
        assert os.pread(fd, 100, 0) == bytes(100)
    finally:
        os.close(fd)


def test_truncate_beyond_max_is_efbig(mnt):
    p = mnt.path("f")
    open(p, "wb").close()
    with pytest.raises(OSError) as ei:
        os.truncate(p, (1 << 63) - 1)
    assert ei.value.errno in (errno.EFBIG, errno.EINVAL)
    assert os.stat(p).st_size == 0
