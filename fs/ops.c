/* ops.c: the FUSE low-level request handlers: inode fds and *at() syscalls for names, the content layer for bytes */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/xattr.h>
#include <unistd.h>
#include <linux/falloc.h>

#include <sodium.h>

#include "keyfs/content.h"
#include "keyfs/log.h"

#include "filekeys.h"
#include "keystate.h"
#include "fs.h"
#include "prefetch.h"

_Static_assert(sizeof(fuse_ino_t) >= sizeof(uintptr_t), "node ids are inode addresses");

/* Open flags a user may pass on to the backing file; the rest is ours to decide (see file_open). */
#define PASSED_OPEN_FLAGS (O_SYNC | O_DSYNC | O_NOATIME)
#define PROC_PATH_SIZE 32

/* An open regular file. Several may share one inode (and its content lock and keys). */
struct kfs_file {
	int fd;                         /* backing file: O_RDWR when writable, never O_APPEND */
	bool writable;
	bool append;                    /* O_APPEND, emulated: each write goes to the current end */
	struct kfs_inode *inode;
};

/* An open directory. The kernel does not run two readdirs of one handle at once. */
struct kfs_dir {
	DIR *dp;
	struct dirent *entry;           /* read but not yet returned (did not fit the last reply) */
	off_t offset;
	unsigned prefetched;            /* files of this listing queued for an unwrap ahead */
};

static struct keyfs *fs_of(fuse_req_t req)
{
	return fuse_req_userdata(req);
}

static struct kfs_inode *inode_of(fuse_req_t req, fuse_ino_t ino)
{
	if (ino == FUSE_ROOT_ID)
		return &fs_of(req)->table.root;
	return (struct kfs_inode *)(uintptr_t)ino;
}

static fuse_ino_t node_id(const struct kfs_inode *i)
{
	return i->is_root ? FUSE_ROOT_ID : (fuse_ino_t)(uintptr_t)i;
}

static struct kfs_file *file_of(const struct fuse_file_info *fi)
{
	return (struct kfs_file *)(uintptr_t)fi->fh;
}

static struct kfs_dir *dir_of(const struct fuse_file_info *fi)
{
	return (struct kfs_dir *)(uintptr_t)fi->fh;
}

/* An inode's O_PATH fd, held open until fd_done(): the inode table may close it otherwise. */
static int fd_of(struct keyfs *fs, struct kfs_inode *i)
{
	return inode_fd(&fs->table, i);
}

static void fd_done(struct keyfs *fs, struct kfs_inode *i)
{
	inode_fd_put(&fs->table, i);
}

/* The volume description is hidden at the backing root and cannot be made there. */
static bool is_reserved(fuse_ino_t parent, const char *name)
{
	return parent == FUSE_ROOT_ID && strcmp(name, VOLDESC_NAME) == 0;
}

static bool is_dot_or_dotdot(const char *name)
{
	return name[0] == '.' && (name[1] == '\0' || (name[1] == '.' && name[2] == '\0'));
}

static void proc_path(int fd, char buf[PROC_PATH_SIZE])
{
	snprintf(buf, PROC_PATH_SIZE, "/proc/self/fd/%d", fd);
}

/* security.* is not kept: answering at once saves `ls -l` a round trip per file. */
static bool is_security_xattr(const char *name)
{
	return strncmp(name, "security.", 9) == 0;
}

/* Regular files show their plaintext size, computed from the backing size alone. */
static void plain_attr(struct stat *st)
{
	if (S_ISREG(st->st_mode))
		st->st_size = (off_t)fmt_plain_size((uint64_t)st->st_size);
}

