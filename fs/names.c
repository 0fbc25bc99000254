/* names.c: namespace and attribute handlers: inode fds and *at() syscalls, no key (contents.c has those) */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "fs.h"
#include "ops.h"
#include "prefetch.h"

int ops_stat(struct keyfs *fs, struct kfs_inode *i, struct stat *st)
{
	int fd = fd_of(fs, i), r = 0;

	if (fd < 0)
		return fd;
	if (fstatat(fd, "", st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0)
		r = -errno;
	fd_done(fs, i);
	if (r == 0)
		plain_attr(fs, st);
	return r;
}

int ops_adopt(struct keyfs *fs, int fd, struct kfs_inode *dir, const char *name, struct fuse_entry_param *e,
	      struct kfs_inode **ret)
{
	struct kfs_inode *i;
	int r;

	memset(e, 0, sizeof(*e));
	e->entry_timeout = fs->timeout;
	if (fstatat(fd, "", &e->attr, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0) {
		r = -errno;
		close(fd);
		return r;
	}
	e->attr_timeout = contents_attr_timeout(fs, e->attr.st_mode);
	r = inode_get(&fs->table, fd, &e->attr, dir, name, &i);
	if (r < 0)
		return r;
	plain_attr(fs, &e->attr);
	e->ino = node_id(i);
	if (ret)
		*ret = i;
	return 0;
}

int ops_lookup(struct keyfs *fs, struct kfs_inode *dir, const char *name, struct fuse_entry_param *e,
	       struct kfs_inode **ret)
{
	int dfd = fd_of(fs, dir), fd;

	if (dfd < 0)
		return dfd;
	fd = openat(dfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0 && inode_fd_shortage(&fs->table, errno))
		fd = openat(dfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		fd = -errno;
	fd_done(fs, dir);
	if (fd < 0)
		return fd;
	return ops_adopt(fs, fd, dir, name, e, ret);
}

void ops_reply_entry(fuse_req_t req, const struct fuse_entry_param *e)
{
	if (fuse_reply_entry(req, e) == -ENOENT && e->ino)
		inode_unref(&fs_of(req)->table, inode_of(req, e->ino), 1);
}

static void reply_attr_of(fuse_req_t req, struct kfs_inode *i)
{
	struct stat st;
	int r = ops_stat(fs_of(req), i, &st);

	if (r < 0)
		fuse_reply_err(req, -r);
	else
		fuse_reply_attr(req, &st, contents_attr_timeout(fs_of(req), i->type));
}

/* Reply to a request that made a node: its entry, or the error. */
static void reply_new_node(fuse_req_t req, int r, const struct fuse_entry_param *e)
{
	if (r < 0)
		fuse_reply_err(req, -r);
	else
		ops_reply_entry(req, e);
}

/* ---- ownership of new nodes ---- */

/*
 * When the daemon runs as root, a new node belongs to root; give it to the caller as the kernel
 * would: the caller's uid, and its gid unless the parent dir is set-group-id. This is what makes
 * `-o allow_other,default_permissions` a multi-user filesystem.
 */
int ops_new_owner(struct keyfs *fs, fuse_req_t req, struct kfs_inode *dir, uid_t *uid, gid_t *gid)
{
	const struct fuse_ctx *c = fuse_req_ctx(req);
	struct stat st;
	int r;

	if (!fs->as_root || (c->uid == 0 && c->gid == 0))
		return 0;
	r = ops_stat(fs, dir, &st);
	if (r < 0)
		return r;
	*uid = c->uid;
	*gid = (st.st_mode & S_ISGID) ? st.st_gid : c->gid;
	return 1;
}

/* Give a new non-regular node (dir, symlink, fifo, socket, device) to the caller. */
static int give_node(struct keyfs *fs, fuse_req_t req, struct kfs_inode *dir, struct kfs_inode *i,
		     mode_t mode, struct stat *st)
{
	char proc[OPS_PROC_PATH_SIZE];
	uid_t uid;
	gid_t gid;
	int fd, r = ops_new_owner(fs, req, dir, &uid, &gid);

	if (r <= 0)
		return r;
	if (st->st_uid == uid && st->st_gid == gid)
		return 0;
	fd = fd_of(fs, i);
	if (fd < 0)
		return fd;
	if (fchownat(fd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0)
		r = -errno;
	if (r == 0 && needs_mode_again(i->type, mode)) {
		proc_path(fd, proc);
		if (chmod(proc, mode & 07777) < 0)
			r = -errno;
	}
	fd_done(fs, i);
	return r < 0 ? r : ops_stat(fs, i, st);
}

/* ---- handlers ---- */

void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct keyfs *fs = fs_of(req);
	struct fuse_entry_param e;
	struct kfs_inode *i = NULL;
	int r = -ENOENT;

	/* No "." or "..": the kernel resolves them itself without FUSE_CAP_EXPORT_SUPPORT, and ".."
	 * of the root would leave the backing dir. */
	if (!is_reserved(parent, name) && !is_dot_or_dotdot(name))
		r = ops_lookup(fs, inode_of(req, parent), name, &e, &i);
	/* A file looked up is usually opened next: its key is unwrapped from now on, not from the
	 * open on (the open waits for that one unwrap rather than making its own). */
	if (r == 0 && fs->prefetch && prefetch_wanted(i)) {
		inode_ref(&fs->table, i);
		prefetch_add(fs->prefetch, i);
	}
	if (r == -ENOENT) {
		/* A negative entry: the kernel remembers the miss for the timeout. */
		memset(&e, 0, sizeof(e));
		e.entry_timeout = fs->timeout;
		fuse_reply_entry(req, &e);
	} else if (r < 0) {
		fuse_reply_err(req, -r);
	} else {
		ops_reply_entry(req, &e);
	}
}

void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
	inode_unref(&fs_of(req)->table, inode_of(req, ino), nlookup);
	fuse_reply_none(req);
}

void op_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
	for (size_t n = 0; n < count; n++)
		inode_unref(&fs_of(req)->table, inode_of(req, forgets[n].ino), forgets[n].nlookup);
	fuse_reply_none(req);
}

void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct kfs_inode *i = inode_of(req, ino);
	int r = fi && S_ISREG(i->type) ? contents_attr_for_write(fs_of(req)) : 0;

	if (r < 0)
		fuse_reply_err(req, -r);
	else
		reply_attr_of(req, i);
}

