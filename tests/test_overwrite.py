# test_overwrite.py: writes of whole chunks inside a file run beside reads and each other in the
# daemon (content.c, content_overwrite: the shared content lock, chunk and group locks). What a user
# relies on: a read racing overwrites returns, for every chunk, one whole version of it (never EIO,
# never a mix of two writes); overwrites of one chunk racing each other leave one of them whole;
# chunks of one tag page written at once all keep their entries (the tag page on disk, read after a
# remount, agrees with the data); and a chunk damaged in the backing file still fails with EIO while
# overwrites run around it. Every read and write goes O_DIRECT, so each is a request of its own and
# several reach the daemon at once. Both formats: v1 volumes take the exclusive path throughout.
import errno
import mmap
import os
import random
import struct
import threading

import pytest

from helpers import CHUNK, FORMAT, LAYOUT, direct_pread, flip, write_file

GROUP_CHUNKS = 128                      # chunks per v2 tag page
OWNED = 4 * 96                          # chunks 0..383: four writers, 96 each, across group boundaries
CONTENDED = range(OWNED, OWNED + 3)     # chunks 384..386: two writers each
NCHUNKS = OWNED + len(CONTENDED)


def page(idx, writer, seq):
    """The 4096 bytes version (writer, seq) of chunk idx writes: a 16-byte stamp repeated, so that
    any mix of two versions, or a page torn between them, is seen."""
    return struct.pack("<IIQ", idx, writer, seq) * (CHUNK // 16)


def check_chunk(idx, data):
    """The (writer, seq) of a whole version of chunk idx; fails on anything else."""
    assert len(data) == CHUNK, (idx, len(data))
    stamp = data[:16]
    got_idx, writer, seq = struct.unpack("<IIQ", stamp)
    assert got_idx == idx and data == stamp * (CHUNK // 16), "chunk %d is not one whole version" % idx
    return writer, seq


def direct_pwrite(fd, data, off):
    buf = mmap.mmap(-1, len(data))
    try:
        buf[:] = data
        assert os.pwritev(fd, [buf], off) == len(data)
    finally:
        buf.close()


def read_all(path, nchunks=NCHUNKS):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        data = direct_pread(fd, nchunks * CHUNK, 0)
    finally:
        os.close(fd)
    assert len(data) == nchunks * CHUNK
    return [check_chunk(i, data[i * CHUNK:(i + 1) * CHUNK]) for i in range(nchunks)]


class Race:
    """Writers and readers on one file through their own O_DIRECT descriptors, until the writers
    are done; the first failure of any thread is kept and raised by join."""

    def __init__(self, path):
        self.path = path
        self.errors = []
        self.done = threading.Event()
        self.last = {}                  # (writer, chunk) -> the last seq that writer wrote there
        self.reads = 0
        self.threads = []

    def _run(self, fn, *args):
        try:
            fn(*args)
        except BaseException as e:      # noqa: B036 (reported by join)
            self.errors.append(e)
            self.done.set()

    def start(self, fn, *args):
        t = threading.Thread(target=self._run, args=(fn,) + args)
        t.start()
        self.threads.append(t)

    def writer(self, wid, chunks, writes, max_run):
        rnd = random.Random(wid)
        fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT)
        try:
            for seq in range(1, writes + 1):
                if self.done.is_set():
                    return
                run = rnd.randint(1, max_run)
                first = rnd.randrange(chunks.start, chunks.stop - run + 1)
                direct_pwrite(fd, b"".join(page(i, wid, seq) for i in range(first, first + run)), first * CHUNK)
                for i in range(first, first + run):
                    self.last[(wid, i)] = seq
        finally:
            os.close(fd)

    def reader(self, rid, stop_when_done):
        rnd = random.Random(100 + rid)
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        try:
            while not (stop_when_done.is_set() or self.done.is_set()):
                run = rnd.choice([1, 1, 2, 8, 33, GROUP_CHUNKS + 2])
                first = rnd.randrange(0, NCHUNKS - run + 1)
                data = direct_pread(fd, run * CHUNK, first * CHUNK)
                assert len(data) == run * CHUNK
                for k in range(run):
                    check_chunk(first + k, data[k * CHUNK:(k + 1) * CHUNK])
                self.reads += 1
        finally:
            os.close(fd)

    def join(self, threads):
        for t in threads:
            t.join(timeout=300)
            assert not t.is_alive(), "a thread hangs"
        if self.errors:
            raise self.errors[0]


def test_reads_racing_overwrites_see_whole_chunks_and_writes_all_land(mount):
    m = mount()
    f = m.path("f")
    write_file(f, b"".join(page(i, 0, 0) for i in range(NCHUNKS)))
    race = Race(f)
    writers_done = threading.Event()
    for wid in range(4):
        race.start(race.writer, wid, range(96 * wid, 96 * (wid + 1)), 1500, 4)
    for wid in (4, 5):
        race.start(race.writer, wid, CONTENDED, 1500, 2)
    writers = list(race.threads)
    for rid in range(2):
        race.start(race.reader, rid, writers_done)
    race.join(writers)
    writers_done.set()
    race.join(race.threads)
    assert race.reads > 0

    def expected(now):
        """Owned chunks hold their writer's last write; a contended one the last write of one of
        its two writers (each writes it in order)."""
        for i, version in enumerate(now):
            writers = [i // 96] if i < OWNED else [4, 5]
            last = {(w, race.last[(w, i)]) for w in writers if (w, i) in race.last}
            assert version in (last or {(0, 0)}), (i, version, last)

    expected(read_all(f))
    # Through the backing file alone (no tag page cached, nothing in the kernel's cache): every
    # entry written beside another of its tag page is there.
    m.remount()
    expected(read_all(f))


@pytest.mark.skipif(FORMAT != 2, reason="the v2 layout names the data page to damage")
def test_a_damaged_chunk_fails_while_overwrites_run_around_it(mount):
    m = mount(allow_errors=True)
    f = m.path("f")
    write_file(f, b"".join(page(i, 0, 0) for i in range(NCHUNKS)))
    damaged = 130           # in the second group, between chunks the writers rewrite
    flip(m.bpath("f"), LAYOUT.data_offset(damaged) + 1000)
    race = Race(f)
    for wid, chunks in ((1, range(96, damaged)), (2, range(damaged + 1, 192))):
        race.start(race.writer, wid, chunks, 400, 2)
    fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
    try:
        for _ in range(50):
            with pytest.raises(OSError) as ei:
                direct_pread(fd, CHUNK, damaged * CHUNK)
            assert ei.value.errno == errno.EIO
    finally:
        os.close(fd)
    race.join(race.threads)
    # Nothing else was harmed: the writers' chunks read back whole.
    fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
    try:
        for i in list(range(96, damaged)) + list(range(damaged + 1, 192)):
            check_chunk(i, direct_pread(fd, CHUNK, i * CHUNK))
    finally:
        os.close(fd)
    with open(m.log) as log:
        assert "does not authenticate" in log.read()


def test_scattered_pages_written_back_at_once_keep_every_entry_of_their_tag_pages(mount):
    # The kernel writes back the dirty pages of a file as many WRITEs at once, in file order, so
    # many overwrites of one tag page's chunks meet in the daemon: none may lose another's entry.
    m = mount()
    f = m.path("f")
    write_file(f, b"".join(page(i, 0, 0) for i in range(NCHUNKS)))
    rnd = random.Random(7)
    want = [(0, 0)] * NCHUNKS
    fd = os.open(f, os.O_RDWR)
    try:
        for rnd_no in range(1, 41):
            for i in rnd.sample(range(NCHUNKS), 150):
                os.pwrite(fd, page(i, 1, rnd_no), i * CHUNK)
                want[i] = (1, rnd_no)
            os.fsync(fd)
            if rnd_no % 10 == 0:
                assert read_all(f) == want, rnd_no
    finally:
        os.close(fd)
    m.remount()
    assert read_all(f) == want


def test_scattered_writes_to_files_of_many_cold_tag_pages_all_land(mount):
    # After a remount no tag page is cached in the daemon: the write-back of scattered pages misses
    # group after group, in file order, and the daemon reads the next tag pages ahead (content.c,
    # tags_read_ahead). Two files at once, so two climbs share the read-ahead table; two rounds,
    # each after a remount, so the second climbs through the pages the first wrote.
    m = mount()
    n = 40 * GROUP_CHUNKS + 17
    files = [m.path("a"), m.path("b")]
    for f in files:
        write_file(f, b"".join(page(i, 0, 0) for i in range(n)))
    rnd = random.Random(11)
    want = {f: [(0, 0)] * n for f in files}
    for rnd_no in (1, 2):
        m.remount()
        fds = [os.open(f, os.O_RDWR) for f in files]
        try:
            for i in rnd.sample(range(n), 1200):
                for w, (f, fd) in enumerate(zip(files, fds)):
                    os.pwrite(fd, page(i, w + 1, rnd_no), i * CHUNK)
                    want[f][i] = (w + 1, rnd_no)
            for fd in fds:
                os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)
        for f in files:
            assert read_all(f, n) == want[f], (rnd_no, f)
    m.remount()
    for f in files:
        assert read_all(f, n) == want[f], f