static int stat_inode(struct keyfs *fs, struct kfs_inode *i, struct stat *st)
{
	int fd = fd_of(fs, i), r = 0;

	if (fd < 0)
		return fd;
	if (fstatat(fd, "", st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0)
		r = -errno;
	fd_done(fs, i);
	if (r == 0)
		plain_attr(st);
	return r;
}

/* Turn an O_PATH fd, name in dir, into an entry with one lookup reference. fd is consumed. */
static int entry_adopt(struct keyfs *fs, int fd, struct kfs_inode *dir, const char *name, struct fuse_entry_param *e,
		       struct kfs_inode **ret)
{
	struct kfs_inode *i;
	int r;

	memset(e, 0, sizeof(*e));
	e->attr_timeout = fs->timeout;
	e->entry_timeout = fs->timeout;
	if (fstatat(fd, "", &e->attr, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0) {
		r = -errno;
		close(fd);
		return r;
	}
	r = inode_get(&fs->table, fd, &e->attr, dir, name, &i);
	if (r < 0)
		return r;
	plain_attr(&e->attr);
	e->ino = node_id(i);
	if (ret)
		*ret = i;
	return 0;
}

static int do_lookup(struct keyfs *fs, struct kfs_inode *dir, const char *name, struct fuse_entry_param *e,
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
	return entry_adopt(fs, fd, dir, name, e, ret);
}

/* Reply with an entry; when the request was interrupted the kernel never got the reference. */
static void reply_entry(fuse_req_t req, const struct fuse_entry_param *e)
{
	if (fuse_reply_entry(req, e) == -ENOENT && e->ino)
		inode_unref(&fs_of(req)->table, inode_of(req, e->ino), 1);
}

static void reply_attr_of(fuse_req_t req, struct kfs_inode *i)
{
	struct stat st;
	int r = stat_inode(fs_of(req), i, &st);

	if (r < 0)
		fuse_reply_err(req, -r);
	else
		fuse_reply_attr(req, &st, fs_of(req)->timeout);
}

/* ---- ownership of new nodes ---- */

/*
 * When the daemon runs as root, a new node belongs to root; give it to the caller as the kernel
 * would: the caller's uid, and its gid unless the parent dir is set-group-id. This is what makes
 * `-o allow_other,default_permissions` a multi-user filesystem. Returns 1 and the owner when a
 * chown is needed, 0 when not, or -errno.
 */
static int new_owner(struct keyfs *fs, fuse_req_t req, struct kfs_inode *dir, uid_t *uid, gid_t *gid)
{
	const struct fuse_ctx *c = fuse_req_ctx(req);
	struct stat st;
	int r;

	if (!fs->as_root || (c->uid == 0 && c->gid == 0))
		return 0;
	r = stat_inode(fs, dir, &st);
	if (r < 0)
		return r;
	*uid = c->uid;
	*gid = (st.st_mode & S_ISGID) ? st.st_gid : c->gid;
	return 1;
}

/* chown clears set-user-id and set-group-id on non-directories: put back what was asked. */
static bool needs_mode_again(mode_t type, mode_t mode)
{
	return !S_ISDIR(type) && !S_ISLNK(type) && (mode & (S_ISUID | S_ISGID));
}

/* Give a new non-regular node (dir, symlink, fifo, socket, device) to the caller. */
static int give_node(struct keyfs *fs, fuse_req_t req, struct kfs_inode *dir, struct kfs_inode *i,
		     mode_t mode, struct stat *st)
{
	char proc[PROC_PATH_SIZE];
	uid_t uid;
	gid_t gid;
	int fd, r = new_owner(fs, req, dir, &uid, &gid);

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
	return r < 0 ? r : stat_inode(fs, i, st);
}

/* ---- regular files ---- */

static int file_new(int fd, struct kfs_inode *i, int flags, bool writable, struct kfs_file **ret)
{
	struct kfs_file *f = malloc(sizeof(*f));

	if (!f)
		return -ENOMEM;
	f->fd = fd;
	f->writable = writable;
	f->append = (flags & O_APPEND) != 0;
	f->inode = i;
	*ret = f;
	return 0;
}

/* Close an open file and let its inode's fd go (file_open and do_create hold it for the file). */
static void file_free(struct keyfs *fs, struct kfs_file *f)
{
	close(f->fd);
	fd_done(fs, f->inode);
	free(f);
}

/*
 * Set the plaintext size; the caller holds i->content exclusively and fd is open O_RDWR.
 * Truncating to 0 needs no key for a file whose header is damaged: it drops the header, and the
 * next write gives the file a new one. That is how a user discards a damaged file in place.
 */
static int truncate_locked(struct keyfs *fs, struct kfs_inode *i, int fd, uint64_t size)
{
	struct content_file cf;
	int r;

	if (size == 0) {
		r = filekeys_get(fs, i, fd, &cf);
		if (r == -EIO || (r == 0 && !cf.keys))
			return filekeys_drop_header(fs, i, fd);
	} else {
		r = filekeys_get_or_create(fs, i, fd, &cf);
	}
	if (r < 0)
		return r;
	return content_truncate(&cf, size);
}

/*
 * Open the backing file of i, holding i's O_PATH fd for as long as the file is open: ops on an
 * open file (fchmod, fstat, a file unlinked since) must not depend on reopening it by name.
 * Write-only becomes read-write (partial chunks are read, modified,
 * re-sealed); O_APPEND is emulated, O_DIRECT dropped (chunks are not sector-aligned), O_TRUNC
 * done here (FUSE_CAP_ATOMIC_O_TRUNC). The keys are loaded now, so a file whose header does
 * not authenticate or whose key is gone fails at open, not at its first read.
 */
static int file_open(struct keyfs *fs, struct kfs_inode *i, int flags, struct kfs_file **ret)
{
	char proc[PROC_PATH_SIZE];
	struct content_file cf;
	bool trunc = (flags & O_TRUNC) != 0;
	bool writable = (flags & O_ACCMODE) != O_RDONLY || trunc;
	int fd, r;

	int pfd, oflags = (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | (flags & PASSED_OPEN_FLAGS);

	r = keystate_check(fs->ks, KS_OP_OPEN);
	if (r < 0)
		return r;
	pfd = fd_of(fs, i);
	if (pfd < 0)
		return pfd;
	proc_path(pfd, proc);
	fd = open(proc, oflags);
	if (fd < 0 && inode_fd_shortage(&fs->table, errno))
		fd = open(proc, oflags);
	if (fd < 0) {
		r = -errno;
		fd_done(fs, i);
		return r;
	}
	if (trunc) {
		pthread_rwlock_wrlock(&i->content);
		r = truncate_locked(fs, i, fd, 0);
		pthread_rwlock_unlock(&i->content);
	} else {
		r = filekeys_get(fs, i, fd, &cf);
	}
	if (r == 0)
		r = file_new(fd, i, flags, writable, ret);
	if (r < 0) {
		close(fd);
		fd_done(fs, i);
	}
	return r;
}

/*
 * Create a regular file with its header (new DEK wrapped by the KMS). On success the entry holds
 * one lookup reference and *ret_fd (when wanted) an O_RDWR fd, and then the inode's O_PATH fd is
 * held for it (see file_open). On failure nothing is left behind.
 */
static int regular_new(struct keyfs *fs, fuse_req_t req, struct kfs_inode *dir, const char *name, mode_t mode,
		       int flags, struct fuse_entry_param *e, struct kfs_inode **ret_inode, int *ret_fd)
{
	char proc[PROC_PATH_SIZE];
	struct content_file cf;
	struct kfs_inode *i;
	struct stat st;
	uid_t uid;
	gid_t gid;
	int fd, pfd, dfd, r;
	int oflags = O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC | O_NOFOLLOW | (flags & PASSED_OPEN_FLAGS);

	r = keystate_check(fs->ks, KS_OP_CREATE);
	if (r < 0)
		return r;
	dfd = fd_of(fs, dir);
	if (dfd < 0)
		return dfd;
	fd = openat(dfd, name, oflags, mode & 07777);
	if (fd < 0 && inode_fd_shortage(&fs->table, errno))
		fd = openat(dfd, name, oflags, mode & 07777);
	if (fd < 0) {
		r = -errno;
		fd_done(fs, dir);
		return r;
	}
	r = new_owner(fs, req, dir, &uid, &gid);
	if (r > 0) {
		r = 0;
		if (fchown(fd, uid, gid) < 0 || (needs_mode_again(S_IFREG, mode) && fchmod(fd, mode & 07777) < 0))
			r = -errno;
	}
	if (r < 0)
		goto fail_unlink;
	/* The O_PATH fd comes from our own fd, not the name, which may already be another file. */
	proc_path(fd, proc);
	pfd = open(proc, O_PATH | O_CLOEXEC);
	if (pfd < 0 && inode_fd_shortage(&fs->table, errno))
		pfd = open(proc, O_PATH | O_CLOEXEC);
	if (pfd < 0) {
		r = -errno;
		goto fail_unlink;
	}
	r = entry_adopt(fs, pfd, dir, name, e, &i);
	if (r < 0)
		goto fail_unlink;
	if (ret_fd) {
		r = fd_of(fs, i);
		if (r < 0) {
			inode_unref(&fs->table, i, 1);
			goto fail_unlink;
		}
	}
	pthread_rwlock_wrlock(&i->content);
	r = filekeys_get_or_create(fs, i, fd, &cf);
	pthread_rwlock_unlock(&i->content);
	if (r == 0 && fstat(fd, &st) < 0)
		r = -errno;
	if (r < 0) {
		if (ret_fd)
			fd_done(fs, i);
		inode_unref(&fs->table, i, 1);
		goto fail_unlink;
	}
	plain_attr(&st);
	e->attr = st;
	*ret_inode = i;
	if (ret_fd)
		*ret_fd = fd;
	else
		close(fd);
	fd_done(fs, dir);
	return 0;
fail_unlink:
	unlinkat(dfd, name, 0);
	close(fd);
	fd_done(fs, dir);
	return r;
}

/* ---- handlers ---- */

static void op_init(void *userdata, struct fuse_conn_info *conn)
{
	(void)userdata;
	/* Every byte is transformed, so splice gains nothing; the writeback cache would let the
	 * kernel own O_APPEND and sizes, and send reads on write-only files. Suid and sgid bits are
	 * dropped by the kernel (a setattr) rather than by us on every write. */
	conn->want &= ~(unsigned)(FUSE_CAP_WRITEBACK_CACHE | FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE |
				  FUSE_CAP_SPLICE_MOVE | FUSE_CAP_HANDLE_KILLPRIV);
	if (conn->capable & FUSE_CAP_ATOMIC_O_TRUNC)
		conn->want |= FUSE_CAP_ATOMIC_O_TRUNC;
	/* Names go through *at() calls on per-inode fds and a locked table: lookups and readdirs in
	 * one directory may run in parallel (libfuse 3.14 does not forward this flag yet; later
	 * versions do). Symlink targets never change: let the kernel keep them. */
	if (conn->capable & FUSE_CAP_PARALLEL_DIROPS)
		conn->want |= FUSE_CAP_PARALLEL_DIROPS;
	if (conn->capable & FUSE_CAP_CACHE_SYMLINKS)
		conn->want |= FUSE_CAP_CACHE_SYMLINKS;
	conn->max_write = 1u << 20;
	if (conn->max_readahead > 1u << 20)
		conn->max_readahead = 1u << 20;
	conn->time_gran = 1;
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct keyfs *fs = fs_of(req);
	struct fuse_entry_param e;
	int r = -ENOENT;

	/* No "." or "..": the kernel resolves them itself without FUSE_CAP_EXPORT_SUPPORT, and ".."
	 * of the root would leave the backing dir. */
	if (!is_reserved(parent, name) && !is_dot_or_dotdot(name))
		r = do_lookup(fs, inode_of(req, parent), name, &e, NULL);
	if (r == -ENOENT) {
		/* A negative entry: the kernel remembers the miss for the timeout. */
		memset(&e, 0, sizeof(e));
		e.entry_timeout = fs->timeout;
		fuse_reply_entry(req, &e);
	} else if (r < 0) {
		fuse_reply_err(req, -r);
	} else {
		reply_entry(req, &e);
	}
}

static void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
	inode_unref(&fs_of(req)->table, inode_of(req, ino), nlookup);
	fuse_reply_none(req);
}

static void op_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
	for (size_t n = 0; n < count; n++)
		inode_unref(&fs_of(req)->table, inode_of(req, forgets[n].ino), forgets[n].nlookup);
	fuse_reply_none(req);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)fi;
	reply_attr_of(req, inode_of(req, ino));
}

