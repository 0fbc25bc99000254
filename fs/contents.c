/* contents.c: the handlers of regular files' bytes, the only ones that need the key, and the gate they pass */
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>
#include <linux/falloc.h>

#include <sodium.h>

#include "keyfs/content.h"
#include "keyfs/log.h"

#include "filekeys.h"
#include "killpriv.h"
#include "loop.h"
#include "fs.h"
#include "keystate.h"
#include "ops.h"
#include "shared.h"

/* Open flags a user may pass on to the backing file; the rest is ours to decide (see file_open). */
#define PASSED_OPEN_FLAGS (O_SYNC | O_DSYNC | O_NOATIME)

/* Writes from this size on seal their chunks before they take the exclusive lock (file_write). */
#define SEAL_AHEAD_MIN (64u << 10)

/* Writes from this size on (a write-back of sequential data comes in max_write pieces) start the
 * backing file's write-out every WRITEOUT_EVERY bytes (writeout_note). */
#define WRITEOUT_REQUEST_MIN (128u << 10)
#define WRITEOUT_EVERY (8u << 20)

/* An open regular file. Several may share one inode (and its content lock and keys). */
struct kfs_file {
	int fd;                         /* backing file: O_RDWR when writable, never O_APPEND */
	bool writable;
	bool append;                    /* O_APPEND, emulated: each write goes to the current end */
	struct kfs_inode *inode;
	/* The backing size as a read found it at inode->content_gen == size_gen (size_gen 0: none
	 * yet; the generations start at 0 and a cached one is stored + 1). Spares each READ an
	 * fstat; never kept on a shared mount, where other hosts change the file. */
	pthread_mutex_t size_lock;
	uint64_t size_gen;              /* size_lock */
	uint64_t size;                  /* size_lock */
	_Atomic uint64_t unstarted;     /* bytes of large writes since the write-out was last started */
};

static struct kfs_file *file_of(const struct fuse_file_info *fi)
{
	return (struct kfs_file *)(uintptr_t)fi->fh;
}

/* ---- the gate: key state, content lock, keys ---- */

/* What a contents operation asks of the gate. */
enum contents_op {
	C_OPEN,         /* open without O_TRUNC */
	C_EMPTY,        /* truncate to 0 bytes, O_TRUNC included */
	C_TRUNCATE,     /* truncate to more than 0 bytes */
	C_CREATE,       /* the header of a new regular file */
	C_READ,
	C_WRITE,
	C_SEAL,         /* a write's chunks sealed ahead, beside reads and other seals */
	C_OVERWRITE,    /* whole chunks inside the file rewritten, beside reads (content_overwrite) */
	C_ALLOCATE,     /* fallocate that keeps the size (FALLOC_FL_KEEP_SIZE) */
	C_SEEK,
};

enum gate_lock { LOCK_NONE, LOCK_SHARED, LOCK_EXCLUSIVE };

enum gate_keys {
	KEYS_NONE,
	KEYS,                   /* the file's keys; none for an empty file (no header yet) */
	KEYS_OR_NEW,            /* an empty file first gets a header (new DEK, wrapped by the KMS) */
	KEYS_IF_INTACT,         /* none, not -EIO, when the header is damaged: it is about to go */
};

/*
 * The key boundary in one table. refuse: keystate_check decides (docs/LOCKING.md: locking
 * refuses opens, truncates, creates and reads, locked refuses writes too, a deactivated key
 * refuses creates). lock: i->content, shared for reads (inode.h). An open loads the keys, so
 * a header that does not authenticate fails the open rather than a read, but takes no content
 * lock: it reads only the header, and filekeys.c serialises the loads of one inode.
 */
static const struct gate {
	bool refuse;
	enum ks_op state;
	enum gate_lock lock;
	enum gate_keys keys;
} gates[] = {
	[C_OPEN]     = { true,  KS_OP_OPEN,   LOCK_NONE,      KEYS },
	[C_EMPTY]    = { true,  KS_OP_OPEN,   LOCK_EXCLUSIVE, KEYS_IF_INTACT },
	[C_TRUNCATE] = { true,  KS_OP_OPEN,   LOCK_EXCLUSIVE, KEYS_OR_NEW },
	[C_CREATE]   = { true,  KS_OP_CREATE, LOCK_EXCLUSIVE, KEYS_OR_NEW },
	[C_READ]     = { true,  KS_OP_READ,   LOCK_SHARED,    KEYS },
	[C_WRITE]    = { true,  KS_OP_WRITE,  LOCK_EXCLUSIVE, KEYS_OR_NEW },
	[C_SEAL]     = { true,  KS_OP_WRITE,  LOCK_SHARED,    KEYS },
	[C_OVERWRITE] = { true, KS_OP_WRITE,  LOCK_SHARED,    KEYS },
	[C_ALLOCATE] = { true,  KS_OP_WRITE,  LOCK_EXCLUSIVE, KEYS },
	/* Holes and the size come from the backing layout: no key, and it works while locked. */
	[C_SEEK]     = { false, KS_OP_READ,   LOCK_SHARED,    KEYS_NONE },
};

