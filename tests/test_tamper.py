# test_tamper.py: backing files changed while unmounted read as EIO, never as garbage
import errno
import os

import pytest

from helpers import CHUNK, CIPHER_ID, FORMAT, HEADER_AREA, HEADER_SIZE, LAYOUT, backing_size, flip, inspect_json, read_file, \
    write_file
from layout import read_chunk, write_chunk, zero_chunk


@pytest.fixture
def tm(mount):
    """A mount that may log errors (the daemon should log the failed authentications)."""
    return mount(allow_errors=True)


def _read_range(path, off, n):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def _expect_eio(fn, *args):
    with pytest.raises(OSError) as ei:
        fn(*args)
    assert ei.value.errno == errno.EIO, "expected EIO, got %r" % ei.value


def _open_and_read_eio(path):
    """Either open or the first read fails with EIO; no bytes are returned."""
    def go():
        with open(path, "rb") as f:
            return f.read()
    _expect_eio(go)


def _setup(m, files):
    for name, data in files.items():
        write_file(m.path(name), data)
    m.umount()


def test_flipped_chunk_byte(tm):
    data = os.urandom(3 * CHUNK)
    _setup(tm, {"f": data})
    flip(tm.bpath("f"), LAYOUT.data_offset(1) + 100)
    tm.start()
    p = tm.path("f")
    assert _read_range(p, 0, CHUNK) == data[:CHUNK]
    _expect_eio(_read_range, p, CHUNK, CHUNK)
    _expect_eio(_read_range, p, CHUNK + 100, 1)
    assert _read_range(p, 2 * CHUNK, CHUNK) == data[2 * CHUNK:]
    _expect_eio(read_file, p)
    # Metadata needs no content: the size is still right.
    assert os.stat(p).st_size == 3 * CHUNK


@pytest.mark.parametrize("where", ["nonce", "tag"])
def test_flipped_nonce_or_tag(tm, where):
    data = os.urandom(2 * CHUNK + 10)
    _setup(tm, {"f": data})
    off = LAYOUT.nonce_offset(2) if where == "nonce" else LAYOUT.tag_offset(2, 10) + 5
    flip(tm.bpath("f"), off, 0x80)
    tm.start()
    p = tm.path("f")
    assert _read_range(p, 0, 2 * CHUNK) == data[:2 * CHUNK]
    _expect_eio(_read_range, p, 2 * CHUNK, 10)


def _header(path):
    with open(path, "rb") as f:
        return f.read(HEADER_SIZE)


def _padding_offset(hdr):
    """The middle of the longest run of zero bytes in a header: unused padding."""
    best, start, best_start = 0, None, None
    for i, b in enumerate(hdr + b"\1"):
        if b == 0 and start is None:
            start = i
        elif b != 0 and start is not None:
            if i - start > best:
                best, best_start = i - start, start
            start = None
    assert best >= 64, "no padding in the header?"
    return best_start + best // 2


def test_flipped_header_padding(tm):
    data = b"header padding test " * 100
    _setup(tm, {"f": data, "g": data})
    flip(tm.bpath("f"), _padding_offset(_header(tm.bpath("f"))))
    tm.start()
    _open_and_read_eio(tm.path("f"))
    assert read_file(tm.path("g")) == data


def test_flipped_header_file_id(tm):
    data = b"file id test " * 100
    _setup(tm, {"f": data, "g": data})
    info = inspect_json(tm.bpath("f"))[0]
    fid = bytes.fromhex(info["file_id"])
    hdr = _header(tm.bpath("f"))
    off = hdr.find(fid)
    assert off > 0, "file id %s not found in the header" % info["file_id"]
    flip(tm.bpath("f"), off + 7)
    tm.start()
    _open_and_read_eio(tm.path("f"))
    assert read_file(tm.path("g")) == data


def test_flipped_header_tag_and_magic(tm):
    data = os.urandom(5000)
    _setup(tm, {"tag": data, "magic": data, "wrapped": data})
    # The magic: the file is not a keyfs file any more.
    flip(tm.bpath("magic"), 3)
    # The last non-zero byte of the header is part of its tag or the wrapped key.
    hdr = _header(tm.bpath("tag"))
    last = max(i for i, b in enumerate(hdr) if b != 0)
    flip(tm.bpath("tag"), last)
    tm.start()
    _open_and_read_eio(tm.path("magic"))
    _open_and_read_eio(tm.path("tag"))
    assert read_file(tm.path("wrapped")) == data