static int do_setattr(struct keyfs *fs, struct kfs_inode *i, int ifd, const struct stat *attr, int valid,
		      const struct fuse_file_info *fi)
{
	char proc[PROC_PATH_SIZE];
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
	if (valid & FUSE_SET_ATTR_SIZE) {
		const struct kfs_file *f = fi && S_ISREG(i->type) ? file_of(fi) : NULL;
		int fd;

		if (S_ISDIR(i->type))
			return -EISDIR;
		if (!S_ISREG(i->type))
			return -EINVAL;
		if (attr->st_size < 0)
			return -EINVAL;
		r = keystate_check(fs->ks, KS_OP_OPEN);
		if (r < 0)
			return r;
		fd = f && f->writable ? f->fd : open(proc, O_RDWR | O_CLOEXEC);
		if (fd < 0 && inode_fd_shortage(&fs->table, errno))
			fd = open(proc, O_RDWR | O_CLOEXEC);
		if (fd < 0)
			return -errno;
		pthread_rwlock_wrlock(&i->content);
		r = truncate_locked(fs, i, fd, (uint64_t)attr->st_size);
		pthread_rwlock_unlock(&i->content);
		if (!(f && f->writable))
			close(fd);
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

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int valid, struct fuse_file_info *fi)
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

static void op_readlink(fuse_req_t req, fuse_ino_t ino)
{
	struct kfs_inode *i = inode_of(req, ino);
	char buf[PATH_MAX + 1];
	int fd = fd_of(fs_of(req), i);
	ssize_t n = fd < 0 ? fd : readlinkat(fd, "", buf, sizeof(buf));

	if (n < 0)
		n = fd < 0 ? fd : -errno;
	if (fd >= 0)
		fd_done(fs_of(req), i);
	if (n < 0)
		fuse_reply_err(req, (int)-n);
	else if ((size_t)n >= sizeof(buf))
		fuse_reply_err(req, ENAMETOOLONG);
	else {
		buf[n] = '\0';
		fuse_reply_readlink(req, buf);
	}
}

/* mkdir, symlink, and mknod of anything but a regular file: mirrored 1:1. */
static int make_node(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev,
		     const char *link, struct fuse_entry_param *e)
{
	struct keyfs *fs = fs_of(req);
	struct kfs_inode *dir = inode_of(req, parent), *i;
	int r;

	int dfd;

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
	r = do_lookup(fs, dir, name, e, &i);
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

static void reply_new_node(fuse_req_t req, int r, const struct fuse_entry_param *e)
{
	if (r < 0)
		fuse_reply_err(req, -r);
	else
		reply_entry(req, e);
}

static void op_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev)
{
	struct keyfs *fs = fs_of(req);
	struct fuse_entry_param e;
	struct kfs_inode *i;
	int r;

	if (S_ISREG(mode))
		r = is_reserved(parent, name) ? -EPERM
			: regular_new(fs, req, inode_of(req, parent), name, mode, 0, &e, &i, NULL);
	else
		r = make_node(req, parent, name, mode, rdev, NULL, &e);
	reply_new_node(req, r, &e);
}

static void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
	struct fuse_entry_param e;
	int r = make_node(req, parent, name, S_IFDIR | (mode & 07777), 0, NULL, &e);

	reply_new_node(req, r, &e);
}

