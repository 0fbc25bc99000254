/* cmd_fsck.c: keyfsctl fsck: every header and chunk of a volume must authenticate; names each damaged file and offset */
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
#include <unistd.h>

#include <sodium.h>

#include "keyfs/content.h"
#include "keyfs/exitcode.h"
#include "keyfs/format.h"
#include "keyfs/kms.h"
#include "keyfs/log.h"
#include "keyfs/util.h"
#include "keyfs/volkeys.h"
#include "cli.h"
#include "progress.h"
#include "volume.h"
#include "walk.h"

#define CDS ((uint64_t)FMT_CHUNK_DISK_SIZE)

/* Chunks per read: about 1 MiB, and whole chunks, so no chunk straddles two reads. */
#define BLOCK_CHUNKS 256
/* Damaged chunks listed per file; the rest are counted ("... and N more"). */
#define LIST_CHUNKS 10
/* A file that changed under the check is checked once more, then left unjudged. A damaged
 * verdict is confirmed by a second pass too: timestamps tick coarsely, and a chunk torn by a
 * concurrent write of a live mount must not be called damage. */
#define ATTEMPTS 2

enum { OPT_JSON = CLI_OPT_BASE, OPT_HELP };

static const struct option fsck_options[] = {
	{ "json", no_argument, NULL, OPT_JSON },
	{ "help", no_argument, NULL, OPT_HELP },
	CLI_KMS_OPTIONS,
	{ NULL, 0, NULL, 0 },
};

enum hdr_state {
	HDR_OK,
	HDR_SHORT,              /* backing file shorter than the header area */
	HDR_NO_PARSE,           /* neither slot parses */
	HDR_NO_UNWRAP,          /* every slot's wrapped DEK is refused by the KMS (-EBADMSG) */
	HDR_NO_AUTH,            /* no slot both unwraps and authenticates */
	HDR_WRONG_LAYOUT,       /* the header is of the other format version than the volume */
};

/* What one pass over one file found. */
struct verdict {
	struct stat st;                 /* fstat before the pass */
	enum hdr_state hdr;
	char key_id[FMT_KEY_ID_MAX + 1];        /* HDR_NO_UNWRAP: the key the newest slot names */
	unsigned version;                       /* HDR_WRONG_LAYOUT: the header's format version */
	uint64_t nbad;                  /* chunks that do not authenticate */
	uint64_t bad[LIST_CHUNKS];      /* the first of them */
	uint32_t bad_len[LIST_CHUNKS];  /* their plaintext lengths */
	bool cut;                       /* the backing size ends inside chunk cut_chunk's overhead */
	uint64_t cut_chunk;
	uint64_t bytes;                 /* plaintext bytes whose chunks were opened (holes included) */
	char note[256];                 /* about the header slot that does not serve */
	char why[160];                  /* not checked: why */
};

enum pass {
	PASS_JUDGED,                    /* verdict complete: clean or damaged */
	PASS_CHANGED,                   /* the file changed under the pass */
	PASS_NOT_CHECKED,               /* v->why says why */
	PASS_GONE,                      /* removed or replaced by a non-file since the listing */
	PASS_FATAL,                     /* the key service failed: the run stops */
};

/* Inodes with more than one link, so a hard-linked file is checked once. */
struct inoset {
	struct ino_key { dev_t dev; ino_t ino; } *v;
	size_t cap, n;                  /* cap: 0 or a power of two */
};

/* A JSON array built while the walk runs (the object's counts come first but are known last). */
struct jlist {
	FILE *f;
	char *buf;
	size_t len;
	uint64_t n;
};

struct fsck {
	struct vol vol;
	bool json;
	struct progress prog;
	uint8_t *buf;                   /* ciphertext only: plain malloc */
	uint8_t *pt;                    /* one chunk of plaintext: sodium_malloc */
	uint8_t *dek;                   /* sodium_malloc */
	struct fmt_keys *keys;          /* sodium_malloc */
	struct inoset links;
	uint64_t files, bytes, damaged, not_checked, changed;
	int fatal;                      /* KEYFS_EXIT_KMS or _LOCKED: the key service failed, stop */
	char fatal_msg[KMS_ERR_MAX];
	char fatal_path[PATH_MAX];
	struct jlist j_damaged, j_notes, j_not_checked, j_changed;
};

static uint64_t inohash(dev_t dev, ino_t ino)
{
	uint64_t h = (uint64_t)ino * 0x9e3779b97f4a7c15ull ^ (uint64_t)dev * 0xc2b2ae3d27d4eb4full;

	return h ^ (h >> 29);
}

