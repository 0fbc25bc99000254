/* audit.c: structured audit events: the journal's native protocol or stderr lines, sent off the caller's thread */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <syslog.h>
#include <unistd.h>

#include "keyfs/audit.h"
#include "keyfs/log.h"

#define JOURNAL_SOCKET  "/run/systemd/journal/socket"
/* One record, either form: every field bounded (paths PATH_MAX), so it always fits. */
#define RECORD_MAX      (3 * 4096 + 4096)
#define QUEUE_MAX       64
/* A journal socket that is full (its queue holds 10 datagrams unless systemd raised
 * net.unix.max_dgram_qlen) is given this long to take a record, by the emitter only. */
#define JOURNAL_WAIT_MS 500
#define JOURNAL_RETRY_MS 5

/* Fixed for good: docs/AUDIT.md lists them, journalctl queries name them. */
static const struct {
	const char *name;
	const char *id;
	int priority;
} kinds[AUDIT_KINDS] = {
	[AUDIT_LOCK] = { "lock", "f1906500dc504079a58e90d20e44b57e", LOG_WARNING },
	[AUDIT_UNLOCK] = { "unlock", "4a53216a5a4348c2b0713b7cfc2cbcf4", LOG_NOTICE },
	[AUDIT_MANUAL_LOCK] = { "manual_lock", "63aef4a61bd642e782eb552d8fbbf2e1", LOG_NOTICE },
	[AUDIT_MANUAL_UNLOCK] = { "manual_unlock", "457eb687976141ef91e1ee8c7a0afd02", LOG_NOTICE },
	[AUDIT_GRACE_START] = { "grace_start", "2944b1e25df742fb90d1fc1fbd5e806d", LOG_WARNING },
	[AUDIT_GRACE_END] = { "grace_end", "0e64885288234e78922373151f8c3a8d", LOG_NOTICE },
	[AUDIT_ROTATION] = { "rotation", "f52cc1eb495243ba895271c4bc538078", LOG_NOTICE },
	[AUDIT_REWRAP] = { "rewrap", "f84c3990a0e24014a3178027ce57955c", LOG_NOTICE },
	[AUDIT_REFUSED] = { "refused", "4037f3cbfadd43b6a99dab97c52d52ce", LOG_WARNING },
};

struct record {
	size_t len;
	char buf[RECORD_MAX];
};

/*
 * The process's one audit sink, like the log's: set up by audit_init before any thread, the
 * queue under lock afterwards. The emitter thread is the only one that does I/O once started.
 */
static struct {
	bool inited;
	bool off;                       /* KEYFS_AUDIT=off: no events at all */
	bool journal;                   /* else stderr lines */
	bool syslog;
	const char *ident;
	struct sockaddr_un addr;
	int fd;                         /* the datagram socket; -1 for stderr */
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool started, stop;
	pthread_t thread;
	struct record *queue;           /* lock: QUEUE_MAX slots, ring */
	unsigned head, count;           /* lock */
	unsigned long long dropped;     /* lock */
	bool drop_logged;               /* lock */
	const char *drop_why;           /* lock: the first drop, for the emitter to log */
	bool journal_stuck;             /* emitter: the last record timed out on a full journal */
} A = { .fd = -1, .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER };

const char *audit_kind_name(enum audit_kind kind)
{
	return (unsigned)kind < AUDIT_KINDS ? kinds[kind].name : "unknown";
}

const char *audit_message_id(enum audit_kind kind)
{
	return (unsigned)kind < AUDIT_KINDS ? kinds[kind].id : "";
}

