/* content.h: plaintext reads and writes of one backing file given its keys (partial chunks, holes, truncate) */
#ifndef KEYFS_CONTENT_H
#define KEYFS_CONTENT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "keyfs/format.h"

/*
 * One open backing file with a valid header. The caller owns the fd and the keys, and serialises:
 * content_read may run concurrently with other reads; content_write, content_truncate and
 * content_fallocate need exclusive access to the file (a per-inode read/write lock in fs/).
 * All functions return >= 0 on success, -errno on failure; an authentication failure is -EIO.
 * A backing file of size 0 has no header yet: reads see an empty file, and content_write or a
 * growing content_truncate answer -ENODATA so the caller writes a header first.
 */
struct content_file {
	int fd;                                 /* backing file, opened O_RDWR for writes */
	const struct fmt_keys *keys;            /* in sodium_malloc memory */
	uint8_t file_id[FMT_FILE_ID_SIZE];
};

/* Read and check the header of fd into ret_hdr and the raw bytes into raw (may be NULL).
 * Returns 0, -ENODATA when the backing file is empty (no header yet), -EIO when it is
 * shorter than a header or its structure is invalid, -EPROTONOSUPPORT for an unknown version. */
int content_header_read(int fd, struct fmt_header *ret_hdr, uint8_t raw[FMT_HEADER_SIZE]);

/* Write an encoded header at offset 0 of fd. Returns 0 or -errno. */
int content_header_write(int fd, const uint8_t raw[FMT_HEADER_SIZE]);

/* Plaintext size of the backing file fd. */
int content_size(int fd, uint64_t *ret_size);

/* Read up to size bytes at off into buf. Returns the byte count (short only at end of file). */
ssize_t content_read(const struct content_file *f, void *buf, size_t size, uint64_t off);

/* Write size bytes at off, growing the file (with holes) as needed. Returns size or -errno.
 * On failure the file keeps its old size; chunks already rewritten may hold new data. */
ssize_t content_write(const struct content_file *f, const void *buf, size_t size, uint64_t off);

/* Set the plaintext size: shrink (re-sealing a cut chunk) or grow (sparse). */
int content_truncate(const struct content_file *f, uint64_t size);

/* fallocate modes 0 and FALLOC_FL_KEEP_SIZE; others give -EOPNOTSUPP. */
int content_fallocate(const struct content_file *f, int mode, uint64_t off, uint64_t len);

/* SEEK_DATA / SEEK_HOLE at chunk granularity. Returns the plaintext offset in *ret_off. */
int content_lseek(const struct content_file *f, uint64_t off, int whence, uint64_t *ret_off);

#endif
