/* inode.h: the inode table: backing (dev, ino) -> lookup count, a cached O_PATH fd, content lock, file keys */
#ifndef KEYFS_FS_INODE_H
#define KEYFS_FS_INODE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/types.h>

#include "keyfs/format.h"

#include "keyslab.h"

struct file_handle;
struct keycache;

/*
 * One backing inode the kernel knows. Its FUSE node id is its address (FUSE_ROOT_ID for the root).
 *
 * Lock order: content -> keys_lock -> inode_table.lock. No lock is held across a fuse_reply_*.
 * The content lock is per inode, not per handle, because hard links and several opens share the
 * chunks: reads take it shared; write, truncate and fallocate exclusive, except a write of whole
 * chunks inside a file with the tag cache on (content_overwrite), which takes it shared too:
 * content.c orders such writes and reads per chunk and per tag page.
 */
struct kfs_inode {
	struct kfs_inode *hnext;        /* table lock */
	uint64_t nlookup;               /* table lock: kernel references (lookup minus forget) */
	dev_t dev;                      /* immutable from here on */
	ino_t ino;
	mode_t type;                    /* S_IFMT bits */
	/* table lock. O_PATH | O_NOFOLLOW, opened from the parent's fd; -1 while evicted from the fd
	 * cache (the root's is never evicted). Use it only between inode_fd() and inode_fd_put(). */
	int fd;
	unsigned fd_users;              /* table lock: inode_fd() holders, open files included */
	bool is_root;
	/* table lock: the handle is still to be taken, when the fd is first evicted (most inodes
	 * never are); the name is kept meanwhile, and stays the way back if that fails. */
	bool handle_later;
	struct kfs_inode *lru_prev;     /* table lock: on the fd cache's LRU list when fd >= 0 and */
	struct kfs_inode *lru_next;     /* fd_users == 0; NULL links otherwise (or at an end) */
	/* How an evicted fd is opened again: by file handle (set under the table lock before the
	 * fd is first closed, immutable from then on), or else by parent and name (table lock; the
	 * inode holds a lookup reference on parent). */
	struct file_handle *handle;
	struct kfs_inode *parent;
	char *name;
	pthread_rwlock_t content;
	pthread_mutex_t keys_lock;
	pthread_cond_t keys_cond;       /* with keys_lock: signalled when keys_loading ends */
	/* keys_lock. Loaded lazily and kept until the inode is freed; a caller may use the pointer
	 * after dropping keys_lock while it holds content (wiping them will need content exclusive). */
	struct fmt_keys *keys;          /* keyslab slot; NULL: not loaded, or the file has no header yet */
	uint8_t file_id[FMT_FILE_ID_SIZE];
	unsigned header_slot;           /* keys_lock: the slot whose header authenticated, */
	uint32_t header_generation;     /* and its generation: a rewrite goes to the other slot */
	/* keys_lock: a hash of that header's bytes (keycache.h), when header_hashed: what the keys
	 * of a forgotten inode are kept under, for a load of the same header to take back. */
	uint8_t header_hash[32];
	bool header_hashed;
	/* keys_lock. One thread at a time loads or creates the keys, without holding keys_lock
	 * across the KMS call (filekeys.c); the others wait on keys_cond or, prefetching, skip. */
	bool keys_loading;
	uint64_t header_epoch;          /* keys_lock: bumped whenever the header is made or dropped */
	/* Open writable files (contents.c). With the writeback cache the kernel may hold dirty
	 * pages of the inode only while one is open: it writes them back before each release. */
	_Atomic unsigned writers;
	/* Bumped by every operation that takes content exclusive (contents.c): a read-side cache
	 * of an open file (its backing size) is good only while this has not moved. */
	_Atomic uint64_t content_gen;
	/* The file's id in content.c's tag cache (content.h), 0 until a read or write gives it one
	 * (contents.c); set to 0 by whatever changes its tag entries otherwise (truncate, fallocate). */
	_Atomic uint64_t tags_id;
	/* keys_lock: the errno of the load that ended last (0: it worked), and a count of loads
	 * ended: a thread that waited for a prefetch's load takes its failure rather than asking
	 * the KMS again for the same wrapped DEK. */
	int keys_load_err;
	uint32_t keys_loads;
	unsigned keys_waiters;          /* keys_lock: threads waiting for the load under way */
};

struct inode_table {
	pthread_mutex_t lock;
	struct kfs_inode **buckets;     /* lock; chained by hnext */
	size_t nbuckets;                /* lock; a power of two */
	size_t count;                   /* lock */
	struct kfs_inode root;          /* never in the hash, never freed before the table */
	struct keyslab *slab;           /* where inode keys go back to */
	/* Where the keys of an inode the kernel forgot go, for a while (NULL: wiped at once). Set
	 * before the session starts, cleared after it ends. */
	struct keycache *keycache;
	/* The fd cache (inode.c says why): at most fd_cap O_PATH fds, least recently used closed. */
	struct kfs_inode *lru_head;     /* lock: most recently used */
	struct kfs_inode *lru_tail;     /* lock: next to close */
	size_t nfds;                    /* lock: non-root inodes with fd >= 0 */
	size_t fd_cap;                  /* lock: 0 until the first inode_get (after rlimits are set) */
	int mount_fd;                   /* O_RDONLY root dir for open_by_handle_at; -1: no handles */
	int mount_id;                   /* of the root, as name_to_handle_at reports it */
	uint64_t reopens;               /* lock: fds opened again after an eviction (debug figures) */
};

/* Set up the table around root_fd (an O_PATH fd of the backing root, owned by the table now). */
int inode_table_init(struct inode_table *t, int root_fd, const struct stat *root_st, struct keyslab *slab);
/* Free every inode (closing fds, wiping keys) and the root. */
void inode_table_free(struct inode_table *t);

/* The inode of st, found as name in parent, with one more lookup reference, or a new one
 * adopting fd. fd (O_PATH) is consumed in every case. Returns 0 or -ENOMEM. */
int inode_get(struct inode_table *t, int fd, const struct stat *st, struct kfs_inode *parent, const char *name,
	      struct kfs_inode **ret);
/* i's O_PATH fd, opened again if it was evicted, and held open until inode_fd_put(): the fd
 * number is only valid in between. Returns the fd or -errno (-ESTALE: the backing file is
 * gone, or another file took its name). */
int inode_fd(struct inode_table *t, struct kfs_inode *i);
void inode_fd_put(struct inode_table *t, struct kfs_inode *i);
/* An open of an fd failed with err: on EMFILE or ENFILE, log (rate-limited) and close cached
 * fds. Returns true when trying once more may work. */
bool inode_fd_shortage(struct inode_table *t, int err);
/* name in parent is now st (a rename through the mount): remember it for reopening. */
void inode_moved(struct inode_table *t, const struct stat *st, struct kfs_inode *parent, const char *name);
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
