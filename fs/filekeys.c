/* filekeys.c: per-file keys: read, unwrap and verify a header, or give an empty file a new one */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <sodium.h>

#include "keyfs/log.h"

#include "filekeys.h"

/* A KMS or format failure as the errno a file operation answers with. */
static int file_errno(int r)
{
	switch (r) {
	case -ENOKEY:
	case -EKEYREVOKED:
	case -EKEYEXPIRED:
	case -ENOMEM:
	case -EMFILE:
	case -ENFILE:
		return r;
	default:
		return -EIO;
	}
}

static void fill(const struct kfs_inode *inode, int fd, struct content_file *cf)
{
	cf->fd = fd;
	cf->keys = inode->keys;
	memcpy(cf->file_id, inode->file_id, FMT_FILE_ID_SIZE);
}

/* Store a DEK the service re-wrapped with a newer key version, in the slot not in use, with
 * the next generation: until that write is durable the current slot still authenticates.
 * Best effort: the old blob keeps unwrapping while the service keeps that key version. */
static void header_rewrite(struct kfs_inode *inode, const struct fmt_header *old,
			   const struct kms_wrapped *w, const struct fmt_keys *keys)
{
	struct fmt_header h = *old;
	uint8_t raw[FMT_HEADER_SIZE];
	char proc[32], label[64];
	unsigned slot = 1 - inode->header_slot;
	int fd, r = -EOVERFLOW;

	inode_label(inode, label, sizeof(label));
	memcpy(h.wrapped, w->blob, w->len);
	h.wrapped_len = w->len;
	snprintf(h.key_version, sizeof(h.key_version), "%s", w->key_version);
	if (old->generation < UINT32_MAX) {
		h.generation = old->generation + 1;
		r = fmt_header_encode(&h, keys, raw);
	}
	if (r == 0) {
		snprintf(proc, sizeof(proc), "/proc/self/fd/%d", inode->fd);
		fd = open(proc, O_WRONLY | O_CLOEXEC);
		if (fd < 0) {
			r = -errno;
		} else {
			r = content_header_store(fd, slot, raw);
			close(fd);
		}
	}
	if (r < 0) {
		log_warn("%s: cannot store the re-wrapped key (version '%s'): %s", label, w->key_version,
			 strerror(-r));
		return;
	}
	inode->header_slot = slot;
	inode->header_generation = h.generation;
	log_info("%s: key re-wrapped with key version '%s'", label, w->key_version);
}

/* Unwrap and authenticate one header slot into keys. Returns 0, -EBADMSG when this slot does
 * not open (another slot may), or a KMS errno that no slot would change. */
static int slot_open(struct keyfs *fs, const char *label, const struct fmt_header *h, const uint8_t *raw,
		     uint8_t *dek, struct fmt_keys *keys, struct kms_wrapped *rewrapped, bool *was_rewrapped)
{
	char hex[2 * FMT_FILE_ID_SIZE + 1];
	const char *aad[KMS_AAD_COUNT];
	struct kms_err err;
	int r;

	fmt_file_id_hex(h->file_id, hex);
	kms_file_aad(fs->vol.volume, hex, aad);
	r = kms_unwrap(fs->kms, h->wrapped, h->wrapped_len, aad, KMS_AAD_COUNT, dek, rewrapped, was_rewrapped,
		       &err);
	if (r < 0) {
		if (r == -EBADMSG && strcmp(h->key_id, kms_key_id(fs->kms)) != 0)
			log_err("%s: wrapped by key '%s', not by this volume's key '%s'", label, h->key_id,
				kms_key_id(fs->kms));
		else
			log_err("%s: %s", label, err.msg);
		return r;
	}
	fmt_keys_derive(dek, keys);
	if (fmt_header_verify(raw, keys) < 0) {
		log_err("%s: keyfs header (generation %u) does not authenticate", label, h->generation);
		return -EBADMSG;
	}
	return 0;
}

