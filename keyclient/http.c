/* http.c: the only user of libcurl: one bounded HTTPS attempt per call over a pool of reusable easy handles */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <sodium.h>

#include "keyfs/secmem.h"
#include "http.h"

/*
 * Idle handles are kept so that their connections (TCP + TLS) are reused by the next call;
 * past idle_max (http_set_idle_max: the client's concurrency, and never more than this), a
 * returned handle is closed. Connections are not shared between handles (libcurl does not
 * support that across concurrent threads), TLS sessions and DNS are.
 */
#define POOL_IDLE_MAX   HTTP_IDLE_MAX
#define POOL_IDLE_DEFAULT 8
/* A burst leaves up to idle_max connections open; those not reused for this long are closed,
 * down to POOL_IDLE_KEEP, at the next return of a handle (a poll at rest): a quiet mount keeps
 * a connection or two, not one per call it once had in flight. The idle list is a stack, so
 * the handles at its bottom are the ones the recent load did not need. */
#define POOL_IDLE_TTL_MS 10000
#define POOL_IDLE_KEEP   2
#define HEADER_LINE_MAX 256
/* Sockets http_interrupt can shut down to wake a transfer at once; one beyond this is still
 * interrupted, at curl's next progress call (within about a second). */
#define SOCKS_MAX       (2 * HTTP_IDLE_MAX + 16)

/*
 * The TLS session cache and DNS cache every handle of one generation shares. http_forget
 * starts a new generation; the old share is cleaned up (its TLS sessions freed, and wiped by
 * secmem's allocator) when the last handle attached to it is closed. A handle's reference is
 * dropped only once curl_easy_cleanup has detached it (conn_close): until then libcurl still
 * takes the share's locks (this struct) and uses its caches.
 */
struct http_share {
	CURLSH *sh;
	pthread_mutex_t locks[CURL_LOCK_DATA_LAST];
	unsigned refs;                  /* under http.pool_lock: the struct http and each handle */
};

struct http_conn {
	struct http *owner;
	struct http_share *share;       /* the generation this handle was made in */
	CURL *curl;
	char *body;                     /* sodium_malloc, body_max + 1 bytes */
	size_t len;
	size_t body_max;
	bool too_large;
	long retry_after;
	char *scratch;                  /* sodium_malloc, HTTP_SCRATCH_SIZE bytes */
	char errbuf[CURL_ERROR_SIZE];
	unsigned epoch;                 /* owner's interrupt epoch when the connection was taken */
	int64_t idle_since;             /* owner's pool_lock: CLOCK_MONOTONIC ms, when it was put back */
	atomic_bool busy;               /* a transfer is under way */
};

/*
 * A socket curl opened for a connection: http_interrupt shuts it down to end a stalled wait.
 * libcurl 7.88 closes a socket that never got connected (an attempt cut short) with close(),
 * not our close callback: its entry stays until the handle is closed (conn_free), and its fd
 * number may be another file's by then, so an fd is shut down only if it is still the socket
 * opened (same inode).
 */
struct http_sock {
	int fd;                         /* -1: free */
	ino_t ino;
	struct http_conn *conn;
};

/* Lock order: pool_lock, then (inside libcurl) the share locks; none is held across a transfer
 * except the share locks libcurl takes and releases itself. */
struct http {
	char *ca_file;
	char *user_agent;
	long connect_timeout_ms;
	long timeout_ms;
	size_t body_max;
	struct http_share *share;       /* pool_lock: the current generation */
	pthread_mutex_t pool_lock;
	struct http_conn *idle[POOL_IDLE_MAX];
	size_t nidle;
	size_t idle_max;                /* pool_lock: 1..POOL_IDLE_MAX */
	atomic_bool cancelled;
	atomic_uint epoch;              /* bumped by http_interrupt */
	pthread_mutex_t socks_lock;     /* guards socks; held across open/close of their fds */
	struct http_sock socks[SOCKS_MAX];
};

/* libcurl is initialised by secmem, with its wiping allocator. */
int http_global_init(void)
{
	return secmem_init();
}

static void share_lock(CURL *handle, curl_lock_data data, curl_lock_access access, void *userp)
{
	struct http_share *s = userp;

	(void)handle;
	(void)access;
	if ((int)data >= 0 && data < CURL_LOCK_DATA_LAST)
		pthread_mutex_lock(&s->locks[data]);
}