static int do_setattr(struct keyfs *fs, struct kfs_inode *i, int ifd, const struct stat *attr, int valid,
		      const struct fuse_file_info *fi)
{
	char proc[OPS_PROC_PATH_SIZE];
	int r;

	proc_path(ifd, proc);
	if ((valid & FUSE_SET_ATTR_MODE) && chmod(proc, attr->st_mode & 07777) < 0)
		return -errno;
	if (valid & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
		uid_t uid = (valid & FUSE_SET_ATTR_UID) ? attr->st_uid : (uid_t)-1;
		gid_t gid = (valid & FUSE_SET_ATTR_GID) ? attr->st_gid : (gid_t)-1;

		if (fchownat(ifd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0)
			return -errno;
	}
	/* The one attribute that is contents: it needs the key. */
	if (valid & FUSE_SET_ATTR_SIZE) {
		r = contents_truncate(fs, i, proc, attr->st_size, fi);
		if (r < 0)
			return r;
	}
	if (valid & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME)) {
		struct timespec tv[2] = { { .tv_nsec = UTIME_OMIT }, { .tv_nsec = UTIME_OMIT } };

		if (valid & FUSE_SET_ATTR_ATIME_NOW)
			tv[0].tv_nsec = UTIME_NOW;
		else if (valid & FUSE_SET_ATTR_ATIME)
			tv[0] = attr->st_atim;
		if (valid & FUSE_SET_ATTR_MTIME_NOW)
			tv[1].tv_nsec = UTIME_NOW;
		else if (valid & FUSE_SET_ATTR_MTIME)
			tv[1] = attr->st_mtim;
		/* AT_EMPTY_PATH works on O_PATH fds, symlinks included; older kernels want the path. */
		if (utimensat(ifd, "", tv, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0 &&
		    (errno != EINVAL || S_ISLNK(i->type) || utimensat(AT_FDCWD, proc, tv, 0) < 0))
			return -errno;
	}
	return 0;
}

void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int valid, struct fuse_file_info *fi)
{
	struct kfs_inode *i = inode_of(req, ino);
	int fd = fd_of(fs_of(req), i), r = fd;

	if (fd >= 0) {
		r = do_setattr(fs_of(req), i, fd, attr, valid, fi);
		fd_done(fs_of(req), i);
	}

	if (r < 0)
		fuse_reply_err(req, -r);
	else
		reply_attr_of(req, i);
}

