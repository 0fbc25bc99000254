/* test_content.c: the content layer against an in-memory model: random RMW, truncate, holes, seek */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdbool.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sodium.h>

#include "check.h"
#include "keyfs/content.h"

/* More than two v2 groups (512 KiB of plaintext each). */
#define MAXSIZE (1200 * 1024)

static struct content_file f;
static enum fmt_layout L;               /* argv[2]: 1 or 2 */
static uint8_t C = FMT_CIPHER_XCHACHA20_POLY1305;       /* argv[3]: a cipher name (v2) */
static struct fmt_keys *keys;
static uint8_t *model;
static uint64_t model_size;

/*
 * fallocate is wrapped at link time (tests/meson.build: --wrap, fallocate64 with 64-bit off_t) so the content layer
 * can be run against a backing filesystem that can neither punch holes nor zero ranges: it must
 * then write zeros, which read as holes all the same.
 */
static bool refuse_zeroing;
int __real_fallocate64(int fd, int mode, off_t off, off_t len);
int __wrap_fallocate64(int fd, int mode, off_t off, off_t len);

int __wrap_fallocate64(int fd, int mode, off_t off, off_t len)
{
	if (refuse_zeroing && (mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE))) {
		errno = EOPNOTSUPP;
		return -1;
	}
	return __real_fallocate64(fd, mode, off, len);
}

static int open_file(char *path)
{
	struct fmt_header h;
	uint8_t raw[FMT_HEADER_SIZE], dek[32];
	int fd = mkstemp(path);

	if (fd < 0)
		return -1;
	randombytes_buf(dek, sizeof(dek));
	keys = sodium_malloc(sizeof(*keys));
	if (fmt_keys_derive(dek, C, keys) < 0)
		return -1;
	memset(&h, 0, sizeof(h));
	randombytes_buf(h.file_id, sizeof(h.file_id));
	strcpy(h.key_id, "test-key");
	h.wrapped_len = 10;
	h.generation = 1;
	h.version = (uint16_t)L;
	if (fmt_header_encode(&h, keys, raw) < 0 || content_header_init(fd, raw) < 0)
		return -1;
	f.fd = fd;
	f.layout = L;
	f.keys = keys;
	memcpy(f.file_id, h.file_id, sizeof(h.file_id));
	return fd;
}

static void check_whole(unsigned op, unsigned seed)
{
	static uint8_t buf[MAXSIZE + 100];
	uint64_t size;
	struct stat st;
	ssize_t n;

	CHECK_EQ(content_size(f.fd, L, &size), 0);
	n = content_read(&f, buf, sizeof(buf), 0);
	fstat(f.fd, &st);
	if (size != model_size || n != (ssize_t)model_size || memcmp(buf, model, model_size) != 0 ||
	    (uint64_t)st.st_size != fmt_backing_size(L, model_size)) {
		fprintf(stderr, "seed %u op %u: size %llu model %llu read %zd backing %lld\n", seed, op,
			(unsigned long long)size, (unsigned long long)model_size, n, (long long)st.st_size);
		CHECK(0);
		exit(check_done());
	}
	check_passed++;
}

/* Whole-chunk writes inside the file that content_overwrite took (test_random, v2). */
static unsigned overwrites;