static void op_symlink(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name)
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

static void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	fuse_reply_err(req, -do_unlink(req, parent, name, 0));
}

static void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
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

static void op_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
		      const char *newname, unsigned int flags)
{
	int r = 0;

	/* RENAME_WHITEOUT (overlayfs upper dirs) leaves a 0/0 char device at the old name: the
	 * backing filesystem makes it, needing CAP_MKNOD like a local one. The kernel already
	 * refused the combinations it forbids (EXCHANGE with NOREPLACE or WHITEOUT). */
	if (flags & ~(unsigned)(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT))
		r = EINVAL;
	else if (is_reserved(parent, name) || is_reserved(newparent, newname))
		r = EPERM;
	else
		r = -do_rename(fs_of(req), inode_of(req, parent), name, inode_of(req, newparent), newname, flags);
	fuse_reply_err(req, r);
}

static void op_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char *newname)
{
	struct keyfs *fs = fs_of(req);
	struct kfs_inode *i = inode_of(req, ino), *newdir = inode_of(req, newparent);
	struct fuse_entry_param e;
	char proc[PROC_PATH_SIZE];
	int fd, newfd, r;

	if (is_reserved(newparent, newname)) {
		fuse_reply_err(req, EPERM);
		return;
	}
	memset(&e, 0, sizeof(e));
	e.attr_timeout = fs->timeout;
	e.entry_timeout = fs->timeout;
	fd = fd_of(fs, i);
	if (fd < 0) {
		fuse_reply_err(req, -fd);
		return;
	}
	newfd = fd_of(fs, newdir);
	r = newfd;
	if (newfd >= 0) {
		proc_path(fd, proc);
		/* Following the /proc magic link needs no CAP_DAC_READ_SEARCH, unlike AT_EMPTY_PATH. */
		r = linkat(AT_FDCWD, proc, newfd, newname, AT_SYMLINK_FOLLOW) < 0 ? -errno : 0;
		fd_done(fs, newdir);
	}
	fd_done(fs, i);
	if (r < 0) {
		fuse_reply_err(req, -r);
		return;
	}
	r = stat_inode(fs, i, &e.attr);
	if (r < 0) {
		fuse_reply_err(req, -r);
		return;
	}
	inode_ref(&fs->table, i);
	e.ino = node_id(i);
	reply_entry(req, &e);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct kfs_file *f;
	int r = file_open(fs_of(req), inode_of(req, ino), fi->flags, &f);

	if (r < 0) {
		fuse_reply_err(req, -r);
		return;
	}
	fi->fh = (uintptr_t)f;
	fi->keep_cache = 1;
	fi->noflush = 1;
	if (fuse_reply_open(req, fi) == -ENOENT)
		file_free(fs_of(req), f);
}

