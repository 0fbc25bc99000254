# test_basic.py: round trips, exact sizes, appends, overwrites, concurrency, no plaintext in the backing
import os
import random
import threading
import time

import pytest

from helpers import (CHUNK, HEADER_AREA, LAYOUTS, backing_files, backing_size, proc_mounts_entry, read_file, sha256,
                     write_file)

SIZES = [0, 1, 4095, 4096, 4097, 8191, 8192, 8193, (1 << 20) + 3, 20 << 20]


def test_mount_shows_in_proc_mounts(mnt):
    assert proc_mounts_entry(mnt.mnt) == (os.path.abspath(mnt.backing), "fuse.keyfs")
    # The volume description is hidden from the mount root.
    assert os.listdir(mnt.mnt) == []


def test_backing_size_formula():
    # The formulas themselves, against the worked examples of docs/FORMAT.md.
    v1, v2 = LAYOUTS[1], LAYOUTS[2]
    assert v1.backing_size(0) == 2048
    assert v1.backing_size(1) == 2048 + 41
    assert v1.backing_size(4096) == 2048 + 4136
    assert v1.backing_size(4097) == 2048 + 4136 + 41
    assert v1.backing_size(8192) == 2048 + 2 * 4136
    assert v2.backing_size(0) == 4096
    assert v2.backing_size(1) == 8193
    assert v2.backing_size(4096) == 12288
    assert v2.backing_size(4097) == 12289
    assert v2.backing_size(512 << 10) == 4096 + 129 * 4096
    assert v2.backing_size((512 << 10) + 1) == 4096 + 129 * 4096 + 4097
    assert v2.backing_size(1 << 30) == 1082134528
    for lay in (v1, v2):
        for p in (0, 1, 4095, 4096, 4097, 524287, 524288, 524289, 10 << 20):
            assert lay.plain_size(lay.backing_size(p)) == p


def test_round_trip_sizes(mnt):
    rng = random.Random(1)
    data = {}
    for n in SIZES:
        name = "f%d" % n
        data[name] = rng.randbytes(n)
        write_file(mnt.path(name), data[name])

    def check(where):
        for n in SIZES:
            name = "f%d" % n
            got = read_file(mnt.path(name))
            assert len(got) == n, "%s: %s" % (where, name)
            assert sha256(got) == sha256(data[name]), "%s: %s content differs" % (where, name)
            assert os.stat(mnt.path(name)).st_size == n, where
            assert os.stat(mnt.bpath(name)).st_size == backing_size(n), "%s: backing size of %s" % (where, name)

    check("before remount")
    mnt.remount()
    check("after remount")


@pytest.mark.parametrize("opts", [("nowriteback",), ()], ids=["nowriteback", "writeback"])
def test_stat_size_while_writing(mount, opts):
    mnt = mount(opts=opts)
    p = mnt.path("growing")
    fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        total = 0
        for n in (1, 4095, 1, 4096, 3, 10000):
            total += os.write(fd, b"x" * n)
            assert os.fstat(fd).st_size == total
            assert os.stat(p).st_size == total
            # Each write reaches the backing file at once; with the writeback cache (the
            # default) the kernel writes it back later, and fsync is when it must have.
            if opts:
                assert os.stat(mnt.bpath("growing")).st_size == backing_size(total)
            else:
                os.fsync(fd)
                assert os.stat(mnt.bpath("growing")).st_size == backing_size(total)
    finally:
        os.close(fd)


def test_empty_file_backing_is_header(mnt):
    open(mnt.path("empty"), "wb").close()
    assert os.stat(mnt.path("empty")).st_size == 0
    assert os.stat(mnt.bpath("empty")).st_size == HEADER_AREA
    assert read_file(mnt.path("empty")) == b""
    mnt.remount()
    assert os.stat(mnt.path("empty")).st_size == 0
    assert read_file(mnt.path("empty")) == b""


def test_append(mnt):
    rng = random.Random(2)
    p = mnt.path("log")
    model = b""
    for i, n in enumerate([5, 4091, 1, 4096, 7000, 3, 12289]):
        piece = rng.randbytes(n)
        fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
        try:
            # An O_APPEND write lands at the end whatever the file offset says.
            os.lseek(fd, 0, os.SEEK_SET)
            assert os.write(fd, piece) == n
        finally:
            os.close(fd)
        model += piece
        assert os.stat(p).st_size == len(model)
    assert read_file(p) == model
    assert os.stat(mnt.bpath("log")).st_size == backing_size(len(model))
    mnt.remount()
    assert read_file(p) == model