/* Add (dev, ino). Returns 1 when it was there already, 0 when added, -ENOMEM. */
static int inoset_add(struct inoset *s, dev_t dev, ino_t ino)
{
	size_t i;

	if (2 * (s->n + 1) > s->cap) {
		size_t cap = s->cap ? 2 * s->cap : 256;
		struct ino_key *v = calloc(cap, sizeof(*v));

		if (!v)
			return -ENOMEM;
		for (size_t k = 0; k < s->cap; k++) {
			if (s->v[k].ino == 0 && s->v[k].dev == 0)
				continue;
			for (i = inohash(s->v[k].dev, s->v[k].ino) & (cap - 1); v[i].ino || v[i].dev; i = (i + 1) & (cap - 1))
				;
			v[i] = s->v[k];
		}
		free(s->v);
		s->v = v;
		s->cap = cap;
	}
	for (i = inohash(dev, ino) & (s->cap - 1); s->v[i].ino || s->v[i].dev; i = (i + 1) & (s->cap - 1))
		if (s->v[i].dev == dev && s->v[i].ino == ino)
			return 1;
	s->v[i].dev = dev;
	s->v[i].ino = ino;
	s->n++;
	return 0;
}

static int jlist_open(struct jlist *l)
{
	memset(l, 0, sizeof(*l));
	l->f = open_memstream(&l->buf, &l->len);
	return l->f ? 0 : -ENOMEM;
}

/* Start the next element; returns the stream to write it to. */
static FILE *jlist_item(struct jlist *l)
{
	fputs(l->n++ ? ",\n    " : "\n    ", l->f);
	return l->f;
}

/* Append {"path": PATH, "KEY": value}, the root as ".". */
static void jlist_path_item(struct jlist *l, const char *path, const char *key, const char *value)
{
	FILE *o = jlist_item(l);

	fputs("{\"path\": ", o);
	util_json_string(o, path[0] ? path : ".");
	fprintf(o, ", \"%s\": ", key);
	util_json_string(o, value);
	fputc('}', o);
}

static void jlist_print(const char *name, struct jlist *l, bool last)
{
	fflush(l->f);
	printf("  \"%s\": [", name);
	if (l->n)
		printf("%s\n  ]", l->buf);
	else
		fputs("]", stdout);
	fputs(last ? "\n" : ",\n", stdout);
}

static void jlist_close(struct jlist *l)
{
	if (l->f)
		fclose(l->f);
	free(l->buf);
	memset(l, 0, sizeof(*l));
}

static const char *node_kind(mode_t mode)
{
	switch (mode & S_IFMT) {
	case S_IFIFO: return "fifo";
	case S_IFSOCK: return "socket";
	case S_IFCHR: return "character device";
	case S_IFBLK: return "block device";
	default: return "node of unknown type";
	}
}

static void report_note(struct fsck *f, const char *path, const char *note)
{
	if (f->json) {
		jlist_path_item(&f->j_notes, path, "note", note);
	} else {
		progress_report(&f->prog, "note", path, "%s", note);
	}
}

static void report_not_checked(struct fsck *f, const char *path, const char *why)
{
	f->not_checked++;
	if (f->json) {
		jlist_path_item(&f->j_not_checked, path, "error", why);
	} else {
		progress_report(&f->prog, "could not check", path, "%s", why);
	}
}

static void report_changed(struct fsck *f, const char *path)
{
	f->changed++;
	if (f->json) {
		util_json_string(jlist_item(&f->j_changed), path);
	} else {
		progress_clear(&f->prog);
		fputs("changed while checking: ", stdout);
		cli_fputs_safe(stdout, path);
		fputs(" (not judged)\n", stdout);
		fflush(stdout);
	}
}

static bool damaged(const struct verdict *v)
{
	return v->hdr != HDR_OK || v->nbad || v->cut;
}

/* What is wrong with v's header, as one message; "" when nothing. */
static void header_message(const struct fsck *f, const struct verdict *v, char *buf, size_t size)
{
	switch (v->hdr) {
	case HDR_OK:
		buf[0] = '\0';
		break;
	case HDR_SHORT:
		snprintf(buf, size, "backing size %" PRIu64 " is shorter than the keyfs header area (%" PRIu64 " bytes)",
			 (uint64_t)v->st.st_size, fmt_header_area(f->vol.vol.format));
		break;
	case HDR_WRONG_LAYOUT:
		snprintf(buf, size, "header format version %u is not this volume's format %d (its sizes cannot be read)",
			 v->version, f->vol.vol.format);
		break;
	case HDR_NO_PARSE:
		snprintf(buf, size, "no header slot parses");
		break;
	case HDR_NO_UNWRAP:
		if (strcmp(v->key_id, kms_key_id(f->vol.kms)) != 0)
			snprintf(buf, size, "wrapped key does not unwrap with this volume's key (wrapped by key '%s')",
				 v->key_id);
		else
			snprintf(buf, size, "wrapped key does not unwrap with this volume's key (damaged, or copied from another volume)");
		break;
	case HDR_NO_AUTH:
		snprintf(buf, size, "no header slot authenticates");
		break;
	}
}

