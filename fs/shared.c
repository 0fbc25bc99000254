/* shared.c: a shared mount's byte-range locks around the content operations */
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <string.h>

#include "keyfs/content.h"
#include "keyfs/lockspace.h"
#include "keyfs/log.h"

#include "shared.h"

/* Lock [start, start + len) of fd's lock space (len 0: to the end), waiting for it. */
static int range_op(int fd, short type, uint64_t start, uint64_t len)
{
	static atomic_bool told;
	struct flock fl = {
		.l_type = type,
		.l_whence = SEEK_SET,
		.l_start = (off_t)start,
		.l_len = (off_t)len,
	};

	while (fcntl(fd, F_OFD_SETLKW, &fl) < 0) {
		int err = errno;

		if (err == EINTR)
			continue;
		if (!atomic_exchange(&told, true))
			log_err("shared volume: the backing filesystem refuses byte-range locks (%s): writes fail with ENOLCK",
				strerror(err));
		return err == EINVAL || err == EOPNOTSUPP ? -ENOLCK : -err;
	}
	return 0;
}

/* The chunks [off, off + size) touches, as a range of the lock space. */
static void chunks(uint64_t off, size_t size, uint64_t *start, uint64_t *len)
{
	uint64_t c0 = off / FMT_CHUNK_SIZE;
	uint64_t c1 = size ? (off + size - 1) / FMT_CHUNK_SIZE : c0;

	*start = LOCKSPACE_CHUNK(c0);
	*len = c1 - c0 + 1;
}

int shared_read_begin(struct keyfs *fs, int fd, uint64_t off, size_t size)
{
	uint64_t start, len;

	if (!fs->shared)
		return 0;
	if (off > FMT_MAX_PLAIN_SIZE || size > FMT_MAX_PLAIN_SIZE - off)
		return 0;       /* nothing there to read: content_read answers */
	chunks(off, size, &start, &len);
	return range_op(fd, F_RDLCK, start, len);
}

int shared_write_begin(struct keyfs *fs, int fd, bool append, size_t size, uint64_t *pos)
{
	uint64_t p = 0, start, len, first;
	bool grows;
	int r;

	if (!fs->shared)
		return append ? content_size(fd, fs->vol.format, pos) : 0;
	if (*pos > FMT_MAX_PLAIN_SIZE || size > FMT_MAX_PLAIN_SIZE - *pos)
		return 0;       /* content_write answers EFBIG without touching the file */
	/* Whether the write grows the file is only known under a size lock: guess from the size
	 * now, and take the exclusive one when the guess was wrong. */
	r = content_size(fd, fs->vol.format, &p);
	grows = append || r < 0 || *pos + size > p;
	for (;;) {
		r = range_op(fd, grows ? F_WRLCK : F_RDLCK, LOCKSPACE_SIZE, 1);
		if (r < 0)
			return r;
		r = content_size(fd, fs->vol.format, &p);
		if (r < 0)
			goto fail;
		if (append)
			*pos = p;
		if (grows || *pos + size <= p)
			break;
		grows = true;   /* shrunk by another host meanwhile: unlock and lock exclusively */
		range_op(fd, F_UNLCK, LOCKSPACE_SIZE, 1);
	}
	chunks(*pos, size, &start, &len);
	/* Growing re-seals the old partial last chunk and leaves holes up to the write. */
	first = p / FMT_CHUNK_SIZE;
	if (grows && LOCKSPACE_CHUNK(first) < start) {
		len += start - LOCKSPACE_CHUNK(first);
		start = LOCKSPACE_CHUNK(first);
	}
	r = range_op(fd, F_WRLCK, start, len);
	if (r == 0)
		return 0;
fail:
	range_op(fd, F_UNLCK, LOCKSPACE_SIZE, 1);
	return r;
}

int shared_all_begin(struct keyfs *fs, int fd)
{
	int r;

	if (!fs->shared)
		return 0;
	r = range_op(fd, F_WRLCK, LOCKSPACE_SIZE, 1);
	if (r == 0) {
		r = range_op(fd, F_WRLCK, LOCKSPACE_CHUNK(0), 0);
		if (r < 0)
			range_op(fd, F_UNLCK, LOCKSPACE_SIZE, 1);
	}
	return r;
}

void shared_end(struct keyfs *fs, int fd)
{
	if (fs->shared)
		range_op(fd, F_UNLCK, LOCKSPACE_SIZE, 0);
}
