/* keystore.c: the local keystore: a 0700 dir of 0600 state files and write-once material files, destroy that shreds */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <sodium.h>

#include "keyfs/keystore.h"
#include "keyfs/kms.h"
#include "keyfs/util.h"
#include "keystore-priv.h"

/*
 * A key is a state file NAME.key and one material file per version, NAME.vN.material.
 *
 * The state file is text, one "name=value" per line, every line ending in '\n':
 *   # keyfs local key state; ...                    ('#' lines are comments)
 *   format=2                                        (first non-comment line)
 *   name=NAME                                       (must match the file name)
 *   id=<uuid4>
 *   state=1|2|3|5
 *   created=<rfc3339>
 *   updated=<rfc3339>
 *   versions=N                                      (live keys: versions 1..N have material files)
 *   destroyed=<rfc3339>                             (tombstones only, which have no versions=)
 * It holds no secret, so suspend, enable and rotate replace it by temp file + rename.
 *
 * A material file is written once (O_EXCL, fsync, fsync of the dir) and never rewritten, so the
 * material has exactly one copy on disk, which destroy overwrites in place. MAT_SIZE bytes:
 *   0  8  "KEYFSKM1"      8  4  version, u32 little endian      12 36  key id (the uuid)
 *   48 32 material        80 32  BLAKE2b-256 of bytes 0..79
 * One that is missing, of another length, zeroed or otherwise not this key's version N is
 * damaged, and a damaged material file means the key is destroyed (a shred without -u, or a
 * destroy cut short between overwriting and the tombstone).
 *
 * Format 1 (earlier keyfs builds) kept the material in the state file as "version=N BASE64" lines,
 * rewritten by every change. Such a key file is still read; the first change migrates it: the
 * material files are written, the old file is kept under a second name (.NAME.key.old) while the
 * format-2 state file replaces it, then overwritten in place, synced and removed. A crash leaves
 * .NAME.key.old behind, which the next change shreds. Anything else is a damaged file.
 */
#define KEYFILE_MAX             (16 * 1024)
#define KEYFILE_SUFFIX          ".key"
#define KEYFILE_FORMAT_V1       1
#define KEYFILE_FORMAT          2
#define KEYFILE_HEAD            "# keyfs local key state; the material is in NAME.vN.material; do not edit or copy\n"
#define TOMBSTONE_HEAD          "# keyfs local key tombstone: the key material was destroyed; keep this file, it blocks the name\n"
#define MAT_SUFFIX              ".material"
#define MAT_MAGIC               "KEYFSKM1"
#define MAT_ID_OFF              12
#define MAT_KEY_OFF             48
#define MAT_SUM_OFF             80
#define MAT_SIZE                112
#define MAT_NAME_MAX            (KEYSTORE_NAME_MAX + sizeof(".v4294967295" MAT_SUFFIX))
#define VERSIONS_MAX            1024    /* a poll checks every version's file; see the parser's message */
#define KEYSTORE_ROOT_DIR       "/var/lib/keyfs/keystore"
#define LOCK_TIMEOUT_MS         5000
#define LOCK_STEP_MS            5

struct keyfile {
	char name[KEYSTORE_NAME_MAX + 1];
	char id[37];
	int state;
	char created[32];
	char updated[32];
	char destroyed[32];
	unsigned newest;                /* 0: no versions (tombstone) */
	unsigned format;                /* KEYFILE_FORMAT_V1: material inline */
};

/* One operation on one key file: the locked dir and, once read, the file text in sodium memory. */
struct ks {
	int dfd;
	const char *dir;
	const char *name;
	char file[KEYSTORE_NAME_MAX + sizeof(KEYFILE_SUFFIX)];
	char path[PATH_MAX];
	char *text;                     /* sodium_malloc(KEYFILE_MAX + 1) */
	size_t len;
	struct keyfile kf;
	char *err;
	size_t errlen;
	char note[sizeof(((struct keystore_info *)0)->note)];  /* why a live key counts as destroyed */
};

static void ks_err(struct ks *k, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void ks_err(struct ks *k, const char *fmt, ...)
{
	va_list ap;

	if (!k->err || k->errlen == 0)
		return;
	va_start(ap, fmt);
	vsnprintf(k->err, k->errlen, fmt, ap);
	va_end(ap);
}

/* strerror() may use a shared buffer; the daemon reads keys from many threads at once. */
static const char *errstr(int e)
{
	const char *s = strerrordesc_np(e);

	return s ? s : "unknown error";
}

int keystore_name_valid(const char *name)
{
	size_t n;

	if (!name)
		return -EINVAL;
	n = strlen(name);
	if (n == 0 || n > KEYSTORE_NAME_MAX)
		return -EINVAL;
	for (size_t i = 0; i < n; i++) {
		char c = name[i];
		bool alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');

		if (!alnum && (i == 0 || (c != '.' && c != '_' && c != '-')))
			return -EINVAL;
	}
	return 0;
}

int keystore_default_dir(char *buf, size_t size)
{
	const char *base, *suffix;
	char pwbuf[4096];
	struct passwd pw, *pwp = NULL;
	int n;

	if (geteuid() == 0) {
		base = KEYSTORE_ROOT_DIR;
		suffix = "";
	} else if ((base = getenv("XDG_DATA_HOME")) && base[0] == '/') {
		suffix = "/keyfs/keystore";
	} else {
		suffix = "/.local/share/keyfs/keystore";
		base = getenv("HOME");
		if (!base || base[0] != '/') {
			if (getpwuid_r(geteuid(), &pw, pwbuf, sizeof(pwbuf), &pwp) != 0 || !pwp ||
			    !pw.pw_dir || pw.pw_dir[0] != '/')
				return -ENOENT;
			base = pw.pw_dir;
		}
	}
	n = snprintf(buf, size, "%s%s", base, suffix);
	if (n < 0 || (size_t)n >= size)
		return -ENAMETOOLONG;
	return 0;
}

static int ks_init(struct ks *k, const char *dir, const char *name, char *err, size_t errlen)
{
	int n;

	memset(k, 0, sizeof(*k));
	k->dfd = -1;
	k->dir = dir;
	k->name = name;
	k->err = err;
	k->errlen = errlen;
	if (err && errlen)
		err[0] = '\0';
	if (!dir || !dir[0]) {
		ks_err(k, "no keystore dir given");
		return -EINVAL;
	}
	if (keystore_name_valid(name) < 0) {
		ks_err(k, "'%s' is not a valid key name: use 1-%d letters, digits, '.', '_' or '-', starting with a letter or digit",
		       name ? name : "", KEYSTORE_NAME_MAX);
		return -EINVAL;
	}
	n = snprintf(k->file, sizeof(k->file), "%s%s", name, KEYFILE_SUFFIX);
	if (n < 0 || (size_t)n >= sizeof(k->file))
		return -EINVAL;
	n = snprintf(k->path, sizeof(k->path), "%s%s%s", dir, dir[strlen(dir) - 1] == '/' ? "" : "/", k->file);
	if (n < 0 || (size_t)n >= sizeof(k->path)) {
		ks_err(k, "keystore '%s': path too long", dir);
		return -ENAMETOOLONG;
	}
	return 0;
}

static void ks_done(struct ks *k)
{
	if (k->text) {
		sodium_memzero(k->text, KEYFILE_MAX + 1);
		sodium_free(k->text);
		k->text = NULL;
	}
	/* Closing the dir releases its lock. */
	if (k->dfd >= 0)
		close(k->dfd);
	k->dfd = -1;
}

/* mkdir -p: missing parents 0755, the keystore itself 0700. */
static int mkdir_p(const char *dir)
{
	char buf[PATH_MAX];
	size_t n = strlen(dir);

	if (n == 0 || n >= sizeof(buf))
		return -ENAMETOOLONG;
	memcpy(buf, dir, n + 1);
	while (n > 1 && buf[n - 1] == '/')
		buf[--n] = '\0';
	for (char *p = buf + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(buf, 0755) < 0 && errno != EEXIST) {
			int r = -errno;

			*p = '/';
			return r;
		}
		*p = '/';
	}
	if (mkdir(buf, 0700) < 0 && errno != EEXIST)
		return -errno;
	return 0;
}