static void report_damage_text(struct fsck *f, const char *path, const struct verdict *v)
{
	char msg[FMT_KEY_ID_MAX + 128];

	header_message(f, v, msg, sizeof(msg));
	if (msg[0])
		progress_report(&f->prog, "damaged", path, "%s", msg);
	for (uint64_t i = 0; i < v->nbad && i < LIST_CHUNKS; i++) {
		uint64_t off = v->bad[i] * FMT_CHUNK_SIZE;

		progress_report(&f->prog, "damaged", path, "chunk %" PRIu64 " (plaintext bytes %" PRIu64 "-%" PRIu64 ") does not authenticate",
		     v->bad[i], off, off + v->bad_len[i] - 1);
	}
	if (v->nbad > LIST_CHUNKS)
		progress_report(&f->prog, "damaged", path, "... and %" PRIu64 " more chunks do not authenticate", v->nbad - LIST_CHUNKS);
	if (v->cut)
		progress_report(&f->prog, "damaged", path, "backing size %" PRIu64 " is cut inside chunk %" PRIu64 " (plaintext offset %" PRIu64 ")",
		     (uint64_t)v->st.st_size, v->cut_chunk, v->cut_chunk * FMT_CHUNK_SIZE);
}

static void report_damage_json(struct fsck *f, const char *path, const struct verdict *v)
{
	FILE *o = jlist_item(&f->j_damaged);
	char msg[FMT_KEY_ID_MAX + 128];
	const char *sep = "";

	fputs("{\"path\": ", o);
	util_json_string(o, path);
	fputs(", \"problems\": [", o);
	header_message(f, v, msg, sizeof(msg));
	if (msg[0]) {
		fputs("{\"kind\": ", o);
		if (v->hdr == HDR_NO_UNWRAP) {
			fputs("\"key\", \"key\": ", o);
			util_json_string(o, v->key_id);
		} else {
			fputs("\"header\"", o);
		}
		fputs(", \"error\": ", o);
		util_json_string(o, msg);
		fputc('}', o);
		sep = ", ";
	}
	for (uint64_t i = 0; i < v->nbad && i < LIST_CHUNKS; i++) {
		fprintf(o, "%s{\"kind\": \"chunk\", \"chunk\": %" PRIu64 ", \"offset\": %" PRIu64 ", \"length\": %" PRIu32 "}",
			sep, v->bad[i], v->bad[i] * FMT_CHUNK_SIZE, v->bad_len[i]);
		sep = ", ";
	}
	if (v->nbad > LIST_CHUNKS) {
		fprintf(o, "%s{\"kind\": \"more_chunks\", \"count\": %" PRIu64 "}", sep, v->nbad - LIST_CHUNKS);
		sep = ", ";
	}
	if (v->cut)
		fprintf(o, "%s{\"kind\": \"size\", \"backing_size\": %" PRIu64 ", \"chunk\": %" PRIu64 ", \"offset\": %" PRIu64 "}",
			sep, (uint64_t)v->st.st_size, v->cut_chunk, v->cut_chunk * FMT_CHUNK_SIZE);
	fputs("]}", o);
}

static bool all_zero(const uint8_t *p, size_t n)
{
	uint8_t acc = 0;

	for (size_t i = 0; i < n; i++)
		acc |= p[i];
	return acc == 0;
}

static bool same_stat(const struct stat *a, const struct stat *b)
{
	return a->st_dev == b->st_dev && a->st_ino == b->st_ino && a->st_size == b->st_size &&
	       a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec &&
	       a->st_ctim.tv_sec == b->st_ctim.tv_sec && a->st_ctim.tv_nsec == b->st_ctim.tv_nsec;
}

static void slot_note(struct verdict *v, unsigned bad_slot, const struct fmt_header *bad, const char *what,
		      unsigned good_slot, const struct fmt_header *good)
{
	if (bad)
		snprintf(v->note, sizeof(v->note), "header slot %u (generation %" PRIu32 ") %s; slot %u (generation %" PRIu32 ") serves",
			 bad_slot, bad->generation, what, good_slot, good->generation);
	else
		snprintf(v->note, sizeof(v->note), "header slot %u %s; slot %u (generation %" PRIu32 ") serves",
			 bad_slot, what, good_slot, good->generation);
}

/* Why a file whose header parses in no slot, one of them for an unknown version or cipher, is
 * not judged: a newer keyfs wrote it, or a flipped bit in those bytes, and fsck cannot tell which. */
static void unknown_format(const uint8_t area[FMT_DATA_OFFSET], struct verdict *v)
{
	struct fmt_header h;
	const uint8_t *raw = area;

	for (unsigned i = 0; i < FMT_HEADER_SLOTS; i++) {
		if (fmt_header_parse(area + fmt_header_offset(i), &h) == -EPROTONOSUPPORT) {
			raw = area + fmt_header_offset(i);
			break;
		}
	}
	snprintf(v->why, sizeof(v->why),
		 "its header (slot %u) names format version %u and cipher %u, unknown to this keyfsctl (written by a newer keyfs, or damaged)",
		 (unsigned)((raw - area) / FMT_HEADER_SIZE), (unsigned)raw[8] | (unsigned)raw[9] << 8, (unsigned)raw[10]);
}