static void test_random(unsigned seed, unsigned ops)
{
	static uint8_t buf[MAXSIZE];

	srandom(seed);
	/* The tag cache on, as on an exclusive mount, so that overwrites are taken. */
	f.tags_id = L == FMT_LAYOUT_V2 ? content_tags_id() : 0;
	for (unsigned op = 0; op < ops; op++) {
		int kind = (int)(random() % 13);
		uint64_t off = (uint64_t)random() % MAXSIZE;
		size_t len = (size_t)(random() % 3 == 0 ? random() % 20000 : random() % 300) + 1;

		if (off + len > MAXSIZE)
			len = MAXSIZE - off;
		if (kind < 5) {
			/* v2, two writes in five: whole chunks, which content_overwrite takes when they
			 * lie inside the file (the tag cache is on) and leaves to content_write with
			 * -EAGAIN otherwise. */
			bool whole = L == FMT_LAYOUT_V2 && kind < 2;
			ssize_t n = -EAGAIN;

			if (whole) {
				off -= off % FMT_CHUNK_SIZE;
				len = (len + FMT_CHUNK_SIZE - 1) / FMT_CHUNK_SIZE * FMT_CHUNK_SIZE;
				if (off + len > MAXSIZE)
					len = (MAXSIZE - off) / FMT_CHUNK_SIZE * FMT_CHUNK_SIZE;
				if (len == 0)
					continue;
			}
			randombytes_buf(buf, len);
			if (whole) {
				ssize_t want = off + len <= model_size ? (ssize_t)len : -EAGAIN;

				n = content_overwrite(&f, buf, len, off);
				if (n != want) {
					fprintf(stderr, "seed %u op %u: overwrite at %llu len %zu of %llu: %zd want %zd\n",
						seed, op, (unsigned long long)off, len, (unsigned long long)model_size, n,
						want);
					CHECK(0);
					return;
				}
				overwrites += n > 0;
			}
			if (n == -EAGAIN)
				n = content_write(&f, buf, len, off);
			if (n != (ssize_t)len) {
				fprintf(stderr, "seed %u op %u: write failed\n", seed, op);
				CHECK(0);
				return;
			}
			if (off > model_size)
				memset(model + model_size, 0, off - model_size);
			memcpy(model + off, buf, len);
			if (off + len > model_size)
				model_size = off + len;
		} else if (kind < 8) {
			ssize_t want = off >= model_size ? 0 : (ssize_t)(off + len > model_size ? model_size - off : len);
			ssize_t n = content_read(&f, buf, len, off);

			if (n != want || memcmp(buf, model + off, (size_t)(n > 0 ? n : 0)) != 0) {
				fprintf(stderr, "seed %u op %u: read at %llu len %zu: %zd want %zd\n", seed, op,
					(unsigned long long)off, len, n, want);
				CHECK(0);
				return;
			}
		} else if (kind >= 10) {
			/* punch hole, zero range, zero range keeping the size */
			static const int modes[3] = { FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE,
						      FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE };
			int mode = modes[kind - 10];
			uint64_t end = off + len, zend = end < model_size ? end : model_size;

			f.tags_id = L == FMT_LAYOUT_V2 ? content_tags_id() : 0;    /* content.h: a new one after it */
			if (content_fallocate(&f, mode, off, len) != 0) {
				fprintf(stderr, "seed %u op %u: fallocate %d at %llu len %zu failed\n", seed, op, mode,
					(unsigned long long)off, len);
				CHECK(0);
				return;
			}
			if (off < zend)
				memset(model + off, 0, zend - off);
			if (mode == FALLOC_FL_ZERO_RANGE && end > model_size) {
				memset(model + model_size, 0, end - model_size);
				model_size = end;
			}
		} else {
			uint64_t size = kind == 8 ? off : (uint64_t)random() % 9000;

			f.tags_id = L == FMT_LAYOUT_V2 ? content_tags_id() : 0;
			if (content_truncate(&f, size) != 0) {
				fprintf(stderr, "seed %u op %u: truncate %llu failed\n", seed, op, (unsigned long long)size);
				CHECK(0);
				return;
			}
			if (size > model_size)
				memset(model + model_size, 0, size - model_size);
			model_size = size;
		}
		if (op % 97 == 0)
			check_whole(op, seed);
	}
	check_whole(ops, seed);
	f.tags_id = 0;
}

