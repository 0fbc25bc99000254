/* util.c: bounded file I/O, number parsing, uuids, time and JSON string helpers */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "keyfs/util.h"

int util_read_file(int dirfd, const char *path, size_t max, char **ret_buf, size_t *ret_len)
{
	struct stat st;
	char *buf;
	size_t len = 0;
	int fd, r;

	fd = openat(dirfd, path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NOFOLLOW);
	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0) {
		r = -errno;
		goto out_close;
	}
	if (!S_ISREG(st.st_mode)) {
		r = -EINVAL;
		goto out_close;
	}
	if ((uint64_t)st.st_size > max) {
		r = -EFBIG;
		goto out_close;
	}
	buf = malloc(max + 1);
	if (!buf) {
		r = -ENOMEM;
		goto out_close;
	}
	/* Read to EOF rather than trusting st_size, still never past max. */
	for (;;) {
		ssize_t n = read(fd, buf + len, max + 1 - len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			r = -errno;
			free(buf);
			goto out_close;
		}
		if (n == 0)
			break;
		len += (size_t)n;
		if (len > max) {
			free(buf);
			r = -EFBIG;
			goto out_close;
		}
	}
	buf[len] = '\0';
	*ret_buf = buf;
	if (ret_len)
		*ret_len = len;
	r = 0;
out_close:
	close(fd);
	return r;
}

int util_write_file_atomic(int dirfd, const char *path, const void *buf, size_t len, unsigned mode)
{
	char tmp[4096];
	const char *base = strrchr(path, '/');
	size_t dirlen = base ? (size_t)(base - path) + 1 : 0;
	const uint8_t *p = buf;
	uint32_t rnd;
	int fd, r, n;

	base = base ? base + 1 : path;
	if (getrandom(&rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd))
		rnd = (uint32_t)getpid();
	n = snprintf(tmp, sizeof(tmp), "%.*s.%s.tmp%08" PRIx32, (int)dirlen, path, base, rnd);
	if (n < 0 || (size_t)n >= sizeof(tmp))
		return -ENAMETOOLONG;
	fd = openat(dirfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode);
	if (fd < 0)
		return -errno;
	if (fchmod(fd, mode) < 0)
		goto fail;
	while (len > 0) {
		ssize_t w = write(fd, p, len);

		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			goto fail;
		p += w;
		len -= (size_t)w;
	}
	if (fsync(fd) < 0)
		goto fail;
	if (close(fd) < 0) {
		fd = -1;
		goto fail;
	}
	fd = -1;
	if (renameat(dirfd, tmp, dirfd, path) < 0)
		goto fail;
	/* Make the rename itself durable. */
	{
		char dir[4096];
		int dfd;

		n = snprintf(dir, sizeof(dir), "%.*s", (int)(dirlen ? dirlen : 1), dirlen ? path : ".");
		if (n < 0 || (size_t)n >= sizeof(dir))
			return 0;
		dfd = openat(dirfd, dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		if (dfd >= 0) {
			fsync(dfd);
			close(dfd);
		}
	}
	return 0;
fail:
	r = -errno;
	if (fd >= 0)
		close(fd);
	unlinkat(dirfd, tmp, 0);
	return r;
}

int util_parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *ret)
{
	char *end;
	unsigned long long v;

	if (!s || *s < '0' || *s > '9')
		return -EINVAL;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno == ERANGE)
		return -ERANGE;
	if (*end != '\0')
		return -EINVAL;
	if (v < min || v > max)
		return -ERANGE;
	*ret = v;
	return 0;
}

void util_hex(const uint8_t *in, size_t n, char *out)
{
	static const char digits[] = "0123456789abcdef";

	for (size_t i = 0; i < n; i++) {
		out[2 * i] = digits[in[i] >> 4];
		out[2 * i + 1] = digits[in[i] & 15];
	}
	out[2 * n] = '\0';
}

bool util_uuid_valid(const char *s)
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

void util_uuid4(char out[37])
{
	uint8_t b[16];
	char hex[33];

	while (getrandom(b, sizeof(b), 0) != (ssize_t)sizeof(b))
		;
	b[6] = (uint8_t)((b[6] & 0x0f) | 0x40);
	b[8] = (uint8_t)((b[8] & 0x3f) | 0x80);
	util_hex(b, sizeof(b), hex);
	snprintf(out, 37, "%.8s-%.4s-%.4s-%.4s-%.12s", hex, hex + 8, hex + 12, hex + 16, hex + 20);
}

