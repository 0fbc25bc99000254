/* kms.c: the one key-service interface: picks the backend a volume names and checks every call's arguments */
#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sodium.h>

#include "keyfs/kms.h"
#include "kms-backend.h"
#include "kms-keyprotect.h"

struct kms {
	const struct kms_backend *ops;
	void *state;
	char key_id[KMS_KEY_ID_MAX + 1];
	char key[256];                  /* as the volume named it: kms_key_info of a local key */
	_Atomic uint64_t wraps, unwraps, failed;        /* kms_counts */
};

void kms_err_set(struct kms_err *err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
	va_end(ap);
}

const char *kms_state_name(int state)
{
	switch (state) {
	case KMS_STATE_PREACTIVE: return "pre-active";
	case KMS_STATE_ACTIVE: return "active";
	case KMS_STATE_SUSPENDED: return "suspended";
	case KMS_STATE_DEACTIVATED: return "deactivated";
	case KMS_STATE_DESTROYED: return "destroyed";
	case KMS_STATE_PURGED: return "purged";
	default: return "unknown";
	}
}

/* Callers may pass err = NULL; backends always get a buffer. */
static struct kms_err *err_or(struct kms_err *err, struct kms_err *scratch)
{
	err = err ? err : scratch;
	err->msg[0] = '\0';
	return err;
}

static int check_aad(const char *const *aad, size_t naad, struct kms_err *err)
{
	if (naad > KMS_AAD_MAX || (naad > 0 && !aad)) {
		kms_err_set(err, "kms: bad associated data (%zu strings)", naad);
		return -EINVAL;
	}
	for (size_t i = 0; i < naad; i++) {
		if (!aad[i]) {
			kms_err_set(err, "kms: associated data string %zu is missing", i);
			return -EINVAL;
		}
	}
	return 0;
}

static const char *given(const char *s)
{
	return s ? s : "";
}

int kms_open(const struct kms_config *given_cfg, struct kms **ret, struct kms_err *err)
{
	struct kms_config c, *cfg = &c;
	struct kms_err scratch;
	struct kms_backend_open o;
	struct kms *k;
	int r;

	err = err_or(err, &scratch);
	if (!given_cfg || !ret) {
		kms_err_set(err, "kms: no configuration given");
		return -EINVAL;
	}
	/* Backends see "" for every field not given. */
	c = (struct kms_config){
		.kms = given(given_cfg->kms), .key = given(given_cfg->key), .key_id = given(given_cfg->key_id),
		.keystore = given(given_cfg->keystore), .endpoint = given(given_cfg->endpoint),
		.instance = given(given_cfg->instance), .iam_endpoint = given(given_cfg->iam_endpoint),
		.apikey_file = given(given_cfg->apikey_file), .ca_file = given(given_cfg->ca_file),
	};
	/* Idempotent; done here so that it happens before the daemon starts its threads. */
	if (sodium_init() < 0) {
		kms_err_set(err, "kms: libsodium cannot be initialised");
		return -EIO;
	}
	memset(&o, 0, sizeof(o));
	if (strcmp(cfg->kms, KMS_KIND_LOCAL) == 0) {
		r = kms_local_open(cfg, &o, err);
	} else if (strcmp(cfg->kms, KMS_KIND_KEYPROTECT) == 0) {
		r = kms_keyprotect_open(cfg, &o, err);
	} else if (!cfg->kms[0]) {
		kms_err_set(err, "the volume description names no kms");
		r = -EINVAL;
	} else {
		kms_err_set(err, "unknown kms '%s': expected '%s' or '%s'", cfg->kms, KMS_KIND_LOCAL,
			    KMS_KIND_KEYPROTECT);
		r = -EINVAL;
	}
	if (r < 0)
		return r;
	k = calloc(1, sizeof(*k));
	if (!k) {
		o.ops->free(o.state);
		kms_err_set(err, "kms: out of memory");
		return -ENOMEM;
	}
	k->ops = o.ops;
	k->state = o.state;
	memcpy(k->key_id, o.key_id, sizeof(k->key_id));
	snprintf(k->key, sizeof(k->key), "%s", cfg->key);
	*ret = k;
	return 0;
}

void kms_free(struct kms *k)
{
	if (!k)
		return;
	k->ops->free(k->state);
	free(k);
}