static int do_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, int flags,
		     struct fuse_entry_param *e, struct kfs_file **ret)
{
	struct keyfs *fs = fs_of(req);
	struct kfs_inode *dir = inode_of(req, parent), *i;
	int fd, r;

	if (is_reserved(parent, name))
		return -EPERM;
	r = regular_new(fs, req, dir, name, mode, flags, e, &i, &fd);
	if (r == 0) {
		r = file_new(fd, i, flags, true, ret);
		if (r < 0) {
			close(fd);
			fd_done(fs, i);
			inode_unref(&fs->table, i, 1);
		}
		return r;
	}
	if (r != -EEXIST || (flags & O_EXCL))
		return r;
	/* Lost a race with another creator, and the caller did not ask for O_EXCL: open it. */
	r = do_lookup(fs, dir, name, e, &i);
	if (r < 0)
		return r;
	r = S_ISREG(i->type) ? file_open(fs, i, flags, ret) : S_ISDIR(i->type) ? -EISDIR : -EEXIST;
	if (r < 0)
		inode_unref(&fs->table, i, 1);
	return r;
}

static void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_file_info *fi)
{
	struct fuse_entry_param e;
	struct kfs_file *f = NULL;
	int r = do_create(req, parent, name, mode, fi->flags, &e, &f);

	if (r < 0) {
		fuse_reply_err(req, -r);
		return;
	}
	fi->fh = (uintptr_t)f;
	fi->keep_cache = 1;
	fi->noflush = 1;
	if (fuse_reply_create(req, &e, fi) == -ENOENT) {
		file_free(fs_of(req), f);
		inode_unref(&fs_of(req)->table, inode_of(req, e.ino), 1);
	}
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	struct kfs_file *f = file_of(fi);
	struct kfs_inode *i = f->inode;
	struct content_file cf = { .fd = -1 };
	uint8_t *buf;
	ssize_t n;

	(void)ino;
	/* Also through a descriptor opened before a lock: no plaintext once locking began. */
	n = keystate_check(fs_of(req)->ks, KS_OP_READ);
	if (n < 0) {
		fuse_reply_err(req, (int)-n);
		return;
	}
	buf = malloc(size ? size : 1);
	if (!buf) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	pthread_rwlock_rdlock(&i->content);
	n = filekeys_get(fs_of(req), i, f->fd, &cf);
	if (n == 0 && cf.keys)
		n = content_read(&cf, buf, size, (uint64_t)off);
	pthread_rwlock_unlock(&i->content);
	if (n == -EIO && cf.keys) {
		char label[64];

		inode_label(i, label, sizeof(label));
		log_err("%s: a chunk in bytes %lld..%lld does not authenticate", label, (long long)off,
			(long long)off + (long long)size - 1);
	}
	if (n < 0)
		fuse_reply_err(req, (int)-n);
	else
		fuse_reply_buf(req, (const char *)buf, (size_t)n);
	/* A failed read may have opened some chunks before the one that did not authenticate. */
	sodium_memzero(buf, n < 0 ? size : (size_t)n);
	free(buf);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
		     struct fuse_file_info *fi)
{
	struct kfs_file *f = file_of(fi);
	struct kfs_inode *i = f->inode;
	struct content_file cf;
	uint64_t pos = (uint64_t)off;
	ssize_t n;