@pytest.mark.parametrize("off,length", [
    (100, 50), (4000, 200), (4095, 2), (8190, 4100), (5000, 9000), (0, 4096), (12287, 1), (1, 16380),
])
def test_overwrite_middle(mnt, off, length):
    rng = random.Random(off * 7 + length)
    model = bytearray(rng.randbytes(20000))
    p = mnt.path("f")
    write_file(p, model)
    patch = rng.randbytes(length)
    fd = os.open(p, os.O_WRONLY)
    try:
        assert os.pwrite(fd, patch, off) == length
    finally:
        os.close(fd)
    model[off:off + length] = patch
    assert read_file(p) == bytes(model)
    assert os.stat(p).st_size == 20000
    assert os.stat(mnt.bpath("f")).st_size == backing_size(20000)
    mnt.remount()
    assert read_file(p) == bytes(model)


def test_concurrent_readers_and_writers(mnt):
    rng = random.Random(3)
    size = 256 * 1024
    p = mnt.path("shared")
    model = bytearray(rng.randbytes(size))
    write_file(p, model)

    # Non-overlapping, unaligned regions, many of them sharing a chunk with another writer's.
    cuts = sorted(rng.sample(range(1, size), 399))
    bounds = [0] + cuts + [size]
    regions = [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(len(bounds) - 1)]
    rng.shuffle(regions)
    nwriters = 4
    work = [regions[i::nwriters] for i in range(nwriters)]
    patches = {}
    for off, n in regions:
        patches[off] = rng.randbytes(n)
    errors = []
    stop = threading.Event()

    def writer(mine):
        try:
            fd = os.open(p, os.O_WRONLY)
            try:
                for off, n in mine:
                    assert os.pwrite(fd, patches[off], off) == n
            finally:
                os.close(fd)
        except Exception as e:  # noqa: BLE001 - report any failure from the thread
            errors.append(e)

    def reader(seed):
        try:
            r = random.Random(seed)
            fd = os.open(p, os.O_RDONLY)
            try:
                while not stop.is_set():
                    off = r.randrange(size)
                    got = os.pread(fd, r.randrange(1, 20000), off)
                    assert 0 < len(got) <= size - off
            finally:
                os.close(fd)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    writers = [threading.Thread(target=writer, args=(w,)) for w in work]
    readers = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join(60)
    stop.set()
    for t in readers:
        t.join(60)
    assert not any(t.is_alive() for t in readers + writers), "threads hung"
    assert not errors, errors
    for off, n in regions:
        model[off:off + n] = patches[off]
    got = read_file(p)
    assert len(got) == size
    assert got == bytes(model)
    mnt.remount()
    assert read_file(p) == bytes(model)


def test_concurrent_writers_separate_files(mnt):
    rng = random.Random(4)
    blobs = {"t%d" % i: rng.randbytes(rng.randrange(1, 300000)) for i in range(6)}
    errors = []

    def w(name):
        try:
            with open(mnt.path(name), "wb") as f:
                data = blobs[name]
                for i in range(0, len(data), 3001):
                    f.write(data[i:i + 3001])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=w, args=(n,)) for n in blobs]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors
    for name, data in blobs.items():
        assert read_file(mnt.path(name)) == data


MARKER = b"KEYFS-PLAINTEXT-MARKER-0123456!!"