/*
 * The key state check alone, for an operation that must be refused before it opens or creates
 * its backing file; contents_enter asks again, as a lock may have begun meanwhile.
 * Returns 0 or -ENOKEY, -EKEYREVOKED.
 */
static int contents_allowed(struct keyfs *fs, enum contents_op op)
{
	return gates[op].refuse ? keystate_check(fs->ks, gates[op].state) : 0;
}

static void contents_leave(struct kfs_inode *i, enum contents_op op)
{
	if (gates[op].lock != LOCK_NONE)
		pthread_rwlock_unlock(&i->content);
}

/*
 * Pass the gate of op on i, whose backing file is open at fd: the key state, the content lock,
 * the keys into cf (cf->keys NULL: no header). On success the caller holds what op needs until
 * contents_leave; on failure nothing is held. Returns 0 or the errno the operation answers.
 */
static int contents_enter(struct keyfs *fs, struct kfs_inode *i, enum contents_op op, int fd,
			  struct content_file *cf)
{
	const struct gate *g = &gates[op];
	int r = contents_allowed(fs, op);

	if (r < 0)
		return r;
	/* A shared mount's byte-range locks need the content lock alone (shared.h). */
	if (g->lock == LOCK_SHARED && !fs->shared)
		pthread_rwlock_rdlock(&i->content);
	else if (g->lock != LOCK_NONE)
		pthread_rwlock_wrlock(&i->content);
	/* Whatever an exclusive holder does to the file, the read caches of its open files are
	 * stale from here (no read runs until it leaves). */
	if (g->lock == LOCK_EXCLUSIVE)
		atomic_fetch_add(&i->content_gen, 1);
	*cf = (struct content_file){ .fd = fd, .layout = fs->vol.format };
	if (g->keys == KEYS_OR_NEW)
		r = filekeys_get_or_create(fs, i, fd, cf);
	else if (g->keys != KEYS_NONE)
		r = filekeys_get(fs, i, fd, cf);
	if (r == -EIO && g->keys == KEYS_IF_INTACT) {
		cf->keys = NULL;
		r = 0;
	}
	if (r < 0)
		contents_leave(i, op);
	return r;
}

/* ---- regular files ---- */

/*
 * The tag cache id of i for a read or write (content.h), given one on first use; 0 (no cache)
 * on a shared mount, where other hosts change the tag pages, and on a v1 volume (no tag pages).
 * Called holding i->content (readers may race to give it one: the first wins).
 */
static uint64_t inode_tags_id(const struct keyfs *fs, struct kfs_inode *i)
{
	uint64_t id, none = 0;

	if (fs->shared || fs->vol.format != FMT_LAYOUT_V2)
		return 0;
	id = atomic_load(&i->tags_id);
	if (id)
		return id;
	id = content_tags_id();
	if (!atomic_compare_exchange_strong(&i->tags_id, &none, id))
		id = none;
	return id;
}

/* i's tag entries change outside content_write (holding i->content exclusively): its cached tag
 * pages are never found again (they age out of the cache), the next read or write gets a new id. */
static void inode_tags_forget(struct kfs_inode *i)
{
	atomic_store(&i->tags_id, 0);
}

static int file_new(struct keyfs *fs, int fd, struct kfs_inode *i, int flags, bool writable, struct kfs_file **ret)
{
	struct kfs_file *f = malloc(sizeof(*f));

	if (!f)
		return -ENOMEM;
	f->fd = fd;
	f->writable = writable;
	/* With the writeback cache the kernel resolves O_APPEND and sends the offset; a write-back
	 * of pages may also come through any writable handle, an O_APPEND one included. */
	f->append = (flags & O_APPEND) != 0 && !fs->writeback_on;
	f->inode = i;
	pthread_mutex_init(&f->size_lock, NULL);
	f->size_gen = 0;
	atomic_init(&f->unstarted, 0);
	if (writable)
		atomic_fetch_add(&i->writers, 1);
	*ret = f;
	return 0;
}