void audit_init(const char *ident)
{
	const char *mode = getenv("KEYFS_AUDIT"), *path = getenv("KEYFS_AUDIT_SOCKET");
	struct stat st;

	if (A.inited)
		return;
	A.inited = true;
	A.ident = ident;
	if (!path || path[0] != '/' || strlen(path) >= sizeof(A.addr.sun_path))
		path = JOURNAL_SOCKET;
	if (mode && strcmp(mode, "off") == 0) {
		A.off = true;
		return;
	}
	if (mode && strcmp(mode, "stderr") == 0)
		return;
	if (!(mode && strcmp(mode, "journal") == 0) && (stat(path, &st) < 0 || !S_ISSOCK(st.st_mode)))
		return;
	A.fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (A.fd < 0)
		return;
	A.addr.sun_family = AF_UNIX;
	memcpy(A.addr.sun_path, path, strlen(path) + 1);
	A.journal = true;
}

void audit_to_syslog(bool on)
{
	A.syslog = on;
}

unsigned long long audit_dropped(void)
{
	unsigned long long n;

	pthread_mutex_lock(&A.lock);
	n = A.dropped;
	pthread_mutex_unlock(&A.lock);
	return n;
}

void audit_correlation_id(const char *msg, char out[37])
{
	const char *p = msg ? strstr(msg, "correlation-id ") : NULL;
	size_t n;

	out[0] = '\0';
	if (!p)
		return;
	p += strlen("correlation-id ");
	n = strspn(p, "0123456789abcdefABCDEF-");
	if (n == 36) {
		memcpy(out, p, 36);
		out[36] = '\0';
	}
}

/* ---- the two forms ---- */

struct out {
	char *buf;
	size_t len, size;
	bool cut;
};

static void put(struct out *o, const void *p, size_t n)
{
	if (o->cut || n > o->size - o->len) {
		o->cut = true;
		return;
	}
	memcpy(o->buf + o->len, p, n);
	o->len += n;
}

static void puts_(struct out *o, const char *s)
{
	put(o, s, strlen(s));
}

/* NAME=value\n, or, for a value with a newline, NAME\n + 64-bit LE length + value + \n (the
 * journal's native protocol). */
static void journal_field(struct out *o, const char *name, const char *value)
{
	size_t n = strlen(value);

	puts_(o, name);
	if (memchr(value, '\n', n)) {
		uint8_t le[8];

		put(o, "\n", 1);
		for (int i = 0; i < 8; i++)
			le[i] = (uint8_t)((uint64_t)n >> (8 * i));
		put(o, le, 8);
	} else {
		put(o, "=", 1);
	}
	put(o, value, n);
	put(o, "\n", 1);
}

/* name=value, the value double-quoted when it holds a space, quote, backslash or control byte
 * (those as \", \\ and \xNN): one line a script can split. */
static void line_field(struct out *o, const char *name, const char *value)
{
	bool quote = value[0] == '\0' || strpbrk(value, " \"\\=") != NULL;

	for (const unsigned char *p = (const unsigned char *)value; *p && !quote; p++)
		quote = *p < 0x20 || *p == 0x7f;
	put(o, " ", 1);
	puts_(o, name);
	put(o, "=", 1);
	if (!quote) {
		puts_(o, value);
		return;
	}
	put(o, "\"", 1);
	for (const unsigned char *p = (const unsigned char *)value; *p; p++) {
		char esc[8];

		if (*p == '"' || *p == '\\') {
			esc[0] = '\\';
			esc[1] = (char)*p;
			put(o, esc, 2);
		} else if (*p < 0x20 || *p == 0x7f) {
			snprintf(esc, sizeof(esc), "\\x%02x", *p);
			puts_(o, esc);
		} else {
			put(o, p, 1);
		}
	}
	put(o, "\"", 1);
}

static void field(struct out *o, const char *name, const char *value)
{
	char lower[32];
	size_t i;

	if (!value || !value[0])
		return;
	if (A.journal) {
		journal_field(o, name, value);
		return;
	}
	/* KEYFS_KEY_ID -> key_id: the line is for people and scripts. */
	for (i = 0; name[6 + i] && i + 1 < sizeof(lower); i++)
		lower[i] = (char)(name[6 + i] >= 'A' && name[6 + i] <= 'Z' ? name[6 + i] + 32 : name[6 + i]);
	lower[i] = '\0';
	line_field(o, lower, value);
}

