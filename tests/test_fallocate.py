# test_fallocate.py: punch hole and zero range against a model at every chunk boundary, SEEK_DATA/HOLE after them, RENAME_WHITEOUT and overlayfs on keyfs
import errno
import os
import random
import shutil
import stat
import subprocess

import pytest

from helpers import (CHUNK, EXIT_OK, KEYFSCTL, backing_size, expect_errno, fallocate, read_file, renameat2, run,
                     wait_for, write_file)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
FALLOC_FL_UNSHARE_RANGE = 0x40
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
ZERO = FALLOC_FL_ZERO_RANGE
ZERO_KEEP = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
MODES = {"punch": PUNCH, "zero": ZERO, "zero-keep": ZERO_KEEP}

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
# ---- the model: plaintext bytes, and which full chunks are holes in the backing file ----

class Model:
    """What a local filesystem shows (bytes, size), plus keyfs's chunk layout: a full chunk is a
    hole when never written or zeroed whole by punch/zero-range; the partial last chunk is data."""

    def __init__(self):
        self.data = bytearray()
        self.sealed = set()

    def chunks(self):
        return (len(self.data) + CHUNK - 1) // CHUNK

    def write(self, off, buf):
        p = len(self.data)
        if off > p:
            self.data.extend(bytes(off - p))
        self.data[off:off + len(buf)] = buf
        if off > p and p % CHUNK:
            self.sealed.add(p // CHUNK)     # the old partial last chunk grows to a full one
        self.sealed.update(range(off // CHUNK, (off + len(buf) - 1) // CHUNK + 1))

    def grow(self, size):
        p = len(self.data)
        if size <= p:
            return
        self.data.extend(bytes(size - p))
        if p % CHUNK:
            self.sealed.add(p // CHUNK)
        if size % CHUNK:
            self.sealed.add(size // CHUNK)

    def fallocate(self, mode, off, length):
        p, end = len(self.data), off + length
        zend = min(end, p)
        if off < zend:
            self.data[off:zend] = bytes(zend - off)
            for c in range(off // CHUNK, (zend - 1) // CHUNK + 1):
                full = (c + 1) * CHUNK <= p
                if full and off <= c * CHUNK and (c + 1) * CHUNK <= zend:
                    self.sealed.discard(c)
        if mode & FALLOC_FL_ZERO_RANGE and not mode & FALLOC_FL_KEEP_SIZE:
            self.grow(end)

    def is_data(self, c):
        return c in self.sealed or (c + 1) * CHUNK > len(self.data)

    def seek_data(self, x):
        for c in range(x // CHUNK, self.chunks()):
            if self.is_data(c):
                return max(c * CHUNK, x)
        return None

    def seek_hole(self, x):
        for c in range(x // CHUNK, self.chunks()):
            if not self.is_data(c):
                return max(c * CHUNK, x)
        return len(self.data)


def check_seek(fd, model, where):
    """SEEK_DATA is exact at chunk granularity. SEEK_HOLE is exact inside a hole; from data it may
    answer a later hole (zeros sharing backing blocks with data look like data to the backing
    lseek), never a position inside data."""
    size = len(model.data)
    probes = sorted({x for c in range(model.chunks() + 1) for x in (c * CHUNK, c * CHUNK + 1, c * CHUNK + CHUNK - 1)
                     if x < size})
    for x in probes:
        want = model.seek_data(x)
        if want is None:
            expect_errno(errno.ENXIO, os.lseek, fd, x, os.SEEK_DATA)
        else:
            assert os.lseek(fd, x, os.SEEK_DATA) == want, (where, "SEEK_DATA", x, sorted(model.sealed))
        got, exact = os.lseek(fd, x, os.SEEK_HOLE), model.seek_hole(x)
        if not model.is_data(x // CHUNK):
            assert got == x, (where, "SEEK_HOLE", x, sorted(model.sealed))
        else:
            assert got >= exact, (where, "SEEK_HOLE", x, got, exact, sorted(model.sealed))
            assert got == size or (got % CHUNK == 0 and not model.is_data(got // CHUNK)), \
                (where, "SEEK_HOLE", x, got, sorted(model.sealed))
    expect_errno(errno.ENXIO, os.lseek, fd, size, os.SEEK_DATA)


def reset(fd, model, size, rng):
    """Random data over size bytes, with chunk 3 left a hole (sparse) when the file reaches it."""
    os.ftruncate(fd, 0)
    model.data, model.sealed = bytearray(), set()
    parts = [(0, min(size, 3 * CHUNK))]
    if size > 4 * CHUNK:
        parts.append((4 * CHUNK, size))
    for a, b in parts:
        buf = rng.randbytes(b - a)
        assert os.pwrite(fd, buf, a) == len(buf)
        model.write(a, buf)


def check(fd, model, where):
    size = len(model.data)
    assert os.fstat(fd).st_size == size, where
    assert os.pread(fd, size + 10, 0) == bytes(model.data), where


SHAPES = {"partial-tail": 5 * CHUNK + 1000, "chunk-tail": 6 * CHUNK}
OFFSETS = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - 1, 2 * CHUNK, 2 * CHUNK + 1, 3 * CHUNK + 100,
           4 * CHUNK - 1, 5 * CHUNK, 5 * CHUNK + 999, 6 * CHUNK, 6 * CHUNK + 1, 8 * CHUNK + 5]
LENGTHS = [1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 1, 3 * CHUNK + 2, 12 * CHUNK + 3]


@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
def test_against_model_at_every_chunk_boundary(mnt, volume, mode):
    rng = random.Random(0x5eed ^ MODES[mode])
    p = mnt.path("f")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    model = Model()
    try:
        for shape, size in SHAPES.items():
            for off in OFFSETS:
                for length in LENGTHS:
                    where = (mode, shape, off, length)
                    reset(fd, model, size, rng)
                    fallocate(fd, MODES[mode], off, length)
                    model.fallocate(MODES[mode], off, length)
                    check(fd, model, where)
                    check_seek(fd, model, where)
                    assert os.stat(mnt.bpath("f")).st_size == backing_size(len(model.data)), where
        # Ops on top of each other, without a reset: holes punched into holes, zeros into zeros.
        reset(fd, model, SHAPES["partial-tail"], rng)
        for off in OFFSETS:
            for length in (1, CHUNK + 1, 2 * CHUNK):
                fallocate(fd, MODES[mode], off, length)
                model.fallocate(MODES[mode], off, length)
                check(fd, model, (mode, "stacked", off, length))
            buf = rng.randbytes(700)
            os.pwrite(fd, buf, off)
            model.write(off, buf)
        check(fd, model, "stacked")
        check_seek(fd, model, "stacked")
    finally:
        os.close(fd)
    mnt.umount()
    # What a backing reader sees: ciphertext, never a slice of the plaintext.
    backing = read_file(mnt.bpath("f"))
    for i in range(0, len(model.data) - 32, 256):
        window = bytes(model.data[i:i + 32])
        if any(window):
            assert window not in backing, "plaintext at %d is in the backing file" % i
    r = run([KEYFSCTL, "fsck", volume])
    assert r.returncode == EXIT_OK, r
    mnt.start()
    assert read_file(p) == bytes(model.data)


def test_punch_frees_backing_space_and_seeks_exactly(mnt):
    # A database discarding pages: 64 chunks of data, the middle 32 punched. The backing blocks go
    # (ext4, tmpfs, xfs punch), and SEEK_HOLE/SEEK_DATA name the punched range exactly.
    p = mnt.path("db")
    data = os.urandom(64 * CHUNK)
    write_file(p, data)
    fd = os.open(p, os.O_RDWR)
    try:
        before = os.stat(mnt.bpath("db")).st_blocks
        fallocate(fd, PUNCH, 16 * CHUNK, 32 * CHUNK)
        assert os.fstat(fd).st_size == 64 * CHUNK
        assert os.pread(fd, 64 * CHUNK, 0) == data[:16 * CHUNK] + bytes(32 * CHUNK) + data[48 * CHUNK:]
        freed = (before - os.stat(mnt.bpath("db")).st_blocks) * 512
        assert freed >= 31 * CHUNK, "punching 32 chunks freed only %d backing bytes" % freed
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 16 * CHUNK
        assert os.lseek(fd, 16 * CHUNK, os.SEEK_DATA) == 48 * CHUNK
        assert os.lseek(fd, 20 * CHUNK + 5, os.SEEK_HOLE) == 20 * CHUNK + 5
        assert os.lseek(fd, 48 * CHUNK, os.SEEK_HOLE) == 64 * CHUNK
        # ZERO_RANGE keeps the space allocated (like ext4) and reads as zeros all the same.
        fallocate(fd, ZERO_KEEP, 50 * CHUNK, 4 * CHUNK)
        assert os.pread(fd, 4 * CHUNK + 2, 50 * CHUNK - 1) == data[50 * CHUNK - 1:50 * CHUNK] + bytes(
            4 * CHUNK) + data[54 * CHUNK:54 * CHUNK + 1]
        assert os.lseek(fd, 50 * CHUNK, os.SEEK_DATA) == 54 * CHUNK
    finally:
        os.close(fd)


def test_zero_range_grows_and_keep_size_does_not(mnt):
    p = mnt.path("log")
    write_file(p, b"x" * 5000)
    fd = os.open(p, os.O_RDWR)
    try:
        fallocate(fd, ZERO_KEEP, 4000, 100000)
        assert os.fstat(fd).st_size == 5000
        assert os.pread(fd, 6000, 0) == b"x" * 4000 + bytes(1000)
        fallocate(fd, ZERO, 7000, 3 * CHUNK)
        assert os.fstat(fd).st_size == 7000 + 3 * CHUNK
        assert os.pread(fd, 30000, 0) == b"x" * 4000 + bytes(3000 + 3 * CHUNK)
        # A punch past the end changes nothing, and never grows the file.
        fallocate(fd, PUNCH, 1 << 20, CHUNK)
        assert os.fstat(fd).st_size == 7000 + 3 * CHUNK
    finally:
        os.close(fd)
    assert os.stat(mnt.bpath("log")).st_size == backing_size(7000 + 3 * CHUNK)
    # An empty file (no header yet): punch and zero-keep leave it empty; zero-range gives it a size.
    q = mnt.path("empty")
    fd = os.open(q, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fallocate(fd, PUNCH, 0, CHUNK)
        fallocate(fd, ZERO_KEEP, 0, CHUNK)
        assert os.fstat(fd).st_size == 0
        fallocate(fd, ZERO, 10, 5000)
        assert os.fstat(fd).st_size == 5010
        assert os.pread(fd, 9000, 0) == bytes(5010)
    finally:
        os.close(fd)
    mnt.remount()
    assert read_file(p) == b"x" * 4000 + bytes(3000 + 3 * CHUNK)
    assert read_file(q) == bytes(5010)


def test_other_modes_stay_refused(mnt):
    p = mnt.path("f")
    write_file(p, os.urandom(8 * CHUNK))
    fd = os.open(p, os.O_RDWR)
    try:
        for mode in (FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE, FALLOC_FL_UNSHARE_RANGE):
            expect_errno(errno.EOPNOTSUPP, fallocate, fd, mode, CHUNK, CHUNK)
        # The kernel's own rules, before keyfs sees anything.
        expect_errno(errno.EOPNOTSUPP, fallocate, fd, FALLOC_FL_PUNCH_HOLE, 0, CHUNK)
        expect_errno(errno.EINVAL, fallocate, fd, PUNCH, 0, 0)
        assert os.fstat(fd).st_size == 8 * CHUNK
    finally:
        os.close(fd)


def test_punch_and_zero_refused_while_locked(mnt):
    p = mnt.path("f")
    data = os.urandom(3 * CHUNK)
    write_file(p, data)
    fd = os.open(p, os.O_RDWR)
    try:
        r = run([KEYFSCTL, "lock", mnt.mnt])
        assert r.returncode == EXIT_OK, r
        for mode in MODES.values():
            expect_errno(errno.ENOKEY, fallocate, fd, mode, 100, CHUNK)
        r = run([KEYFSCTL, "unlock", mnt.mnt])
        assert r.returncode == EXIT_OK, r
        assert os.pread(fd, 4 * CHUNK, 0) == data
    finally:
        os.close(fd)


# ---- RENAME_WHITEOUT and overlayfs ----

def test_rename_whiteout(mnt, volume):
    if os.geteuid() != 0:
        pytest.skip("RENAME_WHITEOUT needs CAP_MKNOD (root)")
    write_file(mnt.path("a"), b"A" * 5000)
    write_file(mnt.path("b"), b"B")
    expect_errno(errno.EINVAL, renameat2, mnt.path("a"), mnt.path("b"), RENAME_EXCHANGE | RENAME_WHITEOUT)
    expect_errno(errno.EEXIST, renameat2, mnt.path("a"), mnt.path("b"), RENAME_NOREPLACE | RENAME_WHITEOUT)
    renameat2(mnt.path("a"), mnt.path("c"), RENAME_NOREPLACE | RENAME_WHITEOUT)
    renameat2(mnt.path("c"), mnt.path("b"), RENAME_WHITEOUT)
    assert read_file(mnt.path("b")) == b"A" * 5000
    for name in ("a", "c"):
        st = os.lstat(mnt.path(name))
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and st.st_size == 0, (name, st)
        bst = os.lstat(mnt.bpath(name))
        assert stat.S_ISCHR(bst.st_mode) and bst.st_rdev == 0, (name, bst)
    assert sorted(os.listdir(mnt.mnt)) == ["a", "b", "c"]
    with os.scandir(mnt.mnt) as it:
        kinds = {e.name: (e.is_file(follow_symlinks=False), stat.S_ISCHR(e.stat(follow_symlinks=False).st_mode))
                 for e in it}
    assert kinds == {"a": (False, True), "b": (True, False), "c": (False, True)}
    mnt.umount()
    # A whiteout is a device node, not a keyfs file: fsck and inspect pass over it.
    r = run([KEYFSCTL, "fsck", volume])
    assert r.returncode == EXIT_OK, r
    r = run([KEYFSCTL, "inspect", "-r", volume])
    assert r.returncode == EXIT_OK, r
    mnt.start()
    assert stat.S_ISCHR(os.lstat(mnt.path("a")).st_mode)
    assert read_file(mnt.path("b")) == b"A" * 5000
    os.unlink(mnt.path("a"))
    os.unlink(mnt.path("c"))
    assert os.listdir(mnt.mnt) == ["b"]


def _overlay_supported():
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1] == "overlay" for line in f if line.strip())
    except OSError:
        return False


def test_overlayfs_with_upper_on_keyfs(mnt, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting overlayfs needs root")
    if not _overlay_supported() or shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("overlayfs (or mount/umount) is not available on this kernel")
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "base.txt").write_bytes(b"from the image\n")
    (lower / "gone.txt").write_bytes(b"deleted in the container\n")
    (lower / "dir").mkdir()
    (lower / "dir" / "inner").write_bytes(b"inner\n")
    upper, work = mnt.path("upper"), mnt.path("work")
    os.mkdir(upper)
    os.mkdir(work)
    merged = str(tmp_path / "merged")
    os.mkdir(merged)
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        "lowerdir=%s,upperdir=%s,workdir=%s" % (lower, upper, work), merged],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.fail("overlayfs with its upper dir on keyfs did not mount: %s" % r.stderr.strip())
    try:
        m = lambda *parts: os.path.join(merged, *parts)
        assert read_file(m("base.txt")) == b"from the image\n"
        secret = os.urandom(3 * CHUNK + 5)
        write_file(m("new.bin"), secret)
        assert read_file(m("new.bin")) == secret
        # Copy-up of a lower file, then its contents are encrypted in keyfs's backing dir.
        with open(m("base.txt"), "ab") as f:
            f.write(b"changed in the container\n")
        assert read_file(m("base.txt")) == b"from the image\nchanged in the container\n"
        # Deleting a lower file leaves a whiteout (0/0 char device) in the upper dir on keyfs.
        os.unlink(m("gone.txt"))
        assert not os.path.lexists(m("gone.txt"))
        st = os.lstat(os.path.join(upper, "gone.txt"))
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
        # Renames: an upper file, and a lower directory (a whiteout or redirect at its old name).
        os.rename(m("new.bin"), m("renamed.bin"))
        assert read_file(m("renamed.bin")) == secret
        os.rename(m("base.txt"), m("moved.txt"))
        assert not os.path.lexists(m("base.txt"))
        assert read_file(m("moved.txt")) == b"from the image\nchanged in the container\n"
        os.unlink(m("renamed.bin"))
        shutil.rmtree(m("dir"))
        assert sorted(os.listdir(merged)) == ["moved.txt"]
        # The lower dir is untouched.
        assert sorted(os.listdir(lower)) == ["base.txt", "dir", "gone.txt"]
        assert (lower / "base.txt").read_bytes() == b"from the image\n"
    finally:
        u = subprocess.run(["umount", merged], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=30)
        if u.returncode != 0:
            subprocess.run(["umount", "-l", merged], stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    assert u.returncode == 0, u.stderr
    # What the upper dir holds is keyfs content: the copied-up file reads back through keyfs only.
    assert read_file(os.path.join(upper, "moved.txt")) == b"from the image\nchanged in the container\n"
    assert b"changed in the container" not in read_file(mnt.bpath("upper", "moved.txt"))
    wait_for(lambda: not os.path.ismount(merged), timeout=5, what="the overlay to be gone")
