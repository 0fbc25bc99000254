/* cmd_control.c: keyfsctl status, lock and unlock: one request to a mount's control socket (include/keyfs/control.h) */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "keyfs/control.h"
#include "keyfs/exitcode.h"
#include "keyfs/kms.h"
#include "keyfs/log.h"
#include "keyfs/util.h"
#include "cli.h"

/* Locking waits for the kernel to flush dirty pages of every inode: give it time. */
#define TIMEOUT_LOCK_S 60
#define TIMEOUT_OTHER_S 10
#define JSON_FIELDS_MAX 32
#define JSON_DEPTH_MAX 16

enum { OPT_JSON = CLI_OPT_BASE, OPT_HELP };

static const struct option control_options[] = {
	{ "json", no_argument, NULL, OPT_JSON },
	{ "help", no_argument, NULL, OPT_HELP },
	{ NULL, 0, NULL, 0 },
};

/* ---- the mount table ---- */


/* The "user_id=N" of a FUSE mount's super options. */
static int super_user_id(char *opts, uid_t *ret)
{
	char *save = NULL;

	for (char *o = strtok_r(opts, ",", &save); o; o = strtok_r(NULL, ",", &save)) {
		uint64_t v;

		if (strncmp(o, "user_id=", 8) != 0)
			continue;
		if (util_parse_u64(o + 8, 0, UINT32_MAX - 1, &v) < 0)
			return -EINVAL;
		*ret = (uid_t)v;
		return 0;
	}
	return -ENOENT;
}

/*
 * Look mountpoint (absolute, normalised) up in our mount table. The latest mount on it counts:
 * one mounted over a keyfs hides it. Returns 1 and the owner's uid when it is a keyfs mount,
 * 0 when not, -EBADMSG when its user_id= is missing or bad, or -errno.
 */
static int keyfs_mount_owner(const char *mountpoint, uid_t *ret_uid)
{
	char fstype[64], source[PATH_MAX], super[1024];
	uid_t uid = 0;
	int r;

	r = util_mount_at(mountpoint, fstype, sizeof(fstype), source, sizeof(source), super, sizeof(super));
	if (r == -ENOENT || (r == 0 && strcmp(fstype, KEYFS_FSTYPE) != 0))
		return 0;
	if (r < 0)
		return r;
	if (super_user_id(super, &uid) < 0)
		return -EBADMSG;
	*ret_uid = uid;
	return 1;
}

/*
 * The keyfs mountpoint arg names, canonical, and its owner. The path is first taken as typed
 * (made absolute), so a hung or dead mount is never stat()ed; only when that is not a mount
 * point are symlinks resolved. Returns 0, or an exit code after printing the error.
 */
static int find_mount(const char *arg, char *mp, size_t size, uid_t *ret_uid)
{
	char real[PATH_MAX];
	int r;

	r = cli_abs_path(arg, mp, size);
	if (r < 0) {
		log_err("'%s': %s", arg, strerror(-r));
		return KEYFS_EXIT_MOUNT;
	}
	r = keyfs_mount_owner(mp, ret_uid);
	if (r == 0) {
		if (!realpath(arg, real)) {
			if (errno == ENOENT || errno == ENOTDIR)
				log_err("'%s' does not exist", arg);
			else
				log_err("'%s': %s", arg, strerror(errno));
			return KEYFS_EXIT_MOUNT;
		}
		r = cli_copy(mp, size, real);
		if (r == 0)
			r = keyfs_mount_owner(mp, ret_uid);
	}
	if (r == 0) {
		log_err("'%s' is not a keyfs mount", arg);
		return KEYFS_EXIT_MOUNT;
	}
	if (r == -EBADMSG) {
		log_err("keyfs mount '%s' has no valid user_id= in /proc/self/mountinfo: cannot tell its owner", mp);
		return KEYFS_EXIT_MOUNT;
	}
	if (r < 0) {
		log_err("'%s': reading /proc/self/mountinfo: %s", arg, strerror(-r));
		return KEYFS_EXIT_FAILURE;
	}
	return 0;
}

/* ---- the request ---- */

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/*
 * Send request to the socket at path and read the one-line answer into buf (NUL-terminated,
 * newline removed), all within timeout_s. The peer must run as owner or root: anybody else
 * cannot have created the socket in its directory, and is not believed if it did.
 * Returns 0, -EMSGSIZE (answer too long), -EPROTO (no answer), -EPERM (wrong peer), -ETIMEDOUT,
 * or the -errno of socket calls (-ENOENT, -ECONNREFUSED, -EACCES ...).
 */