/* Close an open file and let its inode's fd go (file_open and regular_new hold it for the file). */
static void file_free(struct keyfs *fs, struct kfs_file *f)
{
	if (f->writable)
		atomic_fetch_sub(&f->inode->writers, 1);
	close(f->fd);
	fd_done(fs, f->inode);
	pthread_mutex_destroy(&f->size_lock);
	free(f);
}

/* The handle of an open file, as the reply to an open or a create gives it. */
static struct fuse_file_info *file_info(const struct keyfs *fs, struct fuse_file_info *fi, struct kfs_file *f)
{
	fi->fh = (uintptr_t)f;
	/* Shared: another host may have changed the file since the pages were cached. */
	fi->keep_cache = !fs->shared;
	/* Shared: the kernel cuts a write() at a page it has not cached into several requests,
	 * and each piece of an append would land at the end of its own; direct I/O sends it
	 * whole (up to max_write), so an append stays in one piece across hosts. */
	fi->direct_io = fs->shared && f->append;
	fi->noflush = 1;
	return fi;
}

/*
 * Set the plaintext size of i, open O_RDWR at fd. Truncating to 0 needs no key for a file whose
 * header is damaged: it drops the header, and the next write gives the file a new one. That is
 * how a user discards a damaged file in place.
 */
static int file_truncate(struct keyfs *fs, struct kfs_inode *i, int fd, uint64_t size)
{
	enum contents_op op = size == 0 ? C_EMPTY : C_TRUNCATE;
	struct content_file cf;
	int r = contents_enter(fs, i, op, fd, &cf);

	if (r < 0)
		return r;
	inode_tags_forget(i);
	r = shared_all_begin(fs, fd);
	if (r == 0) {
		r = cf.keys || size ? content_truncate(&cf, size) : filekeys_drop_header(fs, i, fd);
		shared_end(fs, fd);
	}
	contents_leave(i, op);
	return r;
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
	char proc[OPS_PROC_PATH_SIZE];
	struct content_file cf;
	bool trunc = (flags & O_TRUNC) != 0;
	bool writable = (flags & O_ACCMODE) != O_RDONLY || trunc;
	int oflags = (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | (flags & PASSED_OPEN_FLAGS);
	int fd, pfd, r;

	r = contents_allowed(fs, C_OPEN);
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
		r = file_truncate(fs, i, fd, 0);
		if (r == 0 && killpriv_wanted())
			r = killpriv_apply(proc);
	} else {
		r = contents_enter(fs, i, C_OPEN, fd, &cf);
		if (r == 0)
			contents_leave(i, C_OPEN);
	}
	if (r == 0)
		r = file_new(fs, fd, i, flags, writable, ret);
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
	char proc[OPS_PROC_PATH_SIZE];
	struct content_file cf;
	struct kfs_inode *i;
	struct stat st;
	uid_t uid;
	gid_t gid;
	int fd, pfd, dfd, r;
	int oflags = O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC | O_NOFOLLOW | (flags & PASSED_OPEN_FLAGS);

	r = contents_allowed(fs, C_CREATE);
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
	r = ops_new_owner(fs, req, dir, &uid, &gid);
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
	r = ops_adopt(fs, pfd, dir, name, e, &i);
	if (r < 0)
		goto fail_unlink;
	if (ret_fd) {
		r = fd_of(fs, i);
		if (r < 0) {
			inode_unref(&fs->table, i, 1);
			goto fail_unlink;
		}
	}
	r = contents_enter(fs, i, C_CREATE, fd, &cf);
	if (r == 0)
		contents_leave(i, C_CREATE);
	if (r == 0 && fstat(fd, &st) < 0)
		r = -errno;
	if (r < 0) {
		if (ret_fd)
			fd_done(fs, i);
		inode_unref(&fs->table, i, 1);
		goto fail_unlink;
	}
	plain_attr(fs, &st);
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

int contents_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_entry_param *e)
{
	struct kfs_inode *i;

	if (is_reserved(parent, name))
		return -EPERM;
	return regular_new(fs_of(req), req, inode_of(req, parent), name, mode, 0, e, &i, NULL);
}