static void share_unlock(CURL *handle, curl_lock_data data, void *userp)
{
	struct http_share *s = userp;

	(void)handle;
	if ((int)data >= 0 && data < CURL_LOCK_DATA_LAST)
		pthread_mutex_unlock(&s->locks[data]);
}

static void share_free(struct http_share *s)
{
	if (!s)
		return;
	/* No handle uses it any more: the cleanup frees every cached TLS session. Were one still
	 * attached, libcurl would refuse, and that handle would lock mutexes freed here. */
	if (s->sh && curl_share_cleanup(s->sh) != CURLSHE_OK)
		return;
	for (int i = 0; i < CURL_LOCK_DATA_LAST; i++)
		pthread_mutex_destroy(&s->locks[i]);
	free(s);
}

static struct http_share *share_new(void)
{
	struct http_share *s = calloc(1, sizeof(*s));

	if (!s)
		return NULL;
	for (int i = 0; i < CURL_LOCK_DATA_LAST; i++)
		pthread_mutex_init(&s->locks[i], NULL);
	s->refs = 1;
	s->sh = curl_share_init();
	if (!s->sh ||
	    curl_share_setopt(s->sh, CURLSHOPT_LOCKFUNC, share_lock) != CURLSHE_OK ||
	    curl_share_setopt(s->sh, CURLSHOPT_UNLOCKFUNC, share_unlock) != CURLSHE_OK ||
	    curl_share_setopt(s->sh, CURLSHOPT_USERDATA, s) != CURLSHE_OK ||
	    curl_share_setopt(s->sh, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION) != CURLSHE_OK ||
	    curl_share_setopt(s->sh, CURLSHOPT_SHARE, CURL_LOCK_DATA_DNS) != CURLSHE_OK) {
		share_free(s);
		return NULL;
	}
	return s;
}

/* Drop one reference; the caller holds pool_lock. Returns the share to free, if it was the last. */
static struct http_share *share_unref(struct http_share *s)
{
	return s && --s->refs == 0 ? s : NULL;
}

int http_new(const struct http_settings *s, struct http **ret)
{
	struct http *h;
	int r;

	r = http_global_init();
	if (r < 0)
		return r;
	h = calloc(1, sizeof(*h));
	if (!h)
		return -ENOMEM;
	h->connect_timeout_ms = s->connect_timeout_ms;
	h->timeout_ms = s->timeout_ms;
	h->body_max = s->body_max;
	if ((s->ca_file && !(h->ca_file = strdup(s->ca_file))) ||
	    !(h->user_agent = strdup(s->user_agent ? s->user_agent : "keyfs"))) {
		free(h->ca_file);
		free(h);
		return -ENOMEM;
	}
	h->idle_max = POOL_IDLE_DEFAULT;
	pthread_mutex_init(&h->pool_lock, NULL);
	pthread_mutex_init(&h->socks_lock, NULL);
	for (int i = 0; i < SOCKS_MAX; i++)
		h->socks[i].fd = -1;
	h->share = share_new();
	if (!h->share) {
		http_free(h);
		return -ENOMEM;
	}
	*ret = h;
	return 0;
}

/* Close the handle (its connection, TLS state and buffers: wiped by secmem's free). */
static void conn_free(struct http_conn *c)
{
	if (!c)
		return;
	if (c->curl)
		curl_easy_cleanup(c->curl);
	/* Entries of sockets curl closed without telling us: none may name a freed handle. */
	if (c->owner) {
		pthread_mutex_lock(&c->owner->socks_lock);
		for (int i = 0; i < SOCKS_MAX; i++)
			if (c->owner->socks[i].conn == c)
				c->owner->socks[i] = (struct http_sock){ .fd = -1 };
		pthread_mutex_unlock(&c->owner->socks_lock);
	}
	if (c->body) {
		sodium_memzero(c->body, c->body_max + 1);
		sodium_free(c->body);
	}
	if (c->scratch) {
		sodium_memzero(c->scratch, HTTP_SCRATCH_SIZE);
		sodium_free(c->scratch);
	}
	free(c);
}

/* Close a handle out of the pool, then drop its share reference: only now is it detached from
 * the share (curl_easy_cleanup), so another thread's last reference cannot free the share
 * while this handle still uses it. Called without pool_lock. */
static void conn_close(struct http *h, struct http_conn *c)
{
	struct http_share *s;

	if (!c)
		return;
	s = c->share;
	conn_free(c);
	pthread_mutex_lock(&h->pool_lock);
	s = share_unref(s);
	pthread_mutex_unlock(&h->pool_lock);
	share_free(s);
}

