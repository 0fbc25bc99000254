/* lockdecision.h: what the key service's answers mean for the mount (DESIGN §3): one pure function */
#ifndef KEYFS_FS_LOCKDECISION_H
#define KEYFS_FS_LOCKDECISION_H

#include <stdbool.h>

/* A poll that has waited this long for its answer counts as unreachable (docs/LOCKING.md). */
#define KS_STALL_MS 1000

enum ks_reason {
	KS_REASON_NONE,
	KS_REASON_SUSPENDED,
	KS_REASON_DESTROYED,
	KS_REASON_REVOKED,
	KS_REASON_UNREACHABLE,
	KS_REASON_MANUAL,
};

/* The name status and the log give a reason ("key-suspended", ...); NULL for KS_REASON_NONE. */
const char *ks_reason_name(enum ks_reason reason);

/* What the mount has observed, as of one moment. Keeping the clock is the caller's job. */
struct ks_observed {
	int key_state;          /* enum kms_key_state of the newest answer (KMS_STATE_PURGED for 404) */
	bool unreachable;       /* the newest poll failed (no answer, 5xx, 429 after the retries),
				 * or one has waited longer than KS_STALL_MS for its answer */
	double quiet;           /* seconds since the last definite answer (a key state, 404, 401/403) */
	unsigned grace;         /* -o grace= */
	bool manual;            /* keyfsctl lock is in force */
	bool revoked;           /* the access-revoked latch: a 401/403 not yet cured by a probe */
};

struct ks_verdict {
	bool locked;
	enum ks_reason reason;  /* why locked; KS_REASON_NONE when not */
	int err;                /* ENOKEY or EKEYREVOKED when locked, else 0 */
	bool no_create;         /* deactivated key: existing files only */
};

/*
 * The verdict, worst news first: destroyed (EKEYREVOKED), access revoked, suspended or any
 * state but active and deactivated, unreachable for longer than grace, manual (all ENOKEY);
 * else unlocked, refusing creates when the key is deactivated.
 */
struct ks_verdict ks_decide(const struct ks_observed *o);

bool ks_verdict_equal(const struct ks_verdict *a, const struct ks_verdict *b);

#endif
