/* cmd_rewrap.c: keyfsctl rewrap: after a root key rotation, put every file's DEK under the newest key version */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <sodium.h>

#include "keyfs/audit.h"
#include "keyfs/content.h"
#include "keyfs/exitcode.h"
#include "keyfs/format.h"
#include "keyfs/log.h"
#include "keyfs/volkeys.h"
#include "progress.h"
#include "volume.h"
#include "walk.h"

/*
 * Only headers change, never data, and each in the crash-safe way of FORMAT.md: the new
 * header goes to the slot that does not hold the one it replaces, with the next generation,
 * and is fdatasync'd; until then the old slot authenticates. A file already on the newest key
 * version is skipped, so an interrupted run is finished by running it again.
 *
 * A live mount may change a header at any time (a new file's first header, a damaged header
 * dropped by a truncate to 0, a DEK the service re-wrapped at open). Both sides take the header
 * lock (content_header_lock) and read the header area again under it; we store only when it
 * is still byte for byte what we unwrapped. The KMS call happens outside the lock.
 */

enum { OPT_HELP = CLI_OPT_BASE };

static const struct option rewrap_options[] = {
	CLI_KMS_OPTIONS,
	{ "help", no_argument, NULL, OPT_HELP },
	{ NULL, 0, NULL, 0 },
};

/* Tries per file when a live mount changes its header between our read and our write. */
#define REWRAP_TRIES 3

struct rewrap {
	struct vol *v;
	struct progress progress;
	char newest[FMT_KEY_VERSION_MAX + 1];   /* the version a wrap gets now */
	uint8_t *dek;                           /* sodium_malloc */
	struct fmt_keys *keys;                  /* sodium_malloc */
	uint64_t files, rewrapped, current, empty, damaged, changed, failed;
	int kms_rc;                             /* an exit code once the KMS failed: the run stops */
};

/* The exit code of a KMS failure that ends the run; 0 when it only concerns this file. */
static int kms_fatal(struct rewrap *rw, int r, const struct kms_err *err)
{
	switch (r) {
	case -EBADMSG:
		return 0;
	case -ENOKEY:
	case -EACCES:
	case -EKEYREVOKED:
	case -EKEYEXPIRED:
		progress_clear(&rw->progress);
		log_err("key '%s' became unusable: %s", rw->v->vol.key, err->msg);
		return KEYFS_EXIT_LOCKED;
	default:
		progress_clear(&rw->progress);
		log_err("key service: %s", err->msg[0] ? err->msg : strerror(-r));
		return KEYFS_EXIT_KMS;
	}
}

/* Learn the newest key version: wrap a throwaway DEK, bound to no file. */
static int probe_newest(struct rewrap *rw)
{
	enum vol_probe_step step;
	struct kms_wrapped w;
	struct kms_err err = { .msg = "" };
	int r;

	r = vol_kms_probe(rw->v->kms, rw->v->vol.volume, false, &w, &err, &step);
	if (r == -ENOMEM) {
		log_err("out of locked memory for keys");
		return KEYFS_EXIT_FAILURE;
	}
	if (r == -EKEYEXPIRED) {
		log_err("key '%s' is deactivated: it wraps nothing, so file keys cannot be re-wrapped with it",
			rw->v->vol.key);
		return KEYFS_EXIT_LOCKED;
	}
	if (r < 0)
		return kms_fatal(rw, r, &err);
	snprintf(rw->newest, sizeof(rw->newest), "%s", w.key_version);
	return 0;
}

enum outcome { DONE, CURRENT, EMPTY, DAMAGED, CHANGED, FAILED, STOP };

/*
 * Unwrap the newest slot that authenticates (an older one serves when the newer was torn) and
 * get its DEK wrapped with the newest version: Key Protect hands that back with the unwrap,
 * the local keystore wraps it again. Fills rw->dek, rw->keys, *ret_i and *w.
 */
