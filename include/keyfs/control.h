/* control.h: the control socket between a keyfs daemon and keyfsctl: where it lives and what it speaks */
#ifndef KEYFS_CONTROL_H
#define KEYFS_CONTROL_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/*
 * Each mount has one unix stream socket, 0600 in a 0700 directory owned by the mount's owner:
 *   uid 0:     /run/keyfs/<id>.sock
 *   other uid: /run/user/<uid>/keyfs/<id>.sock      ($XDG_RUNTIME_DIR's systemd default)
 * where <id> is the 16-hex-digit FNV-1a 64 hash of the canonical (realpath) mountpoint. keyfsctl
 * finds the owner's uid in the mount's "user_id=" option in /proc/self/mountinfo.
 *
 * Protocol: the client sends one request line, the daemon answers one line of JSON and closes.
 *   "status\n"  -> the status object (docs/LOCKING.md): state, reason, key, key_state, last_poll,
 *                  poll, grace, deactivated, backing, mountpoint, volume, key_id, key_crn,
 *                  last_good_age, kms_calls, kms_errors, kms_latency_ms, kms_latency_avg_ms,
 *                  files_keyed, audit_dropped, kms_wraps, kms_unwraps, kms_key_errors
 *   "lock\n"    -> the status object after a manual lock took effect (locking is complete)
 *   "unlock\n"  -> the status object after a manual unlock (the mount may stay locked for a
 *                  KMS reason, which "reason" then names)
 *   anything else, or a peer that is neither root nor the daemon's uid (SO_PEERCRED):
 *               -> {"error":"<message>"}
 * Requests are at most CONTROL_REQUEST_MAX bytes; answers at most CONTROL_ANSWER_MAX.
 */
#define CONTROL_REQUEST_MAX 64
#define CONTROL_ANSWER_MAX 8192
#define CONTROL_DIR_ROOT "/run/keyfs"

/* Bounds of what an answer may hold; a longer string makes it invalid. */
#define CONTROL_DEPTH_MAX 16            /* nesting of arrays and objects (unknown members) */
#define CONTROL_ERROR_MAX 512
#define CONTROL_REASON_MAX 128
#define CONTROL_KEY_MAX 256             /* voldesc's key */
#define CONTROL_TIME_MAX 64

/* The socket path for the mount at mountpoint (canonical) owned by uid. Returns 0 or -ENAMETOOLONG. */
int control_socket_path(const char *mountpoint, uid_t uid, char *buf, size_t size);

/* The directory that holds it. Returns 0 or -ENAMETOOLONG. */
int control_socket_dir(uid_t uid, char *buf, size_t size);

/* Whether mountpoint (absolute, normalised) is a keyfs mount, on top, and its owner (the uid whose
 * socket directory serves it). Returns 1 with the uid, 0 when it is not a keyfs mount, -EBADMSG
 * when its user_id= is missing or bad, or -errno reading the mount table. */
int control_mount_owner(const char *mountpoint, uid_t *ret_uid);

enum control_request { CONTROL_STATUS, CONTROL_LOCK, CONTROL_UNLOCK };

/* The request's name ("status", "lock", "unlock"); its line is the name and "\n". */
const char *control_request_name(enum control_request req);

/* The request a received line (NUL-terminated, newline included) makes, or -EINVAL. */
int control_request_parse(const char *line);

/*
 * One answer: the status object of docs/LOCKING.md, or an error. A JSON null is "" for a string
 * and -1 for a number (the daemon never sends an empty string); a missing member is null.
 */
struct control_status {
	char error[CONTROL_ERROR_MAX];  /* non-empty: the answer was {"error":...}; nothing else is set */
	bool locked;                    /* "state": "locked" or "unlocked" */
	char reason[CONTROL_REASON_MAX];        /* why it is locked: ks_reason_name() */
	char key[CONTROL_KEY_MAX];      /* the volume's key as it names it */
	int64_t key_state;              /* enum kms_key_state; null for a purged key */
	char last_poll[CONTROL_TIME_MAX];       /* RFC 3339 of the newest poll answer */
	int64_t poll, grace;            /* seconds */
	bool deactivated;               /* an expired key: existing files only */
	char backing[PATH_MAX];
	char mountpoint[PATH_MAX];
	/* Added with the host view (keyfsctl status without a path, --prometheus); older daemons
	 * send none of them: -1 and "". */
	char volume[40];                /* volume uuid */
	char key_id[CONTROL_KEY_MAX];   /* the key's uuid */
	char key_crn[512];              /* its CRN */
	int64_t last_good_age;          /* seconds since the newest definite key service answer */
	int64_t kms_calls;              /* key state polls answered or failed */
	int64_t kms_errors;             /* of which failed (no definite answer) */
	int64_t kms_latency_ms;         /* the newest poll's */
	int64_t kms_latency_avg_ms;     /* over all polls */
	int64_t files_keyed;            /* files whose keys are loaded now */
	int64_t audit_dropped;          /* audit events dropped */
	/* Added with the key service counts; older daemons send none: -1. */
	int64_t kms_wraps;              /* wraps asked of the key service since the mount */
	int64_t kms_unwraps;            /* unwraps asked */
	int64_t kms_key_errors;         /* of those wraps and unwraps, how many failed */
};

/* The answer line for st (JSON and "\n", members in the order above; strings that are not UTF-8
 * get U+FFFD) into buf. Returns its length, -ENOBUFS when it does not fit, or -ENOMEM. */
int control_status_format(const struct control_status *st, char *buf, size_t size);

/* The answer line {"error":msg} into buf. Returns its length, -ENOBUFS or -ENOMEM. */
int control_error_format(const char *msg, char *buf, size_t size);

/*
 * Parse an answer line from the peer (at most CONTROL_ANSWER_MAX bytes, the newline optional).
 * Members it does not know are ignored. Returns 0 with st filled (st->error non-empty for an
 * error answer), -EBADMSG when text is not one JSON object within the bounds above, -EPROTO
 * with *ret_field naming the member that is missing ("state") or not of its type, size or range,
 * or -ENOMEM.
 */
int control_answer_parse(const char *text, struct control_status *st, const char **ret_field);

#endif
