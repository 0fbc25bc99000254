/* filekeys.c: a file's keys for keyfs and keyfsctl alike: which header slot opens, new keys, a re-wrapped header stored */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include <sodium.h>

#include "keyfs/volkeys.h"

/* keyclient has its own sizes; where it meets the format they must be the same. */
_Static_assert(KMS_DEK_SIZE == FMT_DEK_SIZE, "a DEK is as large to the key service as to the format");
_Static_assert(KMS_WRAPPED_MAX == FMT_WRAPPED_MAX, "a wrapped DEK fits a header");
_Static_assert(KMS_KEY_VERSION_MAX == FMT_KEY_VERSION_MAX, "a key version fits a header");
_Static_assert(KMS_KEY_ID_MAX == FMT_KEY_ID_MAX, "a key id fits a header");
_Static_assert(sizeof(KMS_KIND_LOCAL) == sizeof(VOLDESC_KMS_LOCAL) &&
	       sizeof(KMS_KIND_KEYPROTECT) == sizeof(VOLDESC_KMS_KEYPROTECT),
	       "the description names the backends as keyclient does");

void vol_file_aad(const char *volume, const uint8_t file_id[FMT_FILE_ID_SIZE], struct vol_aad *ret)
{
	fmt_file_id_hex(file_id, ret->file_id_hex);
	ret->aad[0] = volume;
	ret->aad[1] = ret->file_id_hex;
}

void vol_kms_config(const struct voldesc *d, struct kms_config *cfg)
{
	*cfg = (struct kms_config){
		.kms = d->kms, .key = d->key, .key_id = d->key_id, .keystore = d->keystore,
		.endpoint = d->endpoint, .instance = d->instance, .iam_endpoint = d->iam_endpoint,
		.ca_file = d->ca_file,
	};
}

/* The one place a DEK is made. */
static void new_dek(uint8_t *dek)
{
	randombytes_buf(dek, FMT_DEK_SIZE);
}

int vol_kms_probe(struct kms *kms, const char *volume, bool unwrap, struct kms_wrapped *w,
		  struct kms_err *err, enum vol_probe_step *ret_step)
{
	static const uint8_t no_file[FMT_FILE_ID_SIZE];
	uint8_t *dek = sodium_malloc(2 * KMS_DEK_SIZE);
	struct vol_aad a;
	bool rewrapped;
	int r;

	*ret_step = VOL_PROBE_WRAP;
	if (!dek)
		return -ENOMEM;
	new_dek(dek);
	vol_file_aad(volume, no_file, &a);
	r = kms_wrap(kms, dek, a.aad, VOL_AAD_COUNT, w, err);
	if (r == 0 && unwrap) {
		*ret_step = VOL_PROBE_UNWRAP;
		r = kms_unwrap(kms, w->blob, w->len, a.aad, VOL_AAD_COUNT, dek + KMS_DEK_SIZE, NULL, &rewrapped, err);
		if (r == 0 && sodium_memcmp(dek, dek + KMS_DEK_SIZE, KMS_DEK_SIZE) != 0) {
			*ret_step = VOL_PROBE_COMPARE;
			r = -EBADMSG;
		}
	}
	sodium_free(dek);
	return r;
}

int vol_keys_open(struct kms *kms, const char *volume, const struct content_headers *hs, uint8_t *dek,
		  struct fmt_keys *keys, struct kms_wrapped *rewrapped, struct vol_opened *ret)
{
	struct vol_aad a;
	unsigned i;
	int r;

	memset(ret, 0, sizeof(*ret));
	/* Newest slot first; an older one serves when a rewrite of the newer was torn. */
	for (i = 0; i < hs->count; i++) {
		ret->tried = i + 1;
		vol_file_aad(volume, hs->hdr[i].file_id, &a);
		r = kms_unwrap(kms, hs->hdr[i].wrapped, hs->hdr[i].wrapped_len, a.aad, VOL_AAD_COUNT, dek, rewrapped,
			       &ret->was_rewrapped, &ret->slot[i].err);
		ret->slot[i].r = r;
		if (r == -EBADMSG) {
			ret->slot[i].why = VOL_SLOT_NO_UNWRAP;
			continue;
		}
		if (r < 0) {
			ret->slot[i].why = VOL_SLOT_KMS;
			return r;
		}
		r = fmt_keys_derive(dek, hs->hdr[i].cipher, keys);
		if (r < 0) {
			/* This process cannot open the file's chunks (libcrypto has no AES-256). */
			ret->slot[i].why = VOL_SLOT_KMS;
			ret->slot[i].r = r;
			snprintf(ret->slot[i].err.msg, sizeof(ret->slot[i].err.msg),
				 "cannot use the file's cipher %s here", fmt_cipher_name(hs->hdr[i].cipher));
			sodium_memzero(dek, KMS_DEK_SIZE);
			return r;
		}
		if (fmt_header_verify(hs->raw[i], keys) == 0)
			return (int)i;
		ret->slot[i].why = VOL_SLOT_NO_AUTH;
		ret->was_rewrapped = false;
	}
	sodium_memzero(dek, KMS_DEK_SIZE);
	sodium_memzero(keys, sizeof(*keys));
	return -EBADMSG;
}