def test_swapped_chunks(tm):
    data = os.urandom(3 * CHUNK)
    _setup(tm, {"f": data})
    b = tm.bpath("f")
    raw = bytearray(read_file(b))
    c0, c1 = read_chunk(raw, 0), read_chunk(raw, 1)
    write_chunk(raw, 0, c1)
    write_chunk(raw, 1, c0)
    write_file(b, bytes(raw))
    tm.start()
    p = tm.path("f")
    _expect_eio(_read_range, p, 0, CHUNK)
    _expect_eio(_read_range, p, CHUNK, CHUNK)
    assert _read_range(p, 2 * CHUNK, CHUNK) == data[2 * CHUNK:]


def test_chunk_copied_between_files(tm):
    a, b = os.urandom(2 * CHUNK), os.urandom(2 * CHUNK)
    _setup(tm, {"a": a, "b": b})
    ra = bytearray(read_file(tm.bpath("a")))
    write_chunk(ra, 0, read_chunk(read_file(tm.bpath("b")), 0))
    write_file(tm.bpath("a"), bytes(ra))
    tm.start()
    _expect_eio(_read_range, tm.path("a"), 0, CHUNK)
    assert _read_range(tm.path("a"), CHUNK, CHUNK) == a[CHUNK:]
    assert read_file(tm.path("b")) == b


def test_swapped_headers(tm):
    a, b = os.urandom(10000), os.urandom(10000)
    _setup(tm, {"a": a, "b": b})
    ha, hb = _header(tm.bpath("a")), _header(tm.bpath("b"))
    assert ha != hb
    for path, h in ((tm.bpath("a"), hb), (tm.bpath("b"), ha)):
        with open(path, "r+b") as f:
            f.write(h)
    tm.start()
    _open_and_read_eio(tm.path("a"))
    _open_and_read_eio(tm.path("b"))
    assert os.stat(tm.path("a")).st_size == 10000


def test_truncated_inside_last_chunk(tm):
    data = os.urandom(2 * CHUNK + 1808)
    _setup(tm, {"f": data})
    b = tm.bpath("f")
    size = os.stat(b).st_size
    assert size == backing_size(len(data))
    os.truncate(b, size - 10)
    tm.start()
    p = tm.path("f")
    assert os.stat(p).st_size == len(data) - 10
    assert _read_range(p, 0, 2 * CHUNK) == data[:2 * CHUNK]
    _expect_eio(read_file, p)
    _expect_eio(_read_range, p, 2 * CHUNK, 100)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_truncated_inside_chunk_overhead(tm, k):
    # A cut that leaves no ciphertext byte of a chunk (v1: part of its nonce and tag; v2: part
    # or all of its group's tag page) is a cut inside that chunk: reading it gives EIO, never an
    # empty or shorter file. The size counts the cut chunk as one byte (docs/FORMAT.md, size
    # arithmetic), so a read reaches it. v2: a cut inside a data page leaves a shorter chunk,
    # whose tag does not match.
    small, big = b"first chunk only", os.urandom(2 * CHUNK + 700)
    _setup(tm, {"small": small, "big": big})
    left = (1, 24, 40)[k]
    os.truncate(tm.bpath("small"), LAYOUT.cut_in_overhead(0, k))
    os.truncate(tm.bpath("big"), LAYOUT.data_offset(2) + left if FORMAT == 2 else LAYOUT.cut_in_overhead(2, k))
    tm.start()
    assert os.stat(tm.path("small")).st_size == 1
    assert os.stat(tm.path("big")).st_size == 2 * CHUNK + (left if FORMAT == 2 else 1)
    _open_and_read_eio(tm.path("small"))
    _expect_eio(_read_range, tm.path("small"), 0, 1)
    _open_and_read_eio(tm.path("big"))
    assert _read_range(tm.path("big"), 0, 2 * CHUNK) == big[:2 * CHUNK]
    _expect_eio(_read_range, tm.path("big"), 2 * CHUNK, 1)
    # Emptying a damaged file still works, and it is then a good empty file.
    os.truncate(tm.path("small"), 0)
    assert read_file(tm.path("small")) == b""


def test_truncated_to_whole_chunks(tm):
    # Cutting off a whole trailing chunk is undetectable by design (sizes come from the
    # backing size alone): the rest must still read back exactly.
    data = os.urandom(3 * CHUNK)
    _setup(tm, {"f": data})
    os.truncate(tm.bpath("f"), backing_size(2 * CHUNK))
    tm.start()
    assert read_file(tm.path("f")) == data[:2 * CHUNK]


