/* cmd_control.c: keyfsctl status, lock and unlock: one request to a mount's control socket (include/keyfs/control.h) */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
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
#include "volume.h"

/* Locking waits for the kernel to flush dirty pages of every inode: give it time. */
#define TIMEOUT_LOCK_S 60
#define TIMEOUT_OTHER_S 10

enum { OPT_JSON = CLI_OPT_BASE, OPT_PROMETHEUS, OPT_HELP };

static const struct option control_options[] = {
	{ "json", no_argument, NULL, OPT_JSON },
	{ "prometheus", no_argument, NULL, OPT_PROMETHEUS },
	{ "help", no_argument, NULL, OPT_HELP },
	{ NULL, 0, NULL, 0 },
};

/* ---- the mount ---- */

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
	r = control_mount_owner(mp, ret_uid);
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
			r = control_mount_owner(mp, ret_uid);
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
 * Send req's line to the socket at path and read the one-line answer into buf (NUL-terminated,
 * newline removed), all within timeout_s. The peer must run as owner or root: anybody else
 * cannot have created the socket in its directory, and is not believed if it did.
 * Returns 0, -EMSGSIZE (answer too long), -EPROTO (no answer), -EPERM (wrong peer), -ETIMEDOUT,
 * or the -errno of socket calls (-ENOENT, -ECONNREFUSED, -EACCES ...).
 */
