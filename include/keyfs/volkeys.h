/* volkeys.h: a file's keys the one way, for keyfs and keyfsctl: open a header, make new keys, store a re-wrapped header */
#ifndef KEYFS_VOLKEYS_H
#define KEYFS_VOLKEYS_H

#include <stdbool.h>
#include <stdint.h>

#include "keyfs/content.h"
#include "keyfs/format.h"
#include "keyfs/kms.h"
#include "keyfs/voldesc.h"

/*
 * Here lives what the daemon, keyfsctl fsck and keyfsctl rewrap all do with a file's keys, so
 * that they agree by construction: which header slot serves and why the others do not, the
 * associated data a DEK is wrapped with, new key material, and the locked, re-read store of a
 * re-wrapped header (FORMAT.md). Where the keys are kept (the daemon's slab and per-inode
 * state, a command's sodium_malloc buffers) is the caller's business.
 */

/* A wrapped DEK is bound to { volume uuid, file id hex }: a header copied to another file or
 * another volume does not unwrap. */
#define VOL_AAD_COUNT 2
struct vol_aad {
	char file_id_hex[2 * FMT_FILE_ID_SIZE + 1];
	const char *aad[VOL_AAD_COUNT];
};
void vol_file_aad(const char *volume, const uint8_t file_id[FMT_FILE_ID_SIZE], struct vol_aad *ret);

/* Fill cfg from a description: its kms, key, key id, keystore and Key Protect location (the
 * strings stay d's). The host's overrides (keystore, API key, CA file) are the caller's. */
void vol_kms_config(const struct voldesc *d, struct kms_config *cfg);

/*
 * Prove the key service works for volume: wrap a throwaway DEK bound to no file (file id all
 * zeros, which no file gets) and, with unwrap, unwrap it and compare. w receives the wrapping
 * (its key_version is the newest). Returns 0, -ENOMEM, or the errno of the step *ret_step that
 * failed (VOL_PROBE_COMPARE: -EBADMSG, the unwrap gave back another key; err is empty then).
 */
enum vol_probe_step { VOL_PROBE_WRAP, VOL_PROBE_UNWRAP, VOL_PROBE_COMPARE };
int vol_kms_probe(struct kms *kms, const char *volume, bool unwrap, struct kms_wrapped *w,
		  struct kms_err *err, enum vol_probe_step *ret_step);

/* ---- opening a file's keys ---- */

/* Why a header slot that parses does not serve, as vol_keys_open found it. */
enum vol_slot_why {
	VOL_SLOT_SERVES = 0,
	VOL_SLOT_NO_UNWRAP,             /* the key service refuses its wrapped DEK (-EBADMSG) */
	VOL_SLOT_NO_AUTH,               /* the DEK unwraps, but the header does not authenticate */
	VOL_SLOT_KMS,                   /* another error of the key service: r and err */
};

struct vol_opened {
	unsigned tried;                 /* slots tried, newest first: the last one is where it ended */
	struct {
		enum vol_slot_why why;
		int r;                  /* the key service's errno (VOL_SLOT_NO_UNWRAP, VOL_SLOT_KMS) */
		struct kms_err err;     /* and its words */
	} slot[FMT_HEADER_SLOTS];       /* by index into the headers, not by slot number */
	bool was_rewrapped;             /* the service handed the DEK back re-wrapped (*rewrapped) */
};

/*
 * Open a file's keys from its headers (content_headers_read): unwrap the newest slot's DEK
 * with its AAD, derive the keys and authenticate the header; an older slot serves when the
 * newer does not open (a torn rewrite). dek (KMS_DEK_SIZE bytes) and keys are the caller's
 * locked memory; dek keeps the DEK of the slot that serves, for the caller to wipe. rewrapped
 * may be NULL (then nothing is asked back). Returns the index into hs of the slot that serves
 * (>= 0), -EBADMSG when no slot does (ret->slot says why for each), or the key service's errno
 * of the last slot tried: no other slot would change that (the key or the service).
 */