	(void)ino;
	n = keystate_check(fs_of(req)->ks, KS_OP_WRITE);
	if (n < 0) {
		fuse_reply_err(req, (int)-n);
		return;
	}
	pthread_rwlock_wrlock(&i->content);
	n = filekeys_get_or_create(fs_of(req), i, f->fd, &cf);
	if (n == 0 && f->append)
		n = content_size(f->fd, &pos);
	if (n == 0)
		n = content_write(&cf, buf, size, pos);
	pthread_rwlock_unlock(&i->content);
	if (n < 0)
		fuse_reply_err(req, (int)-n);
	else
		fuse_reply_write(req, (size_t)n);
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	(void)fi;
	/* Every write reached the backing file before it was acknowledged: nothing is pending. */
	fuse_reply_err(req, 0);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct kfs_file *f = file_of(fi);

	(void)ino;
	file_free(fs_of(req), f);
	fuse_reply_err(req, 0);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
	int fd = file_of(fi)->fd;
	int r = datasync ? fdatasync(fd) : fsync(fd);

	(void)ino;
	fuse_reply_err(req, r < 0 ? errno : 0);
}

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct keyfs *fs = fs_of(req);
	struct kfs_inode *i = inode_of(req, ino);
	struct kfs_dir *d = calloc(1, sizeof(*d));
	int fd, pfd, r;

	if (!d) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	pfd = fd_of(fs, i);
	if (pfd < 0) {
		free(d);
		fuse_reply_err(req, -pfd);
		return;
	}
	fd = openat(pfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0 && inode_fd_shortage(&fs->table, errno))
		fd = openat(pfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	r = errno;
	fd_done(fs, i);
	errno = r;
	if (fd < 0 || !(d->dp = fdopendir(fd))) {
		r = errno;
		if (fd >= 0)
			close(fd);
		free(d);
		fuse_reply_err(req, r);
		return;
	}
	fi->fh = (uintptr_t)d;
	if (fuse_reply_open(req, fi) == -ENOENT) {
		closedir(d->dp);
		free(d);
	}
}