int contents_truncate(struct keyfs *fs, struct kfs_inode *i, const char *proc, off_t size,
		      const struct fuse_file_info *fi)
{
	const struct kfs_file *f = fi && S_ISREG(i->type) ? file_of(fi) : NULL;
	int fd, r;

	if (S_ISDIR(i->type))
		return -EISDIR;
	if (!S_ISREG(i->type))
		return -EINVAL;
	if (size < 0)
		return -EINVAL;
	r = contents_allowed(fs, size == 0 ? C_EMPTY : C_TRUNCATE);
	if (r < 0)
		return r;
	fd = f && f->writable ? f->fd : open(proc, O_RDWR | O_CLOEXEC);
	if (fd < 0 && inode_fd_shortage(&fs->table, errno))
		fd = open(proc, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	r = file_truncate(fs, i, fd, (uint64_t)size);
	if (r == 0 && killpriv_wanted())
		r = killpriv_apply(proc);
	if (!(f && f->writable))
		close(fd);
	return r;
}

int contents_attr_for_write(struct keyfs *fs)
{
	/* Refused from the start of a lock, like opens: dirty pages made before are still written
	 * back, but no write() dirties a page afterwards. */
	return fs->writeback_on ? contents_allowed(fs, C_OPEN) : 0;
}

double contents_attr_timeout(struct keyfs *fs, mode_t type)
{
	/* With the writeback cache a write() asks for the attributes only when they are stale.
	 * While locked, none the kernel learns (a stat, a listing) may stay valid: 0 keeps every
	 * later write() asking, through its descriptor, and so failing. */
	if (fs->writeback_on && S_ISREG(type) && keystate_locked(fs->ks))
		return 0;
	return fs->timeout;
}

/* ---- handlers ---- */

void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct kfs_file *f = NULL;
	int r = file_open(fs_of(req), inode_of(req, ino), fi->flags, &f);

	if (r < 0)
		fuse_reply_err(req, -r);
	else if (fuse_reply_open(req, file_info(fs_of(req), fi, f)) == -ENOENT)
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
		r = file_new(fs, fd, i, flags, true, ret);
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
	r = ops_lookup(fs, dir, name, e, &i);
	if (r < 0)
		return r;
	r = S_ISREG(i->type) ? file_open(fs, i, flags, ret) : S_ISDIR(i->type) ? -EISDIR : -EEXIST;
	if (r < 0)
		inode_unref(&fs->table, i, 1);
	return r;
}

void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_file_info *fi)
{
	struct fuse_entry_param e;
	struct kfs_file *f = NULL;
	int r = do_create(req, parent, name, mode, fi->flags, &e, &f);

	if (r < 0) {
		fuse_reply_err(req, -r);
	} else if (fuse_reply_create(req, &e, file_info(fs_of(req), fi, f)) == -ENOENT) {
		file_free(fs_of(req), f);
		inode_unref(&fs_of(req)->table, inode_of(req, e.ino), 1);
	}
}

/*
 * Give cf the backing size of f, from f's cache when no exclusive operation on the inode came
 * since it was taken, else from fstat (then kept). Called holding content shared, so no write
 * that changes the size runs meanwhile (overwrites do not). The size is no secret (stat shows
 * the plaintext size it gives) and is used only past the key gate; a lock changes no file. On
 * a failed fstat cf is left to content_read.
 */
static void file_size_cached(struct kfs_file *f, struct content_file *cf)
{
	uint64_t gen = atomic_load(&f->inode->content_gen) + 1;

	pthread_mutex_lock(&f->size_lock);
	if (f->size_gen != gen && content_backing_size(f->fd, &f->size) == 0)
		f->size_gen = gen;
	if (f->size_gen == gen) {
		cf->backing_size = f->size;
		cf->backing_size_known = true;
	}
	pthread_mutex_unlock(&f->size_lock);
}

/*
 * A write's view of the same cache, under content exclusive (contents_enter has bumped
 * content_gen once, for this write): f's size is good if it was taken right before that bump,
 * else fstat. An empty file is never taken from the cache: contents_enter may just have given
 * it its header. Not on a shared mount (other hosts change the file).
 */
