/* lockdown.c: steps 2 to 4 of a lock (docs/LOCKING.md): drop cached plaintext, wipe every key */
#include <errno.h>
#include <string.h>

#include "keyfs/log.h"

#include "dekpool.h"
#include "filekeys.h"
#include "fs.h"
#include "keystate.h"
#include "lockdown.h"
#include "prefetch.h"

static void invalidate(struct keyfs *fs, struct kfs_inode **inodes, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		int r = fuse_lowlevel_notify_inval_inode(fs->se, inode_node_id(inodes[i]), 0, 0);

		if (r < 0 && r != -ENOENT)
			log_warn("lock: cache invalidation of an inode failed: %s", strerror(-r));
	}
}

/* Called by the lock thread, never by a request handler: invalidations from a handler can
 * deadlock the kernel. Key service calls are being interrupted meanwhile, so a handler that
 * holds a content lock while it waits for the service lets go at once. */
static void lockdown(void *ctx, struct keystate *ks)
{
	struct keyfs *fs = ctx;
	struct kfs_inode **inodes = NULL;
	size_t n = 0, wiped = 0, pooled;

	pooled = dekpool_drain(fs->pool);
	dekpool_pause(fs->pool, true);
	if (fs->prefetch)
		prefetch_clear(fs->prefetch);
	/* Every inode the kernel knows: it may have pages cached or mapped, however it was opened.
	 * Dirty pages of shared mappings come back as writes, still accepted while locking. */
	n = inode_table_snapshot(&fs->table, &inodes);
	invalidate(fs, inodes, n);
	keystate_refuse_writes(ks);
	/* Exclusive content lock: a read or write still running with the keys finishes first. */
	for (size_t i = 0; i < n; i++) {
		pthread_rwlock_wrlock(&inodes[i]->content);
		wiped += filekeys_forget(fs, inodes[i]);
		pthread_rwlock_unlock(&inodes[i]->content);
	}
	/* A read that passed its check just before locking began may have filled pages after the
	 * first pass; it has finished now (content locks), and no read succeeds any more. */
	invalidate(fs, inodes, n);
	inode_table_release(&fs->table, inodes, n);
	log_info("lock: caches of %zu files invalidated, %zu file keys and %zu pooled keys wiped", n, wiped, pooled);
}

static void unlocked(void *ctx)
{
	struct keyfs *fs = ctx;

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
