/* lockdown.c: steps 2 to 5 of a lock (docs/LOCKING.md): write back and drop cached pages, wipe every key */
#include <errno.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/stat.h>

#include "keyfs/log.h"

#include "bgthread.h"
#include "dekpool.h"
#include "filekeys.h"
#include "keycache.h"
#include "fs.h"
#include "keystate.h"
#include "lockdown.h"
#include "prefetch.h"

/* The write-back passes of step 2 repeat while dirty pages keep coming back as writes, for
 * this long at most (the lock itself must stay well under 1 s). */
#define SETTLE_MS 250
#define SETTLE_PASSES 16

enum pass { PASS_ALL, PASS_REGULAR, PASS_WRITERS };

/* One pass: the kernel drops the attributes of each inode, then writes back its dirty pages
 * (they come back as WRITE requests, served by the other threads) and drops every page.
 * Returns the number of inodes passed. */
static size_t invalidate(struct keyfs *fs, struct kfs_inode **inodes, size_t n, enum pass which)
{
	size_t done = 0;

	for (size_t i = 0; i < n; i++) {
		int r;

		if (which != PASS_ALL && !S_ISREG(inodes[i]->type))
			continue;
		/* Dirty pages need an open writable file: the kernel writes them back before each
		 * release (a shared mapping keeps its file open). */
		if (which == PASS_WRITERS && atomic_load(&inodes[i]->writers) == 0)
			continue;
		r = fuse_lowlevel_notify_inval_inode(fs->se, inode_node_id(inodes[i]), 0, 0);
		if (r < 0 && r != -ENOENT)
			log_warn("lock: cache invalidation of an inode failed: %s", strerror(-r));
		done++;
	}
	return done;
}

/*
 * Step 2 (docs/LOCKING.md): write back and drop every cached page while writes are accepted.
 * A write() that passed the kernel's attribute check before the first pass dropped its inode's
 * attributes may dirty a page after that pass went by; the next pass over the files open for
 * writing writes it back. Passes repeat while the previous one saw writes, SETTLE_MS at most.
 * Returns the number of passes; *late counts the writes during the passes after the first.
 */
static unsigned write_back(struct keyfs *fs, struct kfs_inode **inodes, size_t n, unsigned long *late)
{
	struct timespec deadline = bgthread_deadline(SETTLE_MS);
	unsigned long before = atomic_load(&fs->lock_writes), after;
	unsigned passes = 1;
	size_t writers = 1;

	invalidate(fs, inodes, n, PASS_ALL);
	after = atomic_load(&fs->lock_writes);
	*late = 0;
	/* Without the writeback cache a write() reaches keyfs before it returns, and is refused
	 * from step 3 on: there is no check it could pass before the lock and act on after. */
	while (fs->writeback_on && writers && (passes == 1 || after != before) && passes < SETTLE_PASSES &&
	       !bgthread_reached(&deadline)) {
		before = after;
		writers = invalidate(fs, inodes, n, PASS_WRITERS);
		passes++;
		after = atomic_load(&fs->lock_writes);
		*late += after - before;
	}
	return passes;
}

/* Called by the lock thread, never by a request handler: invalidations from a handler can
 * deadlock the kernel. Key service calls are being interrupted meanwhile, so a handler that
 * holds a content lock while it waits for the service lets go at once. */