static void test_holes_and_seek(void)
{
	uint8_t buf[8192];
	uint64_t pos;
	struct stat st;

	CHECK_EQ(content_truncate(&f, 0), 0);
	CHECK_EQ(content_truncate(&f, 10ull << 30), 0);
	fstat(f.fd, &st);
	CHECK_EQ(st.st_size, (long long)fmt_backing_size(L, 10ull << 30));
	CHECK(st.st_blocks * 512 < (1 << 20));
	CHECK_EQ(content_read(&f, buf, sizeof(buf), 5ull << 30), (long long)sizeof(buf));
	CHECK(sodium_is_zero(buf, sizeof(buf)));
	CHECK_EQ(content_read(&f, buf, 100, (10ull << 30) - 50), 50);
	CHECK(sodium_is_zero(buf, 50));
	memset(buf, 'x', 10);
	CHECK_EQ(content_write(&f, buf, 10, (5ull << 30) + 4100), 10);
	/* Seek works at chunk granularity and exactly: all-zero chunks are holes even where they
	 * share a backing block with data (chunks are 4136 bytes, not block-aligned). */
	CHECK_EQ(content_lseek(&f, 0, SEEK_HOLE, &pos), 0);
	CHECK_EQ(pos, 0);
	CHECK_EQ(content_lseek(&f, 0, SEEK_DATA, &pos), 0);
	CHECK_EQ(pos, (5ull << 30) + 4096);
	CHECK_EQ(content_lseek(&f, pos, SEEK_HOLE, &pos), 0);
	CHECK_EQ(pos, (5ull << 30) + 8192);
	CHECK_EQ(content_lseek(&f, (5ull << 30) + 4096 + 7, SEEK_DATA, &pos), 0);
	CHECK_EQ(pos, (5ull << 30) + 4096 + 7);
	CHECK_EQ(content_lseek(&f, 11ull << 30, SEEK_DATA, &pos), -ENXIO);
	CHECK_EQ(content_read(&f, buf, 20, (5ull << 30) + 4095), 20);
	CHECK_EQ(buf[0], 0);
	CHECK_MEM(buf + 5, "xxxxxxxxxx", 10);
	CHECK_EQ(buf[15], 0);

	/* A cut inside the last chunk: the prefix reads, the end gives EIO, the size is the prefix. */
	CHECK_EQ(content_truncate(&f, 0), 0);
	memset(buf, 'y', sizeof(buf));
	CHECK_EQ(content_write(&f, buf, 5000, 0), 5000);
	CHECK_EQ(ftruncate(f.fd, (off_t)fmt_backing_size(L, 5000) - 900), 0);
	CHECK_EQ(content_read(&f, buf, 4096, 0), 4096);
	CHECK_EQ(content_read(&f, buf, 8192, 0), -EIO);
	CHECK_EQ(ftruncate(f.fd, (off_t)fmt_backing_size(L, 4096) + 20), 0);
	CHECK_EQ(content_read(&f, buf, 8192, 0), -EIO);
	/* v1: no valid file has that size, so nothing is written; v2: a whole data page cut short
	 * leaves a valid size, and only the cut chunk fails. */
	CHECK_EQ(content_write(&f, buf, 1, 0), L == FMT_LAYOUT_V1 ? -EIO : 1);
	CHECK_EQ(content_truncate(&f, 0), 0);
	CHECK_EQ(content_read(&f, buf, 10, 0), 0);

	/* fallocate grows with holes; KEEP_SIZE does not change the size. */
	CHECK_EQ(content_fallocate(&f, 0, 0, 100000), 0);
	CHECK_EQ(content_read(&f, buf, sizeof(buf), 96000), 4000);
	CHECK(sodium_is_zero(buf, 4000));
	CHECK_EQ(content_fallocate(&f, 1 /* FALLOC_FL_KEEP_SIZE */, 0, 300000), 0);
	CHECK_EQ(content_size(f.fd, L, &pos), 0);
	CHECK_EQ(pos, 100000);
	CHECK_EQ(content_fallocate(&f, 2 /* PUNCH_HOLE */, 0, 10), -EOPNOTSUPP);
	CHECK_EQ(content_write(&f, buf, 1, fmt_max_plain_size(L)), -EFBIG);
}

