/* inode.h: the inode table: backing (dev, ino) -> one O_PATH fd, lookup count, content lock, file keys */
#ifndef KEYFS_FS_INODE_H
#define KEYFS_FS_INODE_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/types.h>

#include "keyfs/format.h"

#include "keyslab.h"

/*
 * One backing inode the kernel knows. Its FUSE node id is its address (FUSE_ROOT_ID for the root).
 *
 * Lock order: content -> keys_lock -> inode_table.lock. No lock is held across a fuse_reply_*.
 * The content lock is per inode, not per handle, because hard links and several opens share the
 * chunks: reads take it shared; write, truncate and fallocate exclusive.
 */
struct kfs_inode {
	struct kfs_inode *hnext;        /* table lock */
	uint64_t nlookup;               /* table lock: kernel references (lookup minus forget) */
	dev_t dev;                      /* immutable from here on */
	ino_t ino;
	mode_t type;                    /* S_IFMT bits */
	int fd;                         /* O_PATH | O_NOFOLLOW, opened from the parent's fd */
	bool is_root;
	pthread_rwlock_t content;
	pthread_mutex_t keys_lock;
	pthread_cond_t keys_cond;       /* with keys_lock: signalled when keys_loading ends */
	/* keys_lock. Loaded lazily and kept until the inode is freed; a caller may use the pointer
	 * after dropping keys_lock while it holds content (wiping them will need content exclusive). */
	struct fmt_keys *keys;          /* keyslab slot; NULL: not loaded, or the file has no header yet */
	uint8_t file_id[FMT_FILE_ID_SIZE];
	unsigned header_slot;           /* keys_lock: the slot whose header authenticated, */
	uint32_t header_generation;     /* and its generation: a rewrite goes to the other slot */
	/* keys_lock. One thread at a time loads or creates the keys, without holding keys_lock
	 * across the KMS call (filekeys.c); the others wait on keys_cond or, prefetching, skip. */
	bool keys_loading;
	uint64_t header_epoch;          /* keys_lock: bumped whenever the header is made or dropped */
};

struct inode_table {
	pthread_mutex_t lock;
	struct kfs_inode **buckets;     /* lock; chained by hnext */
	size_t nbuckets;                /* lock; a power of two */
	size_t count;                   /* lock */
	struct kfs_inode root;          /* never in the hash, never freed before the table */
	struct keyslab *slab;           /* where inode keys go back to */
};

/* Set up the table around root_fd (an O_PATH fd of the backing root, owned by the table now). */
int inode_table_init(struct inode_table *t, int root_fd, const struct stat *root_st, struct keyslab *slab);
/* Free every inode (closing fds, wiping keys) and the root. */
void inode_table_free(struct inode_table *t);

/* The inode of st, with one more lookup reference, or a new one adopting fd.
 * fd (O_PATH) is consumed in every case. Returns 0 or -ENOMEM. */
int inode_get(struct inode_table *t, int fd, const struct stat *st, struct kfs_inode **ret);
/* "inode 254:1/1234": how a log line names a file; the daemon keeps no paths. */
void inode_label(const struct kfs_inode *i, char *buf, size_t size);

/* The FUSE node id of i. */
static inline uint64_t inode_node_id(const struct kfs_inode *i)
{
	return i->is_root ? 1 /* FUSE_ROOT_ID */ : (uint64_t)(uintptr_t)i;
}

/* Every regular file in the table, each with a reference held for the caller, in a malloc'd
 * array: what a lock must invalidate and wipe. Returns the count (0 on allocation failure,
 * after logging). */
size_t inode_table_snapshot(struct inode_table *t, struct kfs_inode ***ret);
/* Drop the references of a snapshot and free it. */
void inode_table_release(struct inode_table *t, struct kfs_inode **inodes, size_t n);

/* One more lookup reference (link). */
void inode_ref(struct inode_table *t, struct kfs_inode *i);
/* Drop n lookup references; the inode is freed at zero. The root is never freed here. */
void inode_unref(struct inode_table *t, struct kfs_inode *i, uint64_t n);

#endif
