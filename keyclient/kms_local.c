/* kms_local.c: the local keystore backend: wraps DEKs with XChaCha20-Poly1305 under a key file's material */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <sodium.h>

#include "keyfs/keystore.h"
#include "keyfs/kms.h"
#include "keystore-priv.h"
#include "kms-backend.h"

/*
 * The wrapped blob, 77 bytes, opaque to everything outside this file:
 *   offset  0   1 byte   blob format, 1
 *   offset  1   4 bytes  key version number, little endian (the key file's "version=N")
 *   offset  5  24 bytes  random nonce
 *   offset 29  48 bytes  XChaCha20-Poly1305 ciphertext of the 32-byte DEK, then its 16-byte tag
 * Associated data: "keyfs-local-wrap-v1", then for each aad string its length (1 byte) and bytes,
 * so { "ab", "c" } and { "a", "bc" } differ. Nothing else is bound: a blob moved to another
 * volume or file, or opened with another key or version, does not authenticate.
 */
#define BLOB_FORMAT     1
#define BLOB_NONCE_OFF  5
#define BLOB_CT_OFF     (BLOB_NONCE_OFF + crypto_aead_xchacha20poly1305_ietf_NPUBBYTES)
#define BLOB_CT_SIZE    (KMS_DEK_SIZE + crypto_aead_xchacha20poly1305_ietf_ABYTES)
#define BLOB_SIZE       (BLOB_CT_OFF + BLOB_CT_SIZE)
#define WRAP_DOMAIN     "keyfs-local-wrap-v1"
#define AAD_STRING_MAX  255
#define AD_MAX          (sizeof(WRAP_DOMAIN) - 1 + KMS_AAD_MAX * (1 + AAD_STRING_MAX))

_Static_assert(BLOB_SIZE == 77, "local wrapped blob is 77 bytes");
_Static_assert(BLOB_SIZE <= KMS_WRAPPED_MAX, "local wrapped blob fits a header");
_Static_assert(crypto_aead_xchacha20poly1305_ietf_KEYBYTES == KEYSTORE_MATERIAL_SIZE, "key size");

struct kms_local {
	/* Immutable after open. */
	char dir[PATH_MAX];
	char name[KEYSTORE_NAME_MAX + 1];
	char id[37];                    /* the key the volume is bound to */
	char path[PATH_MAX + KEYSTORE_NAME_MAX + 8];    /* the key file */

	/*
	 * The newest version's material, kept while the state file and the material file are
	 * unchanged: re-reading and parsing them cost 0.7 ms a call, which bounded file creation.
	 * keyfsctl replaces state files by rename, so a suspend, destroy or new version changes
	 * the inode or ctime, and a material file overwritten in place changes its mtime: the next
	 * call reloads. lock guards everything below; it is held across one AEAD of 32 bytes, and
	 * across the reload itself (a local file read), never across anything slower.
	 */
	pthread_mutex_t lock;
	bool cached;
	struct stat st;
	struct keystore_info info;
	struct keystore_material *mat;  /* sodium_malloc */
};

static bool same_file(const struct stat *a, const struct stat *b)
{
	return a->st_dev == b->st_dev && a->st_ino == b->st_ino && a->st_size == b->st_size &&
	       a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec &&
	       a->st_ctim.tv_sec == b->st_ctim.tv_sec && a->st_ctim.tv_nsec == b->st_ctim.tv_nsec;
}

static int build_ad(const char *const *aad, size_t naad, uint8_t *ad, size_t *ret_len, struct kms_err *err)
{
	size_t pos = sizeof(WRAP_DOMAIN) - 1;

	memcpy(ad, WRAP_DOMAIN, pos);
	for (size_t i = 0; i < naad; i++) {
		size_t n = strlen(aad[i]);

		if (n > AAD_STRING_MAX) {
			kms_err_set(err, "local kms: associated data string %zu is longer than %d bytes", i, AAD_STRING_MAX);
			return -EINVAL;
		}
		ad[pos++] = (uint8_t)n;
		memcpy(ad + pos, aad[i], n);
		pos += n;
	}
	*ret_len = pos;
	return 0;
}

/* Keystore errors become the errnos every backend shares (kms.h). */
static int map_keystore_error(int r)
{
	switch (r) {
	case -ENOENT:
	case -EACCES:
	case -EINVAL:
	case -ETIMEDOUT:
	case -ENOMEM:
		return r;
	case -EPERM:
		return -EACCES;
	case -ENOTDIR:
		return -EINVAL;
	default:
		return -EIO;
	}
}

