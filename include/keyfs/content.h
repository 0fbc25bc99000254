/* content.h: plaintext reads and writes of one backing file given its keys (partial chunks, holes, truncate) */
#ifndef KEYFS_CONTENT_H
#define KEYFS_CONTENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "keyfs/format.h"

/*
 * One open backing file with a valid header. The caller owns the fd and the keys, and serialises:
 * content_read (and content_overwrite) may run concurrently with other reads and overwrites;
 * content_write, content_truncate and content_fallocate need exclusive access to the file (a
 * per-inode read/write lock in fs/).
 * All functions return >= 0 on success, -errno on failure; an authentication failure is -EIO.
 * A backing file of size 0 has no header yet: reads see an empty file, and content_write or a
 * growing content_truncate answer -ENODATA so the caller writes a header first.
 */
struct content_file {
	int fd;                                 /* backing file, opened O_RDWR for writes */
	enum fmt_layout layout;                 /* the volume's: FMT_LAYOUT_V1 or FMT_LAYOUT_V2 */
	const struct fmt_keys *keys;            /* in sodium_malloc memory */
	uint8_t file_id[FMT_FILE_ID_SIZE];
	/* content_read and the writes (content_write, _seal, _sealed): the backing file's size,
	 * when the caller knows it (a cache of its own, valid while nothing changed the file);
	 * otherwise they ask fstat. A write that succeeds leaves the file at
	 * fmt_backing_size(layout, max(old plain size, off + size)); a failed one, unknown. */
	bool backing_size_known;
	uint64_t backing_size;
	/* v2: the file's key in the tag cache (content_tags_id), 0 for none. Reads and writes
	 * (content_read, content_write, _sealed) then keep its tag pages cached and write tag
	 * pages whole. The caller owns the id: it must give the file a new one (or 0) whenever
	 * something other than these changes its tag entries (truncate, fallocate, a new or
	 * dropped header, another host), and use it only while it holds the content lock (shared
	 * for reads, exclusive for the rest). Never on a shared mount. */
	uint64_t tags_id;
};

/* A tag cache id no file had before (never 0). */
uint64_t content_tags_id(void);
/* Free every cached tag page (a lock: the cache holds nothing of use while locked). */
void content_tags_drop_all(void);
/* Tag pages cached now (at most 1024, 4 KiB each). */
size_t content_tags_cached(void);

/* The header slots of one file that parse (structure only: authenticating needs the keys). */
struct content_headers {
	unsigned count;                         /* 0..2, newest generation first */
	unsigned slot[FMT_HEADER_SLOTS];        /* which slot each came from */
	struct fmt_header hdr[FMT_HEADER_SLOTS];
	uint8_t raw[FMT_HEADER_SLOTS][FMT_HEADER_SIZE];
};

/* Read both header slots of fd in a volume of the given layout: a slot whose format version is
 * not the layout does not count (FMT_LAYOUT_ANY takes either). Returns 0 with at least one slot,
 * -ENODATA when the backing file is empty (no header yet), -EIO when it is shorter than the
 * header area or no slot parses (or all that parse are of the other layout), -EPROTONOSUPPORT
 * when no slot parses and one has an unknown version or cipher. */
int content_headers_read(int fd, enum fmt_layout layout, struct content_headers *ret);

/* The newest slot that parses, for readers without a key (inspect): as content_headers_read. */
int content_header_read(int fd, enum fmt_layout layout, struct fmt_header *ret_hdr, uint8_t raw[FMT_HEADER_SIZE]);

/* Give an empty backing file its header area: raw in slot 0, slot 1 zero; a v2 header (version 2
 * in raw) gets the whole 4096-byte header page. Returns 0 or -errno. */
int content_header_init(int fd, const uint8_t raw[FMT_HEADER_SIZE]);

/* Write raw into one slot and make it durable (fdatasync) before returning: the other slot
 * keeps the previous header until then, so a crash leaves one that authenticates. */
int content_header_store(int fd, unsigned slot, const uint8_t raw[FMT_HEADER_SIZE]);

/* Mark one slot unused (all zero bytes, which never parse) and make that durable. */
int content_header_clear(int fd, unsigned slot);

/* Replace a file's header: raw into slot, durable, then the other slot cleared and synced, so
 * the old wrapped DEK (of an older key version) does not stay in the file. A crash at any
 * point leaves a slot that authenticates. Returns 0 or -errno; when the clear fails the new
 * header is already in place. Call it under content_header_lock. */