static void test_tamper(void)
{
	uint8_t buf[12288], byte;

	CHECK_EQ(content_truncate(&f, 0), 0);
	randombytes_buf(buf, sizeof(buf));
	CHECK_EQ(content_write(&f, buf, sizeof(buf), 0), (long long)sizeof(buf));
	uint64_t at = L == FMT_LAYOUT_V2 ? fmt_v2_page_offset(1) + 500 : 2048 + 4136 + 500;

	CHECK_EQ(pread(f.fd, &byte, 1, at), 1);
	byte ^= 1;
	CHECK_EQ(pwrite(f.fd, &byte, 1, at), 1);
	CHECK_EQ(content_read(&f, buf, 4096, 0), 4096);
	CHECK_EQ(content_read(&f, buf, 10, 4096 + 5), -EIO);
	CHECK_EQ(content_read(&f, buf, 10, 8192), 10);
	/* A partial write into the damaged chunk refuses rather than re-sealing garbage. */
	CHECK_EQ(content_write(&f, buf, 10, 4096 + 5), -EIO);
}

/* A backing file cut inside a chunk's nonce and tag, chunk 0 included: EIO, never a shorter
 * or empty file; shrinking it refuses, emptying it works. */
static void test_cut_inside_overhead(void)
{
	/* v1: inside chunk 0's nonce and tag; v2: inside (or exactly) the tag page of group 0. */
	static const unsigned lefts_v1[] = { 1, 24, 40 }, lefts_v2[] = { 1, 32, 4096 };
	const unsigned *lefts = L == FMT_LAYOUT_V2 ? lefts_v2 : lefts_v1;
	const uint64_t hdr = fmt_header_area(L);
	uint8_t buf[3 * 4096];
	uint64_t size;

	for (unsigned k = 0; k < sizeof(lefts_v1) / sizeof(lefts_v1[0]); k++) {
		CHECK_EQ(content_truncate(&f, 0), 0);
		randombytes_buf(buf, sizeof(buf));
		CHECK_EQ(content_write(&f, buf, 100, 0), 100);
		CHECK_EQ(ftruncate(f.fd, (off_t)(hdr + lefts[k])), 0);
		CHECK_EQ(content_size(f.fd, L, &size), 0);
		CHECK_EQ(size, 1);
		CHECK_EQ(content_read(&f, buf, sizeof(buf), 0), -EIO);
		CHECK_EQ(content_read(&f, buf, 1, 0), -EIO);
		CHECK_EQ(content_write(&f, buf, 10, 0), -EIO);
		CHECK_EQ(content_truncate(&f, 1), -EIO);

		CHECK_EQ(content_truncate(&f, 0), 0);
		randombytes_buf(buf, sizeof(buf));
		CHECK_EQ(content_write(&f, buf, sizeof(buf), 0), (long long)sizeof(buf));
		if (L == FMT_LAYOUT_V2) {
			/* v2: a data page cut short is a valid size; the chunk fails to authenticate. */
			CHECK_EQ(ftruncate(f.fd, (off_t)(fmt_v2_page_offset(2) + lefts_v1[k])), 0);
			CHECK_EQ(content_size(f.fd, L, &size), 0);
			CHECK_EQ(size, 2 * 4096 + lefts_v1[k]);
		} else {
			CHECK_EQ(ftruncate(f.fd, (off_t)(2048 + 2 * 4136 + lefts[k])), 0);
			CHECK_EQ(content_size(f.fd, L, &size), 0);
			CHECK_EQ(size, 2 * 4096 + 1);
		}
		CHECK_EQ(content_read(&f, buf, 2 * 4096, 0), 2 * 4096);
		CHECK_EQ(content_read(&f, buf, sizeof(buf), 0), -EIO);
		CHECK_EQ(content_read(&f, buf, 1, 2 * 4096), -EIO);
	}
	CHECK_EQ(content_truncate(&f, 0), 0);
	CHECK_EQ(content_size(f.fd, L, &size), 0);
	CHECK_EQ(size, 0);
	CHECK_EQ(content_read(&f, buf, 1, 0), 0);
}

