/* keystate.h: the mount's view of its root key: the poller thread and the lock state machine (docs/LOCKING.md) */
#ifndef KEYFS_FS_KEYSTATE_H
#define KEYFS_FS_KEYSTATE_H

#include <stdbool.h>
#include <stddef.h>

struct keyfs;
struct keystate;

/* What a contents operation is about to do; each phase refuses a different set. */
enum ks_op {
	KS_OP_OPEN,     /* open of a regular file, truncate */
	KS_OP_READ,
	KS_OP_WRITE,    /* write, fallocate: still accepted while locking, so written data is not lost */
	KS_OP_CREATE,   /* a new regular file: also refused while the key is deactivated */
};

#define KS_POLL_DEFAULT  30
#define KS_GRACE_DEFAULT 300
#define KS_POLL_MAX      86400
#define KS_GRACE_MAX     (30 * 86400)

/*
 * Set up the state from the key state read at startup (initial_state, enum kms_key_state): a key
 * that is suspended or destroyed starts the mount locked, so admins can still see what a shredded
 * volume holds. Nothing runs until keystate_start. Returns 0 or -ENOMEM.
 */
int keystate_new(struct keyfs *fs, unsigned poll, unsigned grace, int initial_state, struct keystate **ret);

/* Start the poller; fs->se must be live (it sends cache invalidations). Returns 0 or -errno. */
int keystate_start(struct keystate *ks);

/* Stop and join the poller. */
void keystate_free(struct keystate *ks);

/* 0 when op may go ahead now, else the errno to answer (ENOKEY, EKEYREVOKED). Cheap: atomics. */
int keystate_check(struct keystate *ks, enum ks_op op);

/* A wrap or unwrap answered that the key is unusable (errno r): poll now rather than later. */
void keystate_poke(struct keystate *ks, int r);

/* Manual lock (true) or unlock (false), applied by the poller; returns once it has been. */
void keystate_manual(struct keystate *ks, bool lock);

/* One line of JSON (docs/LOCKING.md) into buf. Returns its length or -ENOBUFS. */
int keystate_status_json(struct keystate *ks, char *buf, size_t size);

/* Locked now (for an exit status or a summary). */
bool keystate_locked(struct keystate *ks);

#endif