static int control_call(const char *path, uid_t owner, const char *request, int timeout_s, char *buf,
			size_t size)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct timeval tv = { .tv_sec = timeout_s };
	int64_t deadline = now_ms() + (int64_t)timeout_s * 1000;
	size_t len = 0, reqlen = strlen(request);
	struct ucred cred;
	socklen_t credlen = sizeof(cred);
	int fd, r;

	if (strlen(path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	memcpy(sa.sun_path, path, strlen(path) + 1);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	/* Bounds connect() (a full backlog blocks it) and send(). */
	if (setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) < 0) {
		r = -errno;
		goto out;
	}
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		r = errno == EAGAIN || errno == EINPROGRESS ? -ETIMEDOUT : -errno;
		goto out;
	}
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &credlen) < 0) {
		r = -errno;
		goto out;
	}
	if (cred.uid != owner && cred.uid != 0) {
		r = -EPERM;
		goto out;
	}
	for (size_t off = 0; off < reqlen;) {
		ssize_t n = send(fd, request + off, reqlen - off, MSG_NOSIGNAL);

		if (n < 0 && errno == EINTR)
			continue;
		/* A daemon that refuses the peer answers and closes before reading: read that answer. */
		if (n < 0 && (errno == EPIPE || errno == ECONNRESET))
			break;
		if (n < 0) {
			r = errno == EAGAIN ? -ETIMEDOUT : -errno;
			goto out;
		}
		off += (size_t)n;
	}
	for (;;) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		int64_t left = deadline - now_ms();
		ssize_t n;

		if (left <= 0) {
			r = -ETIMEDOUT;
			goto out;
		}
		r = poll(&p, 1, (int)left);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			r = -errno;
			goto out;
		}
		if (r == 0)
			continue;
		if (len + 1 >= size) {
			r = -EMSGSIZE;
			goto out;
		}
		n = recv(fd, buf + len, size - 1 - len, MSG_DONTWAIT);
		if (n < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (n < 0 && errno == ECONNRESET && len > 0)
			break;
		if (n < 0) {
			r = -errno;
			goto out;
		}
		if (n == 0)
			break;
		len += (size_t)n;
		if (memchr(buf, '\n', len))
			break;
	}
	buf[len] = '\0';
	buf[strcspn(buf, "\n")] = '\0';
	r = buf[0] ? 0 : -EPROTO;
out:
	close(fd);
	return r;
}

/* ---- the answer: one flat JSON object, parsed only as far as we need ---- */

enum jtype { J_STRING, J_NUMBER, J_TRUE, J_FALSE, J_NULL, J_NESTED };

struct jfield {
	const char *name;
	const char *value;              /* decoded string, number text, or "" */
	enum jtype type;
};

struct jobject {
	struct jfield f[JSON_FIELDS_MAX];
	size_t n;
	char arena[2 * CONTROL_ANSWER_MAX + 2];    /* decoded names and values never outgrow the input */
	size_t used;
};

struct jparser {
	const char *p;
	struct jobject *o;
};