/*
 * Find the header slot that serves the way the daemon does (vol_keys_open), and leave its keys
 * in f->keys and its file id in file_id. Returns PASS_JUDGED with v->hdr set (HDR_OK: keys ready), or another pass result.
 */
static enum pass check_header(struct fsck *f, int fd, struct verdict *v, uint8_t file_id[FMT_FILE_ID_SIZE])
{
	uint8_t area[FMT_DATA_OFFSET];
	struct content_headers hs;
	struct vol_opened o;
	bool all_unwrap_refused = true;
	unsigned good;
	ssize_t n;
	int r;

	if ((uint64_t)v->st.st_size < fmt_header_area(f->vol.vol.format)) {
		v->hdr = HDR_SHORT;
		return PASS_JUDGED;
	}
	n = util_pread_full(fd, area, sizeof(area), 0);
	if (n < 0) {
		snprintf(v->why, sizeof(v->why), "reading its header: %s", strerror((int)-n));
		return PASS_NOT_CHECKED;
	}
	if (n < (ssize_t)sizeof(area))
		return PASS_CHANGED;
	r = content_headers_read(fd, f->vol.vol.format, &hs);
	if (r == -EIO) {
		/* A header of the other layout parses but does not count (the daemon answers EIO). */
		v->hdr = content_headers_read(fd, FMT_LAYOUT_ANY, &hs) == 0 ? HDR_WRONG_LAYOUT : HDR_NO_PARSE;
		v->version = v->hdr == HDR_WRONG_LAYOUT ? hs.hdr[0].version : 0;
		return PASS_JUDGED;
	}
	if (r == -EPROTONOSUPPORT) {
		unknown_format(area, v);
		return PASS_NOT_CHECKED;
	}
	if (r == -ENODATA)
		return PASS_CHANGED;
	if (r < 0) {
		snprintf(v->why, sizeof(v->why), "reading its header: %s", strerror(-r));
		return PASS_NOT_CHECKED;
	}
	r = vol_keys_open(f->vol.kms, f->vol.vol.volume, &hs, f->dek, f->keys, NULL, &o);
	sodium_memzero(f->dek, FMT_DEK_SIZE);
	if (r < 0 && r != -EBADMSG) {
		const struct kms_err *err = &o.slot[o.tried - 1].err;

		/* Not the file's fault: the key or the service. Asking again per file would only
		 * hammer a service that is down. */
		f->fatal = r == -ENOKEY || r == -EACCES || r == -EKEYREVOKED ? KEYFS_EXIT_LOCKED : KEYFS_EXIT_KMS;
		snprintf(f->fatal_msg, sizeof(f->fatal_msg), "%s", err->msg[0] ? err->msg : strerror(-r));
		return PASS_FATAL;
	}
	if (r < 0) {
		for (unsigned i = 0; i < hs.count; i++)
			all_unwrap_refused = all_unwrap_refused && o.slot[i].why == VOL_SLOT_NO_UNWRAP;
		v->hdr = all_unwrap_refused ? HDR_NO_UNWRAP : HDR_NO_AUTH;
		snprintf(v->key_id, sizeof(v->key_id), "%s", hs.hdr[0].key_id);
		return PASS_JUDGED;
	}
	good = (unsigned)r;
	memcpy(file_id, hs.hdr[good].file_id, FMT_FILE_ID_SIZE);
	v->hdr = HDR_OK;
	/* The slot that does not serve: harmless while this one does (the daemon falls back the
	 * same way, and a torn rewrite leaves exactly this), so a note, not damage. */
	if (good > 0) {
		slot_note(v, hs.slot[0], &hs.hdr[0],
			  o.slot[0].why == VOL_SLOT_NO_UNWRAP ? "has a wrapped key that does not unwrap" : "does not authenticate",
			  hs.slot[good], &hs.hdr[good]);
	} else if (hs.count == 2) {
		/* Both slots hold the same DEK, so its keys authenticate the other slot too. */
		if (fmt_header_verify(hs.raw[1], f->keys) < 0)
			slot_note(v, hs.slot[1], &hs.hdr[1], "does not authenticate", hs.slot[0], &hs.hdr[0]);
	} else {
		unsigned other = 1 - hs.slot[0];
		const uint8_t *raw = area + fmt_header_offset(other);
		struct fmt_header h;

		/* A slot never used is all zeros: a new file leaves slot 1 so. */
		if (!all_zero(raw, FMT_HEADER_SIZE))
			slot_note(v, other, NULL,
				  fmt_header_parse(raw, &h) == -EPROTONOSUPPORT
				  ? "has a format version or cipher this keyfsctl does not know" : "does not parse",
				  hs.slot[0], &hs.hdr[0]);
	}
	return PASS_JUDGED;
}

