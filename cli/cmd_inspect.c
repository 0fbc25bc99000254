/* cmd_inspect.c: keyfsctl inspect [-r]: the public keyfs header of files, read from the backing side without a key */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sodium.h>

#include "keyfs/content.h"
#include "keyfs/exitcode.h"
#include "keyfs/format.h"
#include "keyfs/log.h"
#include "keyfs/util.h"
#include "keyfs/voldesc.h"
#include "cli.h"
#include "progress.h"
#include "volume.h"
#include "walk.h"

/* inspect -r keeps counts, not files; these bound the rest of what it holds. */
#define KEYVERS_MAX 1024                /* distinct (key, key version) pairs counted one by one */
#define LISTED_MAX 10000                /* unreadable or not visited paths listed by name */

enum { OPT_JSON = CLI_OPT_BASE, OPT_HELP };

static const struct option inspect_options[] = {
	{ "recursive", no_argument, NULL, 'r' },
	{ "json", no_argument, NULL, OPT_JSON },
	{ "help", no_argument, NULL, OPT_HELP },
	{ NULL, 0, NULL, 0 },
};

/* What a keyfs mount's daemon says of itself, asked once, when a path inside it is shown. */
struct mount_state {
	bool asked;
	char state[16];                 /* "locked", "unlocked", or "mounted" when it did not say */
	char reason[32];                /* "" when none */
};

struct mount {
	char *mountpoint;
	char *root;                     /* the mount's root inside its filesystem (bind mounts) */
	char *fstype;
	char *source;
	dev_t dev;
	struct mount_state *ms;         /* keyfs mounts only: filled by mount_state() */
};

/* Its daemon answers within this; a hung one leaves the state "mounted". */
#define MOUNT_STATE_TIMEOUT_S 2

static const struct mount_state *mount_state(const struct mount *m)
{
	struct mount_state *ms = m->ms;

	if (!ms->asked) {
		ms->asked = true;
		if (cli_mount_state(m->mountpoint, MOUNT_STATE_TIMEOUT_S, ms->state, sizeof(ms->state), ms->reason,
				    sizeof(ms->reason)) < 0) {
			snprintf(ms->state, sizeof(ms->state), "mounted");
			ms->reason[0] = '\0';
		}
	}
	return ms;
}

/* " (unlocked)", " (locked: key-destroyed)", or " (mounted)" when the daemon did not say. */
static void print_mount_state(const struct mount *m)
{
	const struct mount_state *ms = mount_state(m);

	printf(" (%s", ms->state);
	if (ms->reason[0]) {
		fputs(": ", stdout);
		cli_fputs_safe(stdout, ms->reason);
	}
	putchar(')');
}

struct mounts {
	struct mount *v;
	size_t n;
};

/* Where a PATH argument leads. */
struct target {
	const char *arg;                /* as the user typed it */
	char backing[PATH_MAX];
	const struct mount *mount;      /* NULL when not inside a live keyfs mount */
	bool found;                     /* backing exists: -r shows it in the summary */
	struct voldesc *desc;           /* -r of a volume's backing root: its description, else NULL */
};

/* Why there is nothing to show for a path: an exit code, and the rest of a message that starts
 * with the path (" is not a keyfs file: ...", ": Permission denied"). */
struct problem {
	int rc;
	char tail[512];
};

/* The header of one file. */
struct result {
	const char *path;               /* as the user typed it; with -r joined with the walk's path */
	const char *backing;            /* absolute */
	const struct mount *mount;
	bool empty;                     /* backing size 0: no header yet */
	bool odd_size;                  /* a backing size no whole keyfs file has */
	struct fmt_header hdr;
	uint64_t backing_size;
	char file_id[2 * FMT_FILE_ID_SIZE + 1];
	char wrapped_sha256[2 * crypto_hash_sha256_BYTES + 1];
};

static void mounts_free(struct mounts *m)
{
	for (size_t i = 0; i < m->n; i++) {
		free(m->v[i].mountpoint);
		free(m->v[i].root);
		free(m->v[i].fstype);
		free(m->v[i].source);
		free(m->v[i].ms);
	}
	free(m->v);
	m->v = NULL;
	m->n = 0;
}

/* Keep a copy of m in the list ctx. */
static int mounts_add(const struct util_mount *m, void *ctx)
{
	struct mounts *ms = ctx;
	struct mount *v = realloc(ms->v, (ms->n + 1) * sizeof(*v));

	if (!v)
		return -ENOMEM;
	ms->v = v;
	/* Counted at once, so that mounts_free frees whatever part of it was allocated. */
	v = &ms->v[ms->n++];
	*v = (struct mount){
		.mountpoint = strdup(m->mountpoint),
		.root = strdup(m->root),
		.fstype = strdup(m->fstype),
		.source = strdup(m->source),
		.dev = m->dev,
	};
	if (strcmp(m->fstype, KEYFS_FSTYPE) == 0 && !(v->ms = calloc(1, sizeof(*v->ms))))
		return -ENOMEM;
	if (!v->mountpoint || !v->root || !v->fstype || !v->source)
		return -ENOMEM;
	return 0;
}

/* All mounts of this namespace, in mount order (a later one covers an earlier one). */
static int mounts_read(struct mounts *ret)
{
	struct mounts m = { NULL, 0 };
	int r = util_mountinfo_each(mounts_add, &m);

	if (r < 0) {
		mounts_free(&m);
		return r;
	}
	*ret = m;
	return 0;
}