static void number(struct out *o, const char *name, long long v)
{
	char buf[24];

	if (v < 0)
		return;
	snprintf(buf, sizeof(buf), "%lld", v);
	field(o, name, buf);
}

static size_t format(const struct audit_event *ev, char *buf, size_t size)
{
	struct out o = { .buf = buf, .size = size };
	char prio[4];

	if (A.journal) {
		snprintf(prio, sizeof(prio), "%d", kinds[ev->kind].priority);
		journal_field(&o, "MESSAGE_ID", kinds[ev->kind].id);
		journal_field(&o, "PRIORITY", prio);
		journal_field(&o, "SYSLOG_IDENTIFIER", A.ident ? A.ident : "keyfs");
		journal_field(&o, "KEYFS_EVENT", kinds[ev->kind].name);
		if (ev->message && ev->message[0])
			journal_field(&o, "MESSAGE", ev->message);
		else
			journal_field(&o, "MESSAGE", kinds[ev->kind].name);
	} else {
		puts_(&o, A.ident ? A.ident : "keyfs");
		puts_(&o, ": audit: ");
		puts_(&o, kinds[ev->kind].name);
	}
	field(&o, "KEYFS_VOLUME", ev->volume);
	field(&o, "KEYFS_MOUNTPOINT", ev->mountpoint);
	field(&o, "KEYFS_BACKING", ev->backing);
	field(&o, "KEYFS_KEY_ID", ev->key_id);
	field(&o, "KEYFS_KEY_CRN", ev->key_crn);
	field(&o, "KEYFS_KEY_VERSION", ev->key_version);
	field(&o, "KEYFS_REASON", ev->reason);
	number(&o, "KEYFS_LATENCY_MS", ev->latency_ms);
	field(&o, "KEYFS_CORRELATION_ID", ev->correlation_id);
	number(&o, "KEYFS_UID", ev->uid);
	if (!A.journal) {
		if (o.cut)
			o.len = o.size - 1;
		buf[o.len++] = '\n';
	}
	/* A journal record cut short would be malformed: dropped instead (never with bounded fields). */
	return o.cut && A.journal ? 0 : o.len;
}

/* ---- sending ---- */

/* Count a dropped event; the first is logged, by the emitter thread when one runs (the caller
 * may be a FUSE request thread, which must not wait for a log write). */
static void dropped(const char *why)
{
	bool first, defer;

	pthread_mutex_lock(&A.lock);
	A.dropped++;
	first = !A.drop_logged;
	A.drop_logged = true;
	defer = first && A.started;
	if (defer) {
		A.drop_why = why;
		pthread_cond_signal(&A.cond);
	}
	pthread_mutex_unlock(&A.lock);
	if (first && !defer)
		log_warn("audit: an event was dropped (%s); further drops are counted, not logged", why);
}

/*
 * One record to the sink. may_wait: the caller is the emitter, nobody's request, so a journal
 * that is only behind gets up to JOURNAL_WAIT_MS to take it; one that took nothing for that long
 * is stuck, and the records after it are dropped at once until one goes through again (a sink
 * that takes nothing must cost the mount nothing, and the queue is what absorbs a burst).
 */
static void send_record(const char *buf, size_t len, bool may_wait)
{
	if (A.journal) {
		unsigned waited = 0;
		ssize_t n;
		int e = 0;

		for (;;) {
			n = sendto(A.fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL, (const struct sockaddr *)&A.addr,
				   sizeof(A.addr));
			e = n < 0 ? errno : 0;
			if (n >= 0 || (e != EAGAIN && e != EWOULDBLOCK) || !may_wait || A.journal_stuck ||
			    waited >= JOURNAL_WAIT_MS)
				break;
			usleep(JOURNAL_RETRY_MS * 1000);
			waited += JOURNAL_RETRY_MS;
		}
		if (may_wait)
			A.journal_stuck = e == EAGAIN || e == EWOULDBLOCK;
		if (n < 0)
			dropped(strerror(e));
		return;
	}
	if (A.syslog) {
		syslog(LOG_NOTICE, "%.*s", (int)len - 1, buf);
		return;
	}
	/* One write: lines of concurrent writers do not interleave. */
	if (write(STDERR_FILENO, buf, len) < 0)
		dropped(strerror(errno));
}