static enum outcome unwrap_and_rewrap(struct rewrap *rw, const char *path, const struct content_headers *hs,
				      unsigned *ret_i, struct kms_wrapped *w)
{
	struct kms_err err = { .msg = "" };
	struct vol_opened o;
	int i, r;

	i = vol_keys_open(rw->v->kms, rw->v->vol.volume, hs, rw->dek, rw->keys, w, &o);
	if (i < 0 && i != -EBADMSG) {
		rw->kms_rc = kms_fatal(rw, i, &o.slot[o.tried - 1].err);
		return STOP;
	}
	if (i < 0) {
		if (strcmp(hs->hdr[0].key_id, kms_key_id(rw->v->kms)) != 0)
			progress_report(&rw->progress, "damaged", path, "wrapped by key '%s', not by this volume's key '%s': left as it is",
				hs->hdr[0].key_id, kms_key_id(rw->v->kms));
		else
			progress_report(&rw->progress, "damaged", path, "no header slot authenticates: left as it is (see keyfsctl fsck)");
		return DAMAGED;
	}
	*ret_i = (unsigned)i;
	if (o.was_rewrapped && strcmp(w->key_version, rw->newest) == 0)
		return DONE;
	if (strcmp(hs->hdr[i].key_version, rw->newest) == 0 && i == 0)
		return CURRENT;
	r = vol_keys_wrap(rw->v->kms, rw->v->vol.volume, hs->hdr[i].file_id, rw->dek, w, &err);
	if (r < 0) {
		rw->kms_rc = kms_fatal(rw, r, &err);
		return STOP;
	}
	/* Rotated again since we started: this file gets the newer one, and so do the rest. */
	if (strcmp(w->key_version, rw->newest) != 0)
		snprintf(rw->newest, sizeof(rw->newest), "%s", w->key_version);
	return DONE;
}

/* Store the header for w in the slot that does not hold header i, then clear the slot of
 * header i; without w only clear the other slot (vol_keys_store: under the header lock, and
 * only while header i is still there). Returns DONE, CHANGED (read again and retry) or FAILED. */
static enum outcome store(struct rewrap *rw, const char *path, int fd, const struct content_headers *hs,
			  unsigned i, const struct kms_wrapped *w)
{
	struct vol_stored st;
	int r = vol_keys_store(fd, hs->slot[i], &hs->hdr[i], hs->raw[i], w, rw->keys, true, &st);

	if (r == 0)
		return DONE;
	if (r == VOL_STORE_CHANGED)
		return CHANGED;
	switch (st.step) {
	case VOL_STORE_ENCODE:
		progress_report(&rw->progress, "failed", path, "cannot encode a header with the %zu-byte wrapped key", w->len);
		break;
	case VOL_STORE_LOCK:
		progress_report(&rw->progress, "failed", path, "cannot lock its header (%s): without the lock a live mount could race",
			strerror(-r));
		break;
	case VOL_STORE_WRITE:
		progress_report(&rw->progress, "failed", path, "writing header slot %u: %s (run rewrap again: it finishes the job)", st.slot,
			strerror(-r));
		break;
	}
	return FAILED;
}

static enum outcome rewrap_fd(struct rewrap *rw, const char *path, int fd)
{
	struct content_headers hs;
	struct kms_wrapped w;
	enum outcome o = CHANGED;
	unsigned i = 0;
	int r;

