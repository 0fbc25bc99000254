/* audit.h: structured audit events (docs/AUDIT.md): one journal entry per event, or one stderr line */
#ifndef KEYFS_AUDIT_H
#define KEYFS_AUDIT_H

#include <stdbool.h>

/*
 * Each kind has a fixed MESSAGE_ID (docs/AUDIT.md): an interface, never changed. Where events go
 * is decided once by audit_init:
 *   - the journal's native protocol (a datagram to /run/systemd/journal/socket), when the socket
 *     exists and KEYFS_AUDIT is not "stderr";
 *   - else one line "IDENT: audit: KIND name=value ..." on stderr (syslog once audit_to_syslog).
 * KEYFS_AUDIT=journal insists on the journal; KEYFS_AUDIT_SOCKET names another datagram socket
 * that speaks the journal's protocol (tests).
 */
enum audit_kind {
	AUDIT_LOCK,             /* the mount locked (any reason, manual included) */
	AUDIT_UNLOCK,           /* the mount unlocked */
	AUDIT_MANUAL_LOCK,      /* keyfsctl lock was asked, by KEYFS_UID */
	AUDIT_MANUAL_UNLOCK,    /* keyfsctl unlock was asked, by KEYFS_UID */
	AUDIT_GRACE_START,      /* the key service stopped answering: grace runs */
	AUDIT_GRACE_END,        /* it answers again before grace ran out */
	AUDIT_ROTATION,         /* a newer key version was picked up (a re-wrapped DEK stored) */
	AUDIT_REWRAP,           /* keyfsctl rewrap ran */
	AUDIT_REFUSED,          /* a volume was refused: untrusted, or its description disagrees */
	AUDIT_KINDS,
};

/* One event. Strings may be NULL or "" (field left out); numbers < 0 are left out. */
struct audit_event {
	enum audit_kind kind;
	const char *volume;             /* KEYFS_VOLUME: volume uuid */
	const char *mountpoint;         /* KEYFS_MOUNTPOINT */
	const char *backing;            /* KEYFS_BACKING */
	const char *key_id;             /* KEYFS_KEY_ID: the key's uuid */
	const char *key_crn;            /* KEYFS_KEY_CRN */
	const char *reason;             /* KEYFS_REASON: a short word (shredded, manual, untrusted ...) */
	const char *correlation_id;     /* KEYFS_CORRELATION_ID: of the KMS answer that decided */
	const char *key_version;        /* KEYFS_KEY_VERSION */
	long long latency_ms;           /* KEYFS_LATENCY_MS: from the key event where known */
	long long uid;                  /* KEYFS_UID: who asked */
	const char *message;            /* MESSAGE: one human line */
};

/* Pick the sink (see above). ident is SYSLOG_IDENTIFIER and the stderr prefix. Idempotent. */
void audit_init(const char *ident);

/* Stderr lines go to syslog from now on (the daemon went to the background). */
void audit_to_syslog(bool on);

/* Send events from a thread of their own from now on: audit_emit only queues (bounded; a full
 * queue drops the event, counts it and logs once). Returns 0 or -errno (events then go inline). */
int audit_start(void);

/* Send what is queued, stop the thread. */
void audit_stop(void);

/* Emit one event. Never blocks on I/O once audit_start ran; before that, the send is inline but
 * non-blocking (MSG_DONTWAIT). Safe from any thread. */
void audit_emit(const struct audit_event *ev);

/* "lock", "grace_start", ... and the MESSAGE_ID (32 lower-case hex digits) of a kind. */
const char *audit_kind_name(enum audit_kind kind);
const char *audit_message_id(enum audit_kind kind);

/* Events dropped so far (queue full, journal not taking more). */
unsigned long long audit_dropped(void);

/* The correlation id ("correlation-id UUID") a key service message names, into out (37 bytes);
 * "" when it names none. */
void audit_correlation_id(const char *msg, char out[37]);

#endif