static void file_size_for_write(struct kfs_file *f, struct content_file *cf)
{
	uint64_t gen = atomic_load(&f->inode->content_gen);

	pthread_mutex_lock(&f->size_lock);
	if (f->size_gen != gen || f->size == 0) {
		f->size_gen = 0;
		if (content_backing_size(f->fd, &f->size) == 0)
			f->size_gen = gen;
	}
	if (f->size_gen == gen) {
		cf->backing_size = f->size;
		cf->backing_size_known = true;
	}
	pthread_mutex_unlock(&f->size_lock);
}

/* After the write of size bytes at pos answered n, still under content exclusive: the size it
 * left (content.h) for the reads and the next write, or none after a failure. */
static void file_size_written(struct kfs_file *f, const struct content_file *cf, ssize_t n, uint64_t pos,
			      size_t size)
{
	uint64_t gen = atomic_load(&f->inode->content_gen) + 1;

	pthread_mutex_lock(&f->size_lock);
	if (n >= 0 && cf->backing_size_known && f->size_gen == gen - 1) {
		uint64_t p = fmt_plain_size(cf->layout, f->size);

		/* An empty write checks nothing and changes nothing (the size may be a damaged one). */
		if (size > 0)
			f->size = fmt_backing_size(cf->layout, pos + size > p ? pos + size : p);
		f->size_gen = gen;
	} else {
		f->size_gen = 0;
	}
	pthread_mutex_unlock(&f->size_lock);
}

/*
 * Read into buf (size bytes). Also through a descriptor opened before a lock: no plaintext once
 * locking began. Returns the byte count or -errno; on failure buf may hold plaintext of the
 * chunks opened before the one that did not authenticate: the caller wipes it either way.
 */
static ssize_t file_read(struct keyfs *fs, struct kfs_file *f, size_t size, off_t off, uint8_t *buf)
{
	struct kfs_inode *i = f->inode;
	struct content_file cf;
	ssize_t n = contents_enter(fs, i, C_READ, f->fd, &cf);

	if (n < 0)
		return n;
	if (cf.keys && !fs->shared)
		file_size_cached(f, &cf);
	if (cf.keys)
		cf.tags_id = inode_tags_id(fs, i);
	if (cf.keys && (n = shared_read_begin(fs, f->fd, (uint64_t)off, size)) == 0) {
		n = content_read(&cf, buf, size, (uint64_t)off);
		shared_end(fs, f->fd);
	}
	contents_leave(i, C_READ);
	if (n == -EIO) {
		char label[64];

		inode_label(i, label, sizeof(label));
		log_err("%s: a chunk in bytes %lld..%lld does not authenticate", label, (long long)off,
			(long long)off + (long long)size - 1);
	}
	return n;
}

void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	/* The worker's own buffer, which the loop wipes after the reply; memory of ours otherwise. */
	uint8_t *own = NULL, *buf = loop_reply_buffer(size);
	ssize_t n;

	(void)ino;
	if (!buf)
		buf = own = malloc(size ? size : 1);
	n = buf ? file_read(fs_of(req), file_of(fi), size, off, buf) : -ENOMEM;
	if (n < 0)
		fuse_reply_err(req, (int)-n);
	else
		fuse_reply_buf(req, (const char *)buf, (size_t)n);
	/* The plaintext stays in memory no longer than the reply needs it. */
	if (own) {
		sodium_memzero(own, size);
		free(own);
	}
}

/*
 * A write of whole chunks inside the file (content_overwrite) under content shared, beside reads
 * and other such writes: the write-back of scattered pages of one file (random 4 KiB writes)
 * runs on every core instead of one at a time. Not on a shared mount (its byte-range locks
 * are taken under the exclusive lock) nor for an emulated append. Returns -EAGAIN when the
 * write is not one, for file_write_exclusive.
 */
static ssize_t file_overwrite(struct keyfs *fs, struct kfs_file *f, const char *buf, size_t size, off_t off)
{
	struct kfs_inode *i = f->inode;
	struct content_file cf;
	bool past_end;
	ssize_t n;

	if (fs->shared || f->append || !content_write_sealable(fs->vol.format, size, (uint64_t)off) ||
	    size % FMT_CHUNK_SIZE)
		return -EAGAIN;
	/* A write past the end by the last size seen (a hint: content_overwrite decides) goes
	 * straight to the exclusive lock, not through the shared one first. */
	pthread_mutex_lock(&f->size_lock);
	past_end = f->size_gen != 0 && (uint64_t)off + size > fmt_plain_size(FMT_LAYOUT_V2, f->size);
	pthread_mutex_unlock(&f->size_lock);
	if (past_end)
		return -EAGAIN;
	n = contents_enter(fs, i, C_OVERWRITE, f->fd, &cf);
	if (n < 0)
		return n;
	n = -EAGAIN;
	if (cf.keys) {
		file_size_cached(f, &cf);
		cf.tags_id = inode_tags_id(fs, i);
		n = content_overwrite(&cf, buf, size, (uint64_t)off);
	}
	contents_leave(i, C_OVERWRITE);
	return n;
}