static void test_header_slots(void)
{
	struct content_headers hs;
	struct fmt_header h;
	uint8_t raw[FMT_HEADER_SIZE], junk[FMT_HEADER_SIZE];

	/* A new file: slot 0 only. */
	CHECK_EQ(content_headers_read(f.fd, L, &hs), 0);
	CHECK_EQ(hs.count, 1);
	CHECK_EQ(hs.slot[0], 0);
	CHECK_EQ(hs.hdr[0].generation, 1);

	/* A rewrite lands in slot 1 with generation 2 and becomes the newest. */
	h = hs.hdr[0];
	h.generation = 2;
	strcpy(h.key_version, "2");
	CHECK_EQ(fmt_header_encode(&h, keys, raw), 0);
	CHECK_EQ(content_header_store(f.fd, 1, raw), 0);
	CHECK_EQ(content_headers_read(f.fd, L, &hs), 0);
	CHECK_EQ(hs.count, 2);
	CHECK_EQ(hs.slot[0], 1);
	CHECK_EQ(hs.hdr[0].generation, 2);
	CHECK(strcmp(hs.hdr[0].key_version, "2") == 0);
	CHECK_EQ(hs.slot[1], 0);
	CHECK_EQ(content_header_read(f.fd, L, &h, NULL), 0);
	CHECK_EQ(h.generation, 2);

	/* A torn rewrite of slot 0 (generation 3): it does not parse, slot 1 still serves. */
	memcpy(junk, raw, sizeof(junk));
	junk[0] = 'X';
	CHECK_EQ(content_header_store(f.fd, 0, junk), 0);
	CHECK_EQ(content_headers_read(f.fd, L, &hs), 0);
	CHECK_EQ(hs.count, 1);
	CHECK_EQ(hs.slot[0], 1);

	/* A volume of the other layout does not take this file's header: EIO (any layout does). */
	CHECK_EQ(content_headers_read(f.fd, L == FMT_LAYOUT_V1 ? FMT_LAYOUT_V2 : FMT_LAYOUT_V1, &hs), -EIO);
	CHECK_EQ(content_headers_read(f.fd, FMT_LAYOUT_ANY, &hs), 0);

	/* No slot parses: EIO; a slot of a newer format version: EPROTONOSUPPORT. */
	CHECK_EQ(content_header_store(f.fd, 1, junk), 0);
	CHECK_EQ(content_headers_read(f.fd, L, &hs), -EIO);
	memcpy(junk, raw, sizeof(junk));
	junk[8] = 9;
	CHECK_EQ(content_header_store(f.fd, 1, junk), 0);
	CHECK_EQ(content_headers_read(f.fd, L, &hs), -EPROTONOSUPPORT);
	CHECK_EQ(content_header_store(f.fd, 0, raw), 0);
	CHECK_EQ(content_headers_read(f.fd, L, &hs), 0);
	CHECK_EQ(hs.count, 1);

	/* A rewrite stores the new slot and then clears the other to zeros (unused), so the old
	 * wrapped DEK is gone; after generation UINT32_MAX comes 1. */
	h = hs.hdr[0];
	h.generation = UINT32_MAX;
	CHECK_EQ(fmt_header_encode(&h, keys, raw), 0);
	CHECK_EQ(content_header_rewrite(f.fd, 1, raw), 0);
	CHECK_EQ(content_headers_read(f.fd, L, &hs), 0);
	CHECK_EQ(hs.count, 1);
	CHECK_EQ(hs.slot[0], 1);
	CHECK_EQ(pread(f.fd, junk, sizeof(junk), 0), (long long)sizeof(junk));
	CHECK(sodium_is_zero(junk, sizeof(junk)));
	h.generation = fmt_generation_next(h.generation);
	CHECK_EQ(h.generation, 1);
	strcpy(h.key_version, "3");
	CHECK_EQ(fmt_header_encode(&h, keys, raw), 0);
	CHECK_EQ(content_header_rewrite(f.fd, 0, raw), 0);
	CHECK_EQ(content_headers_read(f.fd, L, &hs), 0);
	CHECK_EQ(hs.count, 1);
	CHECK_EQ(hs.slot[0], 0);
	CHECK_EQ(hs.hdr[0].generation, 1);
	CHECK(strcmp(hs.hdr[0].key_version, "3") == 0);
	CHECK_EQ(pread(f.fd, junk, sizeof(junk), FMT_HEADER_SIZE), (long long)sizeof(junk));
	CHECK(sodium_is_zero(junk, sizeof(junk)));
	CHECK_EQ(content_header_rewrite(f.fd, 2, raw), -EINVAL);
	CHECK_EQ(content_header_clear(f.fd, 2), -EINVAL);
}

