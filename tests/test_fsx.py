# test_fsx.py: fsx-style random operations on files checked against an in-memory model
import mmap
import os
import random
import time

import pytest

from helpers import CHUNK

NOPS = int(os.environ.get("KEYFS_FSX_OPS", "4000"))
MAXSIZE = 300 * 1024
MAXLEN = 3 * CHUNK + 123


def _seed():
    s = os.environ.get("KEYFS_FSX_SEED")
    return int(s) if s else random.SystemRandom().randrange(1 << 32)


class FsxFile:
    def __init__(self, path, rng, log):
        self.path = path
        self.rng = rng
        self.log = log
        self.model = bytearray()
        self.fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _rand_off_len(self, beyond=True):
        size = len(self.model)
        r = self.rng.random()
        if r < 0.2:
            # Around a chunk boundary.
            off = self.rng.randrange(0, max(size, CHUNK) // CHUNK + 2) * CHUNK + self.rng.randrange(-3, 4)
        elif beyond and r < 0.35:
            off = size + self.rng.randrange(0, 3 * CHUNK)
        else:
            off = self.rng.randrange(0, max(size, 1))
        off = max(0, min(off, MAXSIZE - 1))
        n = self.rng.choice([1, 2, 7, CHUNK - 1, CHUNK, CHUNK + 1]) if self.rng.random() < 0.3 \
            else self.rng.randrange(1, MAXLEN)
        n = min(n, MAXSIZE - off)
        return off, n

    def op(self, i):
        rng = self.rng
        r = rng.random()
        size = len(self.model)
        if r < 0.35:
            off, n = self._rand_off_len()
            data = rng.randbytes(n)
            self.log.append("%d %s write off=%d len=%d size=%d" % (i, self.path, off, n, size))
            assert os.pwrite(self.fd, data, off) == n
            if off > size:
                self.model.extend(b"\0" * (off - size))
            self.model[off:off + n] = data
        elif r < 0.65:
            off, n = self._rand_off_len()
            self.log.append("%d %s read off=%d len=%d size=%d" % (i, self.path, off, n, size))
            got = os.pread(self.fd, n, off)
            exp = bytes(self.model[off:off + n])
            if got != exp:
                where = next((k for k in range(min(len(got), len(exp))) if got[k] != exp[k]),
                             min(len(got), len(exp)))
                raise AssertionError("read mismatch: got %d bytes, expected %d, first difference at "
                                     "file offset %d" % (len(got), len(exp), off + where))
        elif r < 0.75:
            choice = rng.random()
            if choice < 0.4:
                new = rng.randrange(0, max(size, 1))        # down
            elif choice < 0.8:
                new = min(MAXSIZE, size + rng.randrange(0, 4 * CHUNK))   # up
            else:
                new = rng.randrange(0, MAXSIZE // CHUNK) * CHUNK
            self.log.append("%d %s truncate %d -> %d" % (i, self.path, size, new))
            os.ftruncate(self.fd, new)
            if new < size:
                del self.model[new:]
            else:
                self.model.extend(b"\0" * (new - size))
        elif r < 0.80:
            self.log.append("%d %s reopen" % (i, self.path))
            self.close()
            self.fd = os.open(self.path, os.O_RDWR)
        elif r < 0.83:
            self.log.append("%d %s fsync" % (i, self.path))
            os.fsync(self.fd)
        elif r < 0.90 and size > 0:
            off = rng.randrange(0, size)
            n = rng.randrange(1, min(MAXLEN, size - off) + 1)
            self.log.append("%d %s mapread off=%d len=%d size=%d" % (i, self.path, off, n, size))
            with mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                got = m[off:off + n]
            assert got == bytes(self.model[off:off + n]), "mapread mismatch"
        elif r < 0.95 and size > 0:
            off = rng.randrange(0, size)
            n = rng.randrange(1, min(MAXLEN, size - off) + 1)
            data = rng.randbytes(n)
            self.log.append("%d %s mapwrite off=%d len=%d size=%d" % (i, self.path, off, n, size))
            with mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
                m[off:off + n] = data
                m.flush()
            self.model[off:off + n] = data
        else:
            self.log.append("%d %s close/open O_RDONLY check" % (i, self.path))
            self.close()
            with open(self.path, "rb") as f:
                assert f.read() == bytes(self.model), "whole-file content differs"
            self.fd = os.open(self.path, os.O_RDWR)
        st = os.fstat(self.fd)
        assert st.st_size == len(self.model), "st_size %d, model %d" % (st.st_size, len(self.model))

    def final_check(self):
        with open(self.path, "rb") as f:
            assert f.read() == bytes(self.model), "final content differs"


def _run(mnt, names, nops):
    seed = _seed()
    rng = random.Random(seed)
    log = []
    files = [FsxFile(mnt.path(n), rng, log) for n in names]
    start = time.monotonic()
    i = 0
    try:
        for i in range(nops):
            rng.choice(files).op(i)
        for f in files:
            f.close()
        for f in files:
            f.final_check()
        mnt.remount()
        for f in files:
            f.final_check()
    except Exception as e:  # noqa: BLE001 - re-raised with the seed and the op log
        for f in files:
            f.close()
        pytest.fail("fsx failed at op %d: %s\nKEYFS_FSX_SEED=%d\nlast ops:\n%s"
                    % (i, e, seed, "\n".join(log[-25:])), pytrace=False)
    return time.monotonic() - start


def test_fsx_one_file(mnt):
    _run(mnt, ["fsx"], NOPS)


def test_fsx_two_files_interleaved(mnt):
    _run(mnt, ["fsx-a", "fsx-b"], NOPS)