void http_free(struct http *h)
{
	if (!h)
		return;
	for (size_t i = 0; i < h->nidle; i++)
		conn_close(h, h->idle[i]);
	/* Every handle is gone, so the share is no longer in use. */
	share_free(share_unref(h->share));
	pthread_mutex_destroy(&h->pool_lock);
	pthread_mutex_destroy(&h->socks_lock);
	free(h->ca_file);
	free(h->user_agent);
	free(h);
}

int http_conn_get(struct http *h, struct http_conn **ret)
{
	struct http_conn *c = NULL;

	pthread_mutex_lock(&h->pool_lock);
	if (h->nidle > 0)
		c = h->idle[--h->nidle];
	pthread_mutex_unlock(&h->pool_lock);
	if (c) {
		c->epoch = atomic_load(&h->epoch);
		*ret = c;
		return 0;
	}
	c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->owner = h;
	pthread_mutex_lock(&h->pool_lock);
	c->share = h->share;
	c->share->refs++;
	pthread_mutex_unlock(&h->pool_lock);
	c->body_max = h->body_max;
	c->curl = curl_easy_init();
	c->body = sodium_malloc(c->body_max + 1);
	c->scratch = sodium_malloc(HTTP_SCRATCH_SIZE);
	if (!c->curl || !c->body || !c->scratch) {
		http_conn_put(h, c);
		return -ENOMEM;
	}
	c->body[0] = '\0';
	c->epoch = atomic_load(&h->epoch);
	*ret = c;
	return 0;
}

static int64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void http_conn_put(struct http *h, struct http_conn *c)
{
	struct http_conn *stale[POOL_IDLE_MAX];
	size_t nstale = 0;
	int64_t now;

	if (!c)
		return;
	if (c->body)
		sodium_memzero(c->body, c->len + 1 <= c->body_max + 1 ? c->len + 1 : c->body_max + 1);
	c->len = 0;
	if (c->scratch)
		sodium_memzero(c->scratch, HTTP_SCRATCH_SIZE);
	pthread_mutex_lock(&h->pool_lock);
	/* A handle of an older generation (http_forget ran while it was out) is closed. */
	now = mono_ms();
	if (c->curl && c->body && c->scratch && c->share == h->share && h->nidle < h->idle_max) {
		c->idle_since = now;
		h->idle[h->nidle++] = c;
		c = NULL;
	}
	while (nstale < h->nidle && h->nidle - nstale > POOL_IDLE_KEEP &&
	       now - h->idle[nstale]->idle_since >= POOL_IDLE_TTL_MS) {
		stale[nstale] = h->idle[nstale];
		nstale++;
	}
	if (nstale) {
		h->nidle -= nstale;
		memmove(h->idle, h->idle + nstale, h->nidle * sizeof(h->idle[0]));
	}
	pthread_mutex_unlock(&h->pool_lock);
	conn_close(h, c);
	for (size_t i = 0; i < nstale; i++)
		conn_close(h, stale[i]);
}

void http_set_idle_max(struct http *h, size_t n)
{
	pthread_mutex_lock(&h->pool_lock);
	h->idle_max = n < 1 ? 1 : n > POOL_IDLE_MAX ? POOL_IDLE_MAX : n;
	pthread_mutex_unlock(&h->pool_lock);
}

void http_forget(struct http *h)
{
	struct http_conn *idle[POOL_IDLE_MAX];
	struct http_share *fresh = share_new(), *old = NULL;
	size_t n;

	pthread_mutex_lock(&h->pool_lock);
	n = h->nidle;
	memcpy(idle, h->idle, n * sizeof(idle[0]));
	h->nidle = 0;
	/* Without memory for a new share the old one stays: its sessions go with the next forget. */
	if (fresh) {
		old = share_unref(h->share);
		h->share = fresh;
	}
	pthread_mutex_unlock(&h->pool_lock);
	for (size_t i = 0; i < n; i++)
		conn_close(h, idle[i]);
	share_free(old);
}

char *http_conn_scratch(struct http_conn *c)
{
	return c->scratch;
}

static size_t on_body(char *data, size_t size, size_t nmemb, void *userp)
{
	struct http_conn *c = userp;
	size_t n = size * nmemb;

	if (n > c->body_max - c->len) {
		c->too_large = true;
		return CURL_WRITEFUNC_ERROR;
	}
	memcpy(c->body + c->len, data, n);
	c->len += n;
	return n;
}