/* Open every chunk of the file fd, whose header authenticated, in big sequential reads. Whole
 * chunks inside a hole of the backing file are zeros, which is a valid hole: they are skipped
 * without reading. The last, partial chunk is always sealed, so it is always read. */
static enum pass check_chunks_v2(struct fsck *f, int fd, const char *path, struct verdict *v,
				 const uint8_t file_id[FMT_FILE_ID_SIZE]);

static enum pass check_chunks(struct fsck *f, int fd, const char *path, struct verdict *v,
			      const uint8_t file_id[FMT_FILE_ID_SIZE])
{
	uint64_t size = (uint64_t)v->st.st_size, data = size - FMT_DATA_OFFSET;
	uint64_t nfull = data / CDS, rest = data % CDS;
	uint64_t nchunks = nfull + (rest > FMT_CHUNK_OVERHEAD ? 1 : 0);
	uint64_t idx = 0, ext_start = 0, ext_end = 0;

	if (f->vol.vol.format == FMT_LAYOUT_V2)
		return check_chunks_v2(f, fd, path, v, file_id);
	if (rest > 0 && rest <= FMT_CHUNK_OVERHEAD) {
		v->cut = true;
		v->cut_chunk = nfull;
	}
	while (idx < nchunks) {
		uint64_t off = fmt_chunk_offset(idx), n, len;
		ssize_t got;

		if (off >= ext_end) {
			off_t d = lseek(fd, (off_t)off, SEEK_DATA), h;

			if (d < 0 && errno == ENXIO) {
				ext_start = ext_end = size;     /* a hole up to the end */
			} else if (d < 0) {
				ext_start = off;                /* no SEEK_DATA here: read it all */
				ext_end = size;
			} else {
				h = lseek(fd, d, SEEK_HOLE);
				ext_start = (uint64_t)d;
				ext_end = h < 0 ? size : (uint64_t)h;
				if (ext_end <= off)
					ext_end = size;
			}
		}
		if (ext_start > off) {
			uint64_t skip = (ext_start - off) / CDS;

			if (skip > nfull - idx)
				skip = nfull - idx;
			if (skip) {
				idx += skip;
				v->bytes += skip * FMT_CHUNK_SIZE;
				continue;
			}
		}
		n = nchunks - idx < BLOCK_CHUNKS ? nchunks - idx : BLOCK_CHUNKS;
		len = idx + n > nfull ? (n - 1) * CDS + rest : n * CDS;
		got = util_pread_full(fd, f->buf, len, off);
		if (got < 0) {
			snprintf(v->why, sizeof(v->why), "reading backing bytes %" PRIu64 "-%" PRIu64 ": %s", off,
				 off + len - 1, strerror((int)-got));
			return PASS_NOT_CHECKED;
		}
		if ((uint64_t)got < len)
			return PASS_CHANGED;
		for (uint64_t k = 0; k < n; k++) {
			size_t clen = k + 1 < n ? CDS : len - k * CDS;
			int r = fmt_chunk_open(f->keys, file_id, idx + k, f->buf + k * CDS, clen, f->pt);

			if (r < 0) {
				if (v->nbad < LIST_CHUNKS) {
					v->bad[v->nbad] = idx + k;
					v->bad_len[v->nbad] = (uint32_t)(clen - FMT_CHUNK_OVERHEAD);
				}
				v->nbad++;
			}
			v->bytes += clen - FMT_CHUNK_OVERHEAD;
		}
		idx += n;
		progress_update(&f->prog, f->files, f->bytes + v->bytes, path);
	}
	return PASS_JUDGED;
}

/* Note chunk idx of plaintext length len as damaged. */
static void bad_chunk(struct verdict *v, uint64_t idx, size_t len)
{
	if (v->nbad < LIST_CHUNKS) {
		v->bad[v->nbad] = idx;
		v->bad_len[v->nbad] = (uint32_t)len;
	}
	v->nbad++;
}

/* Where the v2 file of backing size b was cut, if it was (a rest of 1..4096 bytes after the header
 * page and the whole groups: fmt_backing_size_valid): the chunk that counts as its last byte. */
static void cut_v2(uint64_t b, struct verdict *v)
{
	if (b > FMT_V2_HEADER_AREA && !fmt_backing_size_valid(FMT_LAYOUT_V2, b)) {
		v->cut = true;
		v->cut_chunk = (b - FMT_V2_HEADER_AREA) / FMT_V2_GROUP_DISK * FMT_V2_GROUP_CHUNKS;
	}
}

/* v2: per group, its tag entries, then the data pages of the chunks that are not holes (an
 * all-zero entry), each opened; a group all of holes is not read further. */
