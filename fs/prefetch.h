/* prefetch.h: unwrap ahead the DEKs of files a directory listing or a lookup showed, on background threads */
#ifndef KEYFS_FS_PREFETCH_H
#define KEYFS_FS_PREFETCH_H

#include "fs.h"

#define PREFETCH_MAX     1024           /* largest -o prefetch= (files per directory listing) */
#define PREFETCH_THREADS_MAX 128        /* unwraps in flight at most (-o kms_concurrency=) */
#define PREFETCH_QUEUE   4096           /* files waiting at most; more are not prefetched */

struct prefetch;

/* A prefetcher of up to threads (1..PREFETCH_THREADS_MAX) unwraps at once; its threads start as
 * files are queued and stay. fs must outlive the prefetcher. Returns 0 or -ENOMEM. */
int prefetch_new(struct keyfs *fs, unsigned threads, struct prefetch **ret);
/* Stop and join the threads (an unwrap in flight is waited for) and drop what is queued. */
void prefetch_free(struct prefetch *p);

/* A listed inode a prefetch would do something for: a regular file whose keys nobody has or is
 * loading. Lets a listing choose what to queue without knowing about keys. */
bool prefetch_wanted(struct kfs_inode *inode);

/*
 * Queue a regular file for filekeys_prefetch. Takes over one lookup reference of inode (the
 * caller took it with inode_ref): it is dropped once the file is done or not done after all
 * (queue full, prefetching paused after a KMS failure, prefetcher stopping).
 */
void prefetch_add(struct prefetch *p, struct kfs_inode *inode);

/*
 * A file a directory listing showed, with one lookup reference taken for us as prefetch_add's.
 * later false: queued now (the first prefetch_max of a listing); true: it waits (up to
 * PREFETCH_QUEUE files, the rest are not prefetched; dropped after 30 s) and is queued when a
 * file queued from a listing is opened, one for one, so a reader that goes through a listing longer than the
 * window (find | xargs cat, tar c) finds about the window unwrapped ahead of it all the way.
 */
void prefetch_listed(struct prefetch *p, struct kfs_inode *inode, bool later);
/* A file handed to prefetch_listed with later would be kept (a listing may skip the lookup). */
bool prefetch_later_room(struct prefetch *p);

/* The keys of inode are wanted by an open or a read: if a listing queued it, slide the window
 * (queue the next file waiting). Cheap when no file waits. p may be NULL. */
void prefetch_opened(struct prefetch *p, const struct kfs_inode *inode);

/* Drop every queued and waiting file (the mount is locked: no key is to be fetched now). */
void prefetch_clear(struct prefetch *p);

#endif