static void *emitter(void *arg)
{
	char *buf = malloc(RECORD_MAX);

	(void)arg;
	pthread_mutex_lock(&A.lock);
	for (;;) {
		while (!A.count && !A.stop && !A.drop_why)
			pthread_cond_wait(&A.cond, &A.lock);
		if (A.drop_why) {
			const char *why = A.drop_why;

			A.drop_why = NULL;
			pthread_mutex_unlock(&A.lock);
			log_warn("audit: an event was dropped (%s); further drops are counted, not logged", why);
			pthread_mutex_lock(&A.lock);
			continue;
		}
		if (!A.count)
			break;
		if (buf) {
			struct record *r = &A.queue[A.head];
			size_t len = r->len;

			memcpy(buf, r->buf, len);
			A.head = (A.head + 1) % QUEUE_MAX;
			A.count--;
			pthread_mutex_unlock(&A.lock);
			send_record(buf, len, true);
			pthread_mutex_lock(&A.lock);
		} else {
			A.head = (A.head + 1) % QUEUE_MAX;
			A.count--;
		}
	}
	pthread_mutex_unlock(&A.lock);
	free(buf);
	return NULL;
}

int audit_start(void)
{
	sigset_t all, old;
	int r;

	if (!A.inited)
		audit_init("keyfs");
	if (A.started)
		return 0;
	A.queue = calloc(QUEUE_MAX, sizeof(*A.queue));
	if (!A.queue)
		return -ENOMEM;
	/* Signals stay with the threads that handle them. */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	r = pthread_create(&A.thread, NULL, emitter, NULL);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (r != 0) {
		free(A.queue);
		A.queue = NULL;
		return -r;
	}
	pthread_mutex_lock(&A.lock);
	A.started = true;
	A.stop = false;
	pthread_mutex_unlock(&A.lock);
	return 0;
}

void audit_stop(void)
{
	pthread_mutex_lock(&A.lock);
	if (!A.started) {
		pthread_mutex_unlock(&A.lock);
		return;
	}
	A.stop = true;
	pthread_cond_signal(&A.cond);
	pthread_mutex_unlock(&A.lock);
	pthread_join(A.thread, NULL);
	pthread_mutex_lock(&A.lock);
	A.started = false;
	free(A.queue);
	A.queue = NULL;
	pthread_mutex_unlock(&A.lock);
}

void audit_emit(const struct audit_event *ev)
{
	char *inline_buf;
	size_t len;

	if ((unsigned)ev->kind >= AUDIT_KINDS)
		return;
	if (!A.inited)
		audit_init("keyfs");
	if (A.off)
		return;
	pthread_mutex_lock(&A.lock);
	if (A.started && !A.stop) {
		struct record *r;

		if (A.count == QUEUE_MAX) {
			pthread_mutex_unlock(&A.lock);
			dropped("the audit queue is full");
			return;
		}
		/* Formatted in place, under the lock: no I/O, no allocation on the caller's thread. */
		r = &A.queue[(A.head + A.count) % QUEUE_MAX];
		r->len = format(ev, r->buf, sizeof(r->buf));
		if (r->len)
			A.count++;
		pthread_cond_signal(&A.cond);
		pthread_mutex_unlock(&A.lock);
		return;
	}
	pthread_mutex_unlock(&A.lock);
	inline_buf = malloc(RECORD_MAX);
	if (!inline_buf) {
		dropped("out of memory");
		return;
	}
	len = format(ev, inline_buf, RECORD_MAX);
	if (len)
		send_record(inline_buf, len, false);
	free(inline_buf);
}