	for (int t = 0; t < REWRAP_TRIES && o == CHANGED; t++) {
		r = content_headers_read(fd, rw->v->vol.format, &hs);
		if (r == -ENODATA)
			return EMPTY;
		if (r == -EPROTONOSUPPORT) {
			progress_report(&rw->progress, "failed", path, "header of a format version or cipher this keyfsctl does not know");
			return FAILED;
		}
		if (r == -EIO) {
			progress_report(&rw->progress, "damaged", path, "no header slot parses: left as it is (see keyfsctl fsck)");
			return DAMAGED;
		}
		if (r < 0) {
			progress_report(&rw->progress, "failed", path, "reading its header: %s", strerror(-r));
			return FAILED;
		}
		/* Resuming: nothing to do for a file whose only header is on the newest version. With
		 * a second slot, the newest may not be the one that authenticates, or the other may
		 * still hold an older wrapping (an interrupted clear, an older keyfs): unwrap to see. */
		if (hs.count == 1 && strcmp(hs.hdr[0].key_version, rw->newest) == 0 &&
		    strcmp(hs.hdr[0].key_id, kms_key_id(rw->v->kms)) == 0)
			return CURRENT;
		o = unwrap_and_rewrap(rw, path, &hs, &i, &w);
		if (o == DONE)
			o = store(rw, path, fd, &hs, i, &w);
		else if (o == CURRENT && hs.count > 1 && (o = store(rw, path, fd, &hs, i, NULL)) == DONE)
			o = CURRENT;
		sodium_memzero(rw->dek, FMT_DEK_SIZE);
		sodium_memzero(rw->keys, sizeof(*rw->keys));
	}
	if (o == CHANGED)
		progress_report(&rw->progress, "changed", path, "its header kept changing under a live mount: run rewrap again");
	return o;
}

static int visit(const struct walk_entry *e, void *arg)
{
	struct rewrap *rw = arg;
	enum outcome o;
	struct stat st;
	int fd;

	if (!S_ISREG(e->st->st_mode))
		return 0;
	rw->files++;
	progress_update(&rw->progress, rw->files, 0, e->path);
	if (e->st->st_size == 0) {
		rw->empty++;
		return 0;
	}
	fd = openat(e->dirfd, e->name, O_RDWR | O_NOFOLLOW | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0) {
		if (errno == ENOENT) {
			rw->files--;
			return 0;
		}
		progress_report(&rw->progress, "failed", e->path, "%s", strerror(errno));
		rw->failed++;
		return 0;
	}
	if (fstat(fd, &st) < 0 || st.st_dev != e->st->st_dev || st.st_ino != e->st->st_ino) {
		/* Replaced since the listing: a new file, made with the newest version. */
		close(fd);
		rw->files--;
		return 0;
	}
	o = rewrap_fd(rw, e->path, fd);
	close(fd);
	switch (o) {
	case DONE: rw->rewrapped++; break;
	case CURRENT: rw->current++; break;
	case EMPTY: rw->empty++; break;
	case DAMAGED: rw->damaged++; break;
	case CHANGED: rw->changed++; break;
	case FAILED: rw->failed++; break;
	case STOP: return -ECANCELED;
	}
	return 0;
}

static int not_visited(const char *path, int err, void *arg)
{
	struct rewrap *rw = arg;

	if (err == EXDEV)
		progress_report(&rw->progress, "not visited", path, "another filesystem is mounted there");
	else
		progress_report(&rw->progress, "not visited", path, "%s", strerror(err));
	rw->failed++;
	return 0;
}

/* The run as an audit event: which volume, to which key version, how it went and how long. */
static void audit_run(const struct rewrap *rw, int rc, long long ms)
{
	char line[256];

	snprintf(line, sizeof(line), "rewrap: %" PRIu64 " files: %" PRIu64 " re-wrapped to key version %s, %" PRIu64
		 " already on it, %" PRIu64 " damaged, %" PRIu64 " failed (exit %d)", rw->files, rw->rewrapped,
		 rw->newest[0] ? rw->newest : "-", rw->current, rw->damaged, rw->failed + rw->changed, rc);
	audit_emit(&(struct audit_event){
		.kind = AUDIT_REWRAP, .volume = rw->v->vol.volume, .backing = rw->v->backing,
		.key_id = kms_key_id(rw->v->kms), .key_crn = rw->v->vol.key_crn, .key_version = rw->newest,
		.reason = rc == KEYFS_EXIT_OK ? "complete" : "incomplete", .latency_ms = ms, .uid = (long long)getuid(),
		.message = line,
	});
}