/* The mount that holds the absolute, normalised path: the longest mountpoint prefix, the latest on ties. */
static const struct mount *mount_of(const struct mounts *m, const char *path, size_t *ret_len)
{
	const struct mount *best = NULL;
	size_t best_len = 0;

	for (size_t i = 0; i < m->n; i++) {
		const char *mp = m->v[i].mountpoint;
		size_t n = strlen(mp);

		if (strcmp(mp, "/") == 0)
			n = 0;
		else if (strncmp(path, mp, n) != 0 || (path[n] != '\0' && path[n] != '/'))
			continue;
		if (!best || n >= best_len) {
			best = &m->v[i];
			best_len = n;
		}
	}
	*ret_len = best_len;
	return best;
}

/* Map a path inside a keyfs mount to its backing file: source + root + the rest. */
static int map_to_backing(const struct mount *mt, const char *path, size_t mplen, char *out, size_t size)
{
	const char *root = strcmp(mt->root, "/") == 0 ? "" : mt->root;
	int n;

	if (mt->source[0] != '/')
		return -EINVAL;
	n = snprintf(out, size, "%s%s%s", mt->source, root, path + mplen);
	if (n < 0 || (size_t)n >= size)
		return -ENAMETOOLONG;
	return 0;
}

static int problem(struct problem *pr, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Fill pr; returns rc. */
static int problem(struct problem *pr, int rc, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(pr->tail, sizeof(pr->tail), fmt, ap);
	va_end(ap);
	pr->rc = rc;
	return rc;
}

/* Any I/O error outranks "not a keyfs file" in the exit code. */
static void merge_rc(int *rc, int one)
{
	if (one && *rc != KEYFS_EXIT_IO)
		*rc = one;
}

/*
 * Find the backing path of t->arg. Paths inside a keyfs mount map lexically, so that a locked,
 * hung or dead mount is never asked anything; other paths resolve their parent, which may
 * lead into a mount through a symlink. Returns 0 or an exit code with pr filled.
 */
static int locate(const struct mounts *m, struct target *t, struct problem *pr)
{
	char path[PATH_MAX];
	const struct mount *mt;
	size_t mplen;
	int r;

	r = cli_abs_path(t->arg, path, sizeof(path));
	if (r < 0)
		goto fail;
	mt = mount_of(m, path, &mplen);
	if (!mt || strcmp(mt->fstype, KEYFS_FSTYPE) != 0) {
		r = util_parent_real_path(t->arg, path, sizeof(path));
		if (r < 0)
			goto fail;
		mt = mount_of(m, path, &mplen);
	}
	if (mt && strcmp(mt->fstype, KEYFS_FSTYPE) == 0) {
		r = map_to_backing(mt, path, mplen, t->backing, sizeof(t->backing));
		if (r == -EINVAL)
			return problem(pr, KEYFS_EXIT_CONFIG,
				       " is inside keyfs mount '%s', whose backing dir '%s' is not an absolute path",
				       mt->mountpoint, mt->source);
		if (r < 0)
			goto fail;
		t->mount = mt;
		return 0;
	}
	r = cli_copy(t->backing, sizeof(t->backing), path);
	if (r == 0)
		return 0;
fail:
	if (r == -ENOENT || r == -ENOTDIR)
		return problem(pr, KEYFS_EXIT_CONFIG, " does not exist");
	return problem(pr, KEYFS_EXIT_IO, ": %s", strerror(-r));
}

/* st is the fstat of an opened file: it must be a regular file outside the keyfs mount. */
static int check_opened(const struct stat *st, const struct mount *mount, struct problem *pr)
{
	if (!S_ISREG(st->st_mode))
		return problem(pr, KEYFS_EXIT_CONFIG, " is not a keyfs file: it is not a regular file");
	/* A symlink in the backing tree that leads back into the mount would show us plaintext. */
	if (mount && st->st_dev == mount->dev)
		return problem(pr, KEYFS_EXIT_CONFIG,
			       " resolves into the keyfs mount '%s' itself: inspect its backing file instead",
			       mount->mountpoint);
	return 0;
}

/* Read the header of the regular file fd (fstat in st) into res. Returns 0 or an exit code. */
static int header_read(int fd, const struct stat *st, struct result *res, struct problem *pr)
{
	uint8_t digest[crypto_hash_sha256_BYTES];
	int r;

	res->backing_size = (uint64_t)st->st_size;
	if (st->st_size == 0) {
		res->empty = true;
		return 0;
	}
	/* Any layout: the header's version says which this file has (and so its volume's). */
	r = content_header_read(fd, FMT_LAYOUT_ANY, &res->hdr, NULL);
	if (r == -ENODATA) {
		res->empty = true;
		res->backing_size = 0;
		return 0;
	}
	if (r == -EIO)
		return problem(pr, KEYFS_EXIT_CONFIG, " is not a keyfs file: %s", st->st_size < FMT_DATA_OFFSET ?
			       "it is shorter than a keyfs header" : "it has no valid keyfs header");
	if (r == -EPROTONOSUPPORT)
		return problem(pr, KEYFS_EXIT_CONFIG,
			       " has a keyfs header of a format version or cipher this keyfsctl does not know");
	if (r < 0)
		return problem(pr, KEYFS_EXIT_IO, ": reading its header: %s", strerror(-r));
	fmt_file_id_hex(res->hdr.file_id, res->file_id);
	crypto_hash_sha256(digest, res->hdr.wrapped, res->hdr.wrapped_len);
	util_hex(digest, sizeof(digest), res->wrapped_sha256);
	res->odd_size = !fmt_backing_size_valid(res->hdr.version, res->backing_size)
			|| res->backing_size < fmt_header_area(res->hdr.version);
	return 0;
}

/* One PATH without -r: it must be a keyfs file. */
static int read_one(const struct target *t, struct result *res, struct problem *pr)
{
	const char *base = strrchr(t->backing, '/');
	struct stat st;
	int fd, rc;

	base = base ? base + 1 : t->backing;
	res->path = t->arg;
	res->backing = t->backing;
	res->mount = t->mount;
	if (lstat(t->backing, &st) < 0) {
		if (errno == ENOENT || errno == ENOTDIR)
			return problem(pr, KEYFS_EXIT_CONFIG, " does not exist");
		return problem(pr, KEYFS_EXIT_IO, ": %s", strerror(errno));
	}
	if (S_ISDIR(st.st_mode))
		return problem(pr, KEYFS_EXIT_CONFIG, " is not a keyfs file: it is a directory");
	if (S_ISLNK(st.st_mode))
		return problem(pr, KEYFS_EXIT_CONFIG, " is not a keyfs file: it is a symbolic link");
	if (!S_ISREG(st.st_mode))
		return problem(pr, KEYFS_EXIT_CONFIG, " is not a keyfs file: it is not a regular file");
	fd = open(t->backing, O_RDONLY | O_NOFOLLOW | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0)
		return problem(pr, KEYFS_EXIT_IO, ": %s", strerror(errno));
	if (fstat(fd, &st) < 0)
		rc = problem(pr, KEYFS_EXIT_IO, ": %s", strerror(errno));
	else
		rc = check_opened(&st, t->mount, pr);
	if (rc == 0) {
		rc = header_read(fd, &st, res, pr);
		if (rc && strcmp(base, VOLDESC_NAME) == 0)
			rc = problem(pr, KEYFS_EXIT_CONFIG, " is the volume description of a keyfs volume (%s), "
				     "not a keyfs file: it holds no file data", VOLDESC_NAME);
	}
	close(fd);
	return rc;
}

static void print_text(const struct result *res, bool first)
{
	const char *cipher;

	if (!first)
		putchar('\n');
	printf("path: %s\n", res->path);
	printf("backing: %s\n", res->backing);
	if (res->mount) {
		printf("mount: %s", res->mount->mountpoint);
		print_mount_state(res->mount);
		putchar('\n');
	} else
		printf("mount: none\n");
	if (res->empty) {
		printf("format: none (empty file, no header yet)\n");
		printf("plaintext_size: 0\n");
		return;
	}
	cipher = fmt_cipher_name(res->hdr.cipher);
	printf("format: %u\n", (unsigned)res->hdr.version);
	if (cipher)
		printf("cipher: %s\n", cipher);
	else
		printf("cipher: unknown (%u)\n", (unsigned)res->hdr.cipher);
	printf("chunk_size: %" PRIu32 "\n", res->hdr.chunk_size);
	printf("file_id: %s\n", res->file_id);
	printf("key: %s\n", res->hdr.key_id);
	printf("key_version: %s\n", res->hdr.key_version);
	printf("plaintext_size: %" PRIu64 "\n", fmt_plain_size(res->hdr.version, res->backing_size));
	printf("backing_size: %" PRIu64 "\n", res->backing_size);
	printf("wrapped_dek_sha256: %s\n", res->wrapped_sha256);
}

static void json_field(const char *ind, const char *name, const char *value, bool last)
{
	printf("%s  \"%s\": ", ind, name);
	if (value)
		util_json_string(stdout, value);
	else
		fputs("null", stdout);
	fputs(last ? "\n" : ",\n", stdout);
}

/* One file's object, its lines indented by ind. */
static void print_json(const struct result *res, bool first, const char *ind)
{
	const char *cipher = res->empty ? NULL : fmt_cipher_name(res->hdr.cipher);

	printf(first ? "%s{\n" : ",\n%s{\n", ind);
	json_field(ind, "path", res->path, false);
	if (res->empty)
		printf("%s  \"format\": null,\n", ind);
	else
		printf("%s  \"format\": %u,\n", ind, (unsigned)res->hdr.version);
	json_field(ind, "cipher", cipher, false);
	if (res->empty)
		printf("%s  \"chunk_size\": null,\n", ind);
	else
		printf("%s  \"chunk_size\": %" PRIu32 ",\n", ind, res->hdr.chunk_size);
	json_field(ind, "file_id", res->empty ? NULL : res->file_id, false);
	json_field(ind, "key", res->empty ? NULL : res->hdr.key_id, false);
	json_field(ind, "key_version", res->empty ? NULL : res->hdr.key_version, false);
	printf("%s  \"plaintext_size\": %" PRIu64 ",\n", ind, res->empty ? 0 : fmt_plain_size(res->hdr.version, res->backing_size));
	printf("%s  \"backing_size\": %" PRIu64 ",\n", ind, res->backing_size);
	json_field(ind, "wrapped_dek_sha256", res->empty ? NULL : res->wrapped_sha256, false);
	json_field(ind, "backing", res->backing, false);
	if (res->mount) {
		printf("%s  \"mount\": {\"mountpoint\": ", ind);
		const struct mount_state *ms = mount_state(res->mount);

		util_json_string(stdout, res->mount->mountpoint);
		printf(", \"state\": \"%s\", \"reason\": ", ms->state);
		if (ms->reason[0])
			util_json_string(stdout, ms->reason);
		else
			fputs("null", stdout);
		fputs("}\n", stdout);
	} else {
		printf("%s  \"mount\": null\n", ind);
	}
	printf("%s}", ind);
}

/* ---- inspect -r: walk trees, stream the files, keep only counts ---- */

struct keyver {
	char key[FMT_KEY_ID_MAX + 1];
	char version[FMT_KEY_VERSION_MAX + 1];
	uint64_t files;
};

/* Report entries (unreadable, not visited), rendered as they will be printed: they come after
 * the streamed files in the JSON object, and under their count in the text summary. */
struct listing {
	FILE *f;                        /* open_memstream into buf, NULL when that failed */
	char *buf;
	size_t len;
	uint64_t n, listed;
};

struct tree {
	bool json;
	int rc;
	const struct target *t;         /* the PATH being walked */
	struct progress progress;
	uint64_t files, empty, plain_bytes, backing_bytes, dirs, symlinks, other, other_key_files;
	struct keyver *kv;              /* sorted by key, then version */
	size_t nkv, kvcap;
	struct listing unreadable, not_visited;
	uint64_t printed;               /* file objects printed, for the commas */
	struct result res;
	char path[2 * PATH_MAX + 2];    /* the entry as the user would type it */
	char backing[2 * PATH_MAX + 2];
};

/* base joined with rel ("" for base itself). Returns 0 or -ENAMETOOLONG. */
static int join(char *out, size_t size, const char *base, const char *rel)
{
	size_t n = strlen(base);
	int r;

	if (!rel[0])
		r = snprintf(out, size, "%s", base);
	else
		r = snprintf(out, size, "%s%s%s", base, n && base[n - 1] == '/' ? "" : "/", rel);
	return r < 0 || (size_t)r >= size ? -ENAMETOOLONG : 0;
}

static int tree_at(struct tree *tr, const char *rel)
{
	int r = join(tr->path, sizeof(tr->path), tr->t->arg, rel);

	if (r == 0)
		r = join(tr->backing, sizeof(tr->backing), tr->t->backing, rel);
	return r;
}

static void list_add(struct tree *tr, struct listing *l, const struct problem *pr)
{
	l->n++;
	merge_rc(&tr->rc, pr->rc);
	if (!l->f || l->listed >= LISTED_MAX)
		return;
	if (tr->json) {
		fputs(l->listed ? ",\n    {\"path\": " : "\n    {\"path\": ", l->f);
		util_json_string(l->f, tr->path);
		fputs(", \"error\": ", l->f);
		util_json_string(l->f, pr->tail + strspn(pr->tail, ": "));
		fputc('}', l->f);
	} else {
		fputs("  ", l->f);
		cli_fputs_safe(l->f, tr->path);
		cli_fputs_safe(l->f, pr->tail);
		fputc('\n', l->f);
	}
	l->listed++;
}

static void listf(struct tree *tr, struct listing *l, int rc, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

/* Add the path being visited to l, with the message tail fmt. */
static void listf(struct tree *tr, struct listing *l, int rc, const char *fmt, ...)
{
	struct problem pr = { .rc = rc };
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(pr.tail, sizeof(pr.tail), fmt, ap);
	va_end(ap);
	list_add(tr, l, &pr);
}

/* Version ids of the local keystore are numbers: 2 sorts before 10. */
static int version_cmp(const char *a, const char *b)
{
	size_t la = strspn(a, "0123456789"), lb = strspn(b, "0123456789");

	if (la && lb && !a[la] && !b[lb]) {
		for (; la > 1 && *a == '0'; la--)
			a++;
		for (; lb > 1 && *b == '0'; lb--)
			b++;
		if (la != lb)
			return la < lb ? -1 : 1;
	}
	return strcmp(a, b);
}

static int count_key(struct tree *tr, const struct fmt_header *h)
{
	size_t lo = 0, hi = tr->nkv;
	struct keyver *e;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		int c = strcmp(h->key_id, tr->kv[mid].key);

		if (c == 0)
			c = version_cmp(h->key_version, tr->kv[mid].version);
		if (c == 0) {
			tr->kv[mid].files++;
			return 0;
		}
		if (c < 0)
			hi = mid;
		else
			lo = mid + 1;
	}
	if (tr->nkv == KEYVERS_MAX) {
		tr->other_key_files++;
		return 0;
	}
	if (tr->nkv == tr->kvcap) {
		size_t cap = tr->kvcap ? 2 * tr->kvcap : 8;

		if (cap > KEYVERS_MAX)
			cap = KEYVERS_MAX;
		e = realloc(tr->kv, cap * sizeof(*e));
		if (!e)
			return -ENOMEM;
		tr->kv = e;
		tr->kvcap = cap;
	}
	memmove(&tr->kv[lo + 1], &tr->kv[lo], (tr->nkv - lo) * sizeof(*tr->kv));
	e = &tr->kv[lo];
	memcpy(e->key, h->key_id, sizeof(e->key));
	memcpy(e->version, h->key_version, sizeof(e->version));
	e->files = 1;
	tr->nkv++;
	return 0;
}

/* True when fd holds a volume description: the .keyfs of a volume root met in the tree. The
 * description into ret, when not NULL. */
static bool fd_voldesc(int fd, struct voldesc *ret)
{
	char *text = malloc(VOLDESC_MAX + 1), err[256];
	struct voldesc *v = ret ? ret : malloc(sizeof(*v));
	size_t len = 0;
	bool ok = false;

	if (!text || !v)
		goto out;
	while (len <= VOLDESC_MAX) {
		ssize_t n = pread(fd, text + len, VOLDESC_MAX + 1 - len, (off_t)len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			goto out;
		if (n == 0)
			break;
		len += (size_t)n;
	}
	if (len > VOLDESC_MAX)
		goto out;
	text[len] = '\0';
	ok = voldesc_parse(text, len, v, err, sizeof(err)) == 0;
out:
	free(text);
	if (v != ret)
		free(v);
	return ok;
}

static bool fd_is_voldesc(int fd)
{
	return fd_voldesc(fd, NULL);
}

/* The description of the volume whose backing root is dirfd, malloc'd; NULL when it is none. */
static struct voldesc *volume_desc(int dirfd)
{
	struct voldesc *v = malloc(sizeof(*v));
	struct stat st;
	int fd;

	if (!v)
		return NULL;
	fd = openat(dirfd, VOLDESC_NAME, O_RDONLY | O_NOFOLLOW | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
	if (fd >= 0 && fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && fd_voldesc(fd, v)) {
		close(fd);
		return v;
	}
	if (fd >= 0)
		close(fd);
	free(v);
	return NULL;
}

/* Who a volume's key is, as its description says: the alias it was named by (Key Protect; an
 * older volume's key_id may be one), its uuid, its CRN; "" for what it does not say. */
static void volume_key(const struct voldesc *d, const char **alias, const char **uuid, const char **crn)
{
	bool kp = strcmp(d->kms, VOLDESC_KMS_KEYPROTECT) == 0;

	*alias = *uuid = *crn = "";
	if (kp && cli_key_id_is_alias(d->key_id))
		*alias = d->key_id;
	else if (kp && strcmp(d->key, d->key_id) != 0 && strncmp(d->key, "crn:", 4) != 0)
		*alias = d->key;
	if (!kp || !cli_key_id_is_alias(d->key_id))
		*uuid = d->key_id;
	*crn = d->key_crn;
}

/* A regular file the walk listed with lstat listed (or a file PATH): count it, print it. */
static int visit_file(struct tree *tr, int dirfd, const char *name, const char *base, const struct stat *listed)
{
	struct problem pr = { 0 };
	struct stat st;
	uint64_t plain;
	int fd, rc, r = 0;

	memset(&tr->res, 0, sizeof(tr->res));
	tr->res.path = tr->path;
	tr->res.backing = tr->backing;
	tr->res.mount = tr->t->mount;
	fd = openat(dirfd, name, O_RDONLY | O_NOFOLLOW | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0) {
		/* Gone since the listing: not an error of the tree (the walker does the same). */
		if (errno != ENOENT)
			listf(tr, &tr->unreadable, KEYFS_EXIT_IO, ": %s", strerror(errno));
		return 0;
	}
	if (fstat(fd, &st) < 0) {
		listf(tr, &tr->unreadable, KEYFS_EXIT_IO, ": %s", strerror(errno));
		goto out;
	}
	/* Replaced since it was listed: not the file the walk saw, skipped like a vanished one. */
	if (st.st_dev != listed->st_dev || st.st_ino != listed->st_ino || !S_ISREG(st.st_mode))
		goto out;
	rc = check_opened(&st, tr->t->mount, &pr);
	if (rc == 0)
		rc = header_read(fd, &st, &tr->res, &pr);
	/* The description of a volume inside the tree (one of several walked from above): not a file. */
	if (rc && strcmp(base, VOLDESC_NAME) == 0 && fd_is_voldesc(fd))
		goto out;
	if (rc) {
		list_add(tr, &tr->unreadable, &pr);
		goto out;
	}
	plain = tr->res.empty ? 0 : fmt_plain_size(tr->res.hdr.version, tr->res.backing_size);
	tr->files++;
	tr->empty += plain == 0;
	tr->plain_bytes += plain;
	tr->backing_bytes += tr->res.backing_size;
	/* A file with no header yet has no key; an empty one with a header has. */
	if (!tr->res.empty)
		r = count_key(tr, &tr->res.hdr);
	if (tr->res.odd_size) {
		char buf[512];

		progress_clear(&tr->progress);
		log_warn("'%s': backing size %" PRIu64 " is not one a whole keyfs file has (truncated?)",
			 cli_escape(tr->path, false, buf, sizeof(buf)), tr->res.backing_size);
	}
	if (tr->json)
		print_json(&tr->res, tr->printed++ == 0, "    ");
out:
	close(fd);
	return r;
}

static int visit(const struct walk_entry *e, void *arg)
{
	struct tree *tr = arg;
	int r = 0;

	if (tree_at(tr, e->path) < 0) {
		listf(tr, &tr->not_visited, KEYFS_EXIT_IO, ": its path is too long");
		return 0;
	}
	if (S_ISDIR(e->st->st_mode))
		tr->dirs++;
	else if (S_ISLNK(e->st->st_mode))
		tr->symlinks++;
	else if (S_ISREG(e->st->st_mode))
		r = visit_file(tr, e->dirfd, e->name, e->name, e->st);
	else
		tr->other++;
	progress_update(&tr->progress, tr->files, tr->plain_bytes, tr->path);
	return r;
}

static int walk_error(const char *path, int err, void *arg)
{
	struct tree *tr = arg;

	if (tree_at(tr, path) < 0)
		tree_at(tr, "");
	if (err == EXDEV)
		listf(tr, &tr->not_visited, KEYFS_EXIT_IO, ": another filesystem is mounted there: not entered");
	else if (err == ELOOP)
		listf(tr, &tr->not_visited, KEYFS_EXIT_IO, ": nested too deep: not entered");
	else if (err == ENAMETOOLONG)
		listf(tr, &tr->not_visited, KEYFS_EXIT_IO, ": a name in it makes a path longer than %d bytes",
		      PATH_MAX);
	else
		listf(tr, &tr->not_visited, KEYFS_EXIT_IO, ": %s", strerror(err));
	return 0;
}

/* One PATH with -r: a directory to walk, a file, or a special file to count. */
static int inspect_tree(struct tree *tr, const struct mounts *m, struct target *t)
{
	const char *base;
	struct problem pr;
	struct stat st, dst;
	int fd, r;

	tr->t = t;
	r = locate(m, t, &pr);
	if (r == 0 && tree_at(tr, "") < 0)
		r = problem(&pr, KEYFS_EXIT_IO, ": %s", strerror(ENAMETOOLONG));
	if (r == 0 && lstat(t->backing, &st) < 0) {
		if (errno == ENOENT || errno == ENOTDIR)
			r = problem(&pr, KEYFS_EXIT_CONFIG, " does not exist");
		else
			r = problem(&pr, KEYFS_EXIT_IO, ": %s", strerror(errno));
	}
	if (r) {
		snprintf(tr->path, sizeof(tr->path), "%s", t->arg);
		list_add(tr, &tr->not_visited, &pr);
		return 0;
	}
	/* Named by the user, a symlink would be counted and nothing under it shown: say so instead. */
	if (S_ISLNK(st.st_mode)) {
		listf(tr, &tr->not_visited, KEYFS_EXIT_CONFIG, " is a symbolic link: not followed");
		return 0;
	}
	t->found = true;
	if (S_ISREG(st.st_mode)) {
		base = strrchr(t->backing, '/');
		return visit_file(tr, AT_FDCWD, t->backing, base ? base + 1 : t->backing, &st);
	}
	if (!S_ISDIR(st.st_mode)) {
		tr->other++;
		return 0;
	}
	fd = open(t->backing, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_NOCTTY | O_CLOEXEC);
	if (fd < 0 || fstat(fd, &dst) < 0) {
		r = -errno;
		if (fd >= 0)
			close(fd);
		listf(tr, &tr->not_visited, KEYFS_EXIT_IO, ": %s", strerror(-r));
		return 0;
	}
	if (t->mount && dst.st_dev == t->mount->dev) {
		listf(tr, &tr->not_visited, KEYFS_EXIT_CONFIG,
		      " resolves into the keyfs mount '%s' itself: inspect its backing dir instead",
		      t->mount->mountpoint);
		close(fd);
		return 0;
	}
	t->desc = volume_desc(fd);
	r = walk_tree(fd, t->desc != NULL, visit, walk_error, tr);
	close(fd);
	if (r == -ENOMEM)
		return r;
	if (r < 0) {
		tree_at(tr, "");
		listf(tr, &tr->not_visited, KEYFS_EXIT_IO, ": %s", strerror(-r));
	}
	return 0;
}

static void listing_open(struct listing *l)
{
	memset(l, 0, sizeof(*l));
	l->f = open_memstream(&l->buf, &l->len);
}

/* Print what l holds; returns the number of entries not listed. */
static uint64_t listing_print(struct listing *l)
{
	if (l->f && fflush(l->f) == 0)
		fwrite(l->buf, 1, l->len, stdout);
	else
		l->listed = 0;
	return l->n - l->listed;
}

static void listing_close(struct listing *l)
{
	if (l->f)
		fclose(l->f);
	free(l->buf);
}

static void human(uint64_t n, char *buf, size_t size)
{
	static const char *const units[] = { "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
	double v = (double)n / 1024;
	unsigned u = 0;

	while (v >= 1024 && u + 1 < sizeof(units) / sizeof(units[0])) {
		v /= 1024;
		u++;
	}
	snprintf(buf, size, " (%.1f %s)", v, units[u]);
	if (n < 1024)
		buf[0] = '\0';
}

static void print_tree_text(struct tree *tr, const struct target *targets, int ntargets)
{
	char size[32];
	uint64_t more;

	for (int i = 0; i < ntargets; i++) {
		if (!targets[i].found)
			continue;
		fputs("backing: ", stdout);
		cli_fputs_safe(stdout, targets[i].backing);
		if (targets[i].mount) {
			fputs("\nmount: ", stdout);
			cli_fputs_safe(stdout, targets[i].mount->mountpoint);
			print_mount_state(targets[i].mount);
		}
		putchar('\n');
		if (targets[i].desc) {
			const struct voldesc *d = targets[i].desc;
			const char *alias, *uuid, *crn;

			volume_key(d, &alias, &uuid, &crn);
			printf("volume: %s\n", d->volume);
			printf("format: %d\n", d->format);
			printf("cipher: %s\n", fmt_cipher_name(voldesc_cipher(d)));
			if (strcmp(d->kms, VOLDESC_KMS_LOCAL) == 0) {
				fputs("key name: ", stdout);
				cli_fputs_safe(stdout, d->key);
				putchar('\n');
			}
			if (alias[0]) {
				fputs("key alias: ", stdout);
				cli_fputs_safe(stdout, alias);
				putchar('\n');
			}
			fputs("key uuid: ", stdout);
			cli_fputs_safe(stdout, uuid[0] ? uuid : "(not recorded)");
			putchar('\n');
			if (crn[0]) {
				fputs("key crn: ", stdout);
				cli_fputs_safe(stdout, crn);
				putchar('\n');
			}
		}
	}
	human(tr->plain_bytes, size, sizeof(size));
	printf("files: %" PRIu64 " (%" PRIu64 " empty)\n", tr->files, tr->empty);
	printf("plaintext bytes: %" PRIu64 "%s\n", tr->plain_bytes, size);
	printf("backing bytes: %" PRIu64 "\n", tr->backing_bytes);
	printf("directories: %" PRIu64 "\n", tr->dirs);
	printf("symlinks: %" PRIu64 "\n", tr->symlinks);
	printf("other: %" PRIu64 " (sockets, fifos, devices)\n", tr->other);
	printf("keys in use:%s\n", tr->nkv || tr->other_key_files ? "" : " none");
	for (size_t i = 0; i < tr->nkv; i++) {
		fputs("  ", stdout);
		cli_fputs_safe(stdout, tr->kv[i].key);
		fputs(" version ", stdout);
		if (tr->kv[i].version[0])
			cli_fputs_safe(stdout, tr->kv[i].version);
		else
			fputs("(none)", stdout);
		printf(": %" PRIu64 " %s\n", tr->kv[i].files, tr->kv[i].files == 1 ? "file" : "files");
	}
	if (tr->other_key_files)
		printf("  other key versions (more than %d in all): %" PRIu64 " files\n", KEYVERS_MAX,
		       tr->other_key_files);
	printf("unreadable headers: %" PRIu64 "\n", tr->unreadable.n);
	more = listing_print(&tr->unreadable);
	if (more)
		printf("  ... and %" PRIu64 " more\n", more);
	printf("not visited: %" PRIu64 "\n", tr->not_visited.n);
	more = listing_print(&tr->not_visited);
	if (more)
		printf("  ... and %" PRIu64 " more\n", more);
}

/* A string member, null when "". */
static void json_member(const char *name, const char *value, bool last)
{
	printf("\"%s\": ", name);
	if (value[0])
		util_json_string(stdout, value);
	else
		fputs("null", stdout);
	if (!last)
		fputs(", ", stdout);
}

static void print_tree_json_end(struct tree *tr, const struct target *targets, int ntargets)
{
	uint64_t unreadable_more, not_visited_more;
	size_t i = 0;
	bool any = false;

	fputs(tr->printed ? "\n  ],\n  \"unreadable\": [" : "  ],\n  \"unreadable\": [", stdout);
	unreadable_more = listing_print(&tr->unreadable);
	fputs(tr->unreadable.listed ? "\n  ],\n  \"not_visited\": [" : "],\n  \"not_visited\": [", stdout);
	not_visited_more = listing_print(&tr->not_visited);
	fputs(tr->not_visited.listed ? "\n  ],\n" : "],\n", stdout);
	fputs("  \"volumes\": [", stdout);
	for (int t = 0; t < ntargets; t++) {
		const struct voldesc *d = targets[t].desc;
		const char *alias, *uuid, *crn;

		if (!d)
			continue;
		volume_key(d, &alias, &uuid, &crn);
		fputs(any ? ",\n    {" : "\n    {", stdout);
		json_member("backing", targets[t].backing, false);
		json_member("volume", d->volume, false);
		printf("\"format\": %d, ", d->format);
		json_member("cipher", fmt_cipher_name(voldesc_cipher(d)), false);
		json_member("kms", d->kms, false);
		json_member("key", d->key, false);
		json_member("key_alias", alias, false);
		json_member("key_uuid", uuid, false);
		json_member("key_crn", crn, true);
		fputs("}", stdout);
		any = true;
	}
	fputs(any ? "\n  ],\n" : "],\n", stdout);
	printf("  \"summary\": {\n");
	printf("    \"files\": %" PRIu64 ",\n", tr->files);
	printf("    \"empty_files\": %" PRIu64 ",\n", tr->empty);
	printf("    \"plaintext_bytes\": %" PRIu64 ",\n", tr->plain_bytes);
	printf("    \"backing_bytes\": %" PRIu64 ",\n", tr->backing_bytes);
	printf("    \"directories\": %" PRIu64 ",\n", tr->dirs);
	printf("    \"symlinks\": %" PRIu64 ",\n", tr->symlinks);
	printf("    \"other\": %" PRIu64 ",\n", tr->other);
	printf("    \"unreadable\": %" PRIu64 ",\n", tr->unreadable.n);
	printf("    \"not_visited\": %" PRIu64 ",\n", tr->not_visited.n);
	fputs("    \"keys\": [", stdout);
	while (i < tr->nkv) {
		const char *key = tr->kv[i].key;

		fputs(i ? ",\n      {\"key\": " : "\n      {\"key\": ", stdout);
		util_json_string(stdout, key);
		fputs(", \"versions\": [", stdout);
		for (bool first = true; i < tr->nkv && strcmp(tr->kv[i].key, key) == 0; i++, first = false) {
			fputs(first ? "{\"version\": " : ", {\"version\": ", stdout);
			util_json_string(stdout, tr->kv[i].version);
			printf(", \"files\": %" PRIu64 "}", tr->kv[i].files);
		}
		fputs("]}", stdout);
	}
	fputs(tr->nkv ? "\n    ],\n" : "],\n", stdout);
	printf("    \"other_key_files\": %" PRIu64 ",\n", tr->other_key_files);
	printf("    \"unreadable_not_listed\": %" PRIu64 ",\n", unreadable_more);
	printf("    \"not_visited_not_listed\": %" PRIu64 "\n", not_visited_more);
	fputs("  }\n}\n", stdout);
}

static int inspect_recursive(const struct mounts *mounts, char **paths, int npaths, bool json)
{
	struct target *targets = calloc((size_t)npaths, sizeof(*targets));
	struct tree *tr = calloc(1, sizeof(*tr));
	int rc = KEYFS_EXIT_OK;

	if (!targets || !tr) {
		free(targets);
		free(tr);
		log_err("out of memory");
		return KEYFS_EXIT_FAILURE;
	}
	tr->json = json;
	listing_open(&tr->unreadable);
	listing_open(&tr->not_visited);
	progress_init(&tr->progress, "inspect");
	/* Streamed JSON on the same terminal would be torn by the progress line. */
	if (json && isatty(STDOUT_FILENO))
		tr->progress.on = false;
	if (json) {
		fputs("{\n  \"paths\": [", stdout);
		for (int i = 0; i < npaths; i++) {
			fputs(i ? ", " : "", stdout);
			util_json_string(stdout, paths[i]);
		}
		fputs("],\n  \"files\": [\n", stdout);
	}
	for (int i = 0; i < npaths; i++) {
		targets[i].arg = paths[i];
		if (inspect_tree(tr, mounts, &targets[i]) < 0) {
			progress_clear(&tr->progress);
			log_err("out of memory");
			rc = KEYFS_EXIT_FAILURE;
			goto out;
		}
	}
	progress_clear(&tr->progress);
	if (json)
		print_tree_json_end(tr, targets, npaths);
	else
		print_tree_text(tr, targets, npaths);
	fflush(stdout);
	for (int i = 0; i < npaths; i++)
		if (targets[i].desc && strcmp(targets[i].desc->kms, VOLDESC_KMS_KEYPROTECT) == 0 &&
		    cli_key_id_is_alias(targets[i].desc->key_id))
			cli_key_id_hint(targets[i].backing, targets[i].desc->key_id);
	rc = tr->rc;
	if (rc)
		log_err("%" PRIu64 " %s without a readable keyfs header, %" PRIu64 " %s not visited: listed in the %s",
			tr->unreadable.n, tr->unreadable.n == 1 ? "file" : "files", tr->not_visited.n,
			tr->not_visited.n == 1 ? "path" : "paths", json ? "output" : "summary");
out:
	listing_close(&tr->unreadable);
	listing_close(&tr->not_visited);
	free(tr->kv);
	free(tr);
	for (int i = 0; i < npaths; i++)
		free(targets[i].desc);
	free(targets);
	return rc;
}

int cmd_inspect(int argc, char **argv)
{
	struct mounts mounts = { NULL, 0 };
	struct result *res;
	struct target *t;
	char **paths;
	bool json = false, recursive = false, any = false;
	int npaths = 0, c, r, rc = KEYFS_EXIT_OK;

	paths = calloc((size_t)argc + 1, sizeof(*paths));
	res = malloc(sizeof(*res));
	t = malloc(sizeof(*t));
	if (!paths || !res || !t) {
		free(paths);
		free(res);
		free(t);
		log_err("out of memory");
		return KEYFS_EXIT_FAILURE;
	}
	optind = 0;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "-:hr", inspect_options, NULL)) != -1) {
		switch (c) {
		case 1: paths[npaths++] = optarg; break;
		case 'r': recursive = true; break;
		case OPT_JSON: json = true; break;
		case 'h':
		case OPT_HELP:
			cli_print_usage(stdout, "inspect");
			goto out;
		default:
			rc = cli_option_error("inspect", c, argv);
			goto out;
		}
	}
	while (optind < argc)
		paths[npaths++] = argv[optind++];
	if (npaths == 0) {
		rc = cli_usage_error("inspect", "missing PATH");
		goto out;
	}
	if (sodium_init() < 0) {
		log_err("libsodium cannot be initialised");
		rc = KEYFS_EXIT_FAILURE;
		goto out;
	}
	r = mounts_read(&mounts);
	if (r < 0)
		log_warn("cannot read /proc/self/mountinfo (%s): paths inside mounts are taken as backing paths",
			 strerror(-r));
	if (recursive) {
		rc = inspect_recursive(&mounts, paths, npaths, json);
		goto out;
	}
	if (json)
		fputs("[\n", stdout);
	for (int i = 0; i < npaths; i++) {
		struct problem pr;
		int one;

		memset(res, 0, sizeof(*res));
		memset(t, 0, sizeof(*t));
		t->arg = paths[i];
		one = locate(&mounts, t, &pr);
		if (one == 0)
			one = read_one(t, res, &pr);
		if (one) {
			log_err("'%s'%s", t->arg, pr.tail);
			merge_rc(&rc, one);
			continue;
		}
		if (res->odd_size)
			log_warn("'%s': backing size %" PRIu64 " is not one a whole keyfs file has (truncated?)",
				 res->path, res->backing_size);
		if (json)
			print_json(res, !any, "  ");
		else
			print_text(res, !any);
		any = true;
	}
	if (json)
		fputs(any ? "\n]\n" : "]\n", stdout);
out:
	mounts_free(&mounts);
	free(t);
	free(res);
	free(paths);
	return rc;
}
