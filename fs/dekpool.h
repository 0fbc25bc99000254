/* dekpool.h: keys for new files made ahead of need: (file id, DEK, wrapped DEK) wrapped by background workers */
#ifndef KEYFS_FS_DEKPOOL_H
#define KEYFS_FS_DEKPOOL_H

#include <stdbool.h>
#include <stdint.h>

#include "keyfs/format.h"
#include "keyfs/kms.h"

#include "keyslab.h"

#define DEKPOOL_MAX     1024            /* largest -o dek_pool= */
#define DEKPOOL_FLOOR   32              /* a pool at rest holds min(dek_pool, this) */
#define DEKPOOL_REST_INFLIGHT 4         /* wraps in flight while it only tops up its floor */
#define DEKPOOL_WORKERS_MAX 128         /* wraps in flight at most, per pool (-o kms_concurrency=) */

/*
 * What a new file needs from the KMS, made before the file exists: creating a file is then one
 * local write, not a KMS round trip. The wrapped DEK is bound to aad = { volume uuid, file id
 * hex }, so the file id is made here too. Every entry is handed out once, then forgotten.
 */
struct dekpool_entry {
	uint8_t file_id[FMT_FILE_ID_SIZE];
	uint8_t *dek;                   /* keyslab slot holding FMT_DEK_SIZE bytes: the taker frees it */
	struct kms_wrapped wrapped;
};

struct dekpool;

/*
 * A pool of at most capacity entries (0..DEKPOOL_MAX; 0: no pool, every dekpool_get wraps at
 * once). At rest it holds min(capacity, DEKPOOL_FLOOR); a create that finds it below a quarter
 * doubles it (up to capacity), and 30 s without a create halve it back (the keys over are
 * wiped). It is refilled whenever fewer than three quarters are left and, while creates come
 * in a burst (less than a second apart), as soon as a key is taken, by up to workers
 * (1..DEKPOOL_WORKERS_MAX) threads in flight, started as wraps are wanted: as many wraps in
 * flight as keys are missing. While it is at its floor and creates are rare, by
 * DEKPOOL_REST_INFLIGHT only. So the wraps made
 * are at most the files created plus capacity, plus what shrinking and locks wiped. kms,
 * volume_uuid and slab must outlive the pool. Returns 0, -EINVAL, -ENOMEM or -EAGAIN (no
 * thread could be started).
 */
int dekpool_new(struct kms *kms, const char *volume_uuid, struct keyslab *slab, unsigned capacity,
		unsigned workers, struct dekpool **ret);
/* Stop and join the workers (a wrap in flight is waited for), wipe every entry, log how many. */
void dekpool_free(struct dekpool *p);

/*
 * A ready entry; when none is ready but wraps are in flight, the first of them to arrive; when
 * none is coming (disabled, paused, backing off), one wrapped now by the caller's thread: a
 * create never fails because the pool is empty. Returns 0 or a kms_wrap errno with
 * err filled (-ENOKEY, -EKEYREVOKED, -EKEYEXPIRED, ...).
 */
int dekpool_get(struct dekpool *p, struct dekpool_entry *ret, struct kms_err *err);

/* Wipe every ready entry and drop the results of wraps in flight. Returns how many were wiped.
 * Workers refill afterwards unless the pool is paused. */
unsigned dekpool_drain(struct dekpool *p);

/* Paused: drained at once and not refilled until unpaused (the mount is locked); a burst of
 * creates ends with it, and the pool is back to its floor. Drained in the same step, so no refill starts in between (a lock must
 * not start a burst of wraps). Returns how many entries were wiped. */
unsigned dekpool_pause(struct dekpool *p, bool paused);

#endif
