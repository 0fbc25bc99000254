/* ops.c: the FUSE low-level operations table and the connection settings; the handlers live by concern */
#include <fcntl.h>
#include <sys/sysmacros.h>

#include "keyfs/util.h"

#include "fs.h"
#include "ops.h"

/* Readahead of one request of 256 pages (max_write makes libfuse ask for max_pages 256). */
#define READAHEAD_BYTES (1u << 20)

struct top_mount {
	const char *path;
	dev_t dev;
	bool found;
};

static int top_mount_one(const struct util_mount *m, void *ctx)
{
	struct top_mount *a = ctx;

	/* The last one listed is on top: keep going. */
	if (strcmp(m->mountpoint, a->path) == 0 && strcmp(m->fstype, KEYFS_FSTYPE) == 0) {
		a->dev = m->dev;
		a->found = true;
	}
	return 0;
}

/*
 * A FUSE mount reads ahead as far as its bdi says, 128 KiB unless raised, and the INIT reply can
 * only lower it: a sequential read then comes in 128 KiB requests. As root, raise it to one full
 * request before the reply (which keeps the smaller of the two), found by the mount's device
 * number in mountinfo: a stat of the mountpoint would wait for this very INIT. Otherwise (not
 * root, no sysfs) the kernel's default stays, which is only slower.
 */
static void readahead_raise(const struct keyfs *fs)
{
	struct top_mount a = { .path = fs->mountpoint };
	char path[64];
	int fd;

	if (util_mountinfo_each(top_mount_one, &a) < 0 || !a.found)
		return;
	snprintf(path, sizeof(path), "/sys/class/bdi/%u:%u/read_ahead_kb", major(a.dev), minor(a.dev));
	fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	dprintf(fd, "%u\n", READAHEAD_BYTES >> 10);
	close(fd);
}

static void op_init(void *userdata, struct fuse_conn_info *conn)
{
	struct keyfs *fs = userdata;

	/* Every byte is transformed, so splice gains nothing; the writeback cache is asked for
	 * below, unless -o nowriteback. Kill-priv is handled as version 2 (killpriv.c: libfuse
	 * 3.14 cannot ask for it), not as version 1, which would leave the GETXATTR before every
	 * write and move chown's suid clearing to us. */
	conn->want &= ~(unsigned)(FUSE_CAP_WRITEBACK_CACHE | FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE |
				  FUSE_CAP_SPLICE_MOVE | FUSE_CAP_HANDLE_KILLPRIV);
	/* The writeback cache (the default): the kernel keeps dirty pages and i_size, merges small
	 * writes, handles O_APPEND itself (contents.c then writes at the offsets it sends) and may
	 * read through a write-only handle. A lock writes the dirty pages back before it refuses
	 * writes (lockdown.c), and while locked a write() must ask for attributes first, which is
	 * refused (contents_attr_for_write, contents_attr_timeout). */
	if (fs->writeback && (conn->capable & FUSE_CAP_WRITEBACK_CACHE)) {
		conn->want |= FUSE_CAP_WRITEBACK_CACHE;
		fs->writeback_on = true;
	}
	/* Shared: pages of a file go when a refreshed size or mtime shows another host changed it
	 * (libfuse asks for this by default; a shared mount depends on it). */
	if (fs->shared && (conn->capable & FUSE_CAP_AUTO_INVAL_DATA))
		conn->want |= FUSE_CAP_AUTO_INVAL_DATA;
	/* POSIX ACLs kept on the backing files are enforced by the kernel, as on the backing
	 * filesystem: without this flag it checks mode bits alone, so an ACL set through the mount
	 * reads back but denies no one. It changes no request count: a getxattr of an ACL name
	 * still reaches us every time (the kernel keeps ACLs for its permission checks only). Not
	 * on a shared volume: the kernel keeps those with no timeout, and another host's change
	 * must show within shared_timeout. */
	if (!fs->shared && (conn->capable & FUSE_CAP_POSIX_ACL))
		conn->want |= FUSE_CAP_POSIX_ACL;
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
	conn->max_readahead = READAHEAD_BYTES;
	readahead_raise(fs);
	conn->time_gran = 1;
}

const struct fuse_lowlevel_ops keyfs_ops = {
	.init = op_init,

	/* names.c: namespace and attributes, no key (a regular mknod and a size change go on to
	 * contents.c) */
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
	.statfs = op_statfs,
	.access = op_access,

	/* contents.c: the bytes of regular files, behind the key */
	.open = op_open,
	.create = op_create,
	.read = op_read,
	.write = op_write,
	.flush = op_flush,
	.release = op_release,
	.fsync = op_fsync,
	.fallocate = op_fallocate,
	.lseek = op_lseek,

	/* dirs.c: directory handles and listings, no key */
	.opendir = op_opendir,
	.readdir = op_readdir,
	.readdirplus = op_readdirplus,
	.releasedir = op_releasedir,
	.fsyncdir = op_fsyncdir,

	/* xattrs.c: extended attributes, no key */
	.setxattr = op_setxattr,
	.getxattr = op_getxattr,
	.listxattr = op_listxattr,
	.removexattr = op_removexattr,
};