void vol_keys_generate(uint8_t *dek, uint8_t file_id[FMT_FILE_ID_SIZE])
{
	new_dek(dek);
	do
		randombytes_buf(file_id, FMT_FILE_ID_SIZE);
	while (sodium_is_zero(file_id, FMT_FILE_ID_SIZE));
}

int vol_keys_wrap(struct kms *kms, const char *volume, const uint8_t file_id[FMT_FILE_ID_SIZE], const uint8_t *dek,
		  struct kms_wrapped *ret, struct kms_err *err)
{
	struct vol_aad a;

	vol_file_aad(volume, file_id, &a);
	return kms_wrap(kms, dek, a.aad, VOL_AAD_COUNT, ret, err);
}

int vol_keys_new(struct kms *kms, const char *volume, uint8_t *dek, uint8_t file_id[FMT_FILE_ID_SIZE],
		 struct kms_wrapped *ret, struct kms_err *err)
{
	int r;

	vol_keys_generate(dek, file_id);
	r = vol_keys_wrap(kms, volume, file_id, dek, ret, err);
	if (r < 0) {
		sodium_memzero(dek, FMT_DEK_SIZE);
		sodium_memzero(file_id, FMT_FILE_ID_SIZE);
	}
	return r;
}

int vol_keys_header(const char *key_id, const uint8_t file_id[FMT_FILE_ID_SIZE], const struct kms_wrapped *w,
		    const uint8_t *dek, enum fmt_layout layout, uint8_t cipher, struct fmt_keys *keys,
		    uint8_t raw[FMT_HEADER_SIZE])
{
	struct fmt_header h;
	int r;

	memset(&h, 0, sizeof(h));
	h.generation = 1;
	h.version = layout == FMT_LAYOUT_V2 ? FMT_LAYOUT_V2 : FMT_LAYOUT_V1;
	memcpy(h.file_id, file_id, FMT_FILE_ID_SIZE);
	snprintf(h.key_id, sizeof(h.key_id), "%s", key_id);
	snprintf(h.key_version, sizeof(h.key_version), "%s", w->key_version);
	memcpy(h.wrapped, w->blob, w->len);
	h.wrapped_len = w->len;
	r = fmt_keys_derive(dek, layout == FMT_LAYOUT_V2 ? cipher : FMT_CIPHER_XCHACHA20_POLY1305, keys);
	if (r < 0)
		return r;
	return fmt_header_encode(&h, keys, raw) < 0 ? -EINVAL : 0;
}

int vol_header_lock(int fd, bool required, bool *locked)
{
	int r = content_header_lock(fd);

	*locked = r == 0;
	if (!required && (r == -ENOLCK || r == -EOPNOTSUPP || r == -EINVAL))
		r = 0;
	return r;
}

void vol_header_unlock(int fd, bool locked)
{
	if (locked)
		content_header_unlock(fd);
}

int vol_header_init(int fd, const uint8_t raw[FMT_HEADER_SIZE])
{
	bool locked;
	int r = vol_header_lock(fd, false, &locked);

	if (r == 0) {
		struct stat st;

		/* Another daemon of a shared volume may have given the file its header since the
		 * caller found it empty: that header stays, and the caller loads it. */
		if (fstat(fd, &st) < 0)
			r = -errno;
		else if (st.st_size != 0)
			r = -EEXIST;
		else
			r = content_header_init(fd, raw);
		vol_header_unlock(fd, locked);
	}
	return r;
}

/* Whether slot still holds raw, the header that authenticated. */
static bool slot_unchanged(const struct content_headers *hs, unsigned slot, const uint8_t raw[FMT_HEADER_SIZE])
{
	for (unsigned i = 0; i < hs->count; i++)
		if (hs->slot[i] == slot)
			return memcmp(hs->raw[i], raw, FMT_HEADER_SIZE) == 0;
	return false;
}

int vol_keys_store(int fd, unsigned slot, const struct fmt_header *hdr, const uint8_t raw[FMT_HEADER_SIZE],
		   const struct kms_wrapped *w, const struct fmt_keys *keys, bool lock_required,
		   struct vol_stored *ret)
{
	struct content_headers now;
	struct fmt_header h = *hdr;
	uint8_t out[FMT_HEADER_SIZE];
	bool locked;
	int r;

	ret->slot = 1 - slot;
	ret->generation = hdr->generation;
	ret->step = VOL_STORE_ENCODE;
	if (w) {
		memcpy(h.wrapped, w->blob, w->len);
		h.wrapped_len = w->len;
		snprintf(h.key_version, sizeof(h.key_version), "%s", w->key_version);
		h.generation = fmt_generation_next(hdr->generation);
		r = fmt_header_encode(&h, keys, out);
		if (r < 0)
			return r;
		ret->generation = h.generation;
	}
	ret->step = VOL_STORE_LOCK;
	r = vol_header_lock(fd, lock_required, &locked);
	if (r < 0)
		return r;
	/* Read again under the lock: the other side may have stored a newer one meanwhile. */
	r = content_headers_read(fd, (enum fmt_layout)hdr->version, &now);
	if (r < 0 || !slot_unchanged(&now, slot, raw)) {
		vol_header_unlock(fd, locked);
		return VOL_STORE_CHANGED;
	}
	ret->step = VOL_STORE_WRITE;
	r = w ? content_header_rewrite(fd, ret->slot, out) : content_header_clear(fd, ret->slot);
	vol_header_unlock(fd, locked);
	return r;
}