static int ks_lock(int fd, int op)
{
	for (int waited = 0;; waited += LOCK_STEP_MS) {
		struct timespec ts = { 0, LOCK_STEP_MS * 1000000L };

		if (flock(fd, op | LOCK_NB) == 0)
			return 0;
		if (errno == EINTR)
			continue;
		if (errno != EWOULDBLOCK)
			return -errno;
		if (waited >= LOCK_TIMEOUT_MS)
			return -ETIMEDOUT;
		nanosleep(&ts, NULL);
	}
}

/* Owned by us or root, not writable by group or others: nobody else can swap key files. */
static bool owner_ok(const struct stat *st)
{
	return st->st_uid == geteuid() || st->st_uid == 0;
}

/* Open the keystore dir, check it is safe, and take lockop (LOCK_SH readers, LOCK_EX writers). */
static int ks_open_dir(struct ks *k, bool create, int lockop)
{
	struct stat st;
	int r;

	if (create) {
		r = mkdir_p(k->dir);
		if (r < 0) {
			ks_err(k, "cannot create keystore '%s': %s", k->dir, errstr(-r));
			return r;
		}
	}
	k->dfd = open(k->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (k->dfd < 0) {
		r = -errno;
		if (r == -ENOENT)
			ks_err(k, "keystore '%s' does not exist: create a key in it with 'keyfsctl key create NAME --keystore %s', or name the keystore the key was created in",
			       k->dir, k->dir);
		else if (r == -ENOTDIR)
			ks_err(k, "keystore '%s' is not a directory", k->dir);
		else if (r == -EACCES)
			ks_err(k, "keystore '%s' is not accessible: permission denied (run as its owner or root)", k->dir);
		else
			ks_err(k, "keystore '%s': %s", k->dir, errstr(-r));
		return r;
	}
	if (fstat(k->dfd, &st) < 0) {
		r = -errno;
		ks_err(k, "keystore '%s': %s", k->dir, errstr(-r));
		return r;
	}
	if (!owner_ok(&st)) {
		ks_err(k, "keystore '%s' is owned by uid %u, not by you or root: refusing to use it",
		       k->dir, (unsigned)st.st_uid);
		return -EPERM;
	}
	if (st.st_mode & (S_IWGRP | S_IWOTH)) {
		ks_err(k, "keystore '%s' is writable by group or others (mode %04o): refusing to use it; run chmod 700 '%s'",
		       k->dir, (unsigned)(st.st_mode & 07777), k->dir);
		return -EPERM;
	}
	r = ks_lock(k->dfd, lockop);
	if (r < 0) {
		ks_err(k, "keystore '%s': cannot lock it: %s", k->dir, r == -ETIMEDOUT ?
		       "another keyfsctl holds it" : errstr(-r));
		return r;
	}
	return 0;
}

/*
 * Open file (the state file or a material file, path names it in messages) and check it is a
 * regular file only we (or root) can read. -ENOENT comes back without a message for material files.
 */
static int ks_open_at(struct ks *k, const char *file, const char *path, int oflags, int *ret_fd,
		      struct stat *ret_st)
{
	bool state_file = file == k->file;
	struct stat st;
	int fd, r;

	fd = openat(k->dfd, file, oflags | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	if (fd < 0) {
		r = -errno;
		if (r == -ENOENT) {
			if (state_file)
				ks_err(k, "key '%s' not found in keystore '%s': create it with 'keyfsctl key create %s --keystore %s', or name the keystore it was created in",
				       k->name, k->dir, k->name, k->dir);
		} else if (r == -ELOOP) {
			ks_err(k, "key file '%s' is a symbolic link: refusing to use it", path);
			r = -EPERM;
		} else if (r == -EACCES) {
			ks_err(k, "key file '%s' is not readable: permission denied (run as its owner or root)", path);
		} else {
			ks_err(k, "key file '%s': %s", path, errstr(-r));
		}
		return r;
	}
	if (fstat(fd, &st) < 0) {
		r = -errno;
		ks_err(k, "key file '%s': %s", path, errstr(-r));
		goto fail;
	}
	if (!S_ISREG(st.st_mode)) {
		ks_err(k, "key file '%s' is not a regular file: refusing to use it", path);
		r = -EPERM;
		goto fail;
	}
	if (!owner_ok(&st)) {
		ks_err(k, "key file '%s' is owned by uid %u, not by you or root: refusing to use it",
		       path, (unsigned)st.st_uid);
		r = -EPERM;
		goto fail;
	}
	if (st.st_mode & 077) {
		ks_err(k, "key file '%s' is accessible by group or others (mode %04o): refusing to use it; run chmod 600 '%s'",
		       path, (unsigned)(st.st_mode & 07777), path);
		r = -EPERM;
		goto fail;
	}
	if (state_file && st.st_size > KEYFILE_MAX) {
		ks_err(k, "key file '%s' is damaged: larger than %d bytes", path, KEYFILE_MAX);
		r = -EUCLEAN;
		goto fail;
	}
	*ret_fd = fd;
	if (ret_st)
		*ret_st = st;
	return 0;
fail:
	close(fd);
	return r;
}

/* Read the whole key file (at most KEYFILE_MAX bytes) from offset 0 into sodium memory. */
static int ks_read_fd(struct ks *k, int fd)
{
	size_t len = 0;

	k->text = sodium_malloc(KEYFILE_MAX + 1);
	if (!k->text) {
		ks_err(k, "key file '%s': out of locked memory", k->path);
		return -ENOMEM;
	}
	for (;;) {
		ssize_t n = pread(fd, k->text + len, KEYFILE_MAX + 1 - len, (off_t)len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			int r = -errno;

			ks_err(k, "key file '%s': %s", k->path, errstr(-r));
			return r;
		}
		if (n == 0)
			break;
		len += (size_t)n;
		if (len > KEYFILE_MAX) {
			ks_err(k, "key file '%s' is damaged: larger than %d bytes", k->path, KEYFILE_MAX);
			return -EUCLEAN;
		}
	}
	k->text[len] = '\0';
	k->len = len;
	return 0;
}

static bool graph(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)s[i] <= 0x20 || (unsigned char)s[i] >= 0x7f)
			return false;
	return true;
}