def test_truncated_inside_header(tm):
    _setup(tm, {"f": b"some content" * 10})
    os.truncate(tm.bpath("f"), 500)
    tm.start()
    _open_and_read_eio(tm.path("f"))


def test_zeroed_partial_chunk_is_not_a_hole(tm):
    # Only a FULL chunk of zeros is a hole; a zeroed partial (last) chunk must not read as zeros.
    data = os.urandom(CHUNK + 100)
    _setup(tm, {"f": data})
    zero_chunk(tm.bpath("f"), 1, 100)
    tm.start()
    assert _read_range(tm.path("f"), 0, CHUNK) == data[:CHUNK]
    _expect_eio(_read_range, tm.path("f"), CHUNK, 100)


def test_zeroed_full_chunk_reads_zeros(tm):
    # Documented limitation (as in gocryptfs): an all-zero full chunk is a hole.
    data = os.urandom(2 * CHUNK)
    _setup(tm, {"f": data})
    zero_chunk(tm.bpath("f"), 0)
    tm.start()
    assert read_file(tm.path("f")) == bytes(CHUNK) + data[CHUNK:]


def _header_fields(hdr):
    """Offsets of every header field (docs/FORMAT.md, format v1)."""
    lk, lv = hdr[32], hdr[33]
    lw = hdr[34] | hdr[35] << 8
    var = 40
    return {
        "magic": 0, "version": 8, "cipher": 10, "chunk_shift": 11, "header_size": 12, "file_id": 16 + 9,
        "key_id_len": 32, "key_version_len": 33, "wrapped_len": 34, "flags": 36,
        "key_id": var + lk // 2, "key_version": var + lk, "wrapped": var + lk + lv + lw // 2,
        "padding_first": var + lk + lv + lw, "padding_last": 991, "tag_first": 992, "tag_last": 1023,
    }


FIELDS = ["magic", "version", "cipher", "chunk_shift", "header_size", "file_id", "key_id_len",
          "key_version_len", "wrapped_len", "flags", "key_id", "key_version", "wrapped",
          "padding_first", "padding_last", "tag_first", "tag_last"]


def test_every_header_field_is_checked(tm):
    data = os.urandom(6000)
    _setup(tm, {f: data for f in FIELDS + ["untouched"]})
    hdr = _header(tm.bpath("untouched"))
    assert hdr[8:12] == bytes([FORMAT, 0, CIPHER_ID, 12]), "header layout changed: update this test and docs/FORMAT.md"
    assert hdr[33] == 1, "key version of a new local key is '1'"
    for f in FIELDS:
        off = _header_fields(_header(tm.bpath(f)))[f]
        flip(tm.bpath(f), off, 0x01 if f not in ("key_id", "key_version") else 0x02)
    tm.start()
    bad = []
    for f in FIELDS:
        try:
            with open(tm.path(f), "rb") as fh:
                fh.read()
            bad.append("%s: read succeeded" % f)
        except OSError as e:
            if e.errno != errno.EIO:
                bad.append("%s: %s instead of EIO" % (f, errno.errorcode.get(e.errno, e.errno)))
    assert not bad, "\n".join(bad)
    assert read_file(tm.path("untouched")) == data


def test_foreign_files_in_backing(tm):
    # Files put into the backing dir behind keyfs' back are never served as plaintext.
    _setup(tm, {})
    write_file(tm.bpath("plain-small"), b"hello, I am not encrypted\n")
    write_file(tm.bpath("plain-big"), b"I am not encrypted either. " * 1000)
    write_file(tm.bpath("zeros"), bytes(backing_size(CHUNK)))
    tm.start()
    for name in ("plain-small", "plain-big", "zeros"):
        _open_and_read_eio(tm.path(name))


def test_empty_backing_file_is_an_empty_file(tm):
    # A backing file of size 0 is a valid empty file without a header yet (format.h).
    _setup(tm, {})
    write_file(tm.bpath("empty"), b"")
    tm.start()
    p = tm.path("empty")
    assert os.stat(p).st_size == 0
    assert read_file(p) == b""
    with open(p, "ab") as f:
        f.write(b"now with content " * 400)
    assert read_file(p) == b"now with content " * 400
    assert os.stat(tm.bpath("empty")).st_size == backing_size(17 * 400)
    tm.remount()
    assert read_file(p) == b"now with content " * 400