/*
 * Files listed by a readdirplus are about to be opened, often all of them (cp -a, tar, grep -r):
 * queue the first prefetch_max regular files of a listing whose keys are not loaded for an
 * unwrap ahead, so that the opens do not pay one serial KMS round trip each. Each queued inode
 * holds one more reference, taken here, so a forget cannot free it while it waits.
 */
static void prefetch_note(struct keyfs *fs, struct kfs_dir *d, struct kfs_inode *child,
			  struct kfs_inode ***pending, size_t *npending)
{
	struct kfs_inode **grown;

	if (!fs->prefetch || !S_ISREG(child->type) || d->prefetched >= fs->prefetch_max || !filekeys_wanted(child))
		return;
	grown = realloc(*pending, (*npending + 1) * sizeof(**pending));
	if (!grown)
		return;
	*pending = grown;
	inode_ref(&fs->table, child);
	grown[(*npending)++] = child;
	d->prefetched++;
}

static void do_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi,
		       bool plus)
{
	struct keyfs *fs = fs_of(req);
	struct kfs_dir *d = dir_of(fi);
	struct kfs_inode *dir = inode_of(req, ino);
	struct kfs_inode **pending = NULL;
	size_t rem = size, npending = 0;
	char *buf, *p;
	int err = 0;

	buf = malloc(size);
	if (!buf) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	p = buf;
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
				int r = do_lookup(fs, dir, name, &e, &child);

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
		d->entry = NULL;
		if (child)
			prefetch_note(fs, d, child, &pending, &npending);
	}
	/* Entries already in the buffer carry lookup references: send them, report the error on
	 * the next call. */
	if (err && rem == size)
		fuse_reply_err(req, err);
	else
		fuse_reply_buf(req, buf, size - rem);
	free(buf);
	for (size_t k = 0; k < npending; k++)
		prefetch_add(fs->prefetch, pending[k]);
	free(pending);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	do_readdir(req, ino, size, off, fi, false);
}

static void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	do_readdir(req, ino, size, off, fi, true);
}

static void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct kfs_dir *d = dir_of(fi);

	(void)ino;
	closedir(d->dp);
	free(d);
	fuse_reply_err(req, 0);
}

static void op_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
	int fd = dirfd(dir_of(fi)->dp);
	int r = datasync ? fdatasync(fd) : fsync(fd);

	(void)ino;
	fuse_reply_err(req, r < 0 ? errno : 0);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
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

static void op_access(fuse_req_t req, fuse_ino_t ino, int mask)
{
	struct stat st;
	int r = stat_inode(fs_of(req), inode_of(req, ino), &st);

	if (r == 0)
		r = check_access(req, &st, mask);
	fuse_reply_err(req, -r);
}

static void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len, struct fuse_file_info *fi)
{
	struct kfs_file *f = file_of(fi);
	struct kfs_inode *i = f->inode;
	struct content_file cf;
	int r;

	(void)ino;
	/* COLLAPSE_RANGE, INSERT_RANGE and UNSHARE_RANGE stay refused (content_fallocate too). */
	if (mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) {
		fuse_reply_err(req, EOPNOTSUPP);
		return;
	}
	if (off < 0 || len <= 0) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	r = keystate_check(fs_of(req)->ks, KS_OP_WRITE);
	if (r < 0) {
		fuse_reply_err(req, -r);
		return;
	}
	pthread_rwlock_wrlock(&i->content);
	/* Growing an empty file needs its header first; KEEP_SIZE modes never grow it. */
	r = mode & FALLOC_FL_KEEP_SIZE ? filekeys_get(fs_of(req), i, f->fd, &cf)
				       : filekeys_get_or_create(fs_of(req), i, f->fd, &cf);
	if (r == 0)
		r = content_fallocate(&cf, mode, (uint64_t)off, (uint64_t)len);
	pthread_rwlock_unlock(&i->content);
	fuse_reply_err(req, -r);
}