static int field_copy(char *dst, size_t size, const char *v, size_t n)
{
	if (n == 0 || n >= size || !graph(v, n))
		return -1;
	memcpy(dst, v, n);
	dst[n] = '\0';
	return 0;
}

/* Strict decimal: no sign, no leading zero, fits in 32 bits. */
static int parse_u32(const char *s, size_t n, unsigned *ret)
{
	uint64_t v = 0;

	if (n == 0 || n > 10 || (s[0] == '0' && n > 1))
		return -1;
	for (size_t i = 0; i < n; i++) {
		if (s[i] < '0' || s[i] > '9')
			return -1;
		v = v * 10 + (uint64_t)(s[i] - '0');
	}
	if (v > UINT32_MAX)
		return -1;
	*ret = (unsigned)v;
	return 0;
}

enum {
	SEEN_NAME = 1, SEEN_ID = 2, SEEN_STATE = 4, SEEN_CREATED = 8, SEEN_UPDATED = 16, SEEN_DESTROYED = 32,
	SEEN_VERSIONS = 64,
};

/*
 * Parse k->text into k->kf. Format 1 only: when mat is non-NULL, copy the material of version
 * want (0: newest) into it; every other version decodes into a scratch area only to be checked.
 */
static int ks_parse(struct ks *k, unsigned want, struct keystore_material *mat)
{
	struct keyfile *kf = &k->kf;
	const char *p = k->text, *end = k->text + k->len;
	uint8_t *scratch = NULL;
	unsigned lineno = 0, seen = 0, found = 0;
	bool have_format = false;
	const char *why = NULL;
	int r = -EUCLEAN;

	memset(kf, 0, sizeof(*kf));
	kf->state = -1;
	if (memchr(k->text, '\0', k->len)) {
		why = "it contains NUL bytes";
		goto bad;
	}
	scratch = sodium_malloc(KEYSTORE_MATERIAL_SIZE);
	if (!scratch) {
		ks_err(k, "key file '%s': out of locked memory", k->path);
		return -ENOMEM;
	}
	while (p < end) {
		const char *nl = memchr(p, '\n', (size_t)(end - p));
		const char *line = p, *eq, *v;
		size_t ll, kl, vl;

		lineno++;
		if (!nl) {
			why = "the last line has no newline";
			goto bad;
		}
		ll = (size_t)(nl - line);
		p = nl + 1;
		if (ll > 0 && line[0] == '#')
			continue;
		eq = memchr(line, '=', ll);
		if (!eq) {
			why = "expected name=value";
			goto bad;
		}
		kl = (size_t)(eq - line);
		v = eq + 1;
		vl = ll - kl - 1;
#define IS(lit) (kl == sizeof(lit) - 1 && memcmp(line, lit, kl) == 0)
		if (!have_format) {
			unsigned fmt;

			if (!IS("format")) {
				why = "the first line must be format=";
				goto bad;
			}
			if (parse_u32(v, vl, &fmt) < 0 || fmt == 0) {
				why = "bad format number";
				goto bad;
			}
			if (fmt != KEYFILE_FORMAT && fmt != KEYFILE_FORMAT_V1) {
				ks_err(k, "key file '%s' has format %u, which this keyfs does not understand", k->path, fmt);
				r = -EPROTONOSUPPORT;
				goto out;
			}
			have_format = true;
			kf->format = fmt;
			continue;
		}
		if (IS("versions") && kf->format == KEYFILE_FORMAT) {
			unsigned n;

			if (seen & SEEN_VERSIONS) {
				why = "repeated name";
				goto bad;
			}
			seen |= SEEN_VERSIONS;
			if (parse_u32(v, vl, &n) < 0 || n == 0 || n > VERSIONS_MAX) {
				why = "versions= is not a number from 1 to 1024";
				goto bad;
			}
			kf->newest = n;
			continue;
		}
		if (IS("version") && kf->format == KEYFILE_FORMAT_V1) {
			const char *sp = memchr(v, ' ', vl), *b64, *b64_end = NULL;
			size_t b64n, binlen = 0;
			unsigned ver;

			if (kf->state == KMS_STATE_DESTROYED || (seen & SEEN_DESTROYED)) {
				why = "a destroyed key has no versions";
				goto bad;
			}
			if (!sp || parse_u32(v, (size_t)(sp - v), &ver) < 0 || ver == 0) {
				why = "expected version=N MATERIAL";
				goto bad;
			}
			if (ver <= kf->newest) {
				why = "versions must increase, newest last";
				goto bad;
			}
			b64 = sp + 1;
			b64n = vl - (size_t)(b64 - v);
			if (sodium_base642bin(scratch, KEYSTORE_MATERIAL_SIZE, b64, b64n, NULL, &binlen, &b64_end,
					      sodium_base64_VARIANT_ORIGINAL) != 0 ||
			    binlen != KEYSTORE_MATERIAL_SIZE || b64_end != b64 + b64n) {
				why = "key material is not 32 bytes of base64";
				goto bad;
			}
			if (mat && (want == 0 || want == ver)) {
				memcpy(mat->key, scratch, KEYSTORE_MATERIAL_SIZE);
				found = ver;
			}
			kf->newest = ver;
			continue;
		}
		{
			unsigned bit;
			char *dst;
			size_t dsize;
			char tmp[8];

			if (IS("name")) {
				bit = SEEN_NAME, dst = kf->name, dsize = sizeof(kf->name);
			} else if (IS("id")) {
				bit = SEEN_ID, dst = kf->id, dsize = sizeof(kf->id);
			} else if (IS("state")) {
				bit = SEEN_STATE, dst = tmp, dsize = sizeof(tmp);
			} else if (IS("created")) {
				bit = SEEN_CREATED, dst = kf->created, dsize = sizeof(kf->created);
			} else if (IS("updated")) {
				bit = SEEN_UPDATED, dst = kf->updated, dsize = sizeof(kf->updated);
			} else if (IS("destroyed")) {
				bit = SEEN_DESTROYED, dst = kf->destroyed, dsize = sizeof(kf->destroyed);
			} else {
				why = "unknown name";
				goto bad;
			}
			if (seen & bit) {
				why = "repeated name";
				goto bad;
			}
			seen |= bit;
			if (field_copy(dst, dsize, v, vl) < 0) {
				why = "bad value";
				goto bad;
			}
			if (bit == SEEN_STATE) {
				unsigned st;

				if (parse_u32(tmp, strlen(tmp), &st) < 0 ||
				    (st != KMS_STATE_ACTIVE && st != KMS_STATE_SUSPENDED &&
				     st != KMS_STATE_DEACTIVATED && st != KMS_STATE_DESTROYED)) {
					why = "unknown state";
					goto bad;
				}
				kf->state = (int)st;
			}
			if (bit == SEEN_ID && !util_uuid_valid(kf->id)) {
				why = "id is not a uuid";
				goto bad;
			}
		}
#undef IS
	}
	lineno = 0;
	if (!have_format) {
		why = "format= is missing";
		goto bad;
	}
	if ((seen & (SEEN_NAME | SEEN_ID | SEEN_STATE | SEEN_CREATED | SEEN_UPDATED)) !=
	    (SEEN_NAME | SEEN_ID | SEEN_STATE | SEEN_CREATED | SEEN_UPDATED)) {
		why = "name, id, state, created or updated is missing";
		goto bad;
	}
	if (strcmp(kf->name, k->name) != 0) {
		why = "it names another key (copied or renamed by hand?)";
		goto bad;
	}
	if (kf->format == KEYFILE_FORMAT && kf->state != KMS_STATE_DESTROYED && !(seen & SEEN_VERSIONS)) {
		why = "a live key needs versions=";
		goto bad;
	}
	if (kf->state == KMS_STATE_DESTROYED) {
		if (!(seen & SEEN_DESTROYED) || kf->newest != 0) {
			why = "a destroyed key must have destroyed= and no versions";
			goto bad;
		}
	} else if ((seen & SEEN_DESTROYED) || kf->newest == 0) {
		why = "a live key needs at least one version and no destroyed=";
		goto bad;
	}
	if (mat)
		mat->version = found;
	r = 0;
	goto out;
bad:
	if (lineno)
		ks_err(k, "key file '%s' is damaged: line %u: %s", k->path, lineno, why);
	else
		ks_err(k, "key file '%s' is damaged: %s", k->path, why);
	r = -EUCLEAN;
out:
	if (scratch) {
		sodium_memzero(scratch, KEYSTORE_MATERIAL_SIZE);
		sodium_free(scratch);
	}
	if (r < 0 && mat) {
		sodium_memzero(mat->key, sizeof(mat->key));
		mat->version = 0;
	}
	return r;
}

