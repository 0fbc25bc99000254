/* kms.h: the one key-service interface (wrap, unwrap, key state) over the local and Key Protect backends */
#ifndef KEYFS_KMS_H
#define KEYFS_KMS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * keyclient knows nothing of the keyfs format or the volume description: its sizes are its own
 * (the volume layer checks at build time that they agree with format.h) and its configuration
 * is plain strings, filled in by the volume layer from the description and the host's word.
 */
#define KMS_DEK_SIZE            32      /* the data keys wrapped and unwrapped */
#define KMS_KEY_ID_MAX          255     /* key id or CRN, printable ASCII */
#define KMS_KEY_VERSION_MAX     64      /* key version id, printable ASCII, may be empty */
#define KMS_WRAPPED_MAX         600     /* a wrapped DEK: opaque bytes from the service */

/* The backends, as a volume names them. */
#define KMS_KIND_LOCAL          "local"
#define KMS_KIND_KEYPROTECT     "keyprotect"

/* Root key states, numbered as Key Protect numbers them. */
enum kms_key_state {
	KMS_STATE_PREACTIVE = 0,
	KMS_STATE_ACTIVE = 1,
	KMS_STATE_SUSPENDED = 2,
	KMS_STATE_DEACTIVATED = 3,
	KMS_STATE_DESTROYED = 5,
	KMS_STATE_PURGED = 404,         /* the key is gone (404): no number from the service */
};

/* Name of a state ("active", "suspended", ...). */
const char *kms_state_name(int state);

#define KMS_ERR_MAX 512
/* Every failing call writes a one-line, lowercase message here: what failed and why, never a secret. */
struct kms_err {
	char msg[KMS_ERR_MAX];
};

/* Where the key is and how to reach it. NULL and "" both mean not given. */
struct kms_config {
	const char *kms;                /* KMS_KIND_LOCAL or KMS_KIND_KEYPROTECT */
	const char *key;                /* local: key name; keyprotect: key id, alias or CRN */
	const char *key_id;             /* the key id the volume is bound to; not given: the key's own */
	const char *keystore;           /* local: keystore dir, else the default one */
	const char *endpoint;           /* keyprotect: service URL, else the CRN's region */
	const char *instance;           /* keyprotect: instance GUID, else the CRN's */
	const char *iam_endpoint;       /* keyprotect: IAM URL, else the public IAM */
	const char *apikey_file;        /* keyprotect: API key file, else $CREDENTIALS_DIRECTORY/apikey */
	const char *ca_file;            /* keyprotect: extra trusted CA bundle */
};

/* A wrapped DEK as stored in a file header. */
struct kms_wrapped {
	uint8_t blob[KMS_WRAPPED_MAX];
	size_t len;
	char key_version[KMS_KEY_VERSION_MAX + 1];
};

struct kms;

/*
 * Errors (negative errno) shared by all backends:
 *   -ENOENT       key unknown (never created)              -EKEYREVOKED  key destroyed or purged
 *   -ENOKEY       key suspended or pre-active              -EKEYEXPIRED  key deactivated: wrap refused
 *   -EACCES       access to the key denied: Key Protect 401 after a fresh token, 403, or IAM
 *                 refusing the API key; local: keystore or key file not readable
 *   -EBADMSG      wrapped DEK does not unwrap (wrong key, AAD or corrupt)
 *   -EHOSTUNREACH, -ETIMEDOUT  service unreachable         -EINVAL       bad configuration
 *   -EIO          anything else
 *   -ECANCELED    kms_cancel was called, or kms_interrupt while the call was under way
 */

/* Open the backend cfg names. Checks configuration and that the keystore or credentials
 * are readable; does not require the key to be active (ask kms_key_state). Thread-safe object. */
int kms_open(const struct kms_config *cfg, struct kms **ret, struct kms_err *err);
void kms_free(struct kms *k);

/* The key id written into file headers (local: the key's uuid; keyprotect: the key id). */
const char *kms_key_id(const struct kms *k);

/* Wraps and unwraps asked of the service since kms_open, and how many of them failed (refused,
 * unreachable or cancelled): status figures. Thread-safe; the counts only grow. */
struct kms_counts {
	uint64_t wraps, unwraps, failed;
};
void kms_counts(const struct kms *k, struct kms_counts *ret);