static void skip_ws(struct jparser *j)
{
	while (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')
		j->p++;
}

static int arena_put(struct jobject *o, char c)
{
	if (o->used >= sizeof(o->arena))
		return -EMSGSIZE;
	o->arena[o->used++] = c;
	return 0;
}

static int arena_utf8(struct jobject *o, uint32_t cp)
{
	char b[4];
	int n;

	if (cp < 0x80) {
		b[0] = (char)cp;
		n = 1;
	} else if (cp < 0x800) {
		b[0] = (char)(0xc0 | cp >> 6);
		b[1] = (char)(0x80 | (cp & 0x3f));
		n = 2;
	} else if (cp < 0x10000) {
		b[0] = (char)(0xe0 | cp >> 12);
		b[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
		b[2] = (char)(0x80 | (cp & 0x3f));
		n = 3;
	} else {
		b[0] = (char)(0xf0 | cp >> 18);
		b[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
		b[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
		b[3] = (char)(0x80 | (cp & 0x3f));
		n = 4;
	}
	for (int i = 0; i < n; i++)
		if (arena_put(o, b[i]) < 0)
			return -EMSGSIZE;
	return 0;
}

static int hex4(const char *s, uint32_t *ret)
{
	uint32_t v = 0;

	for (int i = 0; i < 4; i++) {
		char c = s[i];

		v <<= 4;
		if (c >= '0' && c <= '9')
			v |= (uint32_t)(c - '0');
		else if (c >= 'a' && c <= 'f')
			v |= (uint32_t)(c - 'a' + 10);
		else if (c >= 'A' && c <= 'F')
			v |= (uint32_t)(c - 'A' + 10);
		else
			return -EINVAL;
	}
	*ret = v;
	return 0;
}

/* A string literal at j->p, decoded into the arena when store; *ret points at it. */
static int parse_string(struct jparser *j, bool store, const char **ret)
{
	struct jobject *o = j->o;
	size_t start = o->used;
	int r = 0;

	if (*j->p++ != '"')
		return -EINVAL;
	for (;;) {
		unsigned char c = (unsigned char)*j->p++;
		uint32_t cp, lo;

		if (c == '"')
			break;
		if (c < 0x20)                   /* also the end of the input */
			return -EINVAL;
		if (c != '\\') {
			if (store)
				r = arena_put(o, (char)c);
		} else {
			c = (unsigned char)*j->p++;
			switch (c) {
			case '"': case '\\': case '/': break;
			case 'b': c = '\b'; break;
			case 'f': c = '\f'; break;
			case 'n': c = '\n'; break;
			case 'r': c = '\r'; break;
			case 't': c = '\t'; break;
			case 'u':
				if (hex4(j->p, &cp) < 0)
					return -EINVAL;
				j->p += 4;
				if (cp >= 0xdc00 && cp <= 0xdfff)
					return -EINVAL;
				if (cp >= 0xd800 && cp <= 0xdbff) {
					if (j->p[0] != '\\' || j->p[1] != 'u' || hex4(j->p + 2, &lo) < 0 ||
					    lo < 0xdc00 || lo > 0xdfff)
						return -EINVAL;
					j->p += 6;
					cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
				}
				if (cp == 0)            /* no NUL inside a C string */
					return -EINVAL;
				if (store)
					r = arena_utf8(o, cp);
				if (r < 0)
					return r;
				continue;
			default:
				return -EINVAL;
			}
			if (store)
				r = arena_put(o, (char)c);
		}
		if (r < 0)
			return r;
	}
	if (store) {
		r = arena_put(o, '\0');
		if (r < 0)
			return r;
		*ret = o->arena + start;
	}
	return 0;
}

static int parse_number(struct jparser *j, const char **ret)
{
	const char *s = j->p;
	size_t start = j->o->used;

	if (*j->p == '-')
		j->p++;
	if (*j->p == '0')
		j->p++;
	else if (*j->p >= '1' && *j->p <= '9')
		while (*j->p >= '0' && *j->p <= '9')
			j->p++;
	else
		return -EINVAL;
	if (*j->p == '.') {
		j->p++;
		if (*j->p < '0' || *j->p > '9')
			return -EINVAL;
		while (*j->p >= '0' && *j->p <= '9')
			j->p++;
	}
	if (*j->p == 'e' || *j->p == 'E') {
		j->p++;
		if (*j->p == '+' || *j->p == '-')
			j->p++;
		if (*j->p < '0' || *j->p > '9')
			return -EINVAL;
		while (*j->p >= '0' && *j->p <= '9')
			j->p++;
	}
	for (; s < j->p; s++)
		if (arena_put(j->o, *s) < 0)
			return -EMSGSIZE;
	if (arena_put(j->o, '\0') < 0)
		return -EMSGSIZE;
	*ret = j->o->arena + start;
	return 0;
}

/* Any value, skipped: nested objects and arrays are not part of what we read. */
static int skip_value(struct jparser *j, int depth)
{
	const char *unused;
	char close;
	int r;

	if (depth > JSON_DEPTH_MAX)
		return -EINVAL;
	skip_ws(j);
	switch (*j->p) {
	case '"':
		return parse_string(j, false, &unused);
	case '{':
	case '[':
		close = *j->p == '{' ? '}' : ']';
		j->p++;
		skip_ws(j);
		if (*j->p == close) {
			j->p++;
			return 0;
		}
		for (;;) {
			if (close == '}') {
				skip_ws(j);
				r = parse_string(j, false, &unused);
				if (r < 0)
					return r;
				skip_ws(j);
				if (*j->p++ != ':')
					return -EINVAL;
			}
			r = skip_value(j, depth + 1);
			if (r < 0)
				return r;
			skip_ws(j);
			if (*j->p == ',') {
				j->p++;
				continue;
			}
			if (*j->p++ != close)
				return -EINVAL;
			return 0;
		}
	case 't':
		if (strncmp(j->p, "true", 4) != 0)
			return -EINVAL;
		j->p += 4;
		return 0;
	case 'f':
		if (strncmp(j->p, "false", 5) != 0)
			return -EINVAL;
		j->p += 5;
		return 0;
	case 'n':
		if (strncmp(j->p, "null", 4) != 0)
			return -EINVAL;
		j->p += 4;
		return 0;
	default: {
		size_t used = j->o->used;

		r = parse_number(j, &unused);
		j->o->used = used;
		return r;
	}
	}
}

static int parse_value(struct jparser *j, struct jfield *f)
{
	const char *at = j->p;
	int r;

	f->value = "";
	switch (*j->p) {
	case '"':
		f->type = J_STRING;
		return parse_string(j, true, &f->value);
	case '{':
	case '[':
		f->type = J_NESTED;
		return skip_value(j, 1);
	case 't':
	case 'f':
	case 'n':
		r = skip_value(j, 1);
		f->type = *at == 't' ? J_TRUE : *at == 'f' ? J_FALSE : J_NULL;
		return r;
	default:
		f->type = J_NUMBER;
		return parse_number(j, &f->value);
	}
}

/* Parse text, one JSON object, into o. Returns 0 or -EINVAL / -EMSGSIZE. */
static int json_parse_object(const char *text, struct jobject *o)
{
	struct jparser j = { .p = text, .o = o };
	int r;

	o->n = 0;
	o->used = 0;
	skip_ws(&j);
	if (*j.p++ != '{')
		return -EINVAL;
	skip_ws(&j);
	if (*j.p == '}') {
		j.p++;
	} else {
		for (;;) {
			struct jfield f;

			skip_ws(&j);
			r = parse_string(&j, true, &f.name);
			if (r < 0)
				return r;
			skip_ws(&j);
			if (*j.p++ != ':')
				return -EINVAL;
			skip_ws(&j);
			r = parse_value(&j, &f);
			if (r < 0)
				return r;
			if (o->n >= JSON_FIELDS_MAX)
				return -EMSGSIZE;
			o->f[o->n++] = f;
			skip_ws(&j);
			if (*j.p == ',') {
				j.p++;
				continue;
			}
			if (*j.p++ != '}')
				return -EINVAL;
			break;
		}
	}
	skip_ws(&j);
	return *j.p ? -EINVAL : 0;
}

static const struct jfield *json_get(const struct jobject *o, const char *name)
{
	for (size_t i = 0; i < o->n; i++)
		if (strcmp(o->f[i].name, name) == 0)
			return &o->f[i];
	return NULL;
}

/* A string field's value, or NULL when missing, null or not a string. */
static const char *json_str(const struct jobject *o, const char *name)
{
	const struct jfield *f = json_get(o, name);

	return f && f->type == J_STRING ? f->value : NULL;
}

/* ---- output ---- */

/*
 * The daemon runs as the mount's owner, who may not be us: no terminal control from it. C0
 * bytes, DEL and backslash become \ooo as file names do (cli_fputs_safe); so do the C1
 * controls U+0080..U+009F in their UTF-8 form (C2 80..C2 9F: 9B is CSI). s is cut to size.
 */
static const char *clean(const char *s, char *buf, size_t size)
{
	size_t n = 0;

	for (; *s && n + 9 <= size; s++) {
		unsigned char c = (unsigned char)*s;

		if (c == 0xc2 && (unsigned char)s[1] >= 0x80 && (unsigned char)s[1] <= 0x9f) {
			n += (size_t)snprintf(buf + n, size - n, "\\%03o\\%03o", c, (unsigned char)s[1]);
			s++;
		} else if (c < 0x20 || c == 0x7f || c == '\\') {
			n += (size_t)snprintf(buf + n, size - n, "\\%03o", c);
		} else {
			buf[n++] = (char)c;
		}
	}
	buf[n] = '\0';
	return buf;
}

static void print_clean(const char *label, const char *s)
{
	char buf[CONTROL_ANSWER_MAX];

	fputs(label, stdout);
	puts(clean(s, buf, sizeof(buf)));
}

/* The answer as it came (status --json), with DEL and C1 controls as \u escapes: the parser
 * let them through inside strings, where the escape means the same character. */
static void print_json_clean(const char *answer)
{
	for (const char *s = answer; *s; s++) {
		unsigned char c = (unsigned char)*s;

		if (c == 0x7f) {
			fputs("\\u007f", stdout);
		} else if (c == 0xc2 && (unsigned char)s[1] >= 0x80 && (unsigned char)s[1] <= 0x9f) {
			printf("\\u00%02x", (unsigned char)s[1]);
			s++;
		} else {
			putchar(c);
		}
	}
	putchar('\n');
}

static void print_value(const struct jobject *o, const char *label, const char *name, const char *unit)
{
	const struct jfield *f = json_get(o, name);
	char buf[256];

	if (!f || f->type == J_NULL) {
		print_clean(label, "-");
	} else if (f->type == J_STRING) {
		print_clean(label, f->value);
	} else if (f->type == J_NUMBER) {
		snprintf(buf, sizeof(buf), "%s%s", f->value, unit);
		print_clean(label, buf);
	} else {
		print_clean(label, "?");
	}
}

static void print_status(const struct jobject *o)
{
	const char *reason = json_str(o, "reason");
	const struct jfield *ks = json_get(o, "key_state");
	char buf[CONTROL_ANSWER_MAX];
	uint64_t v;

	if (reason)
		snprintf(buf, sizeof(buf), "%s (%s)", json_str(o, "state"), reason);
	else
		snprintf(buf, sizeof(buf), "%s", json_str(o, "state"));
	print_clean("state: ", buf);
	print_value(o, "key: ", "key", "");
	if (ks && ks->type == J_NUMBER && util_parse_u64(ks->value, 0, INT32_MAX, &v) == 0)
		printf("key state: %d (%s)\n", (int)v, kms_state_name((int)v));
	else
		print_value(o, "key state: ", "key_state", "");
	if (json_str(o, "last_poll"))
		print_value(o, "last poll: ", "last_poll", "");
	else
		printf("last poll: never\n");
	print_value(o, "poll: ", "poll", " s");
	print_value(o, "grace: ", "grace", " s");
	print_value(o, "backing: ", "backing", "");
	print_value(o, "mountpoint: ", "mountpoint", "");
}

/* ---- the commands ---- */

enum action { ACT_STATUS, ACT_LOCK, ACT_UNLOCK };

int cli_mount_state(const char *mp, int timeout_s, char *state, size_t ssize, char *reason, size_t rsize)
{
	char path[PATH_MAX], answer[CONTROL_ANSWER_MAX + 2];
	const char *st, *re;
	struct jobject *o;
	uid_t owner;
	int r;

	r = keyfs_mount_owner(mp, &owner);
	if (r <= 0)
		return r < 0 ? r : -ENOENT;
	if (control_socket_path(mp, owner, path, sizeof(path)) < 0)
		return -ENAMETOOLONG;
	r = control_call(path, owner, "status\n", timeout_s, answer, sizeof(answer));
	if (r < 0)
		return r;
	o = malloc(sizeof(*o));
	if (!o)
		return -ENOMEM;
	r = -EPROTO;
	if (json_parse_object(answer, o) == 0 && (st = json_str(o, "state")) &&
	    (strcmp(st, "locked") == 0 || strcmp(st, "unlocked") == 0)) {
		re = json_str(o, "reason");
		snprintf(state, ssize, "%s", st);
		snprintf(reason, rsize, "%s", re ? re : "");
		r = 0;
	}
	free(o);
	return r;
}

static const char *const action_names[] = { "status", "lock", "unlock" };

static int call_error(int r, const char *arg, const char *path, uid_t owner, int timeout_s)
{
	switch (r) {
	case -ENOENT:
	case -ECONNREFUSED:
	case -ENOTDIR:
		log_err("no control socket for '%s' (is the daemon running?): '%s'", arg, path);
		return KEYFS_EXIT_MOUNT;
	case -EACCES:
		log_err("control socket of '%s': permission denied: only root and the mount's owner (uid %u) may use it",
			arg, (unsigned)owner);
		return KEYFS_EXIT_DENIED;
	case -EPERM:
		log_err("control socket '%s' of '%s' is not served by root or the mount's owner (uid %u): not trusting it",
			path, arg, (unsigned)owner);
		return KEYFS_EXIT_DENIED;
	case -ETIMEDOUT:
		log_err("the daemon of '%s' did not answer within %d s", arg, timeout_s);
		return KEYFS_EXIT_FAILURE;
	case -EMSGSIZE:
		log_err("the daemon of '%s' answered more than %d bytes", arg, CONTROL_ANSWER_MAX);
		return KEYFS_EXIT_FAILURE;
	case -EPROTO:
	case -ECONNRESET:
	case -EPIPE:
		log_err("the daemon of '%s' closed the control connection without an answer", arg);
		return KEYFS_EXIT_FAILURE;
	case -ENAMETOOLONG:
		log_err("control socket path for '%s' is too long", arg);
		return KEYFS_EXIT_FAILURE;
	default:
		log_err("control socket '%s' of '%s': %s", path, arg, strerror(-r));
		return KEYFS_EXIT_FAILURE;
	}
}

static int run_action(enum action act, int argc, char **argv)
{
	const char *cmd = action_names[act], *arg = NULL, *state, *err;
	char mp[PATH_MAX], path[PATH_MAX], request[CONTROL_REQUEST_MAX], answer[CONTROL_ANSWER_MAX + 2];
	char buf[512];
	int timeout_s = act == ACT_LOCK ? TIMEOUT_LOCK_S : TIMEOUT_OTHER_S;
	struct jobject *o = NULL;
	bool json = false, locked;
	uid_t owner;
	int c, r, rc;

	optind = 0;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "-:h", control_options, NULL)) != -1) {
		switch (c) {
		case 1:
			if (arg)
				return cli_usage_error(cmd, "too many arguments: '%s'", optarg);
			arg = optarg;
			break;
		case OPT_JSON:
			if (act != ACT_STATUS)
				return cli_usage_error(cmd, "unknown option '--json'");
			json = true;
			break;
		case 'h':
		case OPT_HELP:
			cli_print_usage(stdout, cmd);
			return KEYFS_EXIT_OK;
		default:
			return cli_option_error(cmd, c, argv);
		}
	}
	if (optind < argc) {
		if (arg || optind + 1 < argc)
			return cli_usage_error(cmd, "too many arguments: '%s'", argv[arg ? optind : optind + 1]);
		arg = argv[optind];
	}
	if (!arg)
		return cli_usage_error(cmd, "missing MOUNTPOINT");

	rc = find_mount(arg, mp, sizeof(mp), &owner);
	if (rc)
		return rc;
	if (control_socket_path(mp, owner, path, sizeof(path)) < 0)
		return call_error(-ENAMETOOLONG, arg, "", owner, timeout_s);
	snprintf(request, sizeof(request), "%s\n", cmd);
	r = control_call(path, owner, request, timeout_s, answer, sizeof(answer));
	if (r < 0)
		return call_error(r, arg, path, owner, timeout_s);

	o = malloc(sizeof(*o));
	if (!o) {
		log_err("out of memory");
		return KEYFS_EXIT_FAILURE;
	}
	if (json_parse_object(answer, o) < 0) {
		log_err("the daemon of '%s' sent an answer that is not a JSON object", arg);
		rc = KEYFS_EXIT_FAILURE;
		goto out;
	}
	if ((err = json_str(o, "error"))) {
		/* The daemon's words; root-or-owner refusals are "permission denied". */
		log_err("'%s': %s", arg, clean(err, buf, sizeof(buf)));
		rc = strcasestr(err, "permission") ? KEYFS_EXIT_DENIED : KEYFS_EXIT_FAILURE;
		goto out;
	}
	state = json_str(o, "state");
	if (!state || (strcmp(state, "locked") != 0 && strcmp(state, "unlocked") != 0)) {
		log_err("the daemon of '%s' answered without a valid \"state\"", arg);
		rc = KEYFS_EXIT_FAILURE;
		goto out;
	}
	locked = strcmp(state, "locked") == 0;
	if (json)
		print_json_clean(answer);
	else
		print_status(o);
	rc = locked ? KEYFS_EXIT_LOCKED : KEYFS_EXIT_OK;
	if (act == ACT_LOCK) {
		rc = KEYFS_EXIT_OK;
		if (!locked) {
			log_err("'%s' did not lock", arg);
			rc = KEYFS_EXIT_FAILURE;
		}
	} else if (act == ACT_UNLOCK && locked) {
		const char *reason = json_str(o, "reason");

		log_err("'%s' stays locked: %s", arg, reason ? clean(reason, buf, sizeof(buf)) : "no reason given");
	}
out:
	free(o);
	return rc;
}

int cmd_status(int argc, char **argv)
{
	return run_action(ACT_STATUS, argc, argv);
}

int cmd_lock(int argc, char **argv)
{
	return run_action(ACT_LOCK, argc, argv);
}

int cmd_unlock(int argc, char **argv)
{
	return run_action(ACT_UNLOCK, argc, argv);
}