/* Without punch or zero-range in the backing filesystem, zeroed full chunks are written as
 * all-zero chunks: holes to read and to SEEK_DATA, and where the backing file has a hole already,
 * nothing is written. */
static void test_zero_fallback(void)
{
	static uint8_t buf[16 * 4096];
	uint64_t pos;
	struct stat st;

	CHECK_EQ(content_truncate(&f, 0), 0);
	randombytes_buf(buf, sizeof(buf));
	CHECK_EQ(content_write(&f, buf, sizeof(buf), 0), (long long)sizeof(buf));
	CHECK_EQ(content_fallocate(&f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096 + 10, 4 * 4096), 0);
	CHECK_EQ(content_read(&f, buf, sizeof(buf), 0), (long long)sizeof(buf));
	CHECK(sodium_is_zero(buf + 4096 + 10, 4 * 4096));
	CHECK(!sodium_is_zero(buf + 4096, 10) && !sodium_is_zero(buf + 5 * 4096 + 10, 100));
	CHECK_EQ(content_lseek(&f, 2 * 4096, SEEK_DATA, &pos), 0);
	CHECK_EQ(pos, 5 * 4096);
	CHECK_EQ(content_lseek(&f, 2 * 4096 + 5, SEEK_HOLE, &pos), 0);
	CHECK_EQ(pos, 2 * 4096 + 5);

	CHECK_EQ(content_truncate(&f, 0), 0);
	CHECK_EQ(content_truncate(&f, 1ull << 30), 0);
	CHECK_EQ(content_write(&f, "x", 1, (1ull << 30) - 1), 1);
	CHECK_EQ(content_fallocate(&f, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 100, (1ull << 30) - 200), 0);
	CHECK_EQ(fstat(f.fd, &st), 0);
	CHECK(st.st_blocks * 512 < (1 << 20));
	CHECK_EQ(content_read(&f, buf, 2, (1ull << 30) - 2), 2);
	CHECK(buf[0] == 0 && buf[1] == 'x');
}

int main(int argc, char **argv)
{
	char path[] = "/tmp/keyfs-test-content-XXXXXX";
	unsigned seed = argc > 1 ? (unsigned)strtoul(argv[1], NULL, 10) : 0;

	L = argc > 2 && strcmp(argv[2], "1") == 0 ? FMT_LAYOUT_V1 : FMT_LAYOUT_V2;
	if (argc > 3 && !(C = fmt_cipher_by_name(argv[3])))
		return 2;

	if (sodium_init() < 0 || open_file(path) < 0)
		return 2;
	unlink(path);
	model = calloc(1, MAXSIZE + 10000);
	if (!seed) {
		randombytes_buf(&seed, sizeof(seed));
		seed = seed % 1000000 + 1;
	}
	printf("seed %u layout %d cipher %s\n", seed, (int)L, fmt_cipher_name(C));
	test_header_slots();
	test_random(seed, 4000);
	refuse_zeroing = true;
	test_random(seed + 1, 2000);
	/* Both runs take some: a file grows to about MAXSIZE / 2 before truncates cut it. */
	if (L == FMT_LAYOUT_V2)
		CHECK(overwrites > 50);
	test_zero_fallback();
	refuse_zeroing = false;
	test_holes_and_seek();
	test_tamper();
	test_cut_inside_overhead();
	close(f.fd);
	sodium_free(keys);
	return check_done();
}
