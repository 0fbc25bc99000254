/* kms.h: the one key-service interface (wrap, unwrap, key state) over the local and Key Protect backends */
#ifndef KEYFS_KMS_H
#define KEYFS_KMS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "keyfs/format.h"
#include "keyfs/voldesc.h"

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

struct kms_config {
	const struct voldesc *vol;      /* kms kind, key, keystore or endpoint */
	const char *keystore;           /* local: overrides vol->keystore when non-NULL */
	const char *apikey_file;        /* keyprotect: API key file, else $CREDENTIALS_DIRECTORY/apikey */
	const char *ca_file;            /* keyprotect: extra trusted CA bundle */
};

/* A wrapped DEK as stored in a file header. */
struct kms_wrapped {
	uint8_t blob[FMT_WRAPPED_MAX];
	size_t len;
	char key_version[FMT_KEY_VERSION_MAX + 1];
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

/* Open the backend the volume names. Checks configuration and that the keystore or credentials
 * are readable; does not require the key to be active (ask kms_key_state). Thread-safe object. */
int kms_open(const struct kms_config *cfg, struct kms **ret, struct kms_err *err);
void kms_free(struct kms *k);

/* The key id written into file headers (local: the key's uuid; keyprotect: the key id). */
const char *kms_key_id(const struct kms *k);

/* Wrap a 32-byte DEK, binding it to the ordered associated strings aad[0..naad-1]. */
int kms_wrap(struct kms *k, const uint8_t dek[FMT_DEK_SIZE], const char *const *aad, size_t naad,
	     struct kms_wrapped *ret, struct kms_err *err);

/* Unwrap into dek_out (32 bytes, caller's sodium_malloc memory; zeroed on failure). When the service re-wrapped the
 * DEK with a newer key version and rewrapped is non-NULL, *rewrapped receives it and
 * *ret_was_rewrapped is set; otherwise *ret_was_rewrapped is false. */
int kms_unwrap(struct kms *k, const uint8_t *blob, size_t len, const char *const *aad, size_t naad,
	       uint8_t dek_out[FMT_DEK_SIZE], struct kms_wrapped *rewrapped, bool *ret_was_rewrapped,
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

/* Current state of the root key (enum kms_key_state). On success err may still carry a line
 * naming the answer (Key Protect: its correlation id), for the log of a transition. */
int kms_key_state(struct kms *k, int *ret_state, struct kms_err *err);

/* The associated data keyfs binds every wrapped DEK to: { volume uuid, file id hex }. */
#define KMS_AAD_COUNT 2
void kms_file_aad(const char *volume_uuid, const char file_id_hex[2 * FMT_FILE_ID_SIZE + 1],
		  const char *aad[KMS_AAD_COUNT]);

#endif
