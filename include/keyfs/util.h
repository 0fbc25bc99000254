/* util.h: small bounded helpers shared by every layer: files, numbers, uuids, time, JSON strings */
#ifndef KEYFS_UTIL_H
#define KEYFS_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>
#include <sys/uio.h>

/* Read a whole regular file (not a symlink) of at most max bytes, NUL-terminated, into a malloc'd buffer.
 * dirfd/path as for openat. Returns 0, -EFBIG when larger than max, or -errno. */
int util_read_file(int dirfd, const char *path, size_t max, char **ret_buf, size_t *ret_len);

/* Replace dirfd/path atomically: write a temporary file with mode, fsync it, rename over
 * path, fsync the directory. Returns 0 or -errno. */
int util_write_file_atomic(int dirfd, const char *path, const void *buf, size_t len, unsigned mode);

/* Parse a whole decimal string into [min, max]. Returns 0 or -EINVAL / -ERANGE. No atoi. */
int util_parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *ret);

/* A random (version 4) uuid, lower-case, 36 chars + NUL. */
void util_uuid4(char out[37]);

/* Is s a uuid as util_uuid4 writes them (36 chars, lower-case hex and hyphens)? Volume uuids
 * and local key ids are. */
bool util_uuid_valid(const char *s);

/* Current time as RFC 3339 UTC with seconds ("2026-11-22T22:25:00Z"). */
void util_now_rfc3339(char out[32]);

/* Copy s into out with each byte that starts no valid UTF-8 sequence replaced by U+FFFD (a file
 * name may hold any bytes; JSON text must be UTF-8). out needs up to 3 * strlen(s) + 1 bytes.
 * Returns 0 or -ENAMETOOLONG. */
int util_utf8_fix(const char *s, char *out, size_t size);

/* Write s to f as a JSON string literal, quotes and escapes included; bytes that are not
 * UTF-8 (a file name may hold any) become U+FFFD, so the output is always valid JSON. */
void util_json_string(FILE *f, const char *s);

/* Lower-case hex of n bytes into out (2n+1 bytes). */
void util_hex(const uint8_t *in, size_t n, char *out);

/* pread until len bytes or end of file, retrying on EINTR. Returns the byte count or -errno. */
ssize_t util_pread_full(int fd, void *buf, size_t len, uint64_t off);

/* preadv until every iovec is full or the file ends, retrying on EINTR; iov is advanced past
 * what was read. Returns the byte count or -errno. */
ssize_t util_preadv_full(int fd, struct iovec *iov, int cnt, uint64_t off);

/* The absolute path of arg with every symlink resolved but in its last component, which is
 * not asked anything (a symlink stays a symlink, a dead mount answers nothing): the real path
 * of its parent joined with it. "." and ".." are resolved whole. Returns 0 or -errno. */
int util_parent_real_path(const char *arg, char *out, size_t size);

/* The filesystem type of a keyfs mount in the mount table: FUSE's "fuse." and the subtype the
 * daemon gives libfuse. keyfsctl and the daemon's start checks recognise keyfs mounts by it. */
#define KEYFS_FSSUBTYPE "keyfs"
#define KEYFS_FSTYPE "fuse." KEYFS_FSSUBTYPE

/* One line of /proc/self/mountinfo, its mountpoint, root and source unescaped (\040 is a space). */
struct util_mount {
	const char *mountpoint;
	const char *root;               /* the mount's root inside its filesystem (bind mounts) */
	const char *fstype;             /* KEYFS_FSTYPE for a keyfs mount */
	const char *source;
	const char *super;              /* super options ("rw,user_id=0,..."), "" when none */
	dev_t dev;
};

/* Call fn for each mount of this namespace in mount order (a later one covers an earlier one);
 * m is valid during the call only. A non-zero return of fn ends the walk and is returned.
 * Returns 0, fn's value, or -errno when the table cannot be read. */
int util_mountinfo_each(int (*fn)(const struct util_mount *m, void *ctx), void *ctx);

/* The mount on top at exactly the absolute, normalised path: its fstype,
 * source and, when super is non-NULL, super options ("rw,user_id=0,..."). Returns 0, -ENOENT
 * when nothing is mounted there, or -errno. Never touches path. */
int util_mount_at(const char *path, char *fstype, size_t fstype_size, char *source, size_t source_size,
		  char *super, size_t super_size);

/* Is a filesystem of type fstype with this source (a keyfs: its backing dir) mounted anywhere in
 * this mount namespace? Returns 1, 0, or -errno. */
int util_mounted_from(const char *fstype, const char *source);

#endif