/* Any write, under content exclusive (its chunks perhaps sealed ahead under content shared). */
static ssize_t file_write_exclusive(struct keyfs *fs, struct kfs_file *f, const char *buf, size_t size, off_t off)
{
	struct kfs_inode *i = f->inode;
	struct content_file cf;
	struct content_sealed sealed = { .ready = false };
	uint64_t pos = (uint64_t)off;
	ssize_t n;

	/* Seal the chunks first under the shared lock, so that the writes of one file (the
	 * write-back of its pages comes as many requests at once) encrypt on every core, and hold
	 * the exclusive lock only to write them. Not for a shared mount (its byte-range locks are
	 * taken under the exclusive lock) nor an emulated append (its offset is known only then).
	 * Nor a small write: a second pass through the gate costs more than its sealing, and
	 * reader-preferring rwlocks would let the seals of many small writes starve their writes. */
	if (size >= SEAL_AHEAD_MIN && !fs->shared && !f->append && content_write_sealable(fs->vol.format, size, pos) &&
	    contents_enter(fs, i, C_SEAL, f->fd, &cf) == 0) {
		if (cf.keys)
			file_size_cached(f, &cf);
		(void)content_write_seal(&cf, buf, size, pos, &sealed);
		contents_leave(i, C_SEAL);
	}
	n = contents_enter(fs, i, C_WRITE, f->fd, &cf);
	if (n < 0)
		return n;
	if (!fs->shared)
		file_size_for_write(f, &cf);
	cf.tags_id = inode_tags_id(fs, i);
	n = shared_write_begin(fs, f->fd, f->append, size, &pos);
	if (n == 0) {
		n = sealed.ready ? content_write_sealed(&cf, buf, size, pos, &sealed) : content_write(&cf, buf, size, pos);
		shared_end(fs, f->fd);
	}
	if (!fs->shared)
		file_size_written(f, &cf, n, pos, size);
	contents_leave(i, C_WRITE);
	return n;
}

static ssize_t file_write(struct keyfs *fs, struct kfs_file *f, const char *buf, size_t size, off_t off)
{
	ssize_t n = file_overwrite(fs, f, buf, size, off);

	if (n == -EAGAIN)
		n = file_write_exclusive(fs, f, buf, size, off);
	/* Accepted while a lock is under way: a dirty page written back with the keys. */
	if (n >= 0 && keystate_locked(fs->ks))
		atomic_fetch_add(&fs->lock_writes, 1);
	if (n >= 0 && killpriv_wanted()) {
		char proc[OPS_PROC_PATH_SIZE];
		int r;

		proc_path(f->fd, proc);
		r = killpriv_apply(proc);
		if (r < 0)
			n = r;
		/* The kernel keeps the mode it had: tell it the attributes changed (no pages, so
		 * safe from a handler). */
		fuse_lowlevel_notify_inval_inode(fs->se, node_id(f->inode), -1, 0);
	}
	return n;
}

/*
 * Large writes start the write-out of the backing file's dirty pages every WRITEOUT_EVERY bytes,
 * without waiting for it. Left alone, those pages wait for the fsync (or the kernel's 30 s) that
 * follows a big write, and the disk starts only once every chunk is sealed; started here, the
 * disk writes while the next chunks are sealed, and the fsync finds little left. Small writes
 * (random 4 KiB) are left to the kernel: their pages may well be written again soon. Before the
 * reply: a write-back's file may be released as soon as it is answered.
 */
static void writeout_note(struct kfs_file *f, size_t n)
{
	uint64_t before;

	if (n < WRITEOUT_REQUEST_MIN)
		return;
	before = atomic_fetch_add(&f->unstarted, n);
	if (before >= WRITEOUT_EVERY || before + n < WRITEOUT_EVERY)
		return;
	atomic_store(&f->unstarted, 0);
	/* A hint: if it fails, the kernel writes the pages out later, as it would have anyway. */
	(void)sync_file_range(f->fd, 0, 0, SYNC_FILE_RANGE_WRITE);
}

