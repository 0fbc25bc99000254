/* keystate.h: the mount's view of its root key: the poller, the lock thread and the lock state machine (docs/LOCKING.md) */
#ifndef KEYFS_FS_KEYSTATE_H
#define KEYFS_FS_KEYSTATE_H

#include <stdbool.h>
#include <stddef.h>

struct control_status;
struct kms;
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

/* How long keyfsctl lock/unlock wait for the lock thread before answering the status as it is. */
#define KS_MANUAL_WAIT_MS 10000

/* What a lock does to the rest of the daemon, called from the lock thread (never a request
 * handler) while every key service call is being interrupted. */
struct keystate_hooks {
	void *ctx;
	/* Steps 2 to 4 of docs/LOCKING.md: invalidate, call keystate_refuse_writes, wipe keys. */
	void (*lockdown)(void *ctx, struct keystate *ks);
	/* Unlocked again: resume what lockdown paused. */
	void (*unlocked)(void *ctx);
	/* Optional: how many files hold keys now (status only; may take a while). */
	unsigned long (*files_keyed)(void *ctx);
};

struct keystate_config {
	struct kms *kms;
	const char *key;                /* the volume's key as it names it: status and log */
	const char *key_id;             /* the key's uuid (audit, status) */
	const char *key_crn;            /* its CRN, "" when unknown (audit, status) */
	const char *volume;             /* volume uuid: associated data of the access probe */
	const char *backing;            /* absolute, for status */
	const char *mountpoint;         /* absolute, for status */
	unsigned poll, grace;           /* seconds */
	int initial_state;              /* enum kms_key_state read at startup */
	struct keystate_hooks hooks;
};

/*
 * Set up the state from the key state read at startup: a key that is suspended or destroyed
 * starts the mount locked, so admins can still see what a shredded volume holds. The strings
 * and kms must outlive the state. Nothing runs until keystate_start. Returns 0 or -ENOMEM.
 */
int keystate_new(const struct keystate_config *cfg, struct keystate **ret);

/* Start the poller and the lock thread; the hooks must work from now on. Returns 0 or -errno. */
int keystate_start(struct keystate *ks);

/* Stop and join both threads; the state stays readable (keystate_check, keystate_locked) for
 * the threads still finishing, which keystate_free must outlive. Call kms_cancel first, or a
 * stalled poll is waited for. Idempotent. */
void keystate_stop(struct keystate *ks);

/* Stop (as keystate_stop) and free: only once no thread can look at the state any more. */
void keystate_free(struct keystate *ks);

/* 0 when op may go ahead now, else the error to answer (-ENOKEY, -EKEYREVOKED). Cheap: atomics. */
int keystate_check(struct keystate *ks, enum ks_op op);

/* A wrap or unwrap failed with r: when the answer says the key is unusable or access is denied
 * (-ENOKEY, -EKEYREVOKED, -EKEYEXPIRED, -EACCES), record it and lock at once if it calls for it,
 * and poll now. Never waits: request handlers call it. */
void keystate_poke(struct keystate *ks, int r);

/* Manual lock (true) or unlock (false). Returns 0 once the lock thread has applied it, or
 * -ETIMEDOUT after KS_MANUAL_WAIT_MS (it is still applied, later). */
int keystate_manual(struct keystate *ks, bool lock);

/* Step 3 of a lock: from now on writes are refused too. For the lockdown hook. */
void keystate_refuse_writes(struct keystate *ks);

/* The status keyfsctl shows (docs/LOCKING.md) into st. Returns 0, or -ENAMETOOLONG when a string
 * does not fit. Never waits for the key service or for a lock under way. */
int keystate_status(struct keystate *ks, struct control_status *st);

/* A wrap or unwrap handed back a DEK re-wrapped with key version: the first time a version is
 * seen, one audit event (rotation picked up). Never waits: request handlers call it. */
void keystate_note_rotation(struct keystate *ks, const char *key_version);

/* A manual request by uid was answered (ms since it came): its audit event. */
void keystate_audit_manual(struct keystate *ks, bool lock, unsigned uid, long long ms);

/* Locked now (for an exit status or a summary). */
bool keystate_locked(struct keystate *ks);

#endif
