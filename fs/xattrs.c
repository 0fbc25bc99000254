/* xattrs.c: extended attributes, no key; kept on the backing inode as they are, security.* refused */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/xattr.h>

#include "fs.h"
#include "ops.h"

/*
 * Every call goes through /proc/self/fd/N of the inode's O_PATH fd: the non-l variants follow
 * that magic link to the inode itself, symlinks included (the l variants would act on the /proc
 * link).
 */

/* security.* is not kept: answering at once saves `ls -l` a round trip per file. */
static bool is_security_xattr(const char *name)
{
	return strncmp(name, "security.", 9) == 0;
}

/* Answer a getxattr or listxattr of n bytes (or -errno) in buf: asked with size 0, the length alone. */
static void reply_xattr(fuse_req_t req, ssize_t n, const char *buf, size_t size)
{
	if (n < 0)
		fuse_reply_err(req, (int)-n);
	else if (size == 0)
		fuse_reply_xattr(req, (size_t)n);
	else
		fuse_reply_buf(req, buf, (size_t)n);
}

/* setxattr, or removexattr when remove, of name on i. Returns 0 or -errno. */
static int xattr_change(struct keyfs *fs, struct kfs_inode *i, const char *name, bool remove, const char *value,
			size_t size, int flags)
{
	char proc[OPS_PROC_PATH_SIZE];
	int fd, r;

	if (is_security_xattr(name))
		return -EOPNOTSUPP;
	r = fd = fd_of(fs, i);
	if (fd >= 0) {
		proc_path(fd, proc);
		r = (remove ? removexattr(proc, name) : setxattr(proc, name, value, size, flags)) < 0 ? -errno : 0;
		fd_done(fs, i);
	}
	return r;
}

void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value, size_t size, int flags)
{
	fuse_reply_err(req, -xattr_change(fs_of(req), inode_of(req, ino), name, false, value, size, flags));
}

void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name)
{
	fuse_reply_err(req, -xattr_change(fs_of(req), inode_of(req, ino), name, true, NULL, 0, 0));
}

/* The value of name into buf (size 0: only its length). Returns its length or -errno. */
static ssize_t xattr_get(struct keyfs *fs, struct kfs_inode *i, const char *name, char *buf, size_t size)
{
	char proc[OPS_PROC_PATH_SIZE];
	ssize_t n;
	int fd;

	n = fd = fd_of(fs, i);
	if (fd >= 0) {
		proc_path(fd, proc);
		n = getxattr(proc, name, buf, size);
		if (n < 0)
			n = -errno;
		fd_done(fs, i);
	}
	return n;
}

void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
	char *buf = NULL;
	ssize_t n;

	if (is_security_xattr(name))
		n = -EOPNOTSUPP;
	else if (size > 0 && !(buf = malloc(size)))
		n = -ENOMEM;
	else
		n = xattr_get(fs_of(req), inode_of(req, ino), name, buf, size);
	reply_xattr(req, n, buf, size);
	free(buf);
}

/* The backing list without security.* names, in a malloc'd buffer. */
static ssize_t list_xattrs(const char *proc, char **ret)
{
	char *buf = NULL;
	ssize_t n;
	size_t len = 0, w = 0;

	for (;;) {
		char *nb;

		n = listxattr(proc, NULL, 0);
		if (n < 0)
			goto fail;
		len = (size_t)n + 256;  /* room for a name added in between */
		nb = realloc(buf, len);
		if (!nb) {
			errno = ENOMEM;
			goto fail;
		}
		buf = nb;
		n = listxattr(proc, buf, len);
		if (n >= 0)
			break;
		if (errno != ERANGE)
			goto fail;
	}
	for (size_t r = 0; r < (size_t)n;) {
		size_t l = strnlen(buf + r, (size_t)n - r) + 1;

		if (!is_security_xattr(buf + r)) {
			memmove(buf + w, buf + r, l);
			w += l;
		}
		r += l;
	}
	*ret = buf;
	return (ssize_t)w;
fail:
	n = -errno;
	free(buf);
	return n;
}

void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
	struct kfs_inode *i = inode_of(req, ino);
	char proc[OPS_PROC_PATH_SIZE];
	char *buf = NULL;
	int fd = fd_of(fs_of(req), i);
	ssize_t n = fd;

	if (fd >= 0) {
		proc_path(fd, proc);
		n = list_xattrs(proc, &buf);
		fd_done(fs_of(req), i);
	}
	if (n >= 0 && size > 0 && (size_t)n > size)
		n = -ERANGE;
	reply_xattr(req, n, buf, size);
	free(buf);
}