/*
 * Read the key file afresh: a suspend or destroy by keyfsctl takes effect at the next call,
 * and material stays in memory no longer than one call. A key file whose id is not the
 * volume's means the volume's key is gone and the name was reused: -EKEYREVOKED.
 * A state file that exists but does not parse (zeroed, garbage: a shred without -u) is a
 * destroyed key, as a damaged material file is (keystore_load says so in info): no outage, so
 * no grace. Only trouble reading the keystore (permissions, I/O) is an error.
 */
static int local_load(const struct kms_local *kl, unsigned want, struct keystore_info *info,
		      struct keystore_material *mat, struct kms_err *err)
{
	int r;

	r = keystore_load(kl->dir, kl->name, want, info, mat, err->msg, sizeof(err->msg));
	if (r == -EUCLEAN) {
		memset(info, 0, sizeof(*info));
		snprintf(info->name, sizeof(info->name), "%s", kl->name);
		snprintf(info->id, sizeof(info->id), "%s", kl->id);
		info->state = KMS_STATE_DESTROYED;
		snprintf(info->note, sizeof(info->note), "%s: the key counts as destroyed", err->msg);
		kms_err_set(err, "%s", info->note);
		if (mat) {
			sodium_memzero(mat->key, sizeof(mat->key));
			mat->version = 0;
		}
		return 0;
	}
	if (r < 0)
		return map_keystore_error(r);
	if (strcmp(info->id, kl->id) != 0) {
		kms_err_set(err, "key '%s' in keystore '%s' has id %s, but this volume's key is %s: that key was destroyed and its name reused",
			    kl->name, kl->dir, info->id, kl->id);
		if (mat) {
			sodium_memzero(mat->key, sizeof(mat->key));
			mat->version = 0;
		}
		return -EKEYREVOKED;
	}
	return 0;
}

static int state_error(const struct kms_local *kl, const struct keystore_info *info, bool wrap, struct kms_err *err)
{
	int state = info->state;

	switch (state) {
	case KMS_STATE_ACTIVE:
		return 0;
	case KMS_STATE_DEACTIVATED:
		if (!wrap)
			return 0;
		kms_err_set(err, "key '%s' in keystore '%s' is deactivated: it unwraps existing keys but wraps no new ones",
			    kl->name, kl->dir);
		return -EKEYEXPIRED;
	case KMS_STATE_DESTROYED:
		if (info->note[0])
			kms_err_set(err, "key '%s' in keystore '%s': %s", kl->name, kl->dir, info->note);
		else
			kms_err_set(err, "key '%s' in keystore '%s' is destroyed", kl->name, kl->dir);
		return -EKEYREVOKED;
	default:
		kms_err_set(err, "key '%s' in keystore '%s' is %s: enable it with 'keyfsctl key enable %s --keystore %s'",
			    kl->name, kl->dir, kms_state_name(state), kl->name, kl->dir);
		return -ENOKEY;
	}
}

/*
 * Material of version want (0: the newest) for a wrap or an unwrap, with the key's state checked.
 * On success kl->lock is held and *ret_mat is valid until local_release().
 */
static int local_acquire(struct kms_local *kl, unsigned want, bool wrap, const struct keystore_material **ret_mat,
			 struct kms_err *err)
{
	struct keystore_info info;
	struct stat st, mst;
	bool have_st = stat(kl->path, &st) == 0;
	int r;

	pthread_mutex_lock(&kl->lock);
	/* The material file's stat too: a shred in place leaves the state file as it was. */
	if (!(have_st && kl->cached && same_file(&st, &kl->st) && (want == 0 || want == kl->mat->version) &&
	      stat(kl->mat->path, &mst) == 0 && same_file(&mst, &kl->mat->st))) {
		/* The stat comes first: a change racing with the reload makes the next call reload. */
		kl->cached = false;
		r = local_load(kl, want, &info, kl->mat, err);
		if (r < 0)
			goto fail;
		kl->info = info;
		kl->st = st;
		kl->cached = have_st && want == 0;
	}
	r = state_error(kl, &kl->info, wrap, err);
	if (r < 0)
		goto fail;
	if (kl->mat->version == 0 || (want && kl->mat->version != want)) {
		if (want)
			kms_err_set(err, "key '%s' in keystore '%s' has no version %u", kl->name, kl->dir, want);
		else
			kms_err_set(err, "key '%s' in keystore '%s' has no key material", kl->name, kl->dir);
		r = want ? -EBADMSG : -EIO;
		goto fail;
	}
	*ret_mat = kl->mat;
	return 0;
fail:
	pthread_mutex_unlock(&kl->lock);
	return r;
}