static enum pass check_chunks_v2(struct fsck *f, int fd, const char *path, struct verdict *v,
				 const uint8_t file_id[FMT_FILE_ID_SIZE])
{
	uint8_t ents[FMT_V2_GROUP_CHUNKS * FMT_V2_ENTRY_SIZE];
	uint64_t b = (uint64_t)v->st.st_size, p = fmt_plain_size(FMT_LAYOUT_V2, b);
	uint64_t nchunks = (p + FMT_CHUNK_SIZE - 1) / FMT_CHUNK_SIZE;

	cut_v2(b, v);
	if (v->cut)
		nchunks = v->cut_chunk;         /* the cut chunk is reported as the cut */
	for (uint64_t a = 0; a < nchunks; a += FMT_V2_GROUP_CHUNKS) {
		uint64_t n = nchunks - a < FMT_V2_GROUP_CHUNKS ? nchunks - a : FMT_V2_GROUP_CHUNKS;
		uint64_t first = n, last = 0, len;
		ssize_t got;

		got = util_pread_full(fd, ents, n * FMT_V2_ENTRY_SIZE, fmt_v2_entry_offset(a));
		if (got < 0) {
			snprintf(v->why, sizeof(v->why), "reading tag page of chunk %" PRIu64 ": %s", a, strerror((int)-got));
			return PASS_NOT_CHECKED;
		}
		if ((uint64_t)got < n * FMT_V2_ENTRY_SIZE)
			return PASS_CHANGED;
		for (uint64_t k = 0; k < n; k++) {
			uint64_t clen = p - (a + k) * FMT_CHUNK_SIZE < FMT_CHUNK_SIZE ? p - (a + k) * FMT_CHUNK_SIZE : FMT_CHUNK_SIZE;

			/* A partial last chunk is never a hole: an all-zero entry there is damage. */
			if (!fmt_v2_entry_is_hole(ents + k * FMT_V2_ENTRY_SIZE) || clen < FMT_CHUNK_SIZE) {
				first = first < k ? first : k;
				last = k;
			} else {
				v->bytes += FMT_CHUNK_SIZE;
			}
		}
		if (first == n)
			continue;
		len = (last - first) * FMT_CHUNK_SIZE +
		      (p - (a + last) * FMT_CHUNK_SIZE < FMT_CHUNK_SIZE ? p - (a + last) * FMT_CHUNK_SIZE : FMT_CHUNK_SIZE);
		got = util_pread_full(fd, f->buf, len, fmt_v2_page_offset(a + first));
		if (got < 0) {
			snprintf(v->why, sizeof(v->why), "reading data pages of chunks %" PRIu64 "-%" PRIu64 ": %s",
				 a + first, a + last, strerror((int)-got));
			return PASS_NOT_CHECKED;
		}
		if ((uint64_t)got < len)
			return PASS_CHANGED;
		for (uint64_t k = first; k <= last; k++) {
			const uint8_t *e = ents + k * FMT_V2_ENTRY_SIZE;
			size_t clen = k < last ? FMT_CHUNK_SIZE : (size_t)(len - (last - first) * FMT_CHUNK_SIZE);

			if (fmt_v2_entry_is_hole(e) && clen == FMT_CHUNK_SIZE)
				continue;       /* counted above */
			if (fmt_chunk_open_v2(f->keys, file_id, a + k, e, f->buf + (k - first) * FMT_CHUNK_SIZE, clen,
					      f->pt) < 0)
				bad_chunk(v, a + k, clen);
			v->bytes += clen;
		}
		progress_update(&f->prog, f->files, f->bytes + v->bytes, path);
	}
	return PASS_JUDGED;
}

/* One pass over the regular file named e->name: open by name (it may have been replaced),
 * check, and compare its stat before and after. */
static enum pass check_once(struct fsck *f, const struct walk_entry *e, bool first, struct verdict *v)
{
	uint8_t file_id[FMT_FILE_ID_SIZE];
	struct stat after;
	enum pass p;
	int fd, r;

