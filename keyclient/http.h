/* http.h: keyclient's one HTTPS request primitive over libcurl (caps, timeouts, a handle pool); private to keyclient/ */
#ifndef KEYFS_HTTP_H
#define KEYFS_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Per-connection scratch memory (sodium_malloc) for secrets a caller builds: headers, form bodies. */
#define HTTP_SCRATCH_SIZE 16384
#define HTTP_WHY_MAX      256
#define HTTP_IDLE_MAX     136     /* idle connections kept at most (the concurrency, and polls) */

struct http_settings {
	const char *ca_file;            /* extra trusted CA bundle, or NULL for the system store */
	long connect_timeout_ms;
	long timeout_ms;                /* whole attempt */
	size_t body_max;                /* largest response body accepted */
	const char *user_agent;
};

struct http;
struct http_conn;

/* Process-wide libcurl initialisation; idempotent and thread-safe. Returns 0 or -EIO. */
int http_global_init(void);

int http_new(const struct http_settings *s, struct http **ret);
void http_free(struct http *h);

/* Take a connection (an idle one, so its TLS session and socket are reused) and give it back. */
int http_conn_get(struct http *h, struct http_conn **ret);
void http_conn_put(struct http *h, struct http_conn *c);

/* Keep at most n idle connections (1..HTTP_IDLE_MAX; default 8): one per call in flight. */
void http_set_idle_max(struct http *h, size_t n);

/* The connection's scratch buffer (HTTP_SCRATCH_SIZE bytes, locked, wiped by http_conn_put). */
char *http_conn_scratch(struct http_conn *c);

struct http_request {
	const char *method;             /* "GET" or "POST" */
	const char *url;                /* https only */
	const char *const *headers;     /* "name: value" each; wiped from curl's copies after the call */
	size_t nheaders;
	const void *body;               /* POST body or NULL */
	size_t body_len;
};

struct http_response {
	long status;
	const char *body;               /* NUL-terminated, owned by the connection until its next request */
	size_t len;
	long retry_after;               /* seconds asked by a Retry-After header, or -1 */
};

/*
 * One attempt. Returns 0 when an HTTP answer came back (any status), else
 *   -EHOSTUNREACH  no connection (resolve, connect)          retryable
 *   -ECONNRESET    connection broke before a full answer      retryable
 *   -ETIMEDOUT     connect or total timeout                   retryable
 *   -EPROTO        TLS certificate not trusted or unusable    not retryable
 *   -EMSGSIZE      answer larger than body_max                not retryable
 *   -EINVAL        unsupported URL (not https)                not retryable
 *   -ECANCELED     http_cancel or http_interrupt was called   not retryable
 *   -ENOMEM, -EIO
 * and a one-line reason in why (curl's own words, never a header or a body).
 */
int http_perform(struct http_conn *c, const struct http_request *rq, struct http_response *ret,
		 char why[HTTP_WHY_MAX]);

/* Close every idle connection and the TLS session cache (new connections start a new one);
 * a connection in use is closed when it is given back. Safe while other threads make calls. */
void http_forget(struct http *h);

/* From now on every transfer of h, those under way included, ends at once with -ECANCELED.
 * For a daemon shutting down: nothing waits out a timeout for an answer nobody needs. */
void http_cancel(struct http *h);
bool http_cancelled(const struct http *h);

/* End every transfer under way now with -ECANCELED, and every later attempt of a connection
 * taken before this call; connections taken afterwards work as usual. For a lock that must not
 * wait for a stalled key service. */
void http_interrupt(struct http *h);

/* http_interrupt (or http_cancel) was called since c was taken: its call should give up. */
bool http_conn_interrupted(const struct http_conn *c);

#endif