void util_now_rfc3339(char out[32])
{
	time_t t = time(NULL);
	struct tm tm;

	gmtime_r(&t, &tm);
	strftime(out, 32, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* Length of the valid UTF-8 sequence at p (1-4), or 0 when p does not start one: overlong
 * forms, surrogates and code points above U+10FFFF are invalid (RFC 3629). */
static size_t utf8_len(const unsigned char *p)
{
	unsigned cp;
	size_t n;

	if (p[0] < 0x80)
		return 1;
	if (p[0] >= 0xc2 && p[0] <= 0xdf)
		n = 2, cp = p[0] & 0x1f;
	else if (p[0] >= 0xe0 && p[0] <= 0xef)
		n = 3, cp = p[0] & 0x0f;
	else if (p[0] >= 0xf0 && p[0] <= 0xf4)
		n = 4, cp = p[0] & 0x07;
	else
		return 0;
	for (size_t i = 1; i < n; i++) {
		if ((p[i] & 0xc0) != 0x80)
			return 0;
		cp = cp << 6 | (p[i] & 0x3f);
	}
	if ((n == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (n == 4 && (cp < 0x10000 || cp > 0x10ffff)))
		return 0;
	return n;
}

int util_utf8_fix(const char *s, char *out, size_t size)
{
	size_t w = 0;

	for (const unsigned char *p = (const unsigned char *)s; *p;) {
		size_t n = utf8_len(p);
		const char *from = n ? (const char *)p : "\xef\xbf\xbd";
		size_t len = n ? n : 3;

		if (w + len >= size)
			return -ENAMETOOLONG;
		memcpy(out + w, from, len);
		w += len;
		p += n ? n : 1;
	}
	if (size == 0)
		return -ENAMETOOLONG;
	out[w] = '\0';
	return 0;
}

void util_json_string(FILE *f, const char *s)
{
	fputc('"', f);
	for (const unsigned char *p = (const unsigned char *)s; *p;) {
		size_t n = utf8_len(p);

		switch (*p) {
		case '"': fputs("\\\"", f); break;
		case '\\': fputs("\\\\", f); break;
		case '\n': fputs("\\n", f); break;
		case '\r': fputs("\\r", f); break;
		case '\t': fputs("\\t", f); break;
		default:
			if (n == 0)
				/* A file name need not be UTF-8; JSON must be. */
				fputs("\\ufffd", f);
			else if (*p < 0x20 || *p == 0x7f)
				fprintf(f, "\\u%04x", *p);
			else
				fwrite(p, 1, n, f);
		}
		p += n ? n : 1;
	}
	fputc('"', f);
}

ssize_t util_preadv_full(int fd, struct iovec *iov, int cnt, uint64_t off)
{
	size_t done = 0;

	while (cnt > 0) {
		ssize_t n = preadv(fd, iov, cnt, (off_t)(off + done));

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			break;
		done += (size_t)n;
		while (cnt > 0 && (size_t)n >= iov->iov_len) {
			n -= (ssize_t)iov->iov_len;
			iov++;
			cnt--;
		}
		if (cnt > 0) {
			iov->iov_base = (uint8_t *)iov->iov_base + n;
			iov->iov_len -= (size_t)n;
		}
	}
	return (ssize_t)done;
}

ssize_t util_pread_full(int fd, void *buf, size_t len, uint64_t off)
{
	struct iovec iov = { .iov_base = buf, .iov_len = len };

	return len ? util_preadv_full(fd, &iov, 1, off) : 0;
}

int util_parent_real_path(const char *arg, char *out, size_t size)
{
	char buf[PATH_MAX], dir[PATH_MAX];
	const char *base, *parent;
	char *slash;
	size_t n;
	int r;

	n = strlen(arg);
	if (n == 0)
		return -ENOENT;
	if (n >= sizeof(buf))
		return -ENAMETOOLONG;
	memcpy(buf, arg, n + 1);
	while (n > 1 && buf[n - 1] == '/')
		buf[--n] = '\0';
	slash = strrchr(buf, '/');
	if (slash) {
		*slash = '\0';
		parent = slash == buf ? "/" : buf;
		base = slash + 1;
	} else {
		parent = ".";
		base = buf;
	}
	if (!base[0] || strcmp(base, ".") == 0 || strcmp(base, "..") == 0) {
		if (slash)
			*slash = '/';
		if (!realpath(buf, dir))
			return -errno;
		r = snprintf(out, size, "%s", dir);
	} else {
		if (!realpath(parent, dir))
			return -errno;
		r = snprintf(out, size, "%s%s%s", dir, strcmp(dir, "/") == 0 ? "" : "/", base);
	}
	return r < 0 || (size_t)r >= size ? -ENAMETOOLONG : 0;
}
