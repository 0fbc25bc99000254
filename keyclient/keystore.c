/* keystore.c: the local keystore: a 0700 dir of strictly parsed 0600 key files, states, destroy with tombstone */
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
 * A key file is text, one "name=value" per line, every line ending in '\n':
 *   # keyfs local key; do not edit or copy          ('#' lines are comments)
 *   format=1                                        (first non-comment line)
 *   name=NAME                                       (must match the file name)
 *   id=<uuid4>
 *   state=1|2|3|5
 *   created=<rfc3339>
 *   updated=<rfc3339>
 *   destroyed=<rfc3339>                             (tombstones only)
 *   version=N <base64 of 32 bytes>                  (live keys: one or more, N increasing, newest last)
 * A tombstone (state=5) has no version lines. Anything else is a damaged file.
 */
#define KEYFILE_MAX             (16 * 1024)
#define KEYFILE_SUFFIX          ".key"
#define KEYFILE_FORMAT          1
#define KEYFILE_HEAD            "# keyfs local key; do not edit or copy\n"
#define TOMBSTONE_HEAD          "# keyfs local key tombstone: the key material was destroyed; keep this file, it blocks the name\n"
#define KEYSTORE_ROOT_DIR       "/var/lib/keyfs/keystore"
#define LOCK_TIMEOUT_MS         5000
#define LOCK_STEP_MS            5
#define B64_SIZE                sodium_base64_ENCODED_LEN(KEYSTORE_MATERIAL_SIZE, sodium_base64_VARIANT_ORIGINAL)