def test_no_plaintext_in_backing(mnt):
    assert len(MARKER) == 32
    os.mkdir(mnt.path("dir"))
    contents = {
        "tiny": MARKER,
        "small": MARKER * 3,
        "chunk": (MARKER * (CHUNK // 32)),
        "big": MARKER * 40000,
        "dir/nested": b"prefix " + MARKER * 100 + b" suffix",
    }
    for name, data in contents.items():
        write_file(mnt.path(name), data)
    # Unaligned rewrite and append paths too.
    with open(mnt.path("big"), "r+b") as f:
        f.seek(4090)
        f.write(MARKER)
    with open(mnt.path("small"), "ab") as f:
        f.write(MARKER)
    os.setxattr(mnt.path("tiny"), "user.note", b"metadata is clear by design")
    mnt.umount()

    files = backing_files(mnt.backing)
    assert len(files) == len(contents)
    for path in files:
        data = read_file(path)
        assert MARKER not in data, "plaintext marker found in %s" % path
        # Not even a large piece of it.
        assert MARKER[:16] not in data and MARKER[16:] not in data, path
        assert data[:8] == b"KEYFSHDR", path
    mnt.start()
    for name, data in contents.items():
        exp = data
        if name == "small":
            exp = data + MARKER
        if name == "big":
            exp = bytearray(data)
            exp[4090:4090 + 32] = MARKER
            exp = bytes(exp)
        assert read_file(mnt.path(name)) == exp


def test_o_trunc_resets_content(mnt):
    p = mnt.path("f")
    write_file(p, os.urandom(10000))
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        assert os.write(fd, b"short") == 5
    finally:
        os.close(fd)
    assert read_file(p) == b"short"
    assert os.stat(mnt.bpath("f")).st_size == backing_size(5)
    with open(p, "wb"):
        pass
    assert os.stat(p).st_size == 0
    assert read_file(p) == b""
    mnt.remount()
    assert read_file(p) == b""


def test_unlinked_open_file(mnt):
    p = mnt.path("tmpfile")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        assert os.write(fd, b"A" * 5000) == 5000
        os.unlink(p)
        assert not os.path.exists(p) and not os.path.exists(mnt.bpath("tmpfile"))
        # The open descriptor keeps working: write, read, truncate.
        assert os.pwrite(fd, b"B" * 10, 4090) == 10
        assert os.pread(fd, 6000, 0) == b"A" * 4090 + b"B" * 10 + b"A" * 900
        os.ftruncate(fd, 4095)
        assert os.fstat(fd).st_size == 4095
        assert os.pread(fd, 6000, 0) == b"A" * 4090 + b"B" * 5
    finally:
        os.close(fd)
    assert os.listdir(mnt.mnt) == []


def test_renamed_open_file(mnt):
    fd = os.open(mnt.path("a"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"before ")
        os.rename(mnt.path("a"), mnt.path("b"))
        os.write(fd, b"after")
    finally:
        os.close(fd)
    assert read_file(mnt.path("b")) == b"before after"


def test_open_excl_race(mnt):
    p = mnt.path("once")
    results = []
    barrier = threading.Barrier(8)

    def go():
        barrier.wait()
        try:
            os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            results.append("created")
        except OSError as e:
            results.append(e.errno)

    ts = [threading.Thread(target=go) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert sorted(results, key=str) == sorted(["created"] + [17] * 7, key=str)
    assert os.stat(mnt.bpath("once")).st_size == HEADER_AREA


def _fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def test_daemon_does_not_leak_fds(mnt):
    pid = mnt.proc.pid
    os.mkdir(mnt.path("d"))
    base = _fd_count(pid)
    for round_ in range(3):
        names = [mnt.path("d", "f%d" % i) for i in range(200)]
        for n in names:
            write_file(n, b"x" * 100)
            with open(n, "rb") as f:
                f.read()
        for n in names:
            os.unlink(n)
    # Forgets arrive asynchronously once the kernel drops the unlinked inodes.
    deadline = time.monotonic() + 10
    while _fd_count(pid) > base + 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _fd_count(pid) <= base + 8, "daemon holds %d fds, %d before" % (_fd_count(pid), base)


def test_same_chunk_interleaved_writers(mnt):
    # Every writer owns every 8th byte of two chunks: any unlocked read-modify-write loses bytes.
    p = mnt.path("rmw")
    size = 2 * CHUNK + 64
    write_file(p, bytes(size))
    nthreads = 8
    errors = []

    # Writer t owns bytes [k*32 + 4t, k*32 + 4t + 4).
    def w4(t):
        try:
            fd = os.open(p, os.O_WRONLY)
            try:
                for base in range(0, size, 4 * nthreads):
                    off = base + 4 * t
                    if off + 4 <= size:
                        assert os.pwrite(fd, bytes([0x41 + t]) * 4, off) == 4
            finally:
                os.close(fd)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=w4, args=(t,)) for t in range(nthreads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errors, errors
    exp = bytearray(size)
    for base in range(0, size, 4 * nthreads):
        for t in range(nthreads):
            off = base + 4 * t
            if off + 4 <= size:
                exp[off:off + 4] = bytes([0x41 + t]) * 4
    assert read_file(p) == bytes(exp)
    mnt.remount()
    assert read_file(p) == bytes(exp)


def test_concurrent_appends(mnt):
    p = mnt.path("appends")
    open(p, "wb").close()
    nthreads, per = 4, 150
    errors = []

    def rec(t, i):
        n = 1 + (t * 997 + i * 131) % 5000
        head = b"<%d:%d:%d>" % (t, i, n)
        return head + bytes([0x61 + t]) * (n - len(head)) if n > len(head) else head

    def w(t):
        try:
            fd = os.open(p, os.O_WRONLY | os.O_APPEND)
            try:
                for i in range(per):
                    r = rec(t, i)
                    assert os.write(fd, r) == len(r)
            finally:
                os.close(fd)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=w, args=(t,)) for t in range(nthreads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errors, errors
    data = read_file(p)
    records = {rec(t, i) for t in range(nthreads) for i in range(per)}
    assert len(data) == sum(len(r) for r in records)
    # Every record is intact and in its writer's order.
    import re
    pos, seen, last = 0, set(), {}
    for m in re.finditer(rb"<(\d+):(\d+):(\d+)>", data):
        t, i, n = (int(x) for x in m.groups())
        assert m.start() == pos, "garbage before offset %d" % m.start()
        r = rec(t, i)
        assert data[pos:pos + len(r)] == r, "record %d:%d torn" % (t, i)
        assert last.get(t, -1) == i - 1
        last[t] = i
        seen.add(r)
        pos += len(r)
    assert pos == len(data) and seen == records


@pytest.mark.parametrize("direct", [False, True], ids=["cached", "o_direct"])
def test_read_during_truncate_and_rewrite(mnt, direct):
    # Readers racing a truncate that cuts a chunk and a write that refills it never see EIO
    # (a half-rewritten chunk), and the never-truncated prefix is always intact. (The tail may
    # read as zeros for a moment: Linux buffered reads are not atomic against writes, ext4 too.)
    p = mnt.path("race")
    data = os.urandom(3 * CHUNK)
    write_file(p, data)
    stop = threading.Event()
    errors = []

    def writer():
        try:
            fd = os.open(p, os.O_WRONLY)
            try:
                for _ in range(300):
                    os.ftruncate(fd, CHUNK + 1000)
                    os.pwrite(fd, data[CHUNK + 1000:], CHUNK + 1000)
            finally:
                os.close(fd)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        finally:
            stop.set()

    def reader():
        import mmap
        try:
            # O_DIRECT reads bypass the page cache, so every one reaches the daemon.
            fd = os.open(p, os.O_RDONLY | (os.O_DIRECT if direct else 0))
            buf = mmap.mmap(-1, 3 * CHUNK)
            try:
                while not stop.is_set():
                    n = os.preadv(fd, [buf], 0)
                    got = buf[:n]
                    assert len(got) >= CHUNK + 1000
                    assert got[:CHUNK + 1000] == data[:CHUNK + 1000], "the untouched prefix changed"
            finally:
                os.close(fd)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
            stop.set()

    ts = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errors, errors
    assert read_file(p) == data


def test_o_direct(mnt):
    import mmap
    p = mnt.path("direct")
    data = os.urandom(5 * CHUNK)
    write_file(p, data)
    try:
        fd = os.open(p, os.O_RDWR | os.O_DIRECT)
    except OSError as e:
        pytest.fail("O_DIRECT open refused: %r" % e)
    try:
        buf = mmap.mmap(-1, 2 * CHUNK)
        assert os.preadv(fd, [buf], CHUNK) == 2 * CHUNK
        assert buf[:] == data[CHUNK:3 * CHUNK]
        buf[:] = b"D" * (2 * CHUNK)
        assert os.pwritev(fd, [buf], 2 * CHUNK) == 2 * CHUNK
        exp = data[:2 * CHUNK] + b"D" * (2 * CHUNK) + data[4 * CHUNK:]
        assert os.pread(fd, 10 * CHUNK, 0) == exp
    finally:
        os.close(fd)
    assert read_file(p) == exp