static void ks_info(const struct ks *k, struct keystore_info *info)
{
	bool tomb = k->kf.state == KMS_STATE_DESTROYED;

	memset(info, 0, sizeof(*info));
	snprintf(info->name, sizeof(info->name), "%s", k->kf.name);
	snprintf(info->id, sizeof(info->id), "%s", k->kf.id);
	info->state = k->note[0] ? KMS_STATE_DESTROYED : k->kf.state;
	info->version = tomb ? 0 : k->kf.newest;
	snprintf(info->created, sizeof(info->created), "%s", k->kf.created);
	snprintf(info->updated, sizeof(info->updated), "%s", k->kf.updated);
	snprintf(info->path, sizeof(info->path), "%s", k->path);
	info->format = k->kf.format;
	snprintf(info->note, sizeof(info->note), "%s", k->note);
}

static int append(char *out, size_t size, size_t *pos, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int append(char *out, size_t size, size_t *pos, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(out + *pos, size - *pos, fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= size - *pos)
		return -ENOBUFS;
	*pos += (size_t)n;
	return 0;
}

/* Write kf as a format-2 state file, atomically (temp + rename + fsync of the dir), mode 0600.
 * It holds no material: the temp file and the replaced inode leave no secret behind. */
static int ks_write(struct ks *k, const struct keyfile *kf)
{
	bool tomb = kf->state == KMS_STATE_DESTROYED;
	char out[1024];
	size_t len = 0;
	int r;

	r = append(out, sizeof(out), &len, "%sformat=%d\nname=%s\nid=%s\nstate=%d\ncreated=%s\nupdated=%s\n",
		   tomb ? TOMBSTONE_HEAD : KEYFILE_HEAD, KEYFILE_FORMAT, kf->name, kf->id, kf->state,
		   kf->created, kf->updated);
	if (r == 0)
		r = tomb ? append(out, sizeof(out), &len, "destroyed=%s\n", kf->destroyed)
			 : append(out, sizeof(out), &len, "versions=%u\n", kf->newest);
	if (r < 0) {
		ks_err(k, "key file '%s': too long", k->path);
		return r;
	}
	r = util_write_file_atomic(k->dfd, k->file, out, len, 0600);
	if (r < 0)
		ks_err(k, "key file '%s': cannot write it: %s", k->path, errstr(-r));
	return r;
}

static int ks_sync_dir(struct ks *k)
{
	if (fsync(k->dfd) < 0) {
		int r = -errno;

		ks_err(k, "keystore '%s': cannot sync it: %s", k->dir, errstr(-r));
		return r;
	}
	return 0;
}

/* ---- material files ---- */

static void mat_file(const struct ks *k, unsigned version, char *buf, size_t size)
{
	snprintf(buf, size, "%s.v%u" MAT_SUFFIX, k->name, version);
}

static void mat_path(const struct ks *k, const char *file, char *buf, size_t size)
{
	snprintf(buf, size, "%s%s%s", k->dir, k->dir[strlen(k->dir) - 1] == '/' ? "" : "/", file);
}

static void mat_encode(uint8_t out[MAT_SIZE], const char *id, unsigned version, const uint8_t *key)
{
	memcpy(out, MAT_MAGIC, 8);
	out[8] = (uint8_t)version;
	out[9] = (uint8_t)(version >> 8);
	out[10] = (uint8_t)(version >> 16);
	out[11] = (uint8_t)(version >> 24);
	memcpy(out + MAT_ID_OFF, id, 36);
	memcpy(out + MAT_KEY_OFF, key, KEYSTORE_MATERIAL_SIZE);
	crypto_generichash(out + MAT_SUM_OFF, 32, out, MAT_SUM_OFF, NULL, 0);
}

/* Check buf (len bytes) is version's material file of key id; copy the material to key (may be
 * NULL). Returns 0, or -EUCLEAN with *why saying what is wrong. */
static int mat_decode(const uint8_t *buf, size_t len, const char *id, unsigned version, uint8_t *key,
		      const char **why)
{
	uint8_t sum[32];
	unsigned v;

	if (len != MAT_SIZE) {
		*why = len == 0 ? "it is empty" : "it has the wrong length";
		return -EUCLEAN;
	}
	if (sodium_is_zero(buf, len)) {
		*why = "it is all zeros";
		return -EUCLEAN;
	}
	crypto_generichash(sum, sizeof(sum), buf, MAT_SUM_OFF, NULL, 0);
	if (memcmp(buf, MAT_MAGIC, 8) != 0 || sodium_memcmp(sum, buf + MAT_SUM_OFF, sizeof(sum)) != 0) {
		*why = "it is not an intact keyfs key material file";
		return -EUCLEAN;
	}
	v = (unsigned)buf[8] | (unsigned)buf[9] << 8 | (unsigned)buf[10] << 16 | (unsigned)buf[11] << 24;
	if (v != version || memcmp(buf + MAT_ID_OFF, id, 36) != 0) {
		*why = "it belongs to another key or version (copied or renamed by hand?)";
		return -EUCLEAN;
	}
	if (key)
		memcpy(key, buf + MAT_KEY_OFF, KEYSTORE_MATERIAL_SIZE);
	return 0;
}

/*
 * Read and check version's material file into key (may be NULL: check only); *ret_st (may be
 * NULL) is its stat from before the read. A missing or damaged file returns -EUCLEAN with
 * k->note saying why the key counts as destroyed; other errors are I/O trouble, with k->err.
 */
static int mat_read(struct ks *k, unsigned version, uint8_t *key, struct stat *ret_st, char *ret_path,
		    size_t pathsize)
{
	char file[MAT_NAME_MAX], path[PATH_MAX];
	const char *why = NULL;
	uint8_t *buf;
	size_t len = 0;
	int fd, r;

	mat_file(k, version, file, sizeof(file));
	mat_path(k, file, path, sizeof(path));
	if (ret_path)
		snprintf(ret_path, pathsize, "%s", path);
	r = ks_open_at(k, file, path, O_RDONLY, &fd, ret_st);
	if (r == -ENOENT) {
		snprintf(k->note, sizeof(k->note), "key material file '%s' is missing: the key counts as destroyed", path);
		return -EUCLEAN;
	}
	if (r < 0)
		return r;
	buf = sodium_malloc(MAT_SIZE + 1);
	if (!buf) {
		close(fd);
		ks_err(k, "key file '%s': out of locked memory", path);
		return -ENOMEM;
	}
	while (len < MAT_SIZE + 1) {
		ssize_t n = pread(fd, buf + len, MAT_SIZE + 1 - len, (off_t)len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			r = -errno;
			ks_err(k, "key file '%s': %s", path, errstr(-r));
			goto out;
		}
		if (n == 0)
			break;
		len += (size_t)n;
	}
	r = mat_decode(buf, len, k->kf.id, version, key, &why);
	if (r < 0)
		snprintf(k->note, sizeof(k->note), "key material file '%s' is damaged (%s): the key counts as destroyed",
			 path, why);
out:
	sodium_memzero(buf, MAT_SIZE + 1);
	sodium_free(buf);
	close(fd);
	return r;
}

/* Overwrite len bytes of the open fd in place with random bytes and make that durable: the same
 * inode and, on a filesystem that overwrites in place, the same blocks. */
static int shred_fd(int fd, off_t len)
{
	uint8_t noise[4096];
	off_t off = 0;

	while (off < len) {
		size_t n = (size_t)(len - off) < sizeof(noise) ? (size_t)(len - off) : sizeof(noise);
		ssize_t w;

		randombytes_buf(noise, n);
		w = pwrite(fd, noise, n, off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return w < 0 ? -errno : -EIO;
		off += w;
	}
	if (fdatasync(fd) < 0)
		return -errno;
	return 0;
}

/* Shred the regular file file in the keystore in place (not removing it). -ENOENT when absent. */
static int shred_file(struct ks *k, const char *file)
{
	char path[PATH_MAX];
	struct stat st;
	int fd, r;

	mat_path(k, file, path, sizeof(path));
	fd = openat(k->dfd, file, O_RDWR | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	if (fd < 0) {
		r = -errno;
		if (r != -ENOENT)
			ks_err(k, "cannot overwrite key file '%s': %s", path, errstr(-r));
		return r;
	}
	if (fstat(fd, &st) < 0) {
		r = -errno;
		ks_err(k, "cannot overwrite key file '%s': %s", path, errstr(-r));
		close(fd);
		return r;
	}
	if (!S_ISREG(st.st_mode)) {
		ks_err(k, "cannot overwrite key file '%s': not a regular file", path);
		close(fd);
		return -EPERM;
	}
	r = shred_fd(fd, st.st_size);
	if (r < 0)
		ks_err(k, "cannot overwrite key file '%s': %s", path, errstr(-r));
	close(fd);
	return r;
}

static int shred_unlink(struct ks *k, const char *file)
{
	int r = shred_file(k, file);

	if (r == 0 && unlinkat(k->dfd, file, 0) < 0 && errno != ENOENT) {
		r = -errno;
		ks_err(k, "cannot remove key file '%s/%s': %s", k->dir, file, errstr(-r));
	}
	return r;
}

/*
 * Write version's material file once: O_EXCL, 0600, fsync (the caller syncs the dir). One that
 * exists already is a leftover nobody used (a crash before the state file named it, or an
 * interrupted migration): kept when it holds this very material, else shredded and replaced.
 */
static int mat_create(struct ks *k, unsigned version, const uint8_t *key)
{
	char file[MAT_NAME_MAX], path[PATH_MAX];
	uint8_t *buf;
	int fd = -1, r;

	mat_file(k, version, file, sizeof(file));
	mat_path(k, file, path, sizeof(path));
	buf = sodium_malloc(2 * MAT_SIZE);
	if (!buf) {
		ks_err(k, "key file '%s': out of locked memory", path);
		return -ENOMEM;
	}
	mat_encode(buf, k->kf.id, version, key);
	for (int attempt = 0; attempt < 2; attempt++) {
		fd = openat(k->dfd, file, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY, 0600);
		if (fd >= 0 || errno != EEXIST || attempt)
			break;
		{
			ssize_t n = -1;
			int efd = openat(k->dfd, file, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);

			if (efd >= 0) {
				n = pread(efd, buf + MAT_SIZE, MAT_SIZE, 0);
				close(efd);
			}
			if (n == MAT_SIZE && sodium_memcmp(buf, buf + MAT_SIZE, MAT_SIZE) == 0) {
				r = 0;
				goto out;
			}
		}
		r = shred_unlink(k, file);
		if (r < 0 && r != -ENOENT)
			goto out;
	}
	if (fd < 0) {
		r = -errno;
		ks_err(k, "cannot create key file '%s': %s", path, errstr(-r));
		goto out;
	}
	r = 0;
	if (fchmod(fd, 0600) < 0)
		r = -errno;
	for (size_t off = 0; r == 0 && off < MAT_SIZE;) {
		ssize_t w = pwrite(fd, buf + off, MAT_SIZE - off, (off_t)off);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			r = w < 0 ? -errno : -EIO;
		else
			off += (size_t)w;
	}
	if (r == 0 && fsync(fd) < 0)
		r = -errno;
	close(fd);
	if (r < 0) {
		ks_err(k, "cannot write key file '%s': %s", path, errstr(-r));
		shred_unlink(k, file);
	}
out:
	sodium_memzero(buf, 2 * MAT_SIZE);
	sodium_free(buf);
	return r;
}

/*
 * Leftovers of a crash, shredded under the exclusive lock (every writer holds it, so they are
 * stale): ".NAME.key.tmpXXXXXXXX" from util_write_file_atomic (format 1 wrote material into
 * them) and ".NAME.key.old", a format-1 key file kept while being migrated. When the crash came
 * before the state file was replaced, .old is a second name of the live key file: only unlinked.
 */
static void wipe_stale(struct ks *k)
{
	char prefix[sizeof(k->file) + 8], old[sizeof(k->file) + 8];
	struct stat cur, st;
	struct dirent *de;
	bool removed = false;
	DIR *d;
	int fd;

	snprintf(prefix, sizeof(prefix), ".%s.tmp", k->file);
	snprintf(old, sizeof(old), ".%s.old", k->file);
	if (fstatat(k->dfd, old, &st, AT_SYMLINK_NOFOLLOW) == 0) {
		if (fstatat(k->dfd, k->file, &cur, AT_SYMLINK_NOFOLLOW) == 0 && cur.st_dev == st.st_dev &&
		    cur.st_ino == st.st_ino)
			removed = unlinkat(k->dfd, old, 0) == 0;
		else
			removed = shred_unlink(k, old) == 0;
	}
	/* A separate open file description: closing it leaves the flock on k->dfd alone. */
	fd = openat(k->dfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return;
	d = fdopendir(fd);
	if (!d) {
		close(fd);
		return;
	}
	while ((de = readdir(d)))
		if (strncmp(de->d_name, prefix, strlen(prefix)) == 0 && shred_unlink(k, de->d_name) == 0)
			removed = true;
	closedir(d);
	if (removed)
		fsync(k->dfd);
}

/*
 * Check every material file of a live format-2 key, and with mat read version want's (0: the
 * newest) into it: a key with one version shredded is a destroyed key for every version. A
 * missing or damaged file sets k->note (the key counts as destroyed) and still returns 0.
 */
static int ks_material(struct ks *k, unsigned want, struct keystore_material *mat)
{
	unsigned target = want ? want : k->kf.newest;
	int r = 0;

	if (k->kf.format != KEYFILE_FORMAT || k->kf.state == KMS_STATE_DESTROYED)
		return 0;
	if (mat)
		mat->version = 0;
	for (unsigned v = 1; v <= k->kf.newest && r == 0; v++) {
		if (mat && v == target) {
			r = mat_read(k, v, mat->key, &mat->st, mat->path, sizeof(mat->path));
			if (r == 0)
				mat->version = v;
		} else {
			r = mat_read(k, v, NULL, NULL, NULL, 0);
		}
	}
	if (r < 0 && mat) {
		sodium_memzero(mat->key, sizeof(mat->key));
		mat->version = 0;
	}
	return r == -EUCLEAN ? 0 : r;
}

/* Open, lock, read and parse the key file; the fd is closed unless ret_fd is non-NULL. */
static int ks_load(struct ks *k, int lockop, int oflags, unsigned want, struct keystore_material *mat,
		   int *ret_fd, struct stat *ret_st)
{
	int fd = -1, r;

	r = ks_open_dir(k, false, lockop);
	if (r < 0)
		return r;
	r = ks_open_at(k, k->file, k->path, oflags, &fd, ret_st);
	if (r < 0)
		return r;
	r = ks_read_fd(k, fd);
	if (r == 0)
		r = ks_parse(k, want, mat);
	if (r < 0 || !ret_fd)
		close(fd);
	else
		*ret_fd = fd;
	return r;
}

/*
 * ks_load for a change: the exclusive lock, stale leftovers shredded, and -EKEYREVOKED for a
 * tombstone or, when check, for a key whose material is missing or damaged (then only destroy
 * may change it). The fd, when asked for, is closed on failure.
 */
static int ks_load_live(struct ks *k, bool check, int oflags, int *ret_fd, struct stat *ret_st)
{
	int fd = -1, r;

	r = ks_load(k, LOCK_EX, oflags, 0, NULL, ret_fd ? &fd : NULL, ret_st);
	if (r == 0 && k->kf.state == KMS_STATE_DESTROYED)
		r = -EKEYREVOKED;
	if (r == 0 && check) {
		r = ks_material(k, 0, NULL);
		if (r == 0 && k->note[0]) {
			ks_err(k, "%s", k->note);
			r = -EKEYREVOKED;
		}
	}
	if (r < 0) {
		if (fd >= 0)
			close(fd);
		return r;
	}
	wipe_stale(k);
	if (ret_fd)
		*ret_fd = fd;
	return 0;
}

int keystore_load(const char *dir, const char *name, unsigned want, struct keystore_info *ret_info,
		  struct keystore_material *mat, char *err, size_t errlen)
{
	struct stat st;
	struct ks k;
	int r;

	r = ks_init(&k, dir, name, err, errlen);
	if (r < 0)
		return r;
	r = ks_load(&k, LOCK_SH, O_RDONLY, want, mat, NULL, &st);
	if (r == 0 && mat && k.kf.format == KEYFILE_FORMAT_V1) {
		mat->st = st;
		snprintf(mat->path, sizeof(mat->path), "%s", k.path);
	}
	if (r == 0)
		r = ks_material(&k, want, mat);
	if (r == 0 && k.note[0])
		ks_err(&k, "%s", k.note);
	if (r == 0 && ret_info)
		ks_info(&k, ret_info);
	ks_done(&k);
	return r;
}

int keystore_show(const char *dir, const char *name, struct keystore_info *ret)
{
	char err[KMS_ERR_MAX];

	if (sodium_init() < 0)
		return -EIO;
	return keystore_load(dir, name, 0, ret, NULL, err, sizeof(err));
}

/* New random material for version of k's key, durable in its file and in the dir. */
static int mat_new(struct ks *k, unsigned version)
{
	uint8_t *material = sodium_malloc(KEYSTORE_MATERIAL_SIZE);
	int r;

	if (!material)
		return -ENOMEM;
	randombytes_buf(material, KEYSTORE_MATERIAL_SIZE);
	r = mat_create(k, version, material);
	if (r == 0)
		r = ks_sync_dir(k);
	sodium_free(material);          /* wipes it */
	return r;
}

int keystore_create(const char *dir, const char *name, struct keystore_info *ret)
{
	char err[KMS_ERR_MAX], file[MAT_NAME_MAX];
	struct keyfile kf;
	struct stat st;
	struct ks k;
	int r;

	if (sodium_init() < 0)
		return -EIO;
	r = ks_init(&k, dir, name, err, sizeof(err));
	if (r < 0)
		return r;
	r = ks_open_dir(&k, true, LOCK_EX);
	if (r < 0)
		goto out;
	/* A tombstone counts: a destroyed key's name is never reused. */
	if (fstatat(k.dfd, k.file, &st, AT_SYMLINK_NOFOLLOW) == 0) {
		r = -EEXIST;
		goto out;
	}
	if (errno != ENOENT) {
		r = -errno;
		goto out;
	}
	wipe_stale(&k);
	memset(&kf, 0, sizeof(kf));
	snprintf(kf.name, sizeof(kf.name), "%s", name);
	util_uuid4(kf.id);
	kf.state = KMS_STATE_ACTIVE;
	util_now_rfc3339(kf.created);
	memcpy(kf.updated, kf.created, sizeof(kf.updated));
	kf.newest = 1;
	kf.format = KEYFILE_FORMAT;
	k.kf = kf;
	r = mat_new(&k, 1);
	if (r == 0)
		r = ks_write(&k, &kf);
	if (r < 0) {
		mat_file(&k, 1, file, sizeof(file));
		shred_unlink(&k, file);
		goto out;
	}
	if (ret)
		ks_info(&k, ret);
out:
	ks_done(&k);
	return r;
}

/*
 * Replace a format-1 key file (material inline, k->text) by material files and the format-2
 * state file kf, then shred the old file's only remaining inode. See the comment at the top.
 */
static int ks_migrate(struct ks *k, struct keyfile *kf)
{
	struct keystore_material *mat;
	char old[sizeof(k->file) + 8];
	unsigned newest = k->kf.newest;
	int r = 0;

	mat = sodium_malloc(sizeof(*mat));
	if (!mat) {
		ks_err(k, "key file '%s': out of locked memory", k->path);
		return -ENOMEM;
	}
	for (unsigned v = 1; v <= newest && r == 0; v++) {
		r = ks_parse(k, v, mat);
		if (r == 0 && mat->version != v) {
			ks_err(k, "key file '%s' has no version %u, so it cannot be moved to this keyfs's layout: create a new key",
			       k->path, v);
			r = -EUCLEAN;
		}
		if (r == 0)
			r = mat_create(k, v, mat->key);
	}
	sodium_memzero(mat, sizeof(*mat));
	sodium_free(mat);
	if (r == 0)
		r = ks_sync_dir(k);
	if (r < 0)
		return r;
	snprintf(old, sizeof(old), ".%s.old", k->file);
	if (linkat(k->dfd, k->file, k->dfd, old, 0) < 0) {
		r = -errno;
		ks_err(k, "key file '%s': cannot link it to '%s': %s", k->path, old, errstr(-r));
		return r;
	}
	kf->format = KEYFILE_FORMAT;
	r = ks_write(k, kf);
	if (r < 0) {
		unlinkat(k->dfd, old, 0);
		return r;
	}
	k->kf = *kf;
	r = shred_unlink(k, old);
	if (r == 0)
		r = ks_sync_dir(k);
	return r;
}

int keystore_set_state(const char *dir, const char *name, int state)
{
	char err[KMS_ERR_MAX];
	struct keyfile kf;
	struct ks k;
	int r;

	if (state != KMS_STATE_ACTIVE && state != KMS_STATE_SUSPENDED && state != KMS_STATE_DEACTIVATED)
		return -EINVAL;
	if (sodium_init() < 0)
		return -EIO;
	r = ks_init(&k, dir, name, err, sizeof(err));
	if (r < 0)
		return r;
	r = ks_load_live(&k, true, O_RDONLY, NULL, NULL);
	if (r < 0)
		goto out;
	if (k.kf.state == state)
		goto out;
	kf = k.kf;
	kf.state = state;
	util_now_rfc3339(kf.updated);
	r = k.kf.format == KEYFILE_FORMAT_V1 ? ks_migrate(&k, &kf) : ks_write(&k, &kf);
out:
	ks_done(&k);
	return r;
}

int keystore_rotate(const char *dir, const char *name, struct keystore_info *ret)
{
	char err[KMS_ERR_MAX];
	struct keyfile kf;
	struct ks k;
	int r;

	if (sodium_init() < 0)
		return -EIO;
	r = ks_init(&k, dir, name, err, sizeof(err));
	if (r < 0)
		return r;
	r = ks_load_live(&k, true, O_RDONLY, NULL, NULL);
	if (r < 0)
		goto out;
	/* As Key Protect: only an active key gets new material. */
	if (k.kf.state != KMS_STATE_ACTIVE) {
		r = -ENOKEY;
		goto out;
	}
	if (k.kf.newest >= VERSIONS_MAX) {
		r = -ENOBUFS;
		goto out;
	}
	if (k.kf.format == KEYFILE_FORMAT_V1) {
		kf = k.kf;
		r = ks_migrate(&k, &kf);
		if (r < 0)
			goto out;
	}
	/* The material file first: the state file names only versions whose file is durable. */
	r = mat_new(&k, k.kf.newest + 1);
	if (r < 0)
		goto out;
	kf = k.kf;
	kf.newest++;
	util_now_rfc3339(kf.updated);
	r = ks_write(&k, &kf);
	if (r == 0) {
		k.kf = kf;
		if (ret)
			ks_info(&k, ret);
	}
out:
	ks_done(&k);
	return r;
}

/*
 * Overwrite every copy of the material this keystore made in place (the material files, or a
 * format-1 key file), fdatasync, then write the tombstone, then remove the overwritten files.
 * A crash before the tombstone leaves overwritten material files: the key counts as destroyed,
 * and destroy again finishes the job. What no software can reach (flash wear levelling,
 * copy-on-write filesystems, snapshots, backups) is in README.md and keyfsctl(8).
 */
int keystore_destroy(const char *dir, const char *name)
{
	char err[KMS_ERR_MAX], file[MAT_NAME_MAX];
	struct keyfile kf;
	struct stat st;
	struct ks k;
	int fd = -1, r;

	if (sodium_init() < 0)
		return -EIO;
	r = ks_init(&k, dir, name, err, sizeof(err));
	if (r < 0)
		return r;
	r = ks_load_live(&k, false, O_RDWR, &fd, &st);
	if (r < 0)
		goto out;
	if (k.kf.format == KEYFILE_FORMAT_V1) {
		r = shred_fd(fd, st.st_size > (off_t)k.len ? st.st_size : (off_t)k.len);
		if (r < 0) {
			ks_err(&k, "cannot overwrite key file '%s': %s", k.path, errstr(-r));
			goto out;
		}
	}
	close(fd);
	fd = -1;
	/* newest + 1: a rotate cut short, or a format-1 key's interrupted migration, may have left it. */
	for (unsigned v = 1; v <= k.kf.newest + 1; v++) {
		mat_file(&k, v, file, sizeof(file));
		r = shred_file(&k, file);
		if (r < 0 && r != -ENOENT)
			goto out;
	}
	kf = k.kf;
	kf.state = KMS_STATE_DESTROYED;
	kf.newest = 0;
	util_now_rfc3339(kf.updated);
	memcpy(kf.destroyed, kf.updated, sizeof(kf.destroyed));
	r = ks_write(&k, &kf);
	if (r < 0)
		goto out;
	for (unsigned v = 1; v <= k.kf.newest + 1; v++) {
		mat_file(&k, v, file, sizeof(file));
		if (unlinkat(k.dfd, file, 0) < 0 && errno != ENOENT && r == 0) {
			r = -errno;
			ks_err(&k, "cannot remove key file '%s/%s': %s", k.dir, file, errstr(-r));
		}
	}
	if (r == 0)
		r = ks_sync_dir(&k);
out:
	if (fd >= 0)
		close(fd);
	ks_done(&k);
	return r;
}
