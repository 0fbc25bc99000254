/* ops.h: what the request handler files share; the handlers themselves, for the table in ops.c */
#ifndef KEYFS_FS_OPS_H
#define KEYFS_FS_OPS_H

/*
 * The handlers are split at the key boundary. names.c (namespace and attributes), dirs.c and
 * xattrs.c work without a key and never ask the key state; contents.c holds every operation on a
 * regular file's bytes and the one gate they pass (docs/LOCKING.md). names.c hands the two name
 * operations that make or cut contents, a regular mknod and a setattr of the size, to contents.c.
 */

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "keyfs/format.h"
#include "keyfs/voldesc.h"

#include "fs.h"

_Static_assert(sizeof(fuse_ino_t) >= sizeof(uintptr_t), "node ids are inode addresses");

#define OPS_PROC_PATH_SIZE 32

static inline struct keyfs *fs_of(fuse_req_t req)
{
	return fuse_req_userdata(req);
}

static inline struct kfs_inode *inode_of(fuse_req_t req, fuse_ino_t ino)
{
	if (ino == FUSE_ROOT_ID)
		return &fs_of(req)->table.root;
	return (struct kfs_inode *)(uintptr_t)ino;
}

static inline fuse_ino_t node_id(const struct kfs_inode *i)
{
	return i->is_root ? FUSE_ROOT_ID : (fuse_ino_t)(uintptr_t)i;
}

/* An inode's O_PATH fd, held open until fd_done(): the inode table may close it otherwise. */
static inline int fd_of(struct keyfs *fs, struct kfs_inode *i)
{
	return inode_fd(&fs->table, i);
}

static inline void fd_done(struct keyfs *fs, struct kfs_inode *i)
{
	inode_fd_put(&fs->table, i);
}

/* The volume description is hidden at the backing root and cannot be made there. */
static inline bool is_reserved(fuse_ino_t parent, const char *name)
{
	return parent == FUSE_ROOT_ID && strcmp(name, VOLDESC_NAME) == 0;
}

static inline bool is_dot_or_dotdot(const char *name)
{
	return name[0] == '.' && (name[1] == '\0' || (name[1] == '.' && name[2] == '\0'));
}

static inline void proc_path(int fd, char buf[OPS_PROC_PATH_SIZE])
{
	snprintf(buf, OPS_PROC_PATH_SIZE, "/proc/self/fd/%d", fd);
}

/* Regular files show their plaintext size, computed from the backing size alone (the volume's
 * layout says how). */
static inline void plain_attr(const struct keyfs *fs, struct stat *st)
{
	if (S_ISREG(st->st_mode))
		st->st_size = (off_t)fmt_plain_size(fs->vol.format, (uint64_t)st->st_size);
}

/* chown clears set-user-id and set-group-id on non-directories: put back what was asked. */
static inline bool needs_mode_again(mode_t type, mode_t mode)
{
	return !S_ISDIR(type) && !S_ISLNK(type) && (mode & (S_ISUID | S_ISGID));
}

/* fsync or fdatasync: 0 or -errno. */
static inline int fd_sync(int fd, int datasync)
{
	return (datasync ? fdatasync(fd) : fsync(fd)) < 0 ? -errno : 0;
}

/* names.c: entries and attributes, for the other handler files. All return 0 or -errno. */

/* lstat of the inode, with the plaintext size. */
int ops_stat(struct keyfs *fs, struct kfs_inode *i, struct stat *st);
/* Turn an O_PATH fd, name in dir, into an entry with one lookup reference. fd is consumed. */
int ops_adopt(struct keyfs *fs, int fd, struct kfs_inode *dir, const char *name, struct fuse_entry_param *e,
	      struct kfs_inode **ret);
/* Look name up in dir: an entry with one lookup reference (and its inode, when ret). */
int ops_lookup(struct keyfs *fs, struct kfs_inode *dir, const char *name, struct fuse_entry_param *e,
	       struct kfs_inode **ret);
/* Reply with an entry; when the request was interrupted the kernel never got the reference. */
void ops_reply_entry(fuse_req_t req, const struct fuse_entry_param *e);
/* Who a new node in dir is given to when the daemon runs as root: 1 and the owner when a chown
 * is needed, 0 when not. */
int ops_new_owner(struct keyfs *fs, fuse_req_t req, struct kfs_inode *dir, uid_t *uid, gid_t *gid);

/* contents.c: the two name operations that need the key. All return 0 or -errno. */

/* mknod of a regular file: a new file with its header. */
int contents_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_entry_param *e);
/* The size part of a setattr of i, whose O_PATH fd is at proc; fi as the setattr got it. */
int contents_truncate(struct keyfs *fs, struct kfs_inode *i, const char *proc, off_t size,
		      const struct fuse_file_info *fi);

/*
 * A getattr through an open regular file (fi set): with the writeback cache, the kernel asks
 * it before a write() may dirty pages once the lock invalidated the attributes. 0, or the
 * errno of the key state from the start of a lock.
 */
int contents_attr_for_write(struct keyfs *fs);
/* The attribute timeout of a node of this type (S_IFMT bits): 0 for regular files while a lock
 * is in force with the writeback cache, else the mount's. */
double contents_attr_timeout(struct keyfs *fs, mode_t type);

/* The handlers, for the table in ops.c. */

void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name);
void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup);
void op_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets);
void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int valid, struct fuse_file_info *fi);
void op_readlink(fuse_req_t req, fuse_ino_t ino);
void op_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev);
void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode);
void op_symlink(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name);
void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name);
void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name);
void op_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent, const char *newname,
	       unsigned int flags);
void op_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char *newname);
void op_statfs(fuse_req_t req, fuse_ino_t ino);
void op_access(fuse_req_t req, fuse_ino_t ino, int mask);

void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_file_info *fi);
void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi);
void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off, struct fuse_file_info *fi);
void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi);
void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len, struct fuse_file_info *fi);
void op_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, struct fuse_file_info *fi);

void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi);
void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi);
void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
void op_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi);

void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value, size_t size, int flags);
void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size);
void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size);
void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name);

#endif
