# test_format_v2.py: what format v2 promises on disk (docs/FORMAT.md, format v2): page-aligned
# data, tag entries kept apart, holes as zero entries, torn writes, and one layout per volume.
# These make their own volumes of the format they need, so they run in both suite runs.
import errno
import os
import random
import threading

import pytest

from helpers import CHUNK, KEYFSCTL, inspect_json, read_file, run, write_file
from layout import LAYOUTS, read_chunk, write_chunk

V2 = LAYOUTS[2]


def _volume(tmp_path, keystore, name, fmt):
    backing = str(tmp_path / name)
    r = run([KEYFSCTL, "init", backing, "--kms", "local", "--keystore", keystore, "--key", "fmt", "--format", str(fmt)]
            + ([] if os.path.exists(keystore) else ["--create-key"]))
    assert r.returncode == 0, r
    assert "  format:   %d\n" % fmt in r.stdout
    with open(os.path.join(backing, ".keyfs")) as f:
        assert "format=%d\n" % fmt in f.read()
    return backing


@pytest.fixture
def v2(mount, tmp_path, keystore):
    return mount(backing=_volume(tmp_path, keystore, "v2", 2), allow_errors=True)


def _pread(path, n, off):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def _expect_eio(path, n, off):
    with pytest.raises(OSError) as ei:
        _pread(path, n, off)
    assert ei.value.errno == errno.EIO


def test_aligned_write_touches_one_page_and_one_entry(v2):
    # 300 chunks: three groups. A 4 KiB write at a random aligned offset changes exactly the
    # bytes of that chunk's data page and its 32-byte tag entry, nothing else of the backing file.
    data = os.urandom(300 * CHUNK)
    write_file(v2.path("f"), data)
    before = read_file(v2.bpath("f"))
    assert len(before) == V2.backing_size(len(data))
    i = random.Random(os.getpid()).randrange(300)
    new = os.urandom(CHUNK)
    fd = os.open(v2.path("f"), os.O_WRONLY)
    try:
        assert os.pwrite(fd, new, i * CHUNK) == CHUNK
        os.fsync(fd)
    finally:
        os.close(fd)
    after = read_file(v2.bpath("f"))
    assert len(after) == len(before)
    page, entry = V2.page_offset(i), V2.entry_offset(i)
    assert page % 4096 == 0
    outside = bytearray(after)
    outside[page:page + CHUNK] = before[page:page + CHUNK]
    outside[entry:entry + 32] = before[entry:entry + 32]
    assert bytes(outside) == before, "chunk %d: bytes outside its page and entry changed" % i
    assert after[page:page + CHUNK] != before[page:page + CHUNK]
    assert after[entry:entry + 16] != before[entry:entry + 16]      # a fresh random nonce part
    assert read_file(v2.path("f")) == data[:i * CHUNK] + new + data[(i + 1) * CHUNK:]


@pytest.mark.parametrize("what", ["entry", "page"])
def test_swapped_entry_or_page_fails(v2, what):
    data = os.urandom(3 * CHUNK)
    write_file(v2.path("f"), data)
    v2.umount()
    raw = bytearray(read_file(v2.bpath("f")))
    c0, c1 = read_chunk(raw, 0, V2), read_chunk(raw, 1, V2)
    k = 1 if what == "entry" else 0          # spans: (data page, tag entry)
    c0[k], c1[k] = c1[k], c0[k]
    write_chunk(raw, 0, c0, V2)
    write_chunk(raw, 1, c1, V2)
    write_file(v2.bpath("f"), bytes(raw))
    v2.start()
    _expect_eio(v2.path("f"), CHUNK, 0)
    _expect_eio(v2.path("f"), CHUNK, CHUNK)
    assert _pread(v2.path("f"), CHUNK, 2 * CHUNK) == data[2 * CHUNK:]