/* The target's length, or -errno. buf has PATH_MAX + 1 bytes. */
static ssize_t do_readlink(struct keyfs *fs, struct kfs_inode *i, char *buf)
{
	int fd = fd_of(fs, i);
	ssize_t n = fd < 0 ? fd : readlinkat(fd, "", buf, PATH_MAX + 1);

	if (n < 0)
		n = fd < 0 ? fd : -errno;
	if (fd >= 0)
		fd_done(fs, i);
	if (n > PATH_MAX)
		return -ENAMETOOLONG;
	return n;
}

void op_readlink(fuse_req_t req, fuse_ino_t ino)
{
	char buf[PATH_MAX + 1];
	ssize_t n = do_readlink(fs_of(req), inode_of(req, ino), buf);

	if (n >= 0)
		buf[n] = '\0';
	if (n < 0)
		fuse_reply_err(req, (int)-n);
	else
		fuse_reply_readlink(req, buf);
}

/* mkdir, symlink, and mknod of anything but a regular file: mirrored 1:1. */
static int make_node(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev,
		     const char *link, struct fuse_entry_param *e)
{
	struct keyfs *fs = fs_of(req);
	struct kfs_inode *dir = inode_of(req, parent), *i;
	int dfd, r;

	if (is_reserved(parent, name))
		return -EPERM;
	dfd = fd_of(fs, dir);
	if (dfd < 0)
		return dfd;
	if (S_ISDIR(mode))
		r = mkdirat(dfd, name, mode & 07777);
	else if (S_ISLNK(mode))
		r = symlinkat(link, dfd, name);
	else
		r = mknodat(dfd, name, mode, rdev);
	if (r < 0) {
		r = -errno;
		fd_done(fs, dir);
		return r;
	}
	r = ops_lookup(fs, dir, name, e, &i);
	if (r == 0) {
		r = give_node(fs, req, dir, i, mode, &e->attr);
		if (r < 0)
			inode_unref(&fs->table, i, 1);
	}
	/* A node we could not hand over (or not even find again) would belong to the wrong user. */
	if (r < 0 && r != -ENOENT)
		unlinkat(dfd, name, S_ISDIR(mode) ? AT_REMOVEDIR : 0);
	fd_done(fs, dir);
	return r;
}

void op_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev)
{
	struct fuse_entry_param e;
	/* A regular file is born with its header: that needs the key. */
	int r = S_ISREG(mode) ? contents_mknod(req, parent, name, mode, &e)
			      : make_node(req, parent, name, mode, rdev, NULL, &e);

	reply_new_node(req, r, &e);
}

void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
	struct fuse_entry_param e;
	int r = make_node(req, parent, name, S_IFDIR | (mode & 07777), 0, NULL, &e);

	reply_new_node(req, r, &e);
}

void op_symlink(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name)
{
	struct fuse_entry_param e;
	int r = make_node(req, parent, name, S_IFLNK | 0777, 0, link, &e);

	reply_new_node(req, r, &e);
}

static int do_unlink(fuse_req_t req, fuse_ino_t parent, const char *name, int flags)
{
	struct kfs_inode *dir = inode_of(req, parent);
	int fd, r = 0;

	if (is_reserved(parent, name))
		return -EPERM;
	fd = fd_of(fs_of(req), dir);
	if (fd < 0)
		return fd;
	if (unlinkat(fd, name, flags) < 0)
		r = -errno;
	fd_done(fs_of(req), dir);
	return r;
}

void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	fuse_reply_err(req, -do_unlink(req, parent, name, 0));
}

void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	fuse_reply_err(req, -do_unlink(req, parent, name, AT_REMOVEDIR));
}

/* A rename, and the names the moved inodes are reopened by when their fds were closed. */
static int do_rename(struct keyfs *fs, struct kfs_inode *dir, const char *name, struct kfs_inode *newdir,
		     const char *newname, unsigned int flags)
{
	struct stat st;
	int fd, newfd, r = 0;

	fd = fd_of(fs, dir);
	if (fd < 0)
		return fd;
	newfd = fd_of(fs, newdir);
	if (newfd < 0) {
		fd_done(fs, dir);
		return newfd;
	}
	if (renameat2(fd, name, newfd, newname, flags) < 0)
		r = -errno;
	/* A stale name only costs a reopen ESTALE (it is verified), never the wrong file. */
	if (r == 0 && fstatat(newfd, newname, &st, AT_SYMLINK_NOFOLLOW) == 0)
		inode_moved(&fs->table, &st, newdir, newname);
	if (r == 0 && (flags & RENAME_EXCHANGE) && fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0)
		inode_moved(&fs->table, &st, dir, name);
	fd_done(fs, newdir);
	fd_done(fs, dir);
	return r;
}