static void op_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, struct fuse_file_info *fi)
{
	struct kfs_file *f = file_of(fi);
	struct content_file cf = { .fd = f->fd };
	uint64_t pos = 0;
	int r;

	(void)ino;
	if (off < 0) {
		fuse_reply_err(req, ENXIO);
		return;
	}
	pthread_rwlock_rdlock(&f->inode->content);
	switch (whence) {
	case SEEK_DATA:
	case SEEK_HOLE:
		/* Holes are found from the backing layout: no key involved. */
		r = content_lseek(&cf, (uint64_t)off, whence, &pos);
		break;
	case SEEK_SET:
		pos = (uint64_t)off;
		r = 0;
		break;
	case SEEK_END:
		r = content_size(f->fd, &pos);
		pos += (uint64_t)off;
		break;
	default:
		r = -EINVAL;
		break;
	}
	pthread_rwlock_unlock(&f->inode->content);
	if (r < 0)
		fuse_reply_err(req, -r);
	else
		fuse_reply_lseek(req, (off_t)pos);
}

/* ---- extended attributes, through /proc/self/fd/N: the non-l variants follow that magic link
 * to the inode itself, symlinks included (the l variants would act on the /proc link) ---- */

static void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value, size_t size,
			int flags)
{
	struct kfs_inode *i = inode_of(req, ino);
	char proc[PROC_PATH_SIZE];
	int fd, r;

	if (is_security_xattr(name)) {
		fuse_reply_err(req, EOPNOTSUPP);
		return;
	}
	r = fd = fd_of(fs_of(req), i);
	if (fd >= 0) {
		proc_path(fd, proc);
		r = setxattr(proc, name, value, size, flags) < 0 ? -errno : 0;
		fd_done(fs_of(req), i);
	}
	fuse_reply_err(req, -r);
}

static void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
	struct kfs_inode *i = inode_of(req, ino);
	char proc[PROC_PATH_SIZE];
	char *buf = NULL;
	ssize_t n;
	int fd;

	if (is_security_xattr(name)) {
		fuse_reply_err(req, EOPNOTSUPP);
		return;
	}
	if (size > 0 && !(buf = malloc(size))) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	n = fd = fd_of(fs_of(req), i);
	if (fd >= 0) {
		proc_path(fd, proc);
		n = getxattr(proc, name, buf, size);
		if (n < 0)
			n = -errno;
		fd_done(fs_of(req), i);
	}
	if (n < 0)
		fuse_reply_err(req, (int)-n);
	else if (size == 0)
		fuse_reply_xattr(req, (size_t)n);
	else
		fuse_reply_buf(req, buf, (size_t)n);
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

static void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
	struct kfs_inode *i = inode_of(req, ino);
	char proc[PROC_PATH_SIZE];
	char *buf = NULL;
	int fd = fd_of(fs_of(req), i);
	ssize_t n = fd;

	if (fd >= 0) {
		proc_path(fd, proc);
		n = list_xattrs(proc, &buf);
		fd_done(fs_of(req), i);
	}
	if (n < 0)
		fuse_reply_err(req, (int)-n);
	else if (size == 0)
		fuse_reply_xattr(req, (size_t)n);
	else if ((size_t)n > size)
		fuse_reply_err(req, ERANGE);
	else
		fuse_reply_buf(req, buf, (size_t)n);
	free(buf);
}

static void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name)
{
	struct kfs_inode *i = inode_of(req, ino);
	char proc[PROC_PATH_SIZE];
	int fd, r;

	if (is_security_xattr(name)) {
		fuse_reply_err(req, EOPNOTSUPP);
		return;
	}
	r = fd = fd_of(fs_of(req), i);
	if (fd >= 0) {
		proc_path(fd, proc);
		r = removexattr(proc, name) < 0 ? -errno : 0;
		fd_done(fs_of(req), i);
	}
	fuse_reply_err(req, -r);
}

const struct fuse_lowlevel_ops keyfs_ops = {
	.init = op_init,
	.lookup = op_lookup,
	.forget = op_forget,
	.forget_multi = op_forget_multi,
	.getattr = op_getattr,
	.setattr = op_setattr,
	.readlink = op_readlink,
	.mknod = op_mknod,
	.mkdir = op_mkdir,
	.symlink = op_symlink,
	.unlink = op_unlink,
	.rmdir = op_rmdir,
	.rename = op_rename,
	.link = op_link,
	.open = op_open,
	.create = op_create,
	.read = op_read,
	.write = op_write,
	.flush = op_flush,
	.release = op_release,
	.fsync = op_fsync,
	.opendir = op_opendir,
	.readdir = op_readdir,
	.readdirplus = op_readdirplus,
	.releasedir = op_releasedir,
	.fsyncdir = op_fsyncdir,
	.statfs = op_statfs,
	.access = op_access,
	.fallocate = op_fallocate,
	.lseek = op_lseek,
	.setxattr = op_setxattr,
	.getxattr = op_getxattr,
	.listxattr = op_listxattr,
	.removexattr = op_removexattr,
};
