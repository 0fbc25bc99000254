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

/* Drop every queued file (the mount is locked: no key is to be fetched now). */
void prefetch_clear(struct prefetch *p);

#endif