void kms_forget(struct kms *k)
{
	if (k && k->ops->forget)
		k->ops->forget(k->state);
}

void kms_cancel(struct kms *k)
{
	if (k && k->ops->cancel)
		k->ops->cancel(k->state);
}

void kms_interrupt(struct kms *k)
{
	if (k && k->ops->interrupt)
		k->ops->interrupt(k->state);
}

static _Thread_local bool thread_ahead;

void kms_thread_ahead(void)
{
	thread_ahead = true;
}

bool kms_thread_is_ahead(void)
{
	return thread_ahead;
}

void kms_set_concurrency(struct kms *k, unsigned n)
{
	if (n < 1)
		n = 1;
	if (n > KMS_CONCURRENCY_MAX)
		n = KMS_CONCURRENCY_MAX;
	if (k && k->ops->set_concurrency)
		k->ops->set_concurrency(k->state, n);
}

const char *kms_key_id(const struct kms *k)
{
	return k->key_id;
}

int kms_wrap(struct kms *k, const uint8_t dek[KMS_DEK_SIZE], const char *const *aad, size_t naad,
	     struct kms_wrapped *ret, struct kms_err *err)
{
	struct kms_err scratch;
	int r;

	err = err_or(err, &scratch);
	if (!k || !dek || !ret) {
		kms_err_set(err, "kms: wrap called without a key, DEK or result");
		return -EINVAL;
	}
	r = check_aad(aad, naad, err);
	if (r < 0)
		return r;
	atomic_fetch_add(&k->wraps, 1);
	r = k->ops->wrap(k->state, dek, aad, naad, ret, err);
	if (r < 0)
		atomic_fetch_add(&k->failed, 1);
	return r;
}

int kms_unwrap(struct kms *k, const uint8_t *blob, size_t len, const char *const *aad, size_t naad,
	       uint8_t dek_out[KMS_DEK_SIZE], struct kms_wrapped *rewrapped, bool *ret_was_rewrapped,
	       struct kms_err *err)
{
	struct kms_err scratch;
	int r;

	err = err_or(err, &scratch);
	if (!k || !dek_out || (!blob && len > 0)) {
		kms_err_set(err, "kms: unwrap called without a key, blob or DEK buffer");
		return -EINVAL;
	}
	if (len == 0 || len > KMS_WRAPPED_MAX) {
		kms_err_set(err, "wrapped key has a bad length (%zu bytes)", len);
		return -EBADMSG;
	}
	r = check_aad(aad, naad, err);
	if (r < 0)
		return r;
	atomic_fetch_add(&k->unwraps, 1);
	r = k->ops->unwrap(k->state, blob, len, aad, naad, dek_out, rewrapped, ret_was_rewrapped, err);
	if (r < 0)
		atomic_fetch_add(&k->failed, 1);
	return r;
}

void kms_counts(const struct kms *k, struct kms_counts *ret)
{
	ret->wraps = k ? atomic_load(&k->wraps) : 0;
	ret->unwraps = k ? atomic_load(&k->unwraps) : 0;
	ret->failed = k ? atomic_load(&k->failed) : 0;
}

int kms_key_info(struct kms *k, struct kms_key_info *ret, struct kms_err *err)
{
	struct kms_err scratch;
	int r;

	err = err_or(err, &scratch);
	if (!k || !ret) {
		kms_err_set(err, "kms: key_info called without a key or result");
		return -EINVAL;
	}
	memset(ret, 0, sizeof(*ret));
	if (k->ops->key_info)
		return k->ops->key_info(k->state, ret, err);
	/* A backend that cannot say more: the id it was opened with, and its state. */
	snprintf(ret->id, sizeof(ret->id), "%s", k->key_id);
	if (strcmp(k->key, k->key_id) != 0) {
		snprintf(ret->name, sizeof(ret->name), "%s", k->key);
		snprintf(ret->alias, sizeof(ret->alias), "%s", k->key);
	}
	r = k->ops->key_state(k->state, &ret->state, err);
	return r;
}

int kms_key_state(struct kms *k, int *ret_state, struct kms_err *err)
{
	struct kms_err scratch;

	err = err_or(err, &scratch);
	if (!k || !ret_state) {
		kms_err_set(err, "kms: key_state called without a key or result");
		return -EINVAL;
	}
	return k->ops->key_state(k->state, ret_state, err);
}
