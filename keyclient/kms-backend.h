/* kms-backend.h: the backend vtable behind struct kms, private to keyclient/ */
#ifndef KEYFS_KMS_BACKEND_H
#define KEYFS_KMS_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "keyfs/kms.h"

/*
 * One backend. The state pointer is the backend's own object; kms.c never looks inside.
 * wrap, unwrap and key_state are called concurrently from many threads: a backend keeps its
 * state immutable after open or locks it itself. err is never NULL here (kms.c sees to that);
 * arguments were checked by kms.c (pointers, naad <= KMS_AAD_MAX, each aad non-NULL), and every
 * string of the kms_config an open gets is non-NULL ("" when not given).
 */
struct kms_backend {
	const char *name;
	int (*wrap)(void *state, const uint8_t dek[KMS_DEK_SIZE], const char *const *aad, size_t naad,
		    struct kms_wrapped *ret, struct kms_err *err);
	int (*unwrap)(void *state, const uint8_t *blob, size_t len, const char *const *aad, size_t naad,
		      uint8_t dek_out[KMS_DEK_SIZE], struct kms_wrapped *rewrapped, bool *ret_was_rewrapped,
		      struct kms_err *err);
	int (*key_state)(void *state, int *ret_state, struct kms_err *err);
	int (*key_info)(void *state, struct kms_key_info *ret, struct kms_err *err);    /* optional */
	void (*forget)(void *state);    /* optional: wipe cached key material */
	void (*cancel)(void *state);    /* optional: end calls under way and refuse new ones */
	void (*interrupt)(void *state); /* optional: end calls under way; new ones proceed */
	void (*set_concurrency)(void *state, unsigned n);      /* optional: see kms_set_concurrency */
	void (*free)(void *state);
};

/* Whether this thread called kms_thread_ahead: its calls leave room for the ones someone waits for. */
bool kms_thread_is_ahead(void);

/* Most associated strings any caller passes (keyfs passes two: volume uuid and file id). */
#define KMS_AAD_MAX 8

/* What a backend's open hands back to kms_open. */
struct kms_backend_open {
	const struct kms_backend *ops;
	void *state;
	char key_id[KMS_KEY_ID_MAX + 1];
};

/* The local keystore backend (kms_local.c). */
int kms_local_open(const struct kms_config *cfg, struct kms_backend_open *ret, struct kms_err *err);

/* Write a one-line message into err (truncated to fit). */
void kms_err_set(struct kms_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