/* Retry-After is either delay-seconds or an HTTP-date (RFC 9110 10.2.3). */
static long parse_retry_after(const char *v)
{
	char *end;
	long long secs;
	time_t when, now;

	while (*v == ' ' || *v == '\t')
		v++;
	if (*v >= '0' && *v <= '9') {
		errno = 0;
		secs = strtoll(v, &end, 10);
		while (*end == ' ' || *end == '\t')
			end++;
		if (errno || *end)
			return -1;
		return secs > 86400 ? 86400 : (long)secs;
	}
	when = curl_getdate(v, NULL);
	if (when == (time_t)-1)
		return -1;
	now = time(NULL);
	return when <= now ? 0 : when - now > 86400 ? 86400 : (long)(when - now);
}

static size_t on_header(char *data, size_t size, size_t nitems, void *userp)
{
	struct http_conn *c = userp;
	size_t n = size * nitems;
	char line[HEADER_LINE_MAX];
	size_t len = n;

	/* A new status line (after 100-continue, say) starts a new set of headers. */
	if (n >= 5 && memcmp(data, "HTTP/", 5) == 0) {
		c->retry_after = -1;
		return n;
	}
	if (n < sizeof("retry-after:") - 1 || strncasecmp(data, "retry-after:", sizeof("retry-after:") - 1) != 0)
		return n;
	while (len > 0 && (data[len - 1] == '\r' || data[len - 1] == '\n'))
		len--;
	len -= sizeof("retry-after:") - 1;
	if (len >= sizeof(line))
		return n;
	memcpy(line, data + sizeof("retry-after:") - 1, len);
	line[len] = '\0';
	c->retry_after = parse_retry_after(line);
	return n;
}

/* Wipe curl's copies of our header lines: the authorization line carries a token. */
static void slist_wipe_free(struct curl_slist *l)
{
	for (struct curl_slist *p = l; p; p = p->next)
		if (p->data)
			sodium_memzero(p->data, strlen(p->data));
	curl_slist_free_all(l);
}

static int map_curl_error(CURLcode rc, bool too_large)
{
	switch (rc) {
	case CURLE_COULDNT_RESOLVE_HOST:
	case CURLE_COULDNT_RESOLVE_PROXY:
	case CURLE_COULDNT_CONNECT:
		return -EHOSTUNREACH;
	case CURLE_SEND_ERROR:
	case CURLE_RECV_ERROR:
	case CURLE_GOT_NOTHING:
	case CURLE_PARTIAL_FILE:
	case CURLE_SSL_CONNECT_ERROR:
	case CURLE_HTTP2:
	case CURLE_HTTP2_STREAM:
	case CURLE_WEIRD_SERVER_REPLY:
		return -ECONNRESET;
	case CURLE_OPERATION_TIMEDOUT:
		return -ETIMEDOUT;
	case CURLE_PEER_FAILED_VERIFICATION:
	case CURLE_SSL_CACERT_BADFILE:
	case CURLE_SSL_CERTPROBLEM:
	case CURLE_SSL_ISSUER_ERROR:
	case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
	case CURLE_SSL_INVALIDCERTSTATUS:
		return -EPROTO;
	case CURLE_FILESIZE_EXCEEDED:
		return -EMSGSIZE;
	case CURLE_WRITE_ERROR:
		return too_large ? -EMSGSIZE : -EIO;
	case CURLE_UNSUPPORTED_PROTOCOL:
	case CURLE_URL_MALFORMAT:
		return -EINVAL;
	case CURLE_OUT_OF_MEMORY:
		return -ENOMEM;
	case CURLE_ABORTED_BY_CALLBACK:
		return -ECANCELED;
	default:
		return -EIO;
	}
}

/* A transfer waiting for a stalled or slow peer sleeps in poll(): a shut-down socket wakes it
 * now. Under socks_lock curl closes no socket through our callback; one it closed itself (its
 * number maybe another file's by now) is told apart by its inode. */
static void wake_transfers(struct http *h)
{
	struct stat st;

	pthread_mutex_lock(&h->socks_lock);
	for (int i = 0; i < SOCKS_MAX; i++)
		if (h->socks[i].fd >= 0 && atomic_load(&h->socks[i].conn->busy) &&
		    fstat(h->socks[i].fd, &st) == 0 && S_ISSOCK(st.st_mode) && st.st_ino == h->socks[i].ino)
			shutdown(h->socks[i].fd, SHUT_RDWR);
	pthread_mutex_unlock(&h->socks_lock);
}