static int run(struct rewrap *rw)
{
	int r;

	r = probe_newest(rw);
	if (r)
		return r;
	progress_init(&rw->progress, "rewrap");
	rw->progress.files_only = true;
	r = walk_tree(rw->v->root_fd, true, visit, not_visited, rw);
	progress_clear(&rw->progress);
	if (r == -ECANCELED) {
		printf("rewrap: stopped after %" PRIu64 " files (%" PRIu64 " re-wrapped); run it again once the key service answers\n",
		       rw->files, rw->rewrapped);
		return rw->kms_rc ? rw->kms_rc : KEYFS_EXIT_KMS;
	}
	if (r < 0) {
		log_err("walking '%s': %s", rw->v->backing, strerror(-r));
		return r == -ENOMEM ? KEYFS_EXIT_FAILURE : KEYFS_EXIT_IO;
	}
	printf("rewrap: %" PRIu64 " files: %" PRIu64 " re-wrapped to key version %s, %" PRIu64
	       " already on it, %" PRIu64 " empty (no key yet)",
	       rw->files, rw->rewrapped, rw->newest, rw->current, rw->empty);
	if (rw->damaged)
		printf(", %" PRIu64 " damaged", rw->damaged);
	if (rw->changed)
		printf(", %" PRIu64 " changed under a live mount", rw->changed);
	if (rw->failed)
		printf(", %" PRIu64 " failed", rw->failed);
	putchar('\n');
	if (rw->damaged)
		return KEYFS_EXIT_DAMAGED;
	if (rw->failed || rw->changed)
		return KEYFS_EXIT_IO;
	return KEYFS_EXIT_OK;
}

int cmd_rewrap(int argc, char **argv)
{
	struct cli_kms_args ka = { NULL, NULL, NULL };
	struct vol v;
	struct rewrap rw;
	const char *backing = NULL;
	int c, rc;

	optind = 0;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "-:h", rewrap_options, NULL)) != -1) {
		if (cli_kms_option(&ka, c, optarg))
			continue;
		switch (c) {
		case 1:
			if (backing)
				return cli_usage_error("rewrap", "unexpected argument '%s'", optarg);
			backing = optarg;
			break;
		case 'h':
		case OPT_HELP:
			cli_print_usage(stdout, "rewrap");
			return KEYFS_EXIT_OK;
		default:
			return cli_option_error("rewrap", c, argv);
		}
	}
	if (optind < argc) {
		if (backing || optind + 1 < argc)
			return cli_usage_error("rewrap", "unexpected argument '%s'", argv[backing ? optind : optind + 1]);
		backing = argv[optind];
	}
	if (!backing)
		return cli_usage_error("rewrap", "missing BACKING (the volume's backing dir)");
	if (sodium_init() < 0) {
		log_err("libsodium cannot be initialised");
		return KEYFS_EXIT_FAILURE;
	}
	memset(&rw, 0, sizeof(rw));
	rc = cli_volume_open(backing, &ka, "rewrap", &v);
	if (rc == 0)
		rc = cli_volume_kms(&v, "rewrap");
	if (rc == 0) {
		rw.v = &v;
		rw.dek = sodium_malloc(FMT_DEK_SIZE);
		rw.keys = sodium_malloc(sizeof(*rw.keys));
		if (!rw.dek || !rw.keys) {
			log_err("out of locked memory for keys");
			rc = KEYFS_EXIT_FAILURE;
		} else {
			struct timespec t0, t1;

			clock_gettime(CLOCK_MONOTONIC, &t0);
			rc = run(&rw);
			clock_gettime(CLOCK_MONOTONIC, &t1);
			audit_run(&rw, rc, (long long)(t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000);
		}
		sodium_free(rw.dek);
		sodium_free(rw.keys);
	}
	cli_volume_close(&v);
	return rc;
}
