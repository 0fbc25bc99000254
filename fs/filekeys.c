/* filekeys.c: per-file keys: read, unwrap and verify a header, or give an empty file a new one */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "keyfs/log.h"
#include "keyfs/volkeys.h"

#include "dekpool.h"
#include "filekeys.h"
#include "keycache.h"
#include "keystate.h"
#include "prefetch.h"

/*
 * The KMS call that unwraps (or wraps) a file's DEK is made without keys_lock: one thread marks
 * the inode keys_loading, unlocks, calls the KMS, and locks again to install what it got. Other
 * threads needing the keys wait on keys_cond for that one call instead of making their own, so
 * a file's DEK is unwrapped once however many readers arrive together, and a prefetch that is
 * already under way serves the open that follows it.
 *
 * A prefetch holds no content lock, so the header may change under it: truncating a damaged
 * file to 0 drops the header and the next write makes a new one. Both bump header_epoch under
 * keys_lock; keys loaded from a header of an older epoch are discarded, never installed.
 */

/* What one load found: keys (a keyslab slot, NULL when the file has no header yet) and where. */
struct loaded {
	struct fmt_keys *keys;
	uint8_t file_id[FMT_FILE_ID_SIZE];
	unsigned slot;
	uint32_t generation;
	bool was_rewrapped;
	struct kms_wrapped rewrapped;   /* when was_rewrapped: to store in the other slot */
	struct fmt_header hdr;          /* when was_rewrapped: the header it replaces */
	uint8_t raw[FMT_HEADER_SIZE];   /* and its bytes as read */
	uint8_t header_hash[KEYCACHE_HASH_SIZE];        /* of the header that serves (keycache.h) */
	char why[KMS_ERR_MAX];          /* a quiet load that failed: the KMS's words, for an open that waited */
};