void http_cancel(struct http *h)
{
	atomic_store(&h->cancelled, true);
	/* Else a call under way ends only with its answer or at curl's next progress call, up to
	 * a second later: an unmount would wait for it. */
	wake_transfers(h);
}

bool http_cancelled(const struct http *h)
{
	return atomic_load(&h->cancelled);
}

void http_interrupt(struct http *h)
{
	atomic_fetch_add(&h->epoch, 1);
	wake_transfers(h);
}

bool http_conn_interrupted(const struct http_conn *c)
{
	return atomic_load(&c->owner->epoch) != c->epoch || http_cancelled(c->owner);
}

static curl_socket_t on_open_socket(void *userp, curlsocktype purpose, struct curl_sockaddr *a)
{
	struct http_conn *c = userp;
	struct http *h = c->owner;
	curl_socket_t fd;
	struct stat st;

	(void)purpose;
	pthread_mutex_lock(&h->socks_lock);
	fd = socket(a->family, a->socktype | SOCK_CLOEXEC, a->protocol);
	if (fd >= 0 && fstat(fd, &st) == 0) {
		/* Entries a close() of curl's left: this number's, and this handle's that no longer
		 * name their socket; else they would fill the table while the handle lives. */
		for (int i = 0; i < SOCKS_MAX; i++) {
			struct stat was;

			if (h->socks[i].fd == fd ||
			    (h->socks[i].fd >= 0 && h->socks[i].conn == c &&
			     (fstat(h->socks[i].fd, &was) < 0 || was.st_ino != h->socks[i].ino)))
				h->socks[i].fd = -1;
		}
		for (int i = 0; i < SOCKS_MAX; i++) {
			if (h->socks[i].fd < 0) {
				h->socks[i] = (struct http_sock){ .fd = fd, .ino = st.st_ino, .conn = c };
				break;
			}
		}
	}
	pthread_mutex_unlock(&h->socks_lock);
	return fd >= 0 ? fd : CURL_SOCKET_BAD;
}

static int on_close_socket(void *userp, curl_socket_t fd)
{
	struct http *h = userp;

	pthread_mutex_lock(&h->socks_lock);
	for (int i = 0; i < SOCKS_MAX; i++)
		if (h->socks[i].fd == fd)
			h->socks[i].fd = -1;
	close(fd);
	pthread_mutex_unlock(&h->socks_lock);
	return 0;
}

/* curl calls this about once a second, and more often while data moves. */
static int on_progress(void *userp, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal, curl_off_t ulnow)
{
	const struct http_conn *c = userp;

	(void)dltotal;
	(void)dlnow;
	(void)ultotal;
	(void)ulnow;
	return http_conn_interrupted(c) ? 1 : 0;
}

static int setup(struct http *h, struct http_conn *c, const struct http_request *rq, struct curl_slist *hdrs)
{
	CURL *e = c->curl;
	CURLcode rc = CURLE_OK;

#define SET(opt, val) do { if (rc == CURLE_OK) rc = curl_easy_setopt(e, opt, val); } while (0)
	/* A fresh set of options each time; the handle keeps its live connections. */
	curl_easy_reset(e);
	SET(CURLOPT_URL, rq->url);
	SET(CURLOPT_PROTOCOLS_STR, "https");
	SET(CURLOPT_REDIR_PROTOCOLS_STR, "https");
	SET(CURLOPT_FOLLOWLOCATION, 0L);
	SET(CURLOPT_NOSIGNAL, 1L);
	SET(CURLOPT_CONNECTTIMEOUT_MS, h->connect_timeout_ms);
	SET(CURLOPT_TIMEOUT_MS, h->timeout_ms);
	SET(CURLOPT_SSL_VERIFYPEER, 1L);
	SET(CURLOPT_SSL_VERIFYHOST, 2L);
	SET(CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
	if (h->ca_file)
		SET(CURLOPT_CAINFO, h->ca_file);
	SET(CURLOPT_SHARE, c->share->sh);
	SET(CURLOPT_USERAGENT, h->user_agent);
	SET(CURLOPT_HTTPHEADER, hdrs);
	SET(CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)h->body_max);
	SET(CURLOPT_WRITEFUNCTION, on_body);
	SET(CURLOPT_WRITEDATA, c);
	SET(CURLOPT_HEADERFUNCTION, on_header);
	SET(CURLOPT_HEADERDATA, c);
	SET(CURLOPT_ERRORBUFFER, c->errbuf);
	SET(CURLOPT_NOPROGRESS, 0L);
	SET(CURLOPT_XFERINFOFUNCTION, on_progress);
	SET(CURLOPT_XFERINFODATA, c);
	SET(CURLOPT_TCP_KEEPALIVE, 1L);
	/* HTTP/1.1 only: an HTTP/2 library (nghttp2) would keep header tables, the authorization
	 * line included, in memory that secmem's allocator does not reach. */
	SET(CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
	SET(CURLOPT_OPENSOCKETFUNCTION, on_open_socket);
	SET(CURLOPT_OPENSOCKETDATA, c);
	SET(CURLOPT_CLOSESOCKETFUNCTION, on_close_socket);
	SET(CURLOPT_CLOSESOCKETDATA, h);
	/* https_proxy/no_proxy from the environment are honoured (sites that reach IBM Cloud only
	 * through a proxy): the peer is verified end to end, so a proxy sees only TLS. */
	if (strcmp(rq->method, "POST") == 0) {
		SET(CURLOPT_POST, 1L);
		SET(CURLOPT_POSTFIELDS, rq->body ? rq->body : "");
		SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)(rq->body ? rq->body_len : 0));
	} else if (strcmp(rq->method, "GET") == 0) {
		SET(CURLOPT_HTTPGET, 1L);
	} else {
		return -EINVAL;
	}