int vol_keys_open(struct kms *kms, const char *volume, const struct content_headers *hs, uint8_t *dek,
		  struct fmt_keys *keys, struct kms_wrapped *rewrapped, struct vol_opened *ret);

/* ---- new file keys ---- */

/* New key material for a file: a random DEK (dek: KMS_DEK_SIZE bytes of the caller's locked
 * memory) and a random file id, never all zeros (what an unset id looks like). The one place
 * keyfs makes either. */
void vol_keys_generate(uint8_t *dek, uint8_t file_id[FMT_FILE_ID_SIZE]);

/* Wrap dek for the file file_id of volume (bound to its AAD). Returns 0 or a kms_wrap errno. */
int vol_keys_wrap(struct kms *kms, const char *volume, const uint8_t file_id[FMT_FILE_ID_SIZE], const uint8_t *dek,
		  struct kms_wrapped *ret, struct kms_err *err);

/* vol_keys_generate, and the DEK wrapped for that file id. Returns 0 or a kms_wrap errno (err
 * filled); on failure dek and file_id are wiped. */
int vol_keys_new(struct kms *kms, const char *volume, uint8_t *dek, uint8_t file_id[FMT_FILE_ID_SIZE],
		 struct kms_wrapped *ret, struct kms_err *err);

/* The first header of a file (generation 1) naming key_id and the wrapped DEK w, its chunks
 * sealed with cipher (FMT_CIPHER_*; XChaCha20-Poly1305 in a v1 file), its keys derived from dek
 * into keys, encoded into raw. Returns 0, -EINVAL (does not fit) or -EIO (cipher unavailable). */
int vol_keys_header(const char *key_id, const uint8_t file_id[FMT_FILE_ID_SIZE], const struct kms_wrapped *w,
		    const uint8_t *dek, enum fmt_layout layout, uint8_t cipher, struct fmt_keys *keys,
		    uint8_t raw[FMT_HEADER_SIZE]);

/* ---- changing a header ---- */

/*
 * The header lock (content_header_lock) of fd, open for writing. Where the backing filesystem
 * has no OFD locks, 0 with *locked false, unless required (keyfsctl rewrap, which runs beside
 * a live mount, refuses then): nothing else changes headers without the daemon. Returns 0 or -errno.
 */
int vol_header_lock(int fd, bool required, bool *locked);
void vol_header_unlock(int fd, bool locked);

/* Give the empty file fd its first header raw, under the header lock: a rewrap that takes the
 * lock and reads again must not have it slip under it. Returns 0 or -errno. */
int vol_header_init(int fd, const uint8_t raw[FMT_HEADER_SIZE]);

/* Which step of vol_keys_store failed. */
enum vol_store_step { VOL_STORE_ENCODE, VOL_STORE_LOCK, VOL_STORE_WRITE };

struct vol_stored {
	unsigned slot;                  /* the other slot: written (with w) or cleared */
	uint32_t generation;            /* the generation stored */
	enum vol_store_step step;       /* on failure: where */
};

#define VOL_STORE_CHANGED 1

/*
 * Replace the header that serves (hdr as parsed, raw as read, in slot) by one holding the
 * re-wrapped DEK w, the next generation, encoded with keys: into the other slot, durable, then
 * slot cleared (content_header_rewrite), so the old wrapping does not stay in the file. Without
 * w the header that serves is already current and only its stale twin (the other slot) is
 * cleared. Under the header lock (required or not: vol_header_lock), and only if slot still
 * holds raw byte for byte: the other slot may hold anything (a torn write, a forged
 * generation) and is overwritten. Returns 0, VOL_STORE_CHANGED (the header changed since it
 * was read: read again), or -errno with ret->step.
 */
int vol_keys_store(int fd, unsigned slot, const struct fmt_header *hdr, const uint8_t raw[FMT_HEADER_SIZE],
		   const struct kms_wrapped *w, const struct fmt_keys *keys, bool lock_required,
		   struct vol_stored *ret);

#endif