void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off, struct fuse_file_info *fi)
{
	struct keyfs *fs = fs_of(req);
	ssize_t n = file_write(fs, file_of(fi), buf, size, off);

	(void)ino;
	/* A page written back from the cache (not a write() waiting for its answer) that a lock
	 * refuses is data lost: the kernel reports this errno at fsync, msync and close, where
	 * EIO is what a program expects to learn that from. */
	if (fi->writepage && (n == -ENOKEY || n == -EKEYREVOKED) && keystate_locked(fs->ks)) {
		atomic_fetch_add(&fs->lock_refused, 1);
		n = -EIO;
	}
	if (n < 0) {
		fuse_reply_err(req, (int)-n);
		return;
	}
	writeout_note(file_of(fi), (size_t)n);
	fuse_reply_write(req, (size_t)n);
}

/* flush, release and fsync move no plaintext: they pass no gate and work while locked. */

void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	(void)fi;
	/* Every write reached the backing file before it was acknowledged: nothing is pending. */
	fuse_reply_err(req, 0);
}

void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	file_free(fs_of(req), file_of(fi));
	fuse_reply_err(req, 0);
}

void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
	(void)ino;
	fuse_reply_err(req, -fd_sync(file_of(fi)->fd, datasync));
}

static int file_fallocate(struct keyfs *fs, struct kfs_file *f, int mode, off_t off, off_t len)
{
	/* Growing an empty file needs its header first; KEEP_SIZE modes never grow it. */
	enum contents_op op = mode & FALLOC_FL_KEEP_SIZE ? C_ALLOCATE : C_WRITE;
	struct content_file cf;
	int r;

	/* COLLAPSE_RANGE, INSERT_RANGE and UNSHARE_RANGE stay refused (content_fallocate too). */
	if (mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE))
		return -EOPNOTSUPP;
	if (off < 0 || len <= 0)
		return -EINVAL;
	r = contents_enter(fs, f->inode, op, f->fd, &cf);
	if (r < 0)
		return r;
	inode_tags_forget(f->inode);
	r = shared_all_begin(fs, f->fd);
	if (r == 0) {
		r = content_fallocate(&cf, mode, (uint64_t)off, (uint64_t)len);
		shared_end(fs, f->fd);
	}
	contents_leave(f->inode, op);
	return r;
}

void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len, struct fuse_file_info *fi)
{
	(void)ino;
	fuse_reply_err(req, -file_fallocate(fs_of(req), file_of(fi), mode, off, len));
}

static int file_lseek(struct keyfs *fs, struct kfs_file *f, off_t off, int whence, uint64_t *ret)
{
	struct content_file cf;
	uint64_t pos = 0;
	int r;

	if (off < 0)
		return -ENXIO;
	/* Holes come from the backing layout, which cached writes have not reached yet: the kernel
	 * sends no write-back before this request. Have it write back (and drop) the pages from
	 * off on first, before the content lock their writes need; only while a writable file is
	 * open can there be any. Safe from a handler: the caller holds the inode lock, which no
	 * holder of a page lock waits for, and the writes go to other workers. */
	if ((whence == SEEK_DATA || whence == SEEK_HOLE) && fs->writeback_on && atomic_load(&f->inode->writers) &&
	    !keystate_locked(fs->ks))
		fuse_lowlevel_notify_inval_inode(fs->se, node_id(f->inode), off, 0);
	r = contents_enter(fs, f->inode, C_SEEK, f->fd, &cf);
	if (r < 0)
		return r;
	switch (whence) {
	case SEEK_DATA:
	case SEEK_HOLE:
		r = content_lseek(&cf, (uint64_t)off, whence, &pos);
		break;
	case SEEK_SET:
		pos = (uint64_t)off;
		break;
	case SEEK_END:
		r = content_size(f->fd, cf.layout, &pos);
		pos += (uint64_t)off;
		break;
	default:
		r = -EINVAL;
		break;
	}
	contents_leave(f->inode, C_SEEK);
	if (r >= 0)
		*ret = pos;
	return r;
}

void op_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, struct fuse_file_info *fi)
{
	uint64_t pos = 0;
	int r = file_lseek(fs_of(req), file_of(fi), off, whence, &pos);

	(void)ino;
	if (r < 0)
		fuse_reply_err(req, -r);
	else
		fuse_reply_lseek(req, (off_t)pos);
}