def test_zero_entry_reads_zeros(v2):
    # A zero tag entry is a hole: the chunk reads as zeros whatever its data page holds. Not on
    # the partial last chunk, which must authenticate.
    data = os.urandom(3 * CHUNK + 100)
    write_file(v2.path("f"), data)
    v2.umount()
    with open(v2.bpath("f"), "r+b") as f:
        f.seek(V2.entry_offset(1))
        f.write(bytes(32))
        f.seek(V2.entry_offset(3))
        f.write(bytes(32))
    v2.start()
    assert _pread(v2.path("f"), 3 * CHUNK, 0) == data[:CHUNK] + bytes(CHUNK) + data[2 * CHUNK:3 * CHUNK]
    _expect_eio(v2.path("f"), 100, 3 * CHUNK)


def test_torn_write_fails_that_chunk_only(v2):
    # A crash between the data pages and the tag entries of a write leaves new pages under old
    # entries: those chunks read EIO until rewritten; the others and the header are untouched.
    data = os.urandom(4 * CHUNK)
    write_file(v2.path("f"), data)
    v2.umount()
    old_entries = read_file(v2.bpath("f"))[V2.entry_offset(0):V2.entry_offset(4)]
    v2.start()
    fd = os.open(v2.path("f"), os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(CHUNK), 2 * CHUNK)
    finally:
        os.close(fd)
    v2.umount()
    with open(v2.bpath("f"), "r+b") as f:
        f.seek(V2.entry_offset(0))
        f.write(old_entries)                 # the tag write never happened
    v2.start()
    p = v2.path("f")
    assert _pread(p, 2 * CHUNK, 0) == data[:2 * CHUNK]
    _expect_eio(p, CHUNK, 2 * CHUNK)
    assert _pread(p, CHUNK, 3 * CHUNK) == data[3 * CHUNK:]
    # Rewriting the torn chunk whole repairs it.
    fd = os.open(p, os.O_WRONLY)
    try:
        os.pwrite(fd, b"r" * CHUNK, 2 * CHUNK)
    finally:
        os.close(fd)
    assert read_file(p) == data[:2 * CHUNK] + b"r" * CHUNK + data[3 * CHUNK:]


def test_sparse_and_groups(v2):
    # Growth leaves holes (zero entries); a shrink then a grow does not bring back old chunks.
    p = v2.path("f")
    data = os.urandom(600 << 10)                 # two groups
    write_file(p, data)
    os.truncate(p, 5000)
    os.truncate(p, 700 << 10)
    assert read_file(p) == data[:5000] + bytes((700 << 10) - 5000)
    assert os.stat(v2.bpath("f")).st_size == V2.backing_size(700 << 10)
    fd = os.open(p, os.O_RDWR)
    try:
        # Chunk 0 and the old partial chunk 1 (now sealed full) are data, the rest holes.
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 2 * CHUNK
        with pytest.raises(OSError) as ei:
            os.lseek(fd, 2 * CHUNK, os.SEEK_DATA)
        assert ei.value.errno == errno.ENXIO
    finally:
        os.close(fd)


def test_other_layout_header_is_eio_and_fsck_names_it(mount, tmp_path, keystore):
    # A volume's files all use its layout: a v2 file copied into a v1 volume (or the reverse)
    # fails to open with EIO, and fsck says why.
    b1 = _volume(tmp_path, keystore, "v1", 1)
    b2 = _volume(tmp_path, keystore, "v2", 2)
    m2 = mount(backing=b2)
    write_file(m2.path("x"), b"from a v2 volume" * 10)
    m2.umount()
    m1 = mount(backing=b1, allow_errors=True)
    write_file(m1.path("mine"), b"v1 file" * 10)
    m1.umount()
    assert read_file(os.path.join(b1, "mine"))[8] == 1
    assert read_file(os.path.join(b2, "x"))[8] == 2
    with open(os.path.join(b2, "x"), "rb") as s, open(os.path.join(b1, "x"), "wb") as d:
        d.write(s.read())
    m1.start()
    with pytest.raises(OSError) as ei:
        read_file(m1.path("x"))
    assert ei.value.errno == errno.EIO
    assert read_file(m1.path("mine")) == b"v1 file" * 10
    m1.umount()
    r = run([KEYFSCTL, "fsck", b1])
    assert r.returncode == 7, r
    assert "damaged: x: header format version 2 is not this volume's format 1" in r.stdout, r.stdout
    # inspect names each file's format version.
    assert [d["format"] for d in inspect_json(os.path.join(b1, "mine"), os.path.join(b1, "x"))] == [1, 2]