	memset(v, 0, sizeof(*v));
	/* O_NOATIME: a check is not a use. It needs ownership or CAP_FOWNER. */
	fd = openat(e->dirfd, e->name, O_RDONLY | O_NOFOLLOW | O_NOCTTY | O_NONBLOCK | O_CLOEXEC | O_NOATIME);
	if (fd < 0 && errno == EPERM)
		fd = openat(e->dirfd, e->name, O_RDONLY | O_NOFOLLOW | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0) {
		if (errno == ENOENT || errno == ELOOP)
			return PASS_GONE;
		snprintf(v->why, sizeof(v->why), "%s", strerror(errno));
		return PASS_NOT_CHECKED;
	}
	if (fstat(fd, &v->st) < 0) {
		snprintf(v->why, sizeof(v->why), "%s", strerror(errno));
		p = PASS_NOT_CHECKED;
		goto out;
	}
	if (!S_ISREG(v->st.st_mode)) {
		p = PASS_GONE;
		goto out;
	}
	if (first && v->st.st_nlink > 1) {
		r = inoset_add(&f->links, v->st.st_dev, v->st.st_ino);
		if (r < 0) {
			snprintf(v->why, sizeof(v->why), "%s", strerror(-r));
			p = PASS_NOT_CHECKED;
			goto out;
		}
		if (r == 1) {
			/* Another name of a file already checked. */
			p = PASS_GONE;
			goto out;
		}
	}
	if (v->st.st_size == 0) {
		/* No header yet: keyfs writes it with the first write. */
		p = PASS_JUDGED;
		goto out;
	}
	posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
	p = check_header(f, fd, v, file_id);
	if (p == PASS_JUDGED && v->hdr == HDR_OK)
		p = check_chunks(f, fd, e->path, v, file_id);
	else if (p == PASS_JUDGED && v->hdr != HDR_SHORT && f->vol.vol.format == FMT_LAYOUT_V2)
		cut_v2((uint64_t)v->st.st_size, v);
	else if (p == PASS_JUDGED && v->hdr != HDR_SHORT) {
		/* The size still says whether the file was cut, key or no key. */
		uint64_t rest = ((uint64_t)v->st.st_size - FMT_DATA_OFFSET) % CDS;

		if (rest > 0 && rest <= FMT_CHUNK_OVERHEAD) {
			v->cut = true;
			v->cut_chunk = ((uint64_t)v->st.st_size - FMT_DATA_OFFSET) / CDS;
		}
	}
	if (p == PASS_JUDGED || p == PASS_NOT_CHECKED) {
		if (fstat(fd, &after) < 0 || !same_stat(&v->st, &after))
			p = PASS_CHANGED;
	}
out:
	sodium_memzero(f->keys, sizeof(*f->keys));
	sodium_memzero(f->pt, FMT_CHUNK_SIZE);
	close(fd);
	return p;
}

static int on_entry(const struct walk_entry *e, void *arg)
{
	struct fsck *f = arg;
	struct verdict vs, *v = &vs;
	enum pass p = PASS_CHANGED;

	if (S_ISDIR(e->st->st_mode) || S_ISLNK(e->st->st_mode))
		return 0;
	if (!S_ISREG(e->st->st_mode)) {
		char note[64];

		snprintf(note, sizeof(note), "a %s: keyfs keeps no contents for it", node_kind(e->st->st_mode));
		report_note(f, e->path, note);
		return 0;
	}
	progress_update(&f->prog, f->files, f->bytes, e->path);
	for (unsigned attempt = 0; attempt < ATTEMPTS; attempt++) {
		p = check_once(f, e, attempt == 0, v);
		if (p == PASS_CHANGED || (p == PASS_JUDGED && damaged(v) && attempt + 1 < ATTEMPTS))
			continue;
		break;
	}
	switch (p) {
	case PASS_GONE:
		return 0;
	case PASS_CHANGED:
		report_changed(f, e->path);
		return 0;
	case PASS_NOT_CHECKED:
		report_not_checked(f, e->path, v->why);
		return 0;
	case PASS_FATAL:
		report_not_checked(f, e->path, f->fatal_msg);
		snprintf(f->fatal_path, sizeof(f->fatal_path), "%s", e->path);
		return -ECANCELED;
	case PASS_JUDGED:
		break;
	}
	f->files++;
	f->bytes += v->bytes;
	if (v->note[0])
		report_note(f, e->path, v->note);
	if (damaged(v)) {
		f->damaged++;
		if (f->json)
			report_damage_json(f, e->path, v);
		else
			report_damage_text(f, e->path, v);
	}
	progress_update(&f->prog, f->files, f->bytes, e->path);
	return 0;
}

static int on_error(const char *path, int err, void *arg)
{
	struct fsck *f = arg;

	switch (err) {
	case EXDEV:
		report_not_checked(f, path, "another filesystem is mounted there");
		break;
	case ELOOP:
		report_not_checked(f, path, "too deep: more than 1024 directory levels");
		break;
	default:
		report_not_checked(f, path, strerror(err));
		break;
	}
	return 0;
}

static void print_json(struct fsck *f, const char *result)
{
	printf("{\n  \"backing\": ");
	util_json_string(stdout, f->vol.backing);
	printf(",\n  \"files_checked\": %" PRIu64 ",\n  \"bytes_checked\": %" PRIu64 ",\n", f->files, f->bytes);
	jlist_print("damaged", &f->j_damaged, false);
	jlist_print("notes", &f->j_notes, false);
	jlist_print("not_checked", &f->j_not_checked, false);
	jlist_print("changed", &f->j_changed, false);
	printf("  \"stopped\": ");
	if (f->fatal)
		util_json_string(stdout, f->fatal_msg);
	else
		fputs("null", stdout);
	printf(",\n  \"result\": \"%s\"\n}\n", result);
}