/* Called with inode->keys_lock held and inode->keys NULL. */
static int keys_load(struct keyfs *fs, struct kfs_inode *inode, int fd)
{
	struct content_headers hs;
	struct kms_wrapped rewrapped;
	struct fmt_keys *keys;
	char label[64];
	uint8_t *dek;
	bool was_rewrapped = false;
	unsigned i;
	int r;

	r = content_headers_read(fd, &hs);
	if (r == -ENODATA)
		return 0;
	inode_label(inode, label, sizeof(label));
	if (r < 0) {
		log_err("%s: unreadable keyfs header: %s", label,
			r == -EIO ? "damaged or truncated"
			: r == -EPROTONOSUPPORT ? "format version or cipher unknown to this keyfs" : strerror(-r));
		return file_errno(r);
	}
	dek = keyslab_alloc(&fs->slab);
	keys = keyslab_alloc(&fs->slab);
	if (!dek || !keys) {
		r = -ENOMEM;
		goto out;
	}
	/* Newest slot first; an older one serves when a rewrite of the newer was torn. */
	for (i = 0; i < hs.count; i++) {
		r = slot_open(fs, label, &hs.hdr[i], hs.raw[i], dek, keys, &rewrapped, &was_rewrapped);
		if (r != -EBADMSG)
			break;
	}
	if (r < 0) {
		r = file_errno(r);
		goto out;
	}
	if (i > 0)
		log_warn("%s: using the header of generation %u: the newer one does not open", label,
			 hs.hdr[i].generation);
	inode->header_slot = hs.slot[i];
	inode->header_generation = hs.hdr[i].generation;
	if (was_rewrapped)
		header_rewrite(inode, &hs.hdr[i], &rewrapped, keys);
	inode->keys = keys;
	memcpy(inode->file_id, hs.hdr[i].file_id, FMT_FILE_ID_SIZE);
	keys = NULL;
	r = 0;
out:
	keyslab_free(&fs->slab, dek);
	keyslab_free(&fs->slab, keys);
	return r;
}

/* Called with inode->keys_lock held, inode->keys NULL and the backing file empty. */
static int keys_create(struct keyfs *fs, struct kfs_inode *inode, int fd)
{
	uint8_t raw[FMT_HEADER_SIZE];
	char hex[2 * FMT_FILE_ID_SIZE + 1], label[64];
	const char *aad[KMS_AAD_COUNT];
	struct fmt_header h;
	struct kms_wrapped w;
	struct kms_err err;
	struct fmt_keys *keys;
	uint8_t *dek;
	int r;

	memset(&h, 0, sizeof(h));
	h.generation = 1;
	dek = keyslab_alloc(&fs->slab);
	keys = keyslab_alloc(&fs->slab);
	if (!dek || !keys) {
		r = -ENOMEM;
		goto out;
	}
	randombytes_buf(dek, FMT_DEK_SIZE);
	do
		randombytes_buf(h.file_id, sizeof(h.file_id));
	while (sodium_is_zero(h.file_id, sizeof(h.file_id)));
	fmt_file_id_hex(h.file_id, hex);
	kms_file_aad(fs->vol.volume, hex, aad);
	r = kms_wrap(fs->kms, dek, aad, KMS_AAD_COUNT, &w, &err);
	if (r < 0) {
		inode_label(inode, label, sizeof(label));
		log_err("%s: cannot create a file key: %s", label, err.msg);
		r = file_errno(r);
		goto out;
	}
	snprintf(h.key_id, sizeof(h.key_id), "%s", kms_key_id(fs->kms));
	snprintf(h.key_version, sizeof(h.key_version), "%s", w.key_version);
	memcpy(h.wrapped, w.blob, w.len);
	h.wrapped_len = w.len;
	fmt_keys_derive(dek, keys);
	r = fmt_header_encode(&h, keys, raw);
	if (r < 0) {
		inode_label(inode, label, sizeof(label));
		log_err("%s: cannot encode a keyfs header (key id '%s', %zu-byte wrapped key)", label,
			h.key_id, h.wrapped_len);
		r = -EIO;
		goto out;
	}
	r = content_header_init(fd, raw);
	if (r < 0)
		goto out;
	inode->header_slot = 0;
	inode->header_generation = 1;
	inode->keys = keys;
	memcpy(inode->file_id, h.file_id, FMT_FILE_ID_SIZE);
	keys = NULL;
out:
	keyslab_free(&fs->slab, dek);
	keyslab_free(&fs->slab, keys);
	return r;
}

static int get(struct keyfs *fs, struct kfs_inode *inode, int fd, struct content_file *cf, bool create)
{
	int r = 0;

	pthread_mutex_lock(&inode->keys_lock);
	if (!inode->keys)
		r = keys_load(fs, inode, fd);
	if (r == 0 && !inode->keys && create)
		r = keys_create(fs, inode, fd);
	if (r == 0)
		fill(inode, fd, cf);
	pthread_mutex_unlock(&inode->keys_lock);
	return r;
}

int filekeys_get(struct keyfs *fs, struct kfs_inode *inode, int fd, struct content_file *cf)
{
	return get(fs, inode, fd, cf, false);
}

int filekeys_get_or_create(struct keyfs *fs, struct kfs_inode *inode, int fd, struct content_file *cf)
{
	return get(fs, inode, fd, cf, true);
}