static void lockdown(void *ctx, struct keystate *ks)
{
	struct keyfs *fs = ctx;
	struct kfs_inode **inodes = NULL;
	size_t n = 0, wiped = 0, pooled, kept;
	unsigned long written = atomic_load(&fs->lock_writes), refused = atomic_load(&fs->lock_refused), late;
	unsigned passes;

	fs->refused_at_lock = refused;

	pooled = dekpool_pause(fs->pool, true);
	if (fs->prefetch)
		prefetch_clear(fs->prefetch);
	/* Every inode the kernel knows: it may have pages cached or mapped, however it was opened.
	 * Dirty pages (cached writes, shared mappings) come back as writes, still accepted. */
	n = inode_table_snapshot(&fs->table, &inodes);
	passes = write_back(fs, inodes, n, &late);
	keystate_refuse_writes(ks);
	written = atomic_load(&fs->lock_writes) - written;
	/* Exclusive content lock: a read or write still running with the keys finishes first. */
	for (size_t i = 0; i < n; i++) {
		pthread_rwlock_wrlock(&inodes[i]->content);
		wiped += filekeys_forget(fs, inodes[i]);
		pthread_rwlock_unlock(&inodes[i]->content);
	}
	/* A read that passed its check just before locking began may have filled pages after the
	 * first pass; it has finished now (content locks), and no read succeeds any more. A page
	 * dirtied after the last write-back pass is refused here: its writer gets EIO at fsync,
	 * msync or close. */
	invalidate(fs, inodes, n, PASS_ALL);
	refused = atomic_load(&fs->lock_refused) - refused;
	inode_table_release(&fs->table, inodes, n);
	/* After the inodes: the keys of one our snapshot held last were wiped above; none is
	 * kept from now on (keycache_put refuses while locking). */
	kept = keycache_wipe(fs->table.keycache);
	/* The v2 tag pages cached for reads and writes (content.h): no use while locked. */
	content_tags_drop_all();
	log_info("lock: caches of %zu files invalidated in %u write-back passes (%lu writes, %lu of them after "
		 "the first pass), %zu file keys, %zu kept keys of forgotten files and %zu pooled keys wiped",
		 n, passes, written, late, wiped, kept, pooled);
	if (refused)
		log_warn("lock: %lu cached writes made after the write-back were refused; their writers get EIO "
			 "at fsync or close", refused);
}

static void unlocked(void *ctx)
{
	struct keyfs *fs = ctx;

	/* Still locked: a page that a write() stalled across the lock dirtied after the last pass
	 * was refused when written back (EIO to its writer), but the kernel keeps it cached. Drop
	 * such pages before reads are served again, or they would show data that never reached
	 * the file. Only refusals leave them: without any, the pass is skipped (a page still dirty
	 * is then written back after the unlock, with the keys). */
	if (fs->writeback_on && atomic_load(&fs->lock_refused) != fs->refused_at_lock) {
		struct kfs_inode **inodes = NULL;
		size_t n = inode_table_snapshot(&fs->table, &inodes);

		invalidate(fs, inodes, n, PASS_REGULAR);
		inode_table_release(&fs->table, inodes, n);
		log_warn("unlock: %lu cached writes made after the lock began were refused; their writers got "
			 "EIO at fsync or close", atomic_load(&fs->lock_refused) - fs->refused_at_lock);
	}
	dekpool_pause(fs->pool, false);
}

/* For status: every inode the kernel knows, asked whether it holds keys. */
static unsigned long files_keyed(void *ctx)
{
	struct keyfs *fs = ctx;
	struct kfs_inode **inodes = NULL;
	unsigned long keyed = 0;
	size_t n = inode_table_snapshot(&fs->table, &inodes);

	for (size_t i = 0; i < n; i++) {
		pthread_mutex_lock(&inodes[i]->keys_lock);
		keyed += inodes[i]->keys != NULL;
		pthread_mutex_unlock(&inodes[i]->keys_lock);
	}
	inode_table_release(&fs->table, inodes, n);
	return keyed;
}

int lockdown_keystate_new(struct keyfs *fs, unsigned poll, unsigned grace, int initial_state,
			  struct keystate **ret)
{
	struct keystate_config cfg = {
		.kms = fs->kms,
		.key = fs->vol.key,
		.key_id = kms_key_id(fs->kms),
		.key_crn = fs->vol.key_crn,
		.volume = fs->vol.volume,
		.backing = fs->backing,
		.mountpoint = fs->mountpoint,
		.poll = poll,
		.grace = grace,
		.initial_state = initial_state,
		.hooks = { .ctx = fs, .lockdown = lockdown, .unlocked = unlocked, .files_keyed = files_keyed },
	};

	return keystate_new(&cfg, ret);
}
