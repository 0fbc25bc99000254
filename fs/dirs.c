/* dirs.c: directory handles and listings, no key; a readdirplus hands the listed files to prefetch.c */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fs.h"
#include "ops.h"
#include "prefetch.h"

/* An open directory. The kernel does not run two readdirs of one handle at once. */
struct kfs_dir {
	DIR *dp;
	struct dirent *entry;           /* read but not yet returned (did not fit the last reply) */
	off_t offset;
	unsigned prefetched;            /* files of this listing queued for an unwrap ahead */
};

static struct kfs_dir *dir_of(const struct fuse_file_info *fi)
{
	return (struct kfs_dir *)(uintptr_t)fi->fh;
}

static int dir_open(struct keyfs *fs, struct kfs_inode *i, struct kfs_dir **ret)
{
	struct kfs_dir *d = calloc(1, sizeof(*d));
	int fd, pfd, r;

	if (!d)
		return -ENOMEM;
	pfd = fd_of(fs, i);
	if (pfd < 0) {
		free(d);
		return pfd;
	}
	fd = openat(pfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0 && inode_fd_shortage(&fs->table, errno))
		fd = openat(pfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	r = errno;
	fd_done(fs, i);
	errno = r;
	if (fd < 0 || !(d->dp = fdopendir(fd))) {
		r = -errno;
		if (fd >= 0)
			close(fd);
		free(d);
		return r;
	}
	*ret = d;
	return 0;
}

static void dir_free(struct kfs_dir *d)
{
	closedir(d->dp);
	free(d);
}

void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct kfs_dir *d = NULL;
	int r = dir_open(fs_of(req), inode_of(req, ino), &d);

	if (r == 0)
		fi->fh = (uintptr_t)d;
	if (r < 0)
		fuse_reply_err(req, -r);
	else if (fuse_reply_open(req, fi) == -ENOENT)
		dir_free(d);
}

/* A listed file to hand to the prefetcher once the reply is sent. */
struct listed {
	struct kfs_inode *inode;
	bool later;                     /* past the first prefetch_max: waits for the window to slide */
};

/*
 * Files listed by a readdirplus are about to be opened, often all of them (cp -a, tar, grep -r):
 * queue the first prefetch_max regular files of a listing whose keys are not loaded for an
 * unwrap ahead, so that the opens do not pay one serial KMS round trip each, and hand the rest
 * to the prefetcher to queue one per listed file opened (a sliding window). Each inode holds
 * one more reference, taken here, so a forget cannot free it while it waits.
 */
static void prefetch_note(struct keyfs *fs, struct kfs_dir *d, struct kfs_inode *child,
			  struct listed **pending, size_t *npending)
{
	struct listed *grown;

	if (!fs->prefetch || !prefetch_wanted(child))
		return;
	grown = realloc(*pending, (*npending + 1) * sizeof(**pending));
	if (!grown)
		return;
	*pending = grown;
	inode_ref(&fs->table, child);
	grown[*npending].inode = child;
	grown[*npending].later = d->prefetched >= fs->prefetch_max;
	(*npending)++;
	if (d->prefetched < fs->prefetch_max)
		d->prefetched++;
}

/*
 * A plain readdir: the kernel asks for one after the first batch of a listing unless the reader
 * looked into it meanwhile (find and tar read the whole directory first), so a long listing's
 * files past that batch get no inode for the kernel. One is made here for a regular file the
 * listing would still hand to the prefetcher; our lookup reference is dropped once it holds its
 * own.
 */
static void prefetch_note_plain(struct keyfs *fs, struct kfs_dir *d, struct kfs_inode *dir, const char *name,
				struct listed **pending, size_t *npending)
{
	struct fuse_entry_param e;
	struct kfs_inode *child = NULL;

	if (d->prefetched >= fs->prefetch_max && !prefetch_later_room(fs->prefetch))
		return;
	if (ops_lookup(fs, dir, name, &e, &child) < 0 || !child)
		return;
	prefetch_note(fs, d, child, pending, npending);
	inode_unref(&fs->table, child, 1);
}

/*
 * Fill buf with the entries of d from off on (with their attributes and a lookup reference each
 * when plus), and note in pending the files to prefetch. Returns the bytes filled, or -errno when
 * none were: entries already in the buffer carry lookup references, so they are sent and the
 * error is reported on the next call.
 */
static ssize_t dir_fill(fuse_req_t req, struct kfs_dir *d, struct kfs_inode *dir, char *buf, size_t size, off_t off,
			bool plus, struct listed **pending, size_t *npending)
{
	struct keyfs *fs = fs_of(req);
	size_t rem = size;
	char *p = buf;
	int err = 0;

	if (off != d->offset) {
		seekdir(d->dp, off);
		d->entry = NULL;
		d->offset = off;
	}
	for (;;) {
		struct fuse_entry_param e;
		struct kfs_inode *child = NULL;
		const char *name;
		size_t len;

		if (!d->entry) {
			errno = 0;
			d->entry = readdir(d->dp);
			if (!d->entry) {
				err = errno;
				break;
			}
		}
		name = d->entry->d_name;
		if (is_reserved(node_id(dir), name)) {
			d->offset = d->entry->d_off;
			d->entry = NULL;
			continue;
		}
		if (plus) {
			if (is_dot_or_dotdot(name)) {
				memset(&e, 0, sizeof(e));
				e.attr.st_ino = d->entry->d_ino;
				e.attr.st_mode = (mode_t)d->entry->d_type << 12;
			} else {
				int r = ops_lookup(fs, dir, name, &e, &child);

				if (r == -ENOENT) {
					/* Removed since readdir saw it. */
					d->offset = d->entry->d_off;
					d->entry = NULL;
					continue;
				}
				if (r < 0) {
					err = -r;
					break;
				}
			}
			len = fuse_add_direntry_plus(req, p, rem, name, &e, d->entry->d_off);
		} else {
			struct stat st = {
				.st_ino = d->entry->d_ino,
				.st_mode = (mode_t)d->entry->d_type << 12,
			};

			len = fuse_add_direntry(req, p, rem, name, &st, d->entry->d_off);
		}
		if (len > rem) {
			if (child)
				inode_unref(&fs->table, child, 1);
			break;
		}
		p += len;
		rem -= len;
		d->offset = d->entry->d_off;
		if (child)
			prefetch_note(fs, d, child, pending, npending);
		else if (!plus && fs->prefetch && d->entry->d_type == DT_REG)
			prefetch_note_plain(fs, d, dir, name, pending, npending);
		d->entry = NULL;
	}
	return err && rem == size ? -err : (ssize_t)(size - rem);
}

static void do_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi,
		       bool plus)
{
	struct keyfs *fs = fs_of(req);
	struct listed *pending = NULL;
	size_t npending = 0;
	char *buf = malloc(size);
	ssize_t n = buf ? dir_fill(req, dir_of(fi), inode_of(req, ino), buf, size, off, plus, &pending, &npending)
			: -ENOMEM;

	if (n < 0)
		fuse_reply_err(req, (int)-n);
	else
		fuse_reply_buf(req, buf, (size_t)n);
	free(buf);
	for (size_t k = 0; k < npending; k++)
		prefetch_listed(fs->prefetch, pending[k].inode, pending[k].later);
	free(pending);
}

void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	do_readdir(req, ino, size, off, fi, false);
}

void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	do_readdir(req, ino, size, off, fi, true);
}

void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	dir_free(dir_of(fi));
	fuse_reply_err(req, 0);
}

void op_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
	(void)ino;
	fuse_reply_err(req, -fd_sync(dirfd(dir_of(fi)->dp), datasync));
}
