# layout.py: the byte layout of keyfs files (docs/FORMAT.md) for the test suite, format v1 and v2.
# The suite runs on the format in KEYFS_TEST_FORMAT (1 or 2, default 2: what keyfsctl init makes),
# and tests that touch backing bytes ask LAYOUT where they are instead of pinning one format.
import os

CHUNK = 4096
HEADER_SIZE = 1024                      # one header slot, both formats

FORMAT = int(os.environ.get("KEYFS_TEST_FORMAT", "2"))
assert FORMAT in (1, 2), "KEYFS_TEST_FORMAT must be 1 or 2"


class V1:
    """Two header slots (2048 bytes), then chunks of nonce (24) || ciphertext || tag (16)."""
    version = 1
    header_area = 2 * HEADER_SIZE
    nonce, tag = 24, 16
    overhead = nonce + tag
    chunk_disk = CHUNK + overhead

    def chunk_offset(self, i):
        return self.header_area + i * self.chunk_disk

    def backing_size(self, plain):
        n, r = divmod(plain, CHUNK)
        return self.header_area + n * self.chunk_disk + (r + self.overhead if r else 0)

    def plain_size(self, b):
        if b <= self.header_area:
            return 0
        n, r = divmod(b - self.header_area, self.chunk_disk)
        if 0 < r <= self.overhead:
            return n * CHUNK + 1
        return n * CHUNK + (r - self.overhead if r else 0)

    def data_offset(self, i):
        """Backing offset of ciphertext byte 0 of chunk i."""
        return self.chunk_offset(i) + self.nonce

    def nonce_offset(self, i):
        return self.chunk_offset(i)

    def tag_offset(self, i, length=CHUNK):
        return self.chunk_offset(i) + self.nonce + length

    def spans(self, i, length=CHUNK):
        """The backing (offset, length) ranges that hold chunk i of `length` plaintext bytes."""
        return [(self.chunk_offset(i), length + self.overhead)]

    def cut_in_overhead(self, i, k):
        """A backing size that cuts chunk i (at a group/chunk start) inside what precedes its data:
        the k-th of three such cuts (v1: 1, 24 or 40 bytes of nonce and tag left)."""
        return self.chunk_offset(i) + (1, self.nonce, self.overhead)[k]


class V2:
    """A 4096-byte header page, then groups of one tag page and 128 data pages."""
    version = 2
    header_area = 4096
    page = 4096
    group_chunks = 128
    entry = 32
    group_disk = 129 * 4096
    group_plain = 128 * CHUNK

    def group_offset(self, g):
        return self.header_area + g * self.group_disk

    def page_offset(self, i):
        return self.group_offset(i // 128) + (1 + i % 128) * self.page

    def entry_offset(self, i):
        return self.group_offset(i // 128) + (i % 128) * self.entry

    def backing_size(self, plain):
        n, r = divmod(plain, self.group_plain)
        return self.header_area + n * self.group_disk + (self.page + r if r else 0)

    def plain_size(self, b):
        if b <= self.header_area:
            return 0
        n, r = divmod(b - self.header_area, self.group_disk)
        if 0 < r <= self.page:
            return n * self.group_plain + 1
        return n * self.group_plain + (r - self.page if r else 0)

    def data_offset(self, i):
        return self.page_offset(i)

    def nonce_offset(self, i):
        return self.entry_offset(i)

    def tag_offset(self, i, length=CHUNK):
        return self.entry_offset(i) + 16

    def spans(self, i, length=CHUNK):
        return [(self.page_offset(i), length), (self.entry_offset(i), self.entry)]

    def cut_in_overhead(self, i, k):
        """v2: a cut inside the tag page of chunk i's group (i must start a group): 1 byte, one
        entry, or the whole tag page and no data byte."""
        assert i % 128 == 0
        return self.group_offset(i // 128) + (1, self.entry, self.page)[k]


LAYOUTS = {1: V1(), 2: V2()}
LAYOUT = LAYOUTS[FORMAT]


def read_chunk(raw, i, layout=None, length=CHUNK):
    """The stored bytes of chunk i in the backing file contents raw: one bytes per span."""
    layout = layout or LAYOUT
    return [bytes(raw[o:o + n]) for o, n in layout.spans(i, length)]


def write_chunk(raw, i, parts, layout=None, length=CHUNK):
    """Put parts (from read_chunk) as chunk i into the bytearray raw."""
    layout = layout or LAYOUT
    for (o, n), p in zip(layout.spans(i, length), parts):
        raw[o:o + n] = p


def zero_chunk(path, i, length=CHUNK, layout=None):
    """Overwrite every stored byte of chunk i of the backing file with zeros."""
    layout = layout or LAYOUT
    with open(path, "r+b") as f:
        for o, n in layout.spans(i, length):
            f.seek(o)
            f.write(bytes(n))