def test_init_format_option(tmp_path, keystore):
    r = run([KEYFSCTL, "init", str(tmp_path / "b"), "--kms", "local", "--keystore", keystore, "--key", "k",
             "--create-key", "--format", "3"])
    assert r.returncode == 2 and "--format '3': use 1 or 2" in r.stderr
    assert not os.path.exists(tmp_path / "b" / ".keyfs")


@pytest.fixture
def v2_direct(mount, tmp_path, keystore):
    # No writeback cache: each pwrite below reaches keyfs as one WRITE of exactly its range.
    return mount(backing=_volume(tmp_path, keystore, "v2d", 2), opts=("nowriteback",), allow_errors=True)


def _pwrite(path, data, off):
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, off) == len(data)
    finally:
        os.close(fd)


def test_large_writes_at_the_edges(v2_direct):
    # Writes of 64 KiB and more seal their chunks before they take the file's exclusive lock
    # (contents.c): each case where that is allowed, and each where the write must read old
    # contents instead, leaves exactly the bytes written, the holes, and the backing size.
    p = v2_direct.path("f")
    model = bytearray()
    write_file(p, b"")

    def put(data, off):
        nonlocal model
        _pwrite(p, data, off)
        if off > len(model):
            model += bytes(off - len(model))
        model[off:off + len(data)] = data
        assert read_file(p) == bytes(model)
        assert os.stat(v2_direct.bpath("f")).st_size == V2.backing_size(len(model))

    put(os.urandom(16 * CHUNK + 100), 0)                # ends inside a chunk, at the new end
    put(os.urandom(16 * CHUNK), 256 * CHUNK)            # past the end: old partial chunk padded, holes
    put(os.urandom(16 * CHUNK + 100), 0)                # ends inside a chunk of the file: merged
    os.truncate(p, 16 * CHUNK + 5000)
    model = model[:16 * CHUNK + 5000]
    assert read_file(p) == bytes(model)
    put(os.urandom(32 * CHUNK), 16 * CHUNK)             # rewrites the partial last chunk whole
    put(os.urandom(130 * CHUNK), 126 * CHUNK)           # across a group boundary, growing
    put(os.urandom(64 * CHUNK), 3 * CHUNK)              # inside the file


def test_concurrent_large_writes_are_whole(v2_direct):
    # Several threads write 128 KiB blocks over one another while another appends: each block
    # reads back as exactly one of the writes made to it (a write is never mixed with another,
    # nor torn into a chunk that fails), and the appended part as appended.
    p = v2_direct.path("f")
    blk, nblk = 32 * CHUNK, 16
    write_file(p, bytes(blk * nblk))
    written = [[bytes(blk)] for _ in range(nblk)]
    lock = threading.Lock()
    errors = []

    def writer(seed):
        rnd = random.Random(seed)
        try:
            for _ in range(40):
                b = rnd.randrange(nblk)
                data = os.urandom(blk)
                with lock:
                    written[b].append(data)
                _pwrite(p, data, b * blk)
        except Exception as e:          # noqa: BLE001 - reported below
            errors.append(e)

    tail = os.urandom(64 * blk // 4)

    def appender():
        try:
            for i in range(0, len(tail), 4 * CHUNK * 5):
                _pwrite(p, tail[i:i + 4 * CHUNK * 5], blk * nblk + i)
        except Exception as e:          # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(4)] + [threading.Thread(target=appender)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    got = read_file(p)
    assert len(got) == blk * nblk + len(tail)
    for b in range(nblk):
        assert got[b * blk:(b + 1) * blk] in written[b], "block %d is none of the writes made to it" % b
    assert got[blk * nblk:] == tail