def _copied_from_other_volume_fails(tm, tmp_path, other):
    """A file written through a mount of volume `other`, its backing file copied into tm's backing dir
    as 'copied' while tm is unmounted: after the remount, it does not open (EIO)."""
    tm.umount()
    om = type(tm)(other, str(tmp_path / "omnt"), [], str(tmp_path), allow_errors=True)
    os.mkdir(om.mnt)
    try:
        om.start()
        write_file(om.path("theirs"), b"y" * 100)
    finally:
        om.umount()
    with open(os.path.join(other, "theirs"), "rb") as src, open(tm.bpath("copied"), "wb") as dst:
        dst.write(src.read())
    tm.start()
    _open_and_read_eio(tm.path("copied"))


def test_header_from_another_volume(tm, tmp_path, keystore):
    # A file copied from another volume with another key does not open here.
    from helpers import keyfsctl
    other = str(tmp_path / "other")
    keyfsctl("init", other, "--kms", "local", "--keystore", keystore, "--key", "other", "--create-key")  # same format
    write_file(tm.path("mine"), b"x" * 100)
    _copied_from_other_volume_fails(tm, tmp_path, other)
    assert read_file(tm.path("mine")) == b"x" * 100


def test_same_key_other_volume(tm, tmp_path, keystore):
    # Same root key, other volume: the volume uuid in the wrapping AAD keeps the file out.
    p = os.path.join(tm.backing, ".keyfs")
    with open(p) as f:
        desc = f.read()
    other = str(tmp_path / "other")
    from helpers import keyfsctl
    keyfsctl("init", other, "--kms", "local", "--keystore", keystore, "--key", "test")
    _copied_from_other_volume_fails(tm, tmp_path, other)
    assert "volume=" in desc


def test_torn_header_rewrite_falls_back_to_older_slot(tm):
    """A header rewrite goes to the other slot with the next generation. If that write is torn,
    the older slot still opens the file: nothing is lost (docs/FORMAT.md, header slots)."""
    data = os.urandom(3 * CHUNK + 5)
    _setup(tm, {"junk": data, "newer": data, "both": data})
    # A torn write that left garbage: slot 1 does not parse and is ignored.
    with open(tm.bpath("junk"), "r+b") as f:
        f.seek(HEADER_SIZE)
        f.write(os.urandom(300))
    # A newer generation that parses but does not authenticate (its tag no longer matches).
    for name in ("newer", "both"):
        with open(tm.bpath(name), "r+b") as f:
            slot0 = f.read(HEADER_SIZE)
            newer = bytearray(slot0)
            newer[36] += 1                          # generation 1 -> 2
            f.seek(HEADER_SIZE)
            f.write(bytes(newer))
    flip(tm.bpath("both"), 100)                    # and slot 0 damaged too: nothing opens
    tm.start()
    assert read_file(tm.path("junk")) == data
    assert read_file(tm.path("newer")) == data
    assert "using the header of generation 1" in tm.stderr()
    _open_and_read_eio(tm.path("both"))
    assert os.stat(tm.path("both")).st_size == len(data)


def test_what_a_backing_dir_writer_can_do_undetected(tm, tmp_path):
    """The threat model (docs/FORMAT.md, README "What keyfs protects") says these are NOT
    detected: names and whole files are not authenticated. This pins that statement: if one
    of these starts failing, the format got stronger and the documents must say so."""
    a, b, c, v1, v2 = (os.urandom(2 * CHUNK + 5), os.urandom(3000), os.urandom(CHUNK),
                       b"version 1 " * 50, b"version 2 " * 60)
    _setup(tm, {"a": a, "b": b, "c": c, "s": b"secret", "d": v1})
    old_d = read_file(tm.bpath("d"))
    tm.start()
    write_file(tm.path("d"), v2)
    tm.umount()
    # One encrypted file copied over another's name: it opens (the file id is in its own header).
    write_file(tm.bpath("b"), read_file(tm.bpath("a")))
    # A file replaced by a symlink to the writer's own plaintext, outside the volume.
    evil = str(tmp_path / "evil")
    write_file(evil, b"attacker's text")
    os.unlink(tm.bpath("s"))
    os.symlink(evil, tm.bpath("s"))
    # Whole all-zero chunks appended to a file that ends on a chunk boundary read as holes.
    with open(tm.bpath("c"), "ab") as f:
        f.write(bytes(backing_size(3 * CHUNK) - backing_size(CHUNK)))
    # A whole file rolled back to an older copy of itself.
    write_file(tm.bpath("d"), old_d)
    tm.start()
    assert read_file(tm.path("b")) == a
    assert read_file(tm.path("s")) == b"attacker's text"
    assert read_file(tm.path("c")) == c + bytes(2 * CHUNK)
    assert read_file(tm.path("d")) == v1