static void local_release(struct kms_local *kl)
{
	pthread_mutex_unlock(&kl->lock);
}

static struct keystore_material *material_new(struct kms_err *err)
{
	struct keystore_material *mat = sodium_malloc(sizeof(*mat));

	if (!mat)
		kms_err_set(err, "local kms: out of locked memory");
	else
		mat->version = 0;
	return mat;
}

static void material_free(struct keystore_material *mat)
{
	if (!mat)
		return;
	sodium_memzero(mat, sizeof(*mat));
	sodium_free(mat);
}

static int local_wrap(void *state, const uint8_t dek[KMS_DEK_SIZE], const char *const *aad, size_t naad,
		      struct kms_wrapped *ret, struct kms_err *err)
{
	struct kms_local *kl = state;
	const struct keystore_material *mat;
	struct kms_wrapped out;
	uint8_t ad[AD_MAX];
	unsigned long long ctlen = 0;
	size_t adlen;
	int r;

	r = build_ad(aad, naad, ad, &adlen, err);
	if (r < 0)
		return r;
	r = local_acquire(kl, 0, true, &mat, err);
	if (r < 0)
		return r;
	memset(&out, 0, sizeof(out));
	out.blob[0] = BLOB_FORMAT;
	out.blob[1] = (uint8_t)mat->version;
	out.blob[2] = (uint8_t)(mat->version >> 8);
	out.blob[3] = (uint8_t)(mat->version >> 16);
	out.blob[4] = (uint8_t)(mat->version >> 24);
	randombytes_buf(out.blob + BLOB_NONCE_OFF, crypto_aead_xchacha20poly1305_ietf_NPUBBYTES);
	if (crypto_aead_xchacha20poly1305_ietf_encrypt(out.blob + BLOB_CT_OFF, &ctlen, dek, KMS_DEK_SIZE, ad, adlen,
						       NULL, out.blob + BLOB_NONCE_OFF, mat->key) != 0 ||
	    ctlen != BLOB_CT_SIZE) {
		kms_err_set(err, "local kms: encryption failed");
		r = -EIO;
		goto out;
	}
	out.len = BLOB_SIZE;
	snprintf(out.key_version, sizeof(out.key_version), "%u", mat->version);
	*ret = out;
	r = 0;
out:
	local_release(kl);
	return r;
}

static int local_unwrap(void *state, const uint8_t *blob, size_t len, const char *const *aad, size_t naad,
			uint8_t dek_out[KMS_DEK_SIZE], struct kms_wrapped *rewrapped, bool *ret_was_rewrapped,
			struct kms_err *err)
{
	struct kms_local *kl = state;
	const struct keystore_material *mat;
	uint8_t ad[AD_MAX];
	unsigned long long ptlen = 0;
	unsigned version;
	size_t adlen;
	int r;

	if (len != BLOB_SIZE || blob[0] != BLOB_FORMAT) {
		kms_err_set(err, "wrapped key (%zu bytes) is not from the local keystore", len);
		return -EBADMSG;
	}
	version = (unsigned)blob[1] | (unsigned)blob[2] << 8 | (unsigned)blob[3] << 16 | (unsigned)blob[4] << 24;
	if (version == 0) {
		kms_err_set(err, "wrapped key names key version 0, which never exists");
		return -EBADMSG;
	}
	r = build_ad(aad, naad, ad, &adlen, err);
	if (r < 0)
		return r;
	r = local_acquire(kl, version, false, &mat, err);
	if (r < 0)
		return r;
	if (crypto_aead_xchacha20poly1305_ietf_decrypt(dek_out, &ptlen, NULL, blob + BLOB_CT_OFF, BLOB_CT_SIZE,
						       ad, adlen, blob + BLOB_NONCE_OFF, mat->key) != 0 ||
	    ptlen != KMS_DEK_SIZE) {
		sodium_memzero(dek_out, KMS_DEK_SIZE);
		kms_err_set(err, "wrapped key does not unwrap with key '%s' version %u: another volume, file or key, or damaged",
			    kl->name, version);
		r = -EBADMSG;
		goto out;
	}
	/* The local backend never re-wraps: rotation re-wraps through 'keyfsctl rewrap'. */
	(void)rewrapped;
	if (ret_was_rewrapped)
		*ret_was_rewrapped = false;
	r = 0;
out:
	local_release(kl);
	return r;
}