struct keyfile {
	char name[KEYSTORE_NAME_MAX + 1];
	char id[37];
	int state;
	char created[32];
	char updated[32];
	char destroyed[32];
	unsigned newest;                /* 0: no version lines (tombstone) */
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

/* Open the key file and check it is a regular file only we (or root) can read. */
static int ks_open_file(struct ks *k, int oflags, int *ret_fd, struct stat *ret_st)
{
	struct stat st;
	int fd, r;

	fd = openat(k->dfd, k->file, oflags | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	if (fd < 0) {
		r = -errno;
		if (r == -ENOENT) {
			ks_err(k, "key '%s' not found in keystore '%s': create it with 'keyfsctl key create %s --keystore %s', or name the keystore it was created in",
			       k->name, k->dir, k->name, k->dir);
		} else if (r == -ELOOP) {
			ks_err(k, "key file '%s' is a symbolic link: refusing to use it", k->path);
			r = -EPERM;
		} else if (r == -EACCES) {
			ks_err(k, "key file '%s' is not readable: permission denied (run as its owner or root)", k->path);
		} else {
			ks_err(k, "key file '%s': %s", k->path, errstr(-r));
		}
		return r;
	}
	if (fstat(fd, &st) < 0) {
		r = -errno;
		ks_err(k, "key file '%s': %s", k->path, errstr(-r));
		goto fail;
	}
	if (!S_ISREG(st.st_mode)) {
		ks_err(k, "key file '%s' is not a regular file: refusing to use it", k->path);
		r = -EPERM;
		goto fail;
	}
	if (!owner_ok(&st)) {
		ks_err(k, "key file '%s' is owned by uid %u, not by you or root: refusing to use it",
		       k->path, (unsigned)st.st_uid);
		r = -EPERM;
		goto fail;
	}
	if (st.st_mode & 077) {
		ks_err(k, "key file '%s' is accessible by group or others (mode %04o): refusing to use it; run chmod 600 '%s'",
		       k->path, (unsigned)(st.st_mode & 07777), k->path);
		r = -EPERM;
		goto fail;
	}
	if (st.st_size > KEYFILE_MAX) {
		ks_err(k, "key file '%s' is damaged: larger than %d bytes", k->path, KEYFILE_MAX);
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

static bool uuid_valid(const char *s)
{
	if (strlen(s) != 36)
		return false;
	for (int i = 0; i < 36; i++) {
		bool hyphen = i == 8 || i == 13 || i == 18 || i == 23;

		if (hyphen ? s[i] != '-' : !((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
			return false;
	}
	return true;
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
};

/*
 * Parse k->text into k->kf. When mat is non-NULL, copy the material of version want (0: newest)
 * into it; every other version decodes into a scratch area of mat only to be checked, then wiped.
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
			if (fmt != KEYFILE_FORMAT) {
				ks_err(k, "key file '%s' has format %u, which this keyfs does not understand", k->path, fmt);
				r = -EPROTONOSUPPORT;
				goto out;
			}
			have_format = true;
			continue;
		}
		if (IS("version")) {
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
			if (bit == SEEN_ID && !uuid_valid(kf->id)) {
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
	memset(info, 0, sizeof(*info));
	snprintf(info->name, sizeof(info->name), "%s", k->kf.name);
	snprintf(info->id, sizeof(info->id), "%s", k->kf.id);
	info->state = k->kf.state;
	info->version = k->kf.state == KMS_STATE_DESTROYED ? 0 : k->kf.newest;
	snprintf(info->created, sizeof(info->created), "%s", k->kf.created);
	snprintf(info->updated, sizeof(info->updated), "%s", k->kf.updated);
	snprintf(info->path, sizeof(info->path), "%s", k->path);
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

/*
 * Format kf into out (sodium memory). The version lines come verbatim from old (the parsed
 * text being replaced, may be NULL) and then from extra (one "version=..." line, may be NULL).
 */
static int ks_format(const struct keyfile *kf, const char *old, size_t oldlen, const char *extra,
		     char *out, size_t size, size_t *ret_len)
{
	bool tomb = kf->state == KMS_STATE_DESTROYED;
	size_t pos = 0;
	int r;

	r = append(out, size, &pos, "%sformat=%d\nname=%s\nid=%s\nstate=%d\ncreated=%s\nupdated=%s\n",
		   tomb ? TOMBSTONE_HEAD : KEYFILE_HEAD, KEYFILE_FORMAT, kf->name, kf->id, kf->state,
		   kf->created, kf->updated);
	if (r == 0 && tomb)
		r = append(out, size, &pos, "destroyed=%s\n", kf->destroyed);
	if (r < 0)
		return r;
	if (!tomb && old) {
		const char *p = old, *end = old + oldlen;

		while (p < end) {
			const char *nl = memchr(p, '\n', (size_t)(end - p));
			size_t ll = nl ? (size_t)(nl - p) + 1 : (size_t)(end - p);

			if (ll > 8 && memcmp(p, "version=", 8) == 0) {
				if (ll >= size - pos)
					return -ENOBUFS;
				memcpy(out + pos, p, ll);
				pos += ll;
			}
			p += ll;
		}
	}
	if (!tomb && extra) {
		r = append(out, size, &pos, "%s", extra);
		if (r < 0)
			return r;
	}
	out[pos] = '\0';
	*ret_len = pos;
	return 0;
}

/* Write kf (plus version lines as for ks_format) atomically over the key file, mode 0600. */
static int ks_write(struct ks *k, const struct keyfile *kf, const char *old, size_t oldlen, const char *extra)
{
	char *out;
	size_t len = 0;
	int r;

	out = sodium_malloc(KEYFILE_MAX + 1);
	if (!out) {
		ks_err(k, "key file '%s': out of locked memory", k->path);
		return -ENOMEM;
	}
	r = ks_format(kf, old, oldlen, extra, out, KEYFILE_MAX + 1, &len);
	if (r < 0) {
		ks_err(k, "key file '%s': too many versions", k->path);
		goto out;
	}
	r = util_write_file_atomic(k->dfd, k->file, out, len, 0600);
	if (r < 0)
		ks_err(k, "key file '%s': cannot write it: %s", k->path, errstr(-r));
out:
	sodium_memzero(out, KEYFILE_MAX + 1);
	sodium_free(out);
	return r;
}

/* Open, lock, read and parse the key file; the fd is closed unless ret_fd is non-NULL. */
static int ks_load(struct ks *k, int lockop, int oflags, unsigned want, struct keystore_material *mat,
		   int *ret_fd, struct stat *ret_st)
{
	int fd = -1, r;

	r = ks_open_dir(k, false, lockop);
	if (r < 0)
		return r;
	r = ks_open_file(k, oflags, &fd, ret_st);
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

/* ks_load for a change: the exclusive lock, and -EKEYREVOKED for a destroyed key's tombstone.
 * The fd, when asked for, is closed on failure. */
static int ks_load_live(struct ks *k, int oflags, int *ret_fd, struct stat *ret_st)
{
	int fd = -1, r;

	r = ks_load(k, LOCK_EX, oflags, 0, NULL, ret_fd ? &fd : NULL, ret_st);
	if (r == 0 && k->kf.state == KMS_STATE_DESTROYED)
		r = -EKEYREVOKED;
	if (r < 0) {
		if (fd >= 0)
			close(fd);
		return r;
	}
	if (ret_fd)
		*ret_fd = fd;
	return 0;
}

int keystore_load(const char *dir, const char *name, unsigned want, struct keystore_info *ret_info,
		  struct keystore_material *mat, char *err, size_t errlen)
{
	struct ks k;
	int r;

	r = ks_init(&k, dir, name, err, errlen);
	if (r < 0)
		return r;
	r = ks_load(&k, LOCK_SH, O_RDONLY, want, mat, NULL, NULL);
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

/* A "version=N MATERIAL" line with fresh random material, in sodium memory the caller
 * sodium_free()s (which wipes it). Returns 0 or -errno. */
static int new_version_line(unsigned version, char **ret_line)
{
	const size_t linesize = sizeof("version=4294967295 \n") + B64_SIZE;
	uint8_t *material;
	char *line;
	int n;

	material = sodium_malloc(KEYSTORE_MATERIAL_SIZE + B64_SIZE);
	line = sodium_malloc(linesize);
	if (!material || !line) {
		sodium_free(material);
		sodium_free(line);
		return -ENOMEM;
	}
	randombytes_buf(material, KEYSTORE_MATERIAL_SIZE);
	sodium_bin2base64((char *)material + KEYSTORE_MATERIAL_SIZE, B64_SIZE, material, KEYSTORE_MATERIAL_SIZE,
			  sodium_base64_VARIANT_ORIGINAL);
	n = snprintf(line, linesize, "version=%u %s\n", version, (char *)material + KEYSTORE_MATERIAL_SIZE);
	sodium_free(material);
	if (n < 0 || (size_t)n >= linesize) {
		sodium_free(line);
		return -ENOBUFS;
	}
	*ret_line = line;
	return 0;
}

int keystore_create(const char *dir, const char *name, struct keystore_info *ret)
{
	char err[KMS_ERR_MAX], *line = NULL;
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
	r = new_version_line(1, &line);
	if (r < 0)
		goto out;
	memset(&kf, 0, sizeof(kf));
	snprintf(kf.name, sizeof(kf.name), "%s", name);
	util_uuid4(kf.id);
	kf.state = KMS_STATE_ACTIVE;
	util_now_rfc3339(kf.created);
	memcpy(kf.updated, kf.created, sizeof(kf.updated));
	kf.newest = 1;
	r = ks_write(&k, &kf, NULL, 0, line);
	if (r < 0)
		goto out;
	k.kf = kf;
	if (ret)
		ks_info(&k, ret);
out:
	sodium_free(line);
	ks_done(&k);
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
	r = ks_load_live(&k, O_RDONLY, NULL, NULL);
	if (r < 0)
		goto out;
	if (k.kf.state == state)
		goto out;
	kf = k.kf;
	kf.state = state;
	util_now_rfc3339(kf.updated);
	r = ks_write(&k, &kf, k.text, k.len, NULL);
out:
	ks_done(&k);
	return r;
}

int keystore_rotate(const char *dir, const char *name, struct keystore_info *ret)
{
	char err[KMS_ERR_MAX], *line = NULL;
	struct keyfile kf;
	struct ks k;
	int r;

	if (sodium_init() < 0)
		return -EIO;
	r = ks_init(&k, dir, name, err, sizeof(err));
	if (r < 0)
		return r;
	r = ks_load_live(&k, O_RDONLY, NULL, NULL);
	if (r < 0)
		goto out;
	/* As Key Protect: only an active key gets new material. */
	if (k.kf.state != KMS_STATE_ACTIVE) {
		r = -ENOKEY;
		goto out;
	}
	if (k.kf.newest == UINT_MAX) {
		r = -EOVERFLOW;
		goto out;
	}
	r = new_version_line(k.kf.newest + 1, &line);
	if (r < 0)
		goto out;
	kf = k.kf;
	kf.newest++;
	util_now_rfc3339(kf.updated);
	r = ks_write(&k, &kf, k.text, k.len, line);
	if (r == 0) {
		k.kf = kf;
		if (ret)
			ks_info(&k, ret);
	}
out:
	sodium_free(line);
	ks_done(&k);
	return r;
}

/* Overwrite the open key file's len bytes with zeros and make that durable. */
static int zero_fd(int fd, off_t len)
{
	static const uint8_t zeros[4096];
	off_t off = 0;

	while (off < len) {
		size_t n = (size_t)(len - off) < sizeof(zeros) ? (size_t)(len - off) : sizeof(zeros);
		ssize_t w = pwrite(fd, zeros, n, off);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return w < 0 ? -errno : -EIO;
		off += w;
	}
	if (fsync(fd) < 0)
		return -errno;
	return 0;
}

/*
 * util_write_file_atomic writes ".<file>.tmpXXXXXXXX" and renames it; a crash in between leaves
 * a copy of the material behind. Writers hold the dir lock, so under it any such file is stale.
 */
static void wipe_stale_tmp(struct ks *k)
{
	char prefix[sizeof(k->file) + 8];
	struct dirent *de;
	DIR *d;
	int fd;

	snprintf(prefix, sizeof(prefix), ".%s.tmp", k->file);
	/* A separate open file description: closing it leaves the flock on k->dfd alone. */
	fd = openat(k->dfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return;
	d = fdopendir(fd);
	if (!d) {
		close(fd);
		return;
	}
	while ((de = readdir(d))) {
		struct stat st;
		int tfd;

		if (strncmp(de->d_name, prefix, strlen(prefix)) != 0)
			continue;
		tfd = openat(k->dfd, de->d_name, O_RDWR | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
		if (tfd < 0)
			continue;
		if (fstat(tfd, &st) == 0 && S_ISREG(st.st_mode) && zero_fd(tfd, st.st_size) == 0)
			unlinkat(k->dfd, de->d_name, 0);
		close(tfd);
	}
	closedir(d);
}

/*
 * The material is overwritten in place first, so the old inode holds zeros even if the rename
 * below never happens. On copy-on-write or journalled-data filesystems and flash, old blocks may
 * survive the overwrite: the keystore belongs on storage the host controls.
 */
int keystore_destroy(const char *dir, const char *name)
{
	char err[KMS_ERR_MAX];
	struct keyfile kf;
	struct stat st;
	struct ks k;
	int fd = -1, r;

	if (sodium_init() < 0)
		return -EIO;
	r = ks_init(&k, dir, name, err, sizeof(err));
	if (r < 0)
		return r;
	r = ks_load_live(&k, O_RDWR, &fd, &st);
	if (r < 0)
		goto out;
	r = zero_fd(fd, st.st_size > (off_t)k.len ? st.st_size : (off_t)k.len);
	if (r < 0)
		goto out;
	close(fd);
	fd = -1;
	kf = k.kf;
	kf.state = KMS_STATE_DESTROYED;
	kf.newest = 0;
	util_now_rfc3339(kf.updated);
	memcpy(kf.destroyed, kf.updated, sizeof(kf.destroyed));
	r = ks_write(&k, &kf, NULL, 0, NULL);
	if (r == 0)
		wipe_stale_tmp(&k);
out:
	if (fd >= 0)
		close(fd);
	ks_done(&k);
	return r;
}
