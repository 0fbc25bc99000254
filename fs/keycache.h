/* keycache.h: the keys of files the kernel just forgot, kept a short while for the open that follows */
#ifndef KEYFS_FS_KEYCACHE_H
#define KEYFS_FS_KEYCACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "keyfs/format.h"

#include "keyslab.h"

struct keystate;

#define KEYCACHE_TTL_MS   30000         /* a forgotten file's keys are kept this long at most */
#define KEYCACHE_HASH_SIZE 32           /* BLAKE2b of the raw header the keys were opened from */

/*
 * Why: a directory listing (readdirplus) hands the kernel an inode per file, and the prefetch
 * unwraps their keys before they are opened. Under memory pressure the kernel forgets such
 * inodes before the open comes; their keys died with them, and each open then unwrapped its
 * own, one round trip at a time. Now a forgotten inode's keys move here, and the load that
 * comes for the same backing file takes them back instead of calling the KMS.
 *
 * An entry is the backing file's identity (st_dev, st_ino) and the header its keys were opened
 * from (slot and a hash of its bytes: file id, generation, wrapped DEK). It serves only a load
 * that finds that very header still the newest in that very file: a replaced, truncated or
 * re-wrapped file gets no stale key, it is unwrapped as usual. Keys stay in their keyslab slot
 * (sodium_malloc). An entry goes after KEYCACHE_TTL_MS, when capacity is reached (oldest
 * first), when it is taken back, and at every lock (keycache_wipe); it is wiped as it goes.
 */
struct keycache;

/* A cache of at most capacity entries (0: keys of forgotten files are wiped at once, as
 * before). A put is refused while ks says opens are refused (a lock is under way or done).
 * slab and ks must outlive it. Returns 0, -ENOMEM or a thread errno. */
int keycache_new(struct keyslab *slab, struct keystate *ks, unsigned capacity, struct keycache **ret);
/* Stop the expiry thread and wipe every entry. NULL is fine. */
void keycache_free(struct keycache *c);

/* Keep keys (a keyslab slot) of the forgotten backing file (dev, ino), opened from the header
 * of that slot and hash. Returns true when the cache took them; false: the caller wipes them. */
bool keycache_put(struct keycache *c, dev_t dev, ino_t ino, unsigned slot, const uint8_t hash[KEYCACHE_HASH_SIZE],
		  struct fmt_keys *keys);
/* The keys kept for (dev, ino) if they were opened from this slot and header hash, now the
 * caller's (a keyslab slot); NULL otherwise (an entry of another header is wiped). */
struct fmt_keys *keycache_take(struct keycache *c, dev_t dev, ino_t ino, unsigned slot,
			       const uint8_t hash[KEYCACHE_HASH_SIZE]);
/* Wipe every entry (the mount is locking). Returns how many. NULL is fine. */
size_t keycache_wipe(struct keycache *c);

/* The hash keycache_put and keycache_take compare: of a raw header. */
void keycache_hash(const uint8_t raw[FMT_HEADER_SIZE], uint8_t out[KEYCACHE_HASH_SIZE]);

#endif