static int local_key_state(void *state, int *ret_state, struct kms_err *err)
{
	const struct kms_local *kl = state;
	struct keystore_info info;
	int r;

	r = local_load(kl, 0, &info, NULL, err);
	/* The key file (or the whole keystore) removed, or replaced by another key: like a 404. */
	if (r == -ENOENT || r == -EKEYREVOKED) {
		*ret_state = KMS_STATE_PURGED;
		return 0;
	}
	if (r < 0)
		return r;
	*ret_state = info.state;
	return 0;
}

static void local_forget(void *state)
{
	struct kms_local *kl = state;

	pthread_mutex_lock(&kl->lock);
	kl->cached = false;
	sodium_memzero(kl->mat, sizeof(*kl->mat));
	pthread_mutex_unlock(&kl->lock);
}

static void local_free(void *state)
{
	struct kms_local *kl = state;

	if (!kl)
		return;
	material_free(kl->mat);
	pthread_mutex_destroy(&kl->lock);
	free(kl);
}

static const struct kms_backend local_backend = {
	.name = KMS_KIND_LOCAL,
	.wrap = local_wrap,
	.unwrap = local_unwrap,
	.key_state = local_key_state,
	.forget = local_forget,
	.free = local_free,
};

int kms_local_open(const struct kms_config *cfg, struct kms_backend_open *ret, struct kms_err *err)
{
	struct keystore_info info;
	struct kms_local *kl;
	const char *dir;
	char defdir[PATH_MAX];
	int r, n;

	if (cfg->keystore[0]) {
		dir = cfg->keystore;
	} else {
		r = keystore_default_dir(defdir, sizeof(defdir));
		if (r < 0) {
			kms_err_set(err, "no keystore dir given and no default: %s", strerrordesc_np(-r));
			return -EINVAL;
		}
		dir = defdir;
	}
	if (!cfg->key[0]) {
		kms_err_set(err, "the volume description names no key");
		return -EINVAL;
	}
	if (keystore_name_valid(cfg->key) < 0) {
		kms_err_set(err, "'%s' is not a valid local key name", cfg->key);
		return -EINVAL;
	}
	kl = calloc(1, sizeof(*kl));
	if (!kl) {
		kms_err_set(err, "local kms: out of memory");
		return -ENOMEM;
	}
	pthread_mutex_init(&kl->lock, NULL);
	kl->mat = material_new(err);
	if (!kl->mat) {
		r = -ENOMEM;
		goto fail;
	}
	n = snprintf(kl->dir, sizeof(kl->dir), "%s", dir);
	if (n < 0 || (size_t)n >= sizeof(kl->dir)) {
		kms_err_set(err, "keystore '%s': path too long", dir);
		r = -ENAMETOOLONG;
		goto fail;
	}
	n = snprintf(kl->name, sizeof(kl->name), "%s", cfg->key);
	if (n < 0 || (size_t)n >= sizeof(kl->name)) {
		r = -EINVAL;
		goto fail;
	}
	n = snprintf(kl->path, sizeof(kl->path), "%s/%s.key", kl->dir, kl->name);
	if (n < 0 || (size_t)n >= sizeof(kl->path)) {
		kms_err_set(err, "keystore '%s': path too long", dir);
		r = -ENAMETOOLONG;
		goto fail;
	}
	r = keystore_load(kl->dir, kl->name, 0, &info, NULL, err->msg, sizeof(err->msg));
	/* A damaged key file of a volume that names its key id: open, and let the key state say
	 * destroyed (the mount comes up locked). */
	if (r == -EUCLEAN && cfg->key_id[0])
		r = 0;
	if (r < 0) {
		r = map_keystore_error(r);
		goto fail;
	}
	/* A volume stays bound to the key it was made with, even when the name is reused later. */
	n = snprintf(kl->id, sizeof(kl->id), "%s", cfg->key_id[0] ? cfg->key_id : info.id);
	if (n < 0 || (size_t)n >= sizeof(kl->id)) {
		kms_err_set(err, "the volume's key id '%s' is not a local key id", cfg->key_id);
		r = -EINVAL;
		goto fail;
	}
	ret->ops = &local_backend;
	ret->state = kl;
	snprintf(ret->key_id, sizeof(ret->key_id), "%s", kl->id);
	return 0;
fail:
	local_free(kl);
	return r;
}