/* A KMS or format failure as the errno a file operation answers with. */
static int file_errno(int r)
{
	switch (r) {
	case -EACCES:           /* access to the key denied: the mount locks as access-revoked */
		return -ENOKEY;
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

/* The header of fd changed since it was read (another daemon of a shared volume, or keyfsctl
 * rewrap, stored a re-wrapped one): follow it when it still holds our DEK, i.e. a slot
 * authenticates with the keys we have. Returns false when none does: the file has a new DEK
 * (its header was dropped and made again elsewhere) and our keys must not be used. */
static bool header_follow(struct keyfs *fs, struct kfs_inode *inode, int fd, const struct fmt_keys *keys)
{
	struct content_headers hs;

	if (content_headers_read(fd, fs->vol.format, &hs) < 0)
		return false;
	for (unsigned k = 0; k < hs.count; k++) {
		if (fmt_header_verify(hs.raw[k], keys) == 0) {
			inode->header_slot = hs.slot[k];
			inode->header_generation = hs.hdr[k].generation;
			return true;
		}
	}
	return false;
}

/* Store a DEK the service re-wrapped with a newer key version (vol_keys_store: the other slot,
 * the next generation, then the old slot cleared, under the header lock and only while the
 * header that authenticated is still there: 'keyfsctl rewrap' may have stored a newer one).
 * Best effort: the old blob keeps unwrapping while the service keeps that key version.
 * Called with keys_lock held, the header epoch checked and inode->header_slot the slot that
 * authenticated. Returns false when the header changed meanwhile to one our keys do not open. */
static bool header_rewrite(struct keyfs *fs, struct kfs_inode *inode, const struct loaded *ld)
{
	const struct kms_wrapped *w = &ld->rewrapped;
	struct vol_stored st;
	char proc[32], label[64];
	int fd, r;

	inode_label(inode, label, sizeof(label));
	fd = inode_fd(&fs->table, inode);
	if (fd < 0) {
		r = fd;
		goto fail;
	}
	snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
	fd = open(proc, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		r = -errno;
	inode_fd_put(&fs->table, inode);
	if (fd < 0)
		goto fail;
	r = vol_keys_store(fd, inode->header_slot, &ld->hdr, ld->raw, w, ld->keys, false, &st);
	if (r == VOL_STORE_CHANGED) {
		bool same = header_follow(fs, inode, fd, ld->keys);

		close(fd);
		log_debug("%s: header changed since it was read: not storing the re-wrapped key%s", label,
			  same ? "" : "; it holds another key now, loading it");
		return same;
	}
	close(fd);
fail:
	if (r < 0) {
		log_warn("%s: cannot store the re-wrapped key (version '%s'): %s", label, w->key_version,
			 strerror(-r));
		return true;
	}
	inode->header_slot = st.slot;
	inode->header_generation = st.generation;
	inode->header_hashed = false;   /* another header now: these keys are not kept once forgotten */
	inode->header_epoch++;
	log_info("%s: key re-wrapped with key version '%s'", label, w->key_version);
	keystate_note_rotation(fs->ks, w->key_version);
	return true;
}

/* Why the slots tried did not open, as the log says it. A quiet caller (a prefetch) logs only
 * at debug level: the open that needs the file reports its own failure. */
static void slots_report(struct keyfs *fs, const char *label, const struct content_headers *hs,
			 const struct vol_opened *o, bool quiet)
{
	enum log_level lvl = quiet ? LOG_LEVEL_DEBUG : LOG_LEVEL_ERR;

	for (unsigned i = 0; i < o->tried; i++) {
		const struct fmt_header *h = &hs->hdr[i];

		switch (o->slot[i].why) {
		case VOL_SLOT_SERVES:
			break;
		case VOL_SLOT_NO_AUTH:
			log_msg(lvl, "%s: keyfs header (generation %u) does not authenticate", label, h->generation);
			break;
		case VOL_SLOT_NO_UNWRAP:
			if (strcmp(h->key_id, kms_key_id(fs->kms)) != 0) {
				log_msg(lvl, "%s: wrapped by key '%s', not by this volume's key '%s'", label, h->key_id,
					kms_key_id(fs->kms));
				break;
			}
			/* fall through */
		case VOL_SLOT_KMS:
			/* Interrupted by a lock: the lock is what gets logged. */
			log_msg(o->slot[i].r == -ECANCELED ? LOG_LEVEL_DEBUG : lvl, "%s: %s", label, o->slot[i].err.msg);
			break;
		}
	}
}

/* Read the header of fd and unwrap its DEK, or take back the keys kept since the kernel forgot
 * the file, if they were opened from the header it still has (keycache.h). Called with no lock
 * held: this is the KMS round trip. Returns 0 (ld->keys NULL when the file has no header yet)
 * or the errno of the header read or of the KMS, unmapped (file_errno maps it for a file
 * operation). */
static int keys_load(struct keyfs *fs, const struct kfs_inode *inode, const char *label, int fd, bool quiet,
		     struct loaded *ld)
{
	enum log_level lvl = quiet ? LOG_LEVEL_DEBUG : LOG_LEVEL_ERR;
	struct content_headers hs;
	struct vol_opened o;
	struct fmt_keys *keys;
	uint8_t *dek;
	int i, r;

	memset(ld, 0, sizeof(*ld));
	r = content_headers_read(fd, fs->vol.format, &hs);
	if (r == -ENODATA)
		return 0;
	if (r < 0) {
		log_msg(lvl, "%s: unreadable keyfs header: %s", label,
			r == -EIO ? "damaged or truncated"
			: r == -EPROTONOSUPPORT ? "format version or cipher unknown to this keyfs" : strerror(-r));
		return r;
	}
	/* The newest header, the one vol_keys_open tries first: unchanged since its keys were kept. */
	keycache_hash(hs.raw[0], ld->header_hash);
	ld->keys = keycache_take(fs->table.keycache, inode->dev, inode->ino, hs.slot[0], ld->header_hash);
	if (ld->keys) {
		ld->slot = hs.slot[0];
		ld->generation = hs.hdr[0].generation;
		memcpy(ld->file_id, hs.hdr[0].file_id, FMT_FILE_ID_SIZE);
		log_debug("%s: keys kept since the kernel forgot it: no unwrap", label);
		return 0;
	}
	dek = keyslab_alloc(&fs->slab);
	keys = keyslab_alloc(&fs->slab);
	if (!dek || !keys) {
		r = -ENOMEM;
		goto out;
	}
	i = vol_keys_open(fs->kms, fs->vol.volume, &hs, dek, keys, &ld->rewrapped, &o);
	slots_report(fs, label, &hs, &o, quiet);
	if (i < 0) {
		for (unsigned k = 0; k < o.tried; k++)
			if (o.slot[k].why == VOL_SLOT_KMS || o.slot[k].why == VOL_SLOT_NO_UNWRAP)
				snprintf(ld->why, sizeof(ld->why), "%s", o.slot[k].err.msg);
		r = i;
		goto out;
	}
	if (i > 0)
		log_warn("%s: using the header of generation %u: the newer one does not open", label,
			 hs.hdr[i].generation);
	ld->slot = hs.slot[i];
	ld->generation = hs.hdr[i].generation;
	keycache_hash(hs.raw[i], ld->header_hash);
	memcpy(ld->file_id, hs.hdr[i].file_id, FMT_FILE_ID_SIZE);
	ld->was_rewrapped = o.was_rewrapped;
	if (ld->was_rewrapped) {
		ld->hdr = hs.hdr[i];
		memcpy(ld->raw, hs.raw[i], FMT_HEADER_SIZE);
	}
	ld->keys = keys;
	keys = NULL;
	r = 0;
out:
	keyslab_free(&fs->slab, dek);
	keyslab_free(&fs->slab, keys);
	return r;
}

/* A new header for an empty file, from the DEK pool (or a wrap made now when the pool has none).
 * Called with no lock but inode->content held exclusively: the KMS call may happen here. */
static int keys_create(struct keyfs *fs, const char *label, int fd, struct loaded *ld)
{
	uint8_t raw[FMT_HEADER_SIZE];
	struct dekpool_entry e;
	struct kms_err err;
	struct fmt_keys *keys;
	int r;

	memset(ld, 0, sizeof(*ld));
	keys = keyslab_alloc(&fs->slab);
	if (!keys)
		return -ENOMEM;
	r = dekpool_get(fs->pool, &e, &err);
	if (r < 0) {
		log_err("%s: cannot create a file key: %s", label, err.msg);
		keyslab_free(&fs->slab, keys);
		return r;      /* unmapped: the caller pokes the key state with it */
	}
	r = vol_keys_header(kms_key_id(fs->kms), e.file_id, &e.wrapped, e.dek, fs->vol.format, voldesc_cipher(&fs->vol),
			    keys, raw);
	keyslab_free(&fs->slab, e.dek);
	if (r < 0) {
		log_err("%s: cannot encode a keyfs header (key id '%s', %zu-byte wrapped key)", label,
			kms_key_id(fs->kms), e.wrapped.len);
		r = -EIO;
	} else {
		r = vol_header_init(fd, raw);
	}
	if (r < 0) {
		keyslab_free(&fs->slab, keys);
		return r;
	}
	ld->keys = keys;
	ld->slot = 0;
	ld->generation = 1;
	keycache_hash(raw, ld->header_hash);
	memcpy(ld->file_id, e.file_id, FMT_FILE_ID_SIZE);
	return 0;
}

/* Make what a load or create found the inode's keys, unless the header changed meanwhile.
 * Called with keys_lock held and keys_loading set by this thread. Returns true if installed
 * (ld->keys then belongs to the inode). */
static bool install(struct keyfs *fs, struct kfs_inode *inode, uint64_t epoch, struct loaded *ld)
{
	if (!ld->keys || inode->keys || inode->header_epoch != epoch)
		return false;
	inode->header_slot = ld->slot;
	inode->header_generation = ld->generation;
	memcpy(inode->file_id, ld->file_id, FMT_FILE_ID_SIZE);
	memcpy(inode->header_hash, ld->header_hash, KEYCACHE_HASH_SIZE);
	inode->header_hashed = true;
	if (ld->was_rewrapped && !header_rewrite(fs, inode, ld))
		return false;
	inode->keys = ld->keys;
	ld->keys = NULL;
	return true;
}

/* Called with keys_lock held by a thread that set keys_loading; r: how the load ended. */
static void loading_done(struct kfs_inode *inode, int r)
{
	inode->keys_load_err = r;
	inode->keys_loads++;
	inode->keys_loading = false;
	pthread_cond_broadcast(&inode->keys_cond);
}

static int get(struct keyfs *fs, struct kfs_inode *inode, int fd, struct content_file *cf, bool create)
{
	struct loaded ld;
	char label[64];
	uint64_t epoch;
	uint32_t loads;
	bool waited;
	int r;

	/* A file a listing queued for an unwrap ahead is used: the prefetch window slides. */
	prefetch_opened(fs->prefetch, inode);
	pthread_mutex_lock(&inode->keys_lock);
	for (;;) {
		waited = inode->keys_loading;
		loads = inode->keys_loads;
		inode->keys_waiters += waited;
		while (inode->keys_loading)
			pthread_cond_wait(&inode->keys_cond, &inode->keys_lock);
		inode->keys_waiters -= waited;
		/* The load we waited for (a prefetch's: a foreground one holds content) failed: its
		 * answer is ours, one unwrap per wrapped DEK even when it fails. An interrupted one
		 * (a lock) is not an answer: the check below says what the lock does. */
		if (waited && !inode->keys && inode->keys_loads == loads + 1 && inode->keys_load_err < 0 &&
		    inode->keys_load_err != -ECANCELED && keystate_check(fs->ks, KS_OP_OPEN) == 0) {
			r = inode->keys_load_err;
			pthread_mutex_unlock(&inode->keys_lock);
			keystate_poke(fs->ks, r);
			return keystate_check(fs->ks, KS_OP_OPEN) < 0 ? keystate_check(fs->ks, KS_OP_OPEN) : file_errno(r);
		}
		/* Locking or locked: no key is loaded, and none is used once writes are refused. */
		r = keystate_check(fs->ks, inode->keys ? KS_OP_WRITE : KS_OP_OPEN);
		if (r < 0) {
			pthread_mutex_unlock(&inode->keys_lock);
			return r;
		}
		if (inode->keys) {
			fill(inode, fd, cf);
			pthread_mutex_unlock(&inode->keys_lock);
			return 0;
		}
		inode->keys_loading = true;
		epoch = inode->header_epoch;
		pthread_mutex_unlock(&inode->keys_lock);

		inode_label(inode, label, sizeof(label));
		r = keys_load(fs, inode, label, fd, false, &ld);
		/* An empty file: a writer gives it its header. The caller holds content exclusively,
		 * so nothing else writes this file meanwhile; a prefetch sees keys_loading and skips. */
		if (r == 0 && !ld.keys && create)
			r = keys_create(fs, label, fd, &ld);
		/* Another daemon of a shared volume gave it a header first: use that one. */
		if (r == -EEXIST)
			r = keys_load(fs, inode, label, fd, false, &ld);
		/* The KMS says the key is unusable or access is denied: the mount finds out now. */
		keystate_poke(fs->ks, r);
		/* Locked meanwhile (a call under way is interrupted then): answer as the lock does. */
		if (r < 0 && keystate_check(fs->ks, KS_OP_OPEN) < 0)
			r = keystate_check(fs->ks, KS_OP_OPEN);
		else if (r < 0)
			r = file_errno(r);

		pthread_mutex_lock(&inode->keys_lock);
		if (r == 0 && ld.keys && !install(fs, inode, epoch, &ld)) {
			/* The header changed under us (only a prefetch without the content lock can
			 * see that happen to it, but be safe): load again. */
			keyslab_free(&fs->slab, ld.keys);
			loading_done(inode, 0);
			continue;
		}
		if (r == 0)
			fill(inode, fd, cf);
		loading_done(inode, r);
		pthread_mutex_unlock(&inode->keys_lock);
		return r;
	}
}

int filekeys_get(struct keyfs *fs, struct kfs_inode *inode, int fd, struct content_file *cf)
{
	return get(fs, inode, fd, cf, false);
}

int filekeys_get_or_create(struct keyfs *fs, struct kfs_inode *inode, int fd, struct content_file *cf)
{
	return get(fs, inode, fd, cf, true);
}

bool filekeys_wanted(struct kfs_inode *inode)
{
	bool wanted;

	pthread_mutex_lock(&inode->keys_lock);
	wanted = !inode->keys && !inode->keys_loading;
	pthread_mutex_unlock(&inode->keys_lock);
	return wanted;
}

int filekeys_prefetch(struct keyfs *fs, struct kfs_inode *inode)
{
	char proc[32], label[64];
	struct loaded ld;
	uint64_t epoch;
	int fd, r, answer = 0;

	pthread_mutex_lock(&inode->keys_lock);
	if (inode->keys || inode->keys_loading || keystate_check(fs->ks, KS_OP_OPEN) < 0) {
		pthread_mutex_unlock(&inode->keys_lock);
		return 0;
	}
	inode->keys_loading = true;
	epoch = inode->header_epoch;
	pthread_mutex_unlock(&inode->keys_lock);

	/* Reading ahead is not an access by anybody: leave the backing atime alone when we may. */
	fd = inode_fd(&fs->table, inode);
	if (fd >= 0) {
		snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
		fd = open(proc, O_RDONLY | O_CLOEXEC | O_NOATIME);
		if (fd < 0 && errno == EPERM)
			fd = open(proc, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			fd = -errno;
		inode_fd_put(&fs->table, inode);
	}
	if (fd < 0) {
		r = fd;
		memset(&ld, 0, sizeof(ld));
	} else {
		inode_label(inode, label, sizeof(label));
		r = keys_load(fs, inode, label, fd, true, &ld);
		answer = r;
		close(fd);
	}

	pthread_mutex_lock(&inode->keys_lock);
	if (r == 0 && ld.keys)
		install(fs, inode, epoch, &ld);
	/* An open is waiting for this load and takes its failure as its own: say it as the open
	 * would have (a prefetch nobody waits for stays quiet). */
	if (answer < 0 && answer != -ECANCELED && inode->keys_waiters > 0 && ld.why[0])
		log_err("%s: %s", label, ld.why);
	/* Only what the header and the KMS said is an answer to share; not our own fd trouble. */
	loading_done(inode, answer);
	pthread_mutex_unlock(&inode->keys_lock);
	keyslab_free(&fs->slab, ld.keys);
	return r;
}

int filekeys_drop_header(struct keyfs *fs, struct kfs_inode *inode, int fd)
{
	bool locked;
	int r;

	pthread_mutex_lock(&inode->keys_lock);
	while (inode->keys_loading)
		pthread_cond_wait(&inode->keys_cond, &inode->keys_lock);
	/* A prefetch may have loaded the keys since the caller failed to: they go with the header.
	 * Nobody else uses them: the caller holds content exclusively. */
	keyslab_free(&fs->slab, inode->keys);
	inode->keys = NULL;
	inode->header_epoch++;
	/* Under the header lock: a rewrap that read the old header must not store it again. */
	r = vol_header_lock(fd, false, &locked);
	if (r == 0) {
		r = ftruncate(fd, 0) < 0 ? -errno : 0;
		vol_header_unlock(fd, locked);
	}
	pthread_mutex_unlock(&inode->keys_lock);
	return r;
}

bool filekeys_forget(struct keyfs *fs, struct kfs_inode *inode)
{
	bool had;

	pthread_mutex_lock(&inode->keys_lock);
	had = inode->keys != NULL;
	keyslab_free(&fs->slab, inode->keys);
	inode->keys = NULL;
	/* A load under way installs nothing now: its header epoch is stale. */
	inode->header_epoch++;
	pthread_mutex_unlock(&inode->keys_lock);
	return had;
}