/* Who the key is, as the service knows it now: a key named by alias or CRN resolves to its id. */
struct kms_key_info {
	char id[KMS_KEY_ID_MAX + 1];    /* the key's uuid (local: its uuid) */
	char crn[512];                  /* keyprotect: its CRN; local: "" */
	char name[256];                 /* keyprotect: its name; local: its name */
	char alias[256];                /* keyprotect: its first alias, "" for none; local: its name */
	int state;                      /* enum kms_key_state */
};

/* Resolve the key the backend was opened with (an alias, a CRN or an id) once, by asking the
 * service (Key Protect: GET /api/v2/keys/<key>/metadata). Returns 0 or an errno as kms_key_state. */
int kms_key_info(struct kms *k, struct kms_key_info *ret, struct kms_err *err);

/* Wrap a KMS_DEK_SIZE-byte DEK, binding it to the ordered associated strings aad[0..naad-1]. */
int kms_wrap(struct kms *k, const uint8_t dek[KMS_DEK_SIZE], const char *const *aad, size_t naad,
	     struct kms_wrapped *ret, struct kms_err *err);

/* Unwrap into dek_out (32 bytes, caller's sodium_malloc memory; zeroed on failure). When the service re-wrapped the
 * DEK with a newer key version and rewrapped is non-NULL, *rewrapped receives it and
 * *ret_was_rewrapped is set; otherwise *ret_was_rewrapped is false. */
int kms_unwrap(struct kms *k, const uint8_t *blob, size_t len, const char *const *aad, size_t naad,
	       uint8_t dek_out[KMS_DEK_SIZE], struct kms_wrapped *rewrapped, bool *ret_was_rewrapped,
	       struct kms_err *err);

/* Wipe any root key material the backend caches (the local keystore keeps the newest version
 * while its key file is unchanged); the next call reads it again. Key Protect wipes its token,
 * closes idle connections and its TLS session cache now and connections in use when their call
 * ends, and from then on caches no token and keeps no connection until a wrap or unwrap begun
 * after this succeeds. Safe while other threads are in calls. A locked mount calls this. */
void kms_forget(struct kms *k);

/* End every call under way at once and refuse new ones with -ECANCELED, for good: a daemon
 * that has unmounted stops without waiting out a request timeout of the key service. */
void kms_cancel(struct kms *k);

/* End every call under way now with -ECANCELED (a stalled one included); calls made afterwards
 * work as usual. A lock calls this so that it never waits for the key service. Thread-safe. */
void kms_interrupt(struct kms *k);

/*
 * Wraps and unwraps under way at once, at most (Key Protect: each on a keep-alive HTTP/1.1
 * connection of its own, closed after 10 s unused; the local keystore ignores it). The client
 * starts at n and, when the service answers 429 or 503, halves its window (once a second at
 * most); the refused call waits out its Retry-After, and every new wrap and unwrap does too once
 * the window is down to 1; it widens again by one a second while calls work (AIMD). Key state
 * reads (polls) are never held back. n is clamped to 1..KMS_CONCURRENCY_MAX. Call before use.
 * The default: 64 / 50 ms round trips = 1,280 calls/s, more than the 500 files/s a 50 ms KMS
 * must allow (32 capped it at 640 and gave 430-590 files/s).
 */
#define KMS_CONCURRENCY_DEFAULT 64
#define KMS_CONCURRENCY_MAX     128
void kms_set_concurrency(struct kms *k, unsigned n);

/*
 * Calls from the calling thread are made ahead of need (keys wrapped for files not yet created,
 * unwrapped for files not yet opened): they leave KMS_WAITED_SLOTS slots of the window free
 * (a quarter of a smaller one), so a wrap or unwrap someone waits for (an open, a create that
 * found the pool empty) never queues behind a refill or a prefetch, even when the service
 * stalls them all. Few suffice: the daemon's 10 request threads are all that can wait at once,
 * and every slot held back from calls made ahead costs their rate (a quarter of 64 cost
 * `find | xargs cat` at 20 ms a fifth of its files/s). A worker thread calls
 * this once, at its start.
 */
#define KMS_WAITED_SLOTS 4
void kms_thread_ahead(void);

/* Current state of the root key (enum kms_key_state). On success err may still carry a line
 * naming the answer (Key Protect: its correlation id), for the log of a transition. */
int kms_key_state(struct kms *k, int *ret_state, struct kms_err *err);

#endif