void op_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent, const char *newname,
	       unsigned int flags)
{
	int r;

	/* RENAME_WHITEOUT (overlayfs upper dirs) leaves a 0/0 char device at the old name: the
	 * backing filesystem makes it, needing CAP_MKNOD like a local one. The kernel already
	 * refused the combinations it forbids (EXCHANGE with NOREPLACE or WHITEOUT). */
	if (flags & ~(unsigned)(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT))
		r = -EINVAL;
	else if (is_reserved(parent, name) || is_reserved(newparent, newname))
		r = -EPERM;
	else
		r = do_rename(fs_of(req), inode_of(req, parent), name, inode_of(req, newparent), newname, flags);
	fuse_reply_err(req, -r);
}

/* A hard link of i as newname in newdir: an entry with one more lookup reference on i. */
static int do_link(fuse_req_t req, struct kfs_inode *i, fuse_ino_t newparent, const char *newname,
		   struct fuse_entry_param *e)
{
	struct keyfs *fs = fs_of(req);
	struct kfs_inode *newdir = inode_of(req, newparent);
	char proc[OPS_PROC_PATH_SIZE];
	int fd, newfd, r;

	if (is_reserved(newparent, newname))
		return -EPERM;
	memset(e, 0, sizeof(*e));
	e->attr_timeout = contents_attr_timeout(fs, i->type);
	e->entry_timeout = fs->timeout;
	fd = fd_of(fs, i);
	if (fd < 0)
		return fd;
	newfd = fd_of(fs, newdir);
	r = newfd;
	if (newfd >= 0) {
		proc_path(fd, proc);
		/* Following the /proc magic link needs no CAP_DAC_READ_SEARCH, unlike AT_EMPTY_PATH. */
		r = linkat(AT_FDCWD, proc, newfd, newname, AT_SYMLINK_FOLLOW) < 0 ? -errno : 0;
		fd_done(fs, newdir);
	}
	fd_done(fs, i);
	if (r < 0)
		return r;
	r = ops_stat(fs, i, &e->attr);
	if (r < 0)
		return r;
	inode_ref(&fs->table, i);
	e->ino = node_id(i);
	return 0;
}

void op_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char *newname)
{
	struct fuse_entry_param e;
	int r = do_link(req, inode_of(req, ino), newparent, newname, &e);

	reply_new_node(req, r, &e);
}

void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
	struct statvfs st;

	(void)ino;
	if (fstatvfs(fs_of(req)->table.root.fd, &st) < 0)
		fuse_reply_err(req, errno);
	else
		fuse_reply_statfs(req, &st);
}

static bool in_groups(fuse_req_t req, gid_t gid)
{
	gid_t small[64], *list = small;
	bool found = false;
	int n = fuse_req_getgroups(req, 64, small);

	if (n > 64) {
		list = calloc((size_t)n, sizeof(*list));
		if (!list)
			return false;
		n = fuse_req_getgroups(req, n, list);
	}
	for (int k = 0; k < n && k < 65536; k++) {
		if (list[k] == gid) {
			found = true;
			break;
		}
	}
	if (list != small)
		free(list);
	return found;
}

/* Only asked without -o default_permissions (which makes the kernel check by itself). */
static int check_access(fuse_req_t req, const struct stat *st, int mask)
{
	const struct fuse_ctx *c = fuse_req_ctx(req);
	unsigned bits;

	if (mask == F_OK)
		return 0;
	if (c->uid == 0) {
		if ((mask & X_OK) && !S_ISDIR(st->st_mode) && !(st->st_mode & 0111))
			return -EACCES;
		return 0;
	}
	if (c->uid == st->st_uid)
		bits = (st->st_mode >> 6) & 7;
	else if (c->gid == st->st_gid || in_groups(req, st->st_gid))
		bits = (st->st_mode >> 3) & 7;
	else
		bits = st->st_mode & 7;
	return ((unsigned)mask & bits) == (unsigned)mask ? 0 : -EACCES;
}

void op_access(fuse_req_t req, fuse_ino_t ino, int mask)
{
	struct stat st;
	int r = ops_stat(fs_of(req), inode_of(req, ino), &st);

	if (r == 0)
		r = check_access(req, &st, mask);
	fuse_reply_err(req, -r);
}