#undef SET
	return rc == CURLE_OK ? 0 : rc == CURLE_OUT_OF_MEMORY ? -ENOMEM : -EINVAL;
}

int http_perform(struct http_conn *c, const struct http_request *rq, struct http_response *ret,
		 char why[HTTP_WHY_MAX])
{
	struct http *h;
	struct curl_slist *hdrs = NULL, *tmp;
	CURLcode rc;
	long status = 0;
	int r;

	why[0] = '\0';
	if (http_conn_interrupted(c)) {
		snprintf(why, HTTP_WHY_MAX, "%s", http_cancelled(c->owner) ? "cancelled: shutting down" : "interrupted");
		return -ECANCELED;
	}
	sodium_memzero(c->body, c->len + 1 <= c->body_max + 1 ? c->len + 1 : c->body_max + 1);
	c->len = 0;
	c->too_large = false;
	c->retry_after = -1;
	c->errbuf[0] = '\0';
	for (size_t i = 0; i < rq->nheaders; i++) {
		tmp = curl_slist_append(hdrs, rq->headers[i]);
		if (!tmp) {
			slist_wipe_free(hdrs);
			snprintf(why, HTTP_WHY_MAX, "out of memory");
			return -ENOMEM;
		}
		hdrs = tmp;
	}
	h = c->owner;
	r = setup(h, c, rq, hdrs);
	if (r < 0) {
		slist_wipe_free(hdrs);
		snprintf(why, HTTP_WHY_MAX, "cannot set up the request");
		return r;
	}
	/* busy first, then the epoch: an interrupt in between either sees busy or is seen here. */
	atomic_store(&c->busy, true);
	rc = http_conn_interrupted(c) ? CURLE_ABORTED_BY_CALLBACK : curl_easy_perform(c->curl);
	atomic_store(&c->busy, false);
	/* Drop our header list from the handle before freeing it. */
	curl_easy_setopt(c->curl, CURLOPT_HTTPHEADER, NULL);
	curl_easy_setopt(c->curl, CURLOPT_POSTFIELDS, NULL);
	slist_wipe_free(hdrs);
	c->body[c->len] = '\0';
	/* Interrupted: whatever curl made of the shut-down socket, the answer is the interrupt. */
	if (rc != CURLE_OK && http_conn_interrupted(c))
		rc = CURLE_ABORTED_BY_CALLBACK;
	if (rc != CURLE_OK) {
		r = map_curl_error(rc, c->too_large);
		if (r == -EMSGSIZE)
			snprintf(why, HTTP_WHY_MAX, "response too large (over %zu bytes)", c->body_max);
		else if (r == -ECANCELED)
			snprintf(why, HTTP_WHY_MAX, "%s", http_cancelled(h) ? "cancelled: shutting down" : "interrupted");
		else
			snprintf(why, HTTP_WHY_MAX, "%s", c->errbuf[0] ? c->errbuf : curl_easy_strerror(rc));
		sodium_memzero(c->body, c->len + 1);
		c->len = 0;
		return r;
	}
	curl_easy_getinfo(c->curl, CURLINFO_RESPONSE_CODE, &status);
	ret->status = status;
	ret->body = c->body;
	ret->len = c->len;
	ret->retry_after = c->retry_after;
	return 0;
}