int content_header_rewrite(int fd, unsigned slot, const uint8_t raw[FMT_HEADER_SIZE]);

/*
 * An exclusive OFD lock on the header area of fd (open for writing), waiting for it. Whoever
 * changes a header takes it and, under it, re-reads before writing: the daemon (new headers,
 * re-wrapped keys, dropping a header) and keyfsctl rewrap, which runs alongside a live mount.
 * Returns 0, or -errno (-ENOLCK, -EOPNOTSUPP: the backing filesystem has no such locks).
 */
int content_header_lock(int fd);
void content_header_unlock(int fd);

/* Size of the backing file fd (fstat), for a caller that keeps it (content_file.backing_size). */
int content_backing_size(int fd, uint64_t *ret_size);

/* Plaintext size of the backing file fd in a volume of the given layout. */
int content_size(int fd, enum fmt_layout layout, uint64_t *ret_size);

/* Read up to size bytes at off into buf. Returns the byte count (short only at end of file). */
ssize_t content_read(const struct content_file *f, void *buf, size_t size, uint64_t off);

/* Write size bytes at off, growing the file (with holes) as needed. Returns size or -errno.
 * On failure the file keeps its old size; chunks already rewritten may hold new data. */
ssize_t content_write(const struct content_file *f, const void *buf, size_t size, uint64_t off);

/*
 * Overwrite whole chunks inside a v2 file with the tag cache on (tags_id set): off and size
 * multiples of the chunk size, off + size at most the plaintext size, so no old contents and no
 * size change are involved. Unlike content_write it needs only shared access (as a read): it
 * may run beside reads and other overwrites of the file; a read sees each chunk whole, as it
 * was before or after, and two overwrites of one chunk leave one of them whole (content.c,
 * chunk and group locks). Returns size, -EAGAIN when the write is not such an overwrite (then
 * use content_write under exclusive access), or -errno as content_write.
 */
ssize_t content_overwrite(const struct content_file *f, const void *buf, size_t size, uint64_t off);

/*
 * A write in two steps, so that its chunks are sealed outside the exclusive access a write
 * needs (several requests of one file sealing at once on several cores): content_write_seal
 * under shared access (as a read), then content_write_sealed under exclusive access, in the
 * same thread (the sealed chunks wait in its scratch buffer). Only a v2 write that starts on a
 * chunk and ends on one or at or past the end of the file needs no old contents to seal:
 * content_write_sealable says whether it can be (the layout and the range alone), seal answers
 * -EAGAIN when the file makes it not (no header, damaged, ends inside the last chunk written).
 * content_write_sealed writes the sealed chunks if the keys, file id and range are the ones
 * sealed for and the file still ends where they need it to, else it does content_write. Both
 * return as content_write; s needs no release.
 */
struct content_sealed {
	bool ready;
	const struct fmt_keys *keys;
	uint8_t file_id[FMT_FILE_ID_SIZE];
	uint64_t off;
	size_t size;
};

bool content_write_sealable(enum fmt_layout layout, size_t size, uint64_t off);
int content_write_seal(const struct content_file *f, const void *buf, size_t size, uint64_t off,
		       struct content_sealed *s);
ssize_t content_write_sealed(const struct content_file *f, const void *buf, size_t size, uint64_t off,
			     struct content_sealed *s);

/* Set the plaintext size: shrink (re-sealing a cut chunk) or grow (sparse). */
int content_truncate(const struct content_file *f, uint64_t size);

/*
 * fallocate with the semantics of a local filesystem: modes 0 and FALLOC_FL_KEEP_SIZE
 * (preallocate, grow unless KEEP_SIZE), FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE and
 * FALLOC_FL_ZERO_RANGE with or without KEEP_SIZE (the range inside the file reads as zeros;
 * ZERO_RANGE without KEEP_SIZE grows the file to off + len). Full chunks in a zeroed range become
 * holes; chunks it covers in part, and a partial last chunk, are re-sealed. Other modes give
 * -EOPNOTSUPP. A file without a header (backing size 0) is only grown by mode 0 or ZERO_RANGE
 * after the caller gave it one.
 */
int content_fallocate(const struct content_file *f, int mode, uint64_t off, uint64_t len);

/* SEEK_DATA / SEEK_HOLE at chunk granularity. Returns the plaintext offset in *ret_off. */
int content_lseek(const struct content_file *f, uint64_t off, int whence, uint64_t *ret_off);

#endif