static void fsck_free(struct fsck *f)
{
	jlist_close(&f->j_damaged);
	jlist_close(&f->j_notes);
	jlist_close(&f->j_not_checked);
	jlist_close(&f->j_changed);
	free(f->links.v);
	free(f->buf);
	sodium_free(f->pt);
	sodium_free(f->dek);
	sodium_free(f->keys);
	cli_volume_close(&f->vol);
	free(f);
}

int cmd_fsck(int argc, char **argv)
{
	struct cli_kms_args kargs = { NULL, NULL, NULL };
	const char *backing = NULL, *result;
	struct fsck *f;
	int c, r, rc;

	f = calloc(1, sizeof(*f));
	if (!f) {
		log_err("out of memory");
		return KEYFS_EXIT_FAILURE;
	}
	f->vol.root_fd = -1;
	optind = 0;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "-:h", fsck_options, NULL)) != -1) {
		if (cli_kms_option(&kargs, c, optarg))
			continue;
		switch (c) {
		case 1:
			if (backing) {
				rc = cli_usage_error("fsck", "one BACKING only ('%s' and '%s')", backing, optarg);
				goto out;
			}
			backing = optarg;
			break;
		case OPT_JSON: f->json = true; break;
		case 'h':
		case OPT_HELP:
			cli_print_usage(stdout, "fsck");
			rc = KEYFS_EXIT_OK;
			goto out;
		default:
			rc = cli_option_error("fsck", c, argv);
			goto out;
		}
	}
	if (optind < argc) {
		rc = backing ? cli_usage_error("fsck", "one BACKING only ('%s' and '%s')", backing, argv[optind])
			: cli_usage_error("fsck", "one BACKING only");
		goto out;
	}
	if (!backing) {
		rc = cli_usage_error("fsck", "missing BACKING");
		goto out;
	}
	if (sodium_init() < 0) {
		log_err("libsodium cannot be initialised");
		rc = KEYFS_EXIT_FAILURE;
		goto out;
	}
	rc = cli_volume_open(backing, &kargs, "fsck", &f->vol);
	if (rc)
		goto out;
	if (strcmp(f->vol.vol.kms, VOLDESC_KMS_KEYPROTECT) == 0 && cli_key_id_is_alias(f->vol.vol.key_id))
		cli_key_id_hint(f->vol.backing, f->vol.vol.key_id);
	rc = cli_volume_kms(&f->vol, "fsck");
	if (rc)
		goto out;
	f->buf = malloc(BLOCK_CHUNKS * CDS);
	f->pt = sodium_malloc(FMT_CHUNK_SIZE);
	f->dek = sodium_malloc(FMT_DEK_SIZE);
	f->keys = sodium_malloc(sizeof(*f->keys));
	if (!f->buf || !f->pt || !f->dek || !f->keys ||
	    (f->json && (jlist_open(&f->j_damaged) < 0 || jlist_open(&f->j_notes) < 0 ||
			 jlist_open(&f->j_not_checked) < 0 || jlist_open(&f->j_changed) < 0))) {
		log_err("out of memory");
		rc = KEYFS_EXIT_FAILURE;
		goto out;
	}
	progress_init(&f->prog, "fsck");
	r = walk_tree(f->vol.root_fd, true, on_entry, on_error, f);
	progress_clear(&f->prog);
	if (r < 0 && r != -ECANCELED) {
		log_err("walking '%s': %s", f->vol.backing, strerror(-r));
		rc = r == -ENOMEM ? KEYFS_EXIT_FAILURE : KEYFS_EXIT_IO;
		goto out;
	}
	if (f->damaged)
		result = "damaged";
	else if (f->fatal || f->not_checked)
		result = "incomplete";
	else
		result = "clean";
	if (f->json) {
		print_json(f, result);
	} else {
		printf("checked %" PRIu64 " files, %" PRIu64 " plaintext bytes: %" PRIu64 " damaged, %" PRIu64
		       " not checked, %" PRIu64 " changed while checking\n",
		       f->files, f->bytes, f->damaged, f->not_checked, f->changed);
	}
	fflush(stdout);
	if (f->fatal)
		log_err("fsck of '%s' stopped at '%s': %s: the files after it were not checked", f->vol.backing,
			f->fatal_path, f->fatal_msg);
	else if (f->damaged)
		log_err("volume '%s' has %" PRIu64 " damaged %s", f->vol.backing, f->damaged,
			f->damaged == 1 ? "file" : "files");
	else if (f->not_checked)
		log_err("volume '%s': %" PRIu64 " %s could not be checked", f->vol.backing, f->not_checked,
			f->not_checked == 1 ? "entry" : "entries");
	rc = f->damaged ? KEYFS_EXIT_DAMAGED : f->fatal ? f->fatal : f->not_checked ? KEYFS_EXIT_IO : KEYFS_EXIT_OK;
out:
	fsck_free(f);
	return rc;
}