static int control_call(const char *path, uid_t owner, enum control_request req, int timeout_s, char *buf,
			size_t size)
{
	char request[CONTROL_REQUEST_MAX];
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct timeval tv = { .tv_sec = timeout_s };
	int64_t deadline = now_ms() + (int64_t)timeout_s * 1000;
	size_t len = 0, reqlen = (size_t)snprintf(request, sizeof(request), "%s\n", control_request_name(req));
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

/* ---- output ---- */

/* The daemon runs as the mount's owner, who may not be us: no terminal control from it, C1
 * controls included. s is cut to size. */
static const char *clean(const char *s, char *buf, size_t size)
{
	return cli_escape(s, true, buf, size);
}

static void print_clean(const char *label, const char *s)
{
	char buf[CONTROL_ANSWER_MAX];

	fputs(label, stdout);
	puts(clean(s, buf, sizeof(buf)));
}

/* The status line as keyfsctl sends it on (status --json), with DEL and C1 controls as \u
 * escapes: JSON lets them through inside strings, where the escape means the same character. */
static void print_json_clean(const char *line)
{
	for (const char *s = line; *s; s++) {
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
}

/* A string of the status, "-" when it is null. */
static void print_string(const char *label, const char *s)
{
	print_clean(label, s[0] ? s : "-");
}

/* Seconds, "-" when null. */
static void print_seconds(const char *label, int64_t v)
{
	char buf[32];

	if (v < 0)
		snprintf(buf, sizeof(buf), "-");
	else
		snprintf(buf, sizeof(buf), "%" PRId64 " s", v);
	print_clean(label, buf);
}

static void print_status(const struct control_status *st)
{
	const char *state = st->locked ? "locked" : "unlocked";
	char buf[CONTROL_REASON_MAX + 16];

	if (st->reason[0])
		snprintf(buf, sizeof(buf), "%s (%s)", state, st->reason);
	else
		snprintf(buf, sizeof(buf), "%s", state);
	print_clean("state: ", buf);
	print_string("key: ", st->key);
	if (st->key_id[0] && strcmp(st->key_id, st->key) != 0)
		print_string("key id: ", st->key_id);
	if (st->key_crn[0] && strcmp(st->key_crn, st->key) != 0)
		print_string("key crn: ", st->key_crn);
	if (st->volume[0])
		print_string("volume: ", st->volume);
	/* The name only: the number is in --json. */
	print_clean("key state: ", st->key_state >= 0 ? kms_state_name((int)st->key_state) : "-");
	print_string("last poll: ", st->last_poll[0] ? st->last_poll : "never");
	print_seconds("poll: ", st->poll);
	print_seconds("grace: ", st->grace);
	if (st->kms_wraps >= 0 && st->kms_unwraps >= 0 && st->kms_key_errors >= 0) {
		char calls[96];

		snprintf(calls, sizeof(calls), "%" PRId64 " wraps, %" PRId64 " unwraps, %" PRId64 " failed",
			 st->kms_wraps, st->kms_unwraps, st->kms_key_errors);
		print_clean("key service: ", calls);
	}
	print_string("backing: ", st->backing);
	print_string("mountpoint: ", st->mountpoint);
}

/* ---- the commands ---- */

int cli_mount_state(const char *mp, int timeout_s, char *state, size_t ssize, char *reason, size_t rsize)
{
	char path[PATH_MAX], answer[CONTROL_ANSWER_MAX + 2];
	struct control_status *st;
	uid_t owner;
	int r;

	r = control_mount_owner(mp, &owner);
	if (r <= 0)
		return r < 0 ? r : -ENOENT;
	if (control_socket_path(mp, owner, path, sizeof(path)) < 0)
		return -ENAMETOOLONG;
	r = control_call(path, owner, CONTROL_STATUS, timeout_s, answer, sizeof(answer));
	if (r < 0)
		return r;
	st = malloc(sizeof(*st));
	if (!st)
		return -ENOMEM;
	r = -EPROTO;
	if (control_answer_parse(answer, st, NULL) == 0 && !st->error[0]) {
		snprintf(state, ssize, "%s", st->locked ? "locked" : "unlocked");
		snprintf(reason, rsize, "%s", st->reason);
		r = 0;
	}
	free(st);
	return r;
}

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

/* The answer line as status --json prints it: formatted again from what was understood, so
 * that it says no more than the status does and is valid UTF-8. Returns 0 or an exit code. */
static int print_json(const char *arg, const struct control_status *st)
{
	/* Not UTF-8 bytes from the peer may grow threefold as U+FFFD. */
	size_t size = 3 * CONTROL_ANSWER_MAX + 8;
	char *line = malloc(size);

	if (!line || control_status_format(st, line, size) < 0) {
		log_err("the daemon of '%s': cannot print its status", arg);
		free(line);
		return KEYFS_EXIT_FAILURE;
	}
	print_json_clean(line);
	free(line);
	return 0;
}

/* ---- every mount of the host ---- */

#define HOST_MOUNTS_MAX 4096

struct host_mount {
	char *mountpoint;
	uid_t owner;
	bool bad_owner;
};

struct host_list {
	struct host_mount *m;
	size_t n;
	bool full;
};

static int host_collect(const struct util_mount *m, void *ctx)
{
	struct host_list *l = ctx;
	struct host_mount *hm;
	uid_t uid;
	int r;

	if (strcmp(m->fstype, KEYFS_FSTYPE) != 0)
		return 0;
	/* Only the mount on top answers on its socket: control_mount_owner says which. */
	for (size_t i = 0; i < l->n; i++)
		if (strcmp(l->m[i].mountpoint, m->mountpoint) == 0)
			return 0;
	if (l->n == HOST_MOUNTS_MAX) {
		l->full = true;
		return 0;
	}
	hm = &l->m[l->n];
	hm->mountpoint = strdup(m->mountpoint);
	if (!hm->mountpoint)
		return -ENOMEM;
	r = control_mount_owner(m->mountpoint, &uid);
	hm->bad_owner = r != 1;
	hm->owner = r == 1 ? uid : 0;
	l->n++;
	return 0;
}

/* A label value of the text exposition format: backslash, quote and newline escaped. */
static void prom_label(const char *name, const char *v, bool first)
{
	printf("%s%s=\"", first ? "" : ",", name);
	for (; *v; v++) {
		if (*v == '\\')
			fputs("\\\\", stdout);
		else if (*v == '"')
			fputs("\\\"", stdout);
		else if (*v == '\n')
			fputs("\\n", stdout);
		else
			putchar(*v);
	}
	putchar('"');
}

struct host_answer {
	const char *mountpoint;
	struct control_status *st;      /* NULL: no answer (error says why) */
	char error[CONTROL_ERROR_MAX];
};

enum prom_kind {
	P_UP, P_LOCKED, P_KEY_STATE, P_AGE, P_LAT, P_LAT_AVG, P_CALLS, P_ERRORS, P_WRAPS, P_UNWRAPS, P_KEY_ERRORS,
	P_FILES, P_DROPPED
};

static const struct {
	const char *name, *type, *help;
} prom[] = {
	[P_UP] = { "keyfs_mount_up", "gauge", "Whether the mount's daemon answered on its control socket (1) or not (0)." },
	[P_LOCKED] = { "keyfs_mount_locked", "gauge", "Whether the mount is locked (1) or unlocked (0)." },
	[P_KEY_STATE] = { "keyfs_key_state", "gauge", "The root key state as the key service numbers it (1 active, 2 suspended, 3 deactivated, 5 destroyed); absent when purged." },
	[P_AGE] = { "keyfs_last_good_poll_age_seconds", "gauge", "Seconds since the key service last gave a definite answer." },
	[P_LAT] = { "keyfs_kms_call_latency_seconds", "gauge", "Latency of the newest key state poll." },
	[P_LAT_AVG] = { "keyfs_kms_call_latency_avg_seconds", "gauge", "Mean latency of the key state polls since the mount." },
	[P_CALLS] = { "keyfs_kms_calls_total", "counter", "Key state polls made since the mount." },
	[P_ERRORS] = { "keyfs_kms_errors_total", "counter", "Key state polls that got no definite answer." },
	[P_WRAPS] = { "keyfs_kms_wraps_total", "counter", "Data keys wrapped by the key service since the mount (new files)." },
	[P_UNWRAPS] = { "keyfs_kms_unwraps_total", "counter", "Data keys unwrapped by the key service since the mount (first opens)." },
	[P_KEY_ERRORS] = { "keyfs_kms_key_errors_total", "counter", "Wraps and unwraps that failed (refused, unreachable or cancelled)." },
	[P_FILES] = { "keyfs_files_with_keys_loaded", "gauge", "Files whose keys are loaded in the daemon now." },
	[P_DROPPED] = { "keyfs_audit_events_dropped_total", "counter", "Audit events the daemon could not send." },
};

static void prom_sample(enum prom_kind k, const struct host_answer *a, double v)
{
	const struct control_status *st = a->st;

	printf("%s{", prom[k].name);
	prom_label("mountpoint", a->mountpoint, true);
	if (st) {
		prom_label("volume", st->volume, false);
		prom_label("key_id", st->key_id, false);
	}
	printf("} %.6g\n", v);
}

static void print_prometheus(const struct host_answer *a, size_t n)
{
	for (size_t k = 0; k < sizeof(prom) / sizeof(prom[0]); k++) {
		printf("# HELP %s %s\n# TYPE %s %s\n", prom[k].name, prom[k].help, prom[k].name, prom[k].type);
		for (size_t i = 0; i < n; i++) {
			const struct control_status *st = a[i].st;
			int64_t v = -1;

			if (k == P_UP) {
				prom_sample(P_UP, &a[i], st ? 1 : 0);
				continue;
			}
			if (!st)
				continue;
			switch (k) {
			case P_LOCKED: v = st->locked; break;
			case P_KEY_STATE: v = st->key_state; break;
			case P_AGE: v = st->last_good_age; break;
			case P_LAT:
				if (st->kms_latency_ms >= 0)
					prom_sample(P_LAT, &a[i], (double)st->kms_latency_ms / 1000.0);
				continue;
			case P_LAT_AVG:
				if (st->kms_latency_avg_ms >= 0)
					prom_sample(P_LAT_AVG, &a[i], (double)st->kms_latency_avg_ms / 1000.0);
				continue;
			case P_CALLS: v = st->kms_calls; break;
			case P_ERRORS: v = st->kms_errors; break;
			case P_WRAPS: v = st->kms_wraps; break;
			case P_UNWRAPS: v = st->kms_unwraps; break;
			case P_KEY_ERRORS: v = st->kms_key_errors; break;
			case P_FILES: v = st->files_keyed; break;
			case P_DROPPED: v = st->audit_dropped; break;
			default: break;
			}
			if (v >= 0)
				prom_sample((enum prom_kind)k, &a[i], (double)v);
		}
	}
}

/* One mount's status, or why there is none. */
static void host_ask(const struct host_mount *hm, struct host_answer *a)
{
	char path[PATH_MAX], answer[CONTROL_ANSWER_MAX + 2];
	int r;

	a->mountpoint = hm->mountpoint;
	a->st = NULL;
	if (hm->bad_owner) {
		snprintf(a->error, sizeof(a->error), "no valid user_id= in the mount table");
		return;
	}
	if (control_socket_path(hm->mountpoint, hm->owner, path, sizeof(path)) < 0) {
		snprintf(a->error, sizeof(a->error), "control socket path too long");
		return;
	}
	r = control_call(path, hm->owner, CONTROL_STATUS, TIMEOUT_OTHER_S, answer, sizeof(answer));
	if (r < 0) {
		snprintf(a->error, sizeof(a->error), "%s", r == -EACCES || r == -EPERM ? "permission denied"
			 : r == -ENOENT || r == -ECONNREFUSED ? "no control socket (is the daemon running?)"
			 : strerror(-r));
		return;
	}
	a->st = malloc(sizeof(*a->st));
	if (!a->st) {
		snprintf(a->error, sizeof(a->error), "out of memory");
		return;
	}
	if (control_answer_parse(answer, a->st, NULL) < 0 || a->st->error[0]) {
		snprintf(a->error, sizeof(a->error), "%s", a->st->error[0] ? a->st->error : "invalid answer");
		free(a->st);
		a->st = NULL;
	}
}

/*
 * keyfsctl status without a mountpoint: every keyfs mount in this mount namespace. Exit 0 when
 * every mount answered and none is locked, 8 when one is locked, 1 when one did not answer.
 */
static int host_status(bool json, bool prometheus)
{
	struct host_list l = { .m = calloc(HOST_MOUNTS_MAX, sizeof(struct host_mount)) };
	struct host_answer *a = NULL;
	char buf[PATH_MAX * 2];
	int r, rc = KEYFS_EXIT_OK;

	if (!l.m) {
		log_err("out of memory");
		return KEYFS_EXIT_FAILURE;
	}
	r = util_mountinfo_each(host_collect, &l);
	if (r < 0) {
		log_err("reading /proc/self/mountinfo: %s", strerror(-r));
		rc = KEYFS_EXIT_FAILURE;
		goto out;
	}
	if (l.full)
		log_warn("more than %d keyfs mounts: the first %d are shown", HOST_MOUNTS_MAX, HOST_MOUNTS_MAX);
	a = calloc(l.n ? l.n : 1, sizeof(*a));
	if (!a) {
		log_err("out of memory");
		rc = KEYFS_EXIT_FAILURE;
		goto out;
	}
	for (size_t i = 0; i < l.n; i++) {
		host_ask(&l.m[i], &a[i]);
		if (!a[i].st)
			rc = KEYFS_EXIT_FAILURE;
		else if (a[i].st->locked && rc == KEYFS_EXIT_OK)
			rc = KEYFS_EXIT_LOCKED;
	}
	for (size_t i = 0; i < l.n && !prometheus; i++)
		if (a[i].st && cli_key_id_is_alias(a[i].st->key_id))
			cli_key_id_hint(a[i].st->backing, a[i].st->key_id);
	if (prometheus) {
		print_prometheus(a, l.n);
	} else if (json) {
		size_t size = 3 * CONTROL_ANSWER_MAX + 8;
		char *line = malloc(size);

		fputs("[", stdout);
		for (size_t i = 0; i < l.n && line; i++) {
			int n;

			if (i)
				fputs(",", stdout);
			if (a[i].st) {
				n = control_status_format(a[i].st, line, size);
			} else {
				/* {"error":...} with the mountpoint it concerns. */
				n = control_error_format(a[i].error, line, size);
				if (n > 2) {
					line[n - 2] = '\0';
					fputs(line, stdout);
					fputs(",\"mountpoint\":", stdout);
					n = control_error_format(a[i].mountpoint, line, size);
					if (n > 11) {
						line[n - 2] = '\0';
						fputs(line + 9, stdout);
					}
					fputs("}", stdout);
					continue;
				}
			}
			if (n > 0) {
				line[n - 1] = '\0';
				print_json_clean(line);
			}
		}
		fputs("]\n", stdout);
		free(line);
	} else if (l.n == 0) {
		puts("no keyfs mounts");
	} else {
		printf("%-8s %-20s %-36s %s\n", "STATE", "REASON", "VOLUME", "MOUNTPOINT");
		for (size_t i = 0; i < l.n; i++) {
			const struct control_status *st = a[i].st;
			/* The table's column is narrow: a mount nobody answers for says so in two words
			 * (--json has the whole message). */
			const char *why = st ? (st->reason[0] ? st->reason : "-")
					  : strncmp(a[i].error, "no control socket", 17) == 0 ? "no daemon" : a[i].error;

			printf("%-8s ", st ? (st->locked ? "locked" : "unlocked") : "unknown");
			printf("%-20s ", clean(why, buf, 21));
			printf("%-36s ", st && st->volume[0] ? clean(st->volume, buf, sizeof(buf)) : "-");
			puts(clean(a[i].mountpoint, buf, sizeof(buf)));
		}
	}
out:
	for (size_t i = 0; i < l.n; i++) {
		free(l.m[i].mountpoint);
		if (a)
			free(a[i].st);
	}
	free(a);
	free(l.m);
	return rc;
}

static int run_action(enum control_request req, int argc, char **argv)
{
	const char *cmd = control_request_name(req), *arg = NULL, *field;
	char mp[PATH_MAX], path[PATH_MAX], answer[CONTROL_ANSWER_MAX + 2];
	char buf[CONTROL_ERROR_MAX * 4];
	int timeout_s = req == CONTROL_LOCK ? TIMEOUT_LOCK_S : TIMEOUT_OTHER_S;
	struct control_status *st = NULL;
	bool json = false, prometheus = false;
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
			if (req != CONTROL_STATUS)
				return cli_usage_error(cmd, "unknown option '--json'");
			json = true;
			break;
		case OPT_PROMETHEUS:
			if (req != CONTROL_STATUS)
				return cli_usage_error(cmd, "unknown option '--prometheus'");
			prometheus = true;
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
	if (json && prometheus)
		return cli_usage_error(cmd, "--json and --prometheus exclude each other");
	if (!arg && req == CONTROL_STATUS)
		return host_status(json, prometheus);
	if (!arg)
		return cli_usage_error(cmd, "missing MOUNTPOINT");
	if (prometheus)
		return cli_usage_error(cmd, "--prometheus lists every mount: give no MOUNTPOINT");

	rc = find_mount(arg, mp, sizeof(mp), &owner);
	if (rc)
		return rc;
	if (control_socket_path(mp, owner, path, sizeof(path)) < 0)
		return call_error(-ENAMETOOLONG, arg, "", owner, timeout_s);
	r = control_call(path, owner, req, timeout_s, answer, sizeof(answer));
	if (r < 0)
		return call_error(r, arg, path, owner, timeout_s);

	st = malloc(sizeof(*st));
	if (!st) {
		log_err("out of memory");
		return KEYFS_EXIT_FAILURE;
	}
	r = control_answer_parse(answer, st, &field);
	rc = KEYFS_EXIT_FAILURE;
	if (r == -EPROTO && strcmp(field, "state") == 0) {
		log_err("the daemon of '%s' answered without a valid \"state\"", arg);
		goto out;
	}
	if (r == -EPROTO) {
		log_err("the daemon of '%s' answered with an invalid \"%s\"", arg, field);
		goto out;
	}
	if (r == -ENOMEM) {
		log_err("out of memory");
		goto out;
	}
	if (r < 0) {
		log_err("the daemon of '%s' sent an answer that is not a JSON object", arg);
		goto out;
	}
	if (st->error[0]) {
		/* The daemon's words; root-or-owner refusals are "permission denied". */
		log_err("'%s': %s", arg, clean(st->error, buf, sizeof(buf)));
		rc = strcasestr(st->error, "permission") ? KEYFS_EXIT_DENIED : KEYFS_EXIT_FAILURE;
		goto out;
	}
	if (json) {
		rc = print_json(arg, st);
		if (rc)
			goto out;
	} else {
		print_status(st);
	}
	if (req == CONTROL_STATUS && cli_key_id_is_alias(st->key_id))
		cli_key_id_hint(st->backing, st->key_id);
	rc = st->locked ? KEYFS_EXIT_LOCKED : KEYFS_EXIT_OK;
	if (req == CONTROL_LOCK) {
		rc = KEYFS_EXIT_OK;
		if (!st->locked) {
			log_err("'%s' did not lock", arg);
			rc = KEYFS_EXIT_FAILURE;
		}
	} else if (req == CONTROL_UNLOCK && st->locked) {
		log_err("'%s' stays locked: %s", arg,
			st->reason[0] ? clean(st->reason, buf, sizeof(buf)) : "no reason given");
	}
out:
	free(st);
	return rc;
}

int cmd_status(int argc, char **argv)
{
	return run_action(CONTROL_STATUS, argc, argv);
}

int cmd_lock(int argc, char **argv)
{
	return run_action(CONTROL_LOCK, argc, argv);
}

int cmd_unlock(int argc, char **argv)
{
	return run_action(CONTROL_UNLOCK, argc, argv);
}
