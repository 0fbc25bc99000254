/* kms_keyprotect.c: the IBM Key Protect backend: IAM tokens, wrap/unwrap/metadata calls, retries, errno mapping */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <sodium.h>

#include "keyfs-config.h"
#include "keyfs/kms.h"
#include "keyfs/log.h"
#include "keyfs/util.h"
#include "http.h"
#include "kms-backend.h"
#include "kms-keyprotect.h"

/*
 * The wire protocol is shared/keyprotect-api.md. The blob stored in a file header is the
 * service's ciphertext string itself (base64 ASCII, opaque): it goes back verbatim on unwrap.
 *
 * Errors (kms.h), chosen here:
 *   IAM refuses the API key (400/401/403), KMS 401 after one fresh token, KMS 403  -EACCES
 *   404 on wrap/unwrap (purged, or never created), 410                             -EKEYREVOKED
 *   409 KEY_ACTION_INVALID_STATE_ERR                 -ENOKEY, or -EKEYEXPIRED when a wrap meets
 *                                                    a deactivated key (asked by one metadata call)
 *   400/422 on unwrap                                                               -EBADMSG
 *   no connection, broken connection, untrusted TLS certificate                     -EHOSTUNREACH
 *   timeout                                                                         -ETIMEDOUT
 *   kms_cancel, or kms_interrupt while the call was under way                       -ECANCELED
 *   429/5xx after the retries, malformed or oversized answers, anything else        -EIO
 * An untrusted certificate is "the genuine service cannot be reached": it is not retried.
 */

#define KP_DEFAULT_IAM          "https://iam.cloud.ibm.com"
#define KP_APIKEY_MAX           4096
#define KP_TOKEN_MAX            8192
#define KP_BODY_MAX             (64 * 1024)
#define KP_URL_MAX              1024
#define KP_AAD_STRING_MAX       255
#define KP_RETRY_AFTER_MAX      60      /* seconds */
#define KP_BUSY_RETRIES         10      /* attempts after a 429/503 with Retry-After: the service is pacing us */
#define KP_CUT_MS               1000    /* the window is halved at most this often */
#define KP_GROW_MS              1000    /* and widened by one at most this often */
#define KP_TOKEN_MARGIN         60      /* never use a token this close to its expiration */
#define KP_DETAIL_MAX           160     /* service text quoted in a message */
#define KP_CODE_MAX             63
#define KP_GRANT                "grant_type=urn:ibm:params:oauth:grant-type:apikey&apikey="
#define KP_AUTH_PREFIX          "authorization: Bearer "
#define KP_ACTION_TYPE          "content-type: application/vnd.ibm.kms.key_action+json"

_Static_assert(sizeof(KP_AUTH_PREFIX) + KP_TOKEN_MAX <= HTTP_SCRATCH_SIZE, "token header fits the scratch");
_Static_assert(sizeof(KP_GRANT) + 3 * KP_APIKEY_MAX <= HTTP_SCRATCH_SIZE, "token request fits the scratch");

struct kp_tunables {
	long connect_timeout_ms;
	long timeout_ms;
	unsigned retries;
	long backoff_ms;                /* first backoff; doubles with each retry */
};

/*
 * Everything above tok_lock is immutable after open. tok_lock guards the token cache and is
 * never held across an HTTP call: one thread fetches (tok_refreshing), the others wait on
 * tok_cond and take its result, so a burst of calls costs one token request.
 */
struct kp {
	char endpoint[512];
	char iam_url[600];
	char instance[64];
	char key_id[KMS_KEY_ID_MAX + 1];
	char instance_header[96];
	char apikey_path[PATH_MAX];     /* absolute: read at each token fetch, never kept in memory */
	bool apikey_credential;         /* the path is $CREDENTIALS_DIRECTORY/apikey */
	struct kp_tunables tun;
	struct http *http;

	pthread_mutex_t tok_lock;
	pthread_cond_t tok_cond;
	char *token;                    /* sodium_malloc, KP_TOKEN_MAX + 1 */
	size_t token_len;
	bool tok_ok;
	bool tok_refreshing;
	uint64_t tok_gen;               /* bumped with each token stored */
	uint64_t tok_epoch;             /* bumped with each fetch that ended, well or not */
	time_t tok_refresh_at;          /* CLOCK_MONOTONIC seconds: 80 % of expires_in */
	time_t tok_use_until;           /* wall clock: expiration - KP_TOKEN_MARGIN */
	int tok_fail;                   /* errno of the last fetch, 0 when it worked */
	char tok_fail_msg[KMS_ERR_MAX];
	/* After kms_forget (a lock) no token is cached and no connection is kept, until a wrap or
	 * unwrap begun after the forget succeeds: keyfs makes those only while unlocked. */
	bool tok_nocache;
	uint64_t forget_gen;            /* bumped by each forget */

	/*
	 * The gate: how many wraps and unwraps may be under way at once. gate_limit is an AIMD
	 * window below gate_max: a 429 or 503 halves it (once per KP_CUT_MS, since calls in flight
	 * together fail together); one that comes when the window is down to 1 also holds every
	 * new call until its Retry-After has passed (the refused call itself always waits it out,
	 * without holding a slot). gate_limit calls that worked, and KP_GROW_MS, widen it by one.
	 * Polls (metadata reads) do not pass the gate: a busy service must not make a key state
	 * answer wait behind a queue of wraps. Calls made ahead of need (the DEK pool, prefetch)
	 * leave KMS_WAITED_SLOTS of the window (a quarter of a smaller one) to calls someone waits for.
	 * gate_lock is a leaf, never held across an HTTP call.
	 */
	pthread_mutex_t gate_lock;
	pthread_cond_t gate_cond;       /* gate_lock: a slot freed, the pause ended, an interrupt */
	unsigned gate_max;              /* gate_lock */
	unsigned gate_limit;            /* gate_lock: 1..gate_max */
	unsigned gate_used;             /* gate_lock: calls holding a slot */
	unsigned gate_ok;               /* gate_lock: calls that worked since the last widening */
	int64_t gate_pause_until;       /* gate_lock: CLOCK_MONOTONIC ms, new calls wait until then */
	int64_t gate_cut_at;            /* gate_lock: when the window was last halved */
	int64_t gate_grown_at;          /* gate_lock: when it last changed */
	uint64_t gate_epoch;            /* gate_lock: bumped by interrupt and cancel */
	bool gate_cancelled;            /* gate_lock */
	bool gate_busy_logged;          /* gate_lock: "asks to slow down" said, until the window is whole again */
};

/* One logical call: one correlation id across its retries and its token fetch. */
struct kp_call {
	struct kp *kp;
	struct http_conn *conn;
	const char *op;                 /* "wrap", "unwrap", "metadata read" */
	char cid[37];
	unsigned attempts;
	uint64_t token_gen;
	uint64_t forget_gen;            /* kp->forget_gen when the call began */
	bool nocache;                   /* kp->tok_nocache when the call began */
	bool gated;                     /* holds a slot of the gate (wrap, unwrap) */
};

struct kp_detail {
	char code[KP_CODE_MAX + 1];
	char msg[KP_DETAIL_MAX + 1];
};

/* ---- small helpers ---- */

static bool b64_char(char ch)
{
	return (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '+' ||
	       ch == '/' || ch == '=';
}

static bool b64_string_ok(const char *s, size_t len, size_t max)
{
	if (len == 0 || len > max)
		return false;
	for (size_t i = 0; i < len; i++)
		if (!b64_char(s[i]))
			return false;
	return true;
}

static bool printable_ok(const char *s, size_t max)
{
	size_t n = strlen(s);

	if (n > max)
		return false;
	for (size_t i = 0; i < n; i++)
		if (s[i] < 0x21 || s[i] > 0x7e)
			return false;
	return true;
}

static bool ident_ok(const char *s, size_t max)
{
	size_t n = strlen(s);

	if (n == 0 || n > max)
		return false;
	for (size_t i = 0; i < n; i++) {
		char ch = s[i];

		if (!((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '-' ||
		      ch == '_'))
			return false;
	}
	return true;
}

/* An https base URL we append paths to: no query, fragment, space, quote or control byte. */
static int base_url(const char *in, char *out, size_t size, const char *what, struct kms_err *err)
{
	size_t n = strlen(in);

	while (n > 0 && in[n - 1] == '/')
		n--;
	if (n <= sizeof("https://") - 1 || strncmp(in, "https://", sizeof("https://") - 1) != 0) {
		kms_err_set(err, "key protect: %s '%s' is not an https:// URL", what, in);
		return -EINVAL;
	}
	if (n >= size) {
		kms_err_set(err, "key protect: %s is longer than %zu bytes", what, size - 1);
		return -EINVAL;
	}
	for (size_t i = 0; i < n; i++) {
		char ch = in[i];

		if (ch <= 0x20 || ch >= 0x7f || ch == '?' || ch == '#' || ch == '"' || ch == '\\' || ch == '\'') {
			kms_err_set(err, "key protect: %s '%s' has a character a base URL cannot have", what, in);
			return -EINVAL;
		}
	}
	memcpy(out, in, n);
	out[n] = '\0';
	return 0;
}

/* Sleep between retries, in slices, so that a cancel or an interrupt ends the wait too. */
static void sleep_ms(const struct kp_call *c, long ms)
{
	while (ms > 0 && !http_conn_interrupted(c->conn)) {
		long slice = ms < 50 ? ms : 50;
		struct timespec ts = { .tv_sec = 0, .tv_nsec = slice * 1000000L };

		while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
			;
		ms -= slice;
	}
}

static time_t mono_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec;
}

/* Copy service text for a message: printable ASCII only, bounded, and never the API key
 * (given while it is in memory, for an IAM answer). */
static void detail_copy(const char *apikey, size_t apikey_len, char *out, size_t size, const char *in)
{
	size_t j = 0;

	for (size_t i = 0; in[i] && j + 1 < size; i++)
		out[j++] = (in[i] >= 0x20 && in[i] < 0x7f) ? in[i] : '?';
	out[j] = '\0';
	if (apikey_len > 0 && memmem(out, j, apikey, apikey_len))
		snprintf(out, size, "(details withheld: they quote the API key)");
}

/* Pull a reason code and message out of a KMS error collection or an IAM error object. */
static void error_detail(const char *apikey, size_t apikey_len, const struct http_response *resp,
			 struct kp_detail *d)
{
	const cJSON *res, *reasons, *v;
	cJSON *root;

	d->code[0] = '\0';
	d->msg[0] = '\0';
	root = cJSON_ParseWithLength(resp->body, resp->len);
	if (!root)
		return;
	res = cJSON_GetObjectItemCaseSensitive(root, "resources");
	if (cJSON_IsArray(res) && cJSON_IsObject(res->child)) {
		const cJSON *r0 = res->child;

		v = cJSON_GetObjectItemCaseSensitive(r0, "errorMsg");
		if (cJSON_IsString(v))
			detail_copy(apikey, apikey_len, d->msg, sizeof(d->msg), v->valuestring);
		reasons = cJSON_GetObjectItemCaseSensitive(r0, "reasons");
		if (cJSON_IsArray(reasons) && cJSON_IsObject(reasons->child)) {
			v = cJSON_GetObjectItemCaseSensitive(reasons->child, "code");
			if (cJSON_IsString(v) && ident_ok(v->valuestring, KP_CODE_MAX))
				snprintf(d->code, sizeof(d->code), "%s", v->valuestring);
		}
	} else {
		v = cJSON_GetObjectItemCaseSensitive(root, "errorCode");
		if (cJSON_IsString(v) && ident_ok(v->valuestring, KP_CODE_MAX))
			snprintf(d->code, sizeof(d->code), "%s", v->valuestring);
		v = cJSON_GetObjectItemCaseSensitive(root, "errorMessage");
		if (!cJSON_IsString(v))
			v = cJSON_GetObjectItemCaseSensitive(root, "message");
		if (cJSON_IsString(v))
			detail_copy(apikey, apikey_len, d->msg, sizeof(d->msg), v->valuestring);
	}
	cJSON_Delete(root);
}

/* "key protect: <op> of key '<id>' failed[ after N attempts]: <what> (correlation-id <cid>)" */
static void call_fail(const struct kp_call *c, struct kms_err *err, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void call_fail(const struct kp_call *c, struct kms_err *err, const char *fmt, ...)
{
	char what[KMS_ERR_MAX], head[KMS_ERR_MAX], tail[64], after[32] = "";
	size_t room;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(what, sizeof(what), fmt, ap);
	va_end(ap);
	if (c->attempts > 1)
		snprintf(after, sizeof(after), " after %u attempts", c->attempts);
	snprintf(head, sizeof(head), "key protect: %s of key '%s' failed%s: ", c->op, c->kp->key_id, after);
	snprintf(tail, sizeof(tail), " (correlation-id %s)", c->cid);
	/* Shorten the middle, never the correlation id: it is what the service's support asks for. */
	room = KMS_ERR_MAX - 1 - strlen(tail);
	room = strlen(head) < room ? room - strlen(head) : 0;
	if (strlen(what) > room && room >= 4)
		memcpy(what + room - 3, "...", 4);
	else if (strlen(what) > room)
		what[room] = '\0';
	kms_err_set(err, "%.*s%s%s", (int)(KMS_ERR_MAX - 1 - strlen(tail)), head, what, tail);
}

/* ---- the retry loop ---- */

static bool retryable_status(long s)
{
	return s == 429 || (s >= 500 && s <= 599 && s != 501);
}

static bool retryable_transport(int r)
{
	return r == -EHOSTUNREACH || r == -ECONNRESET || r == -ETIMEDOUT;
}

static long retry_delay_ms(const struct kp *kp, unsigned retry, const struct http_response *resp, bool answered)
{
	long ms;

	if (answered && (resp->status == 429 || resp->status == 503) && resp->retry_after >= 0)
		return (resp->retry_after > KP_RETRY_AFTER_MAX ? KP_RETRY_AFTER_MAX : resp->retry_after) * 1000L;
	ms = kp->tun.backoff_ms << retry;
	/* Up to 10 % jitter, so that many clients failing together do not retry together. */
	if (ms >= 10)
		ms += (long)randombytes_uniform((uint32_t)(ms / 10 + 1));
	return ms;
}

static int token_header(struct kp_call *c, struct kms_err *err);
static void token_invalidate(struct kp *kp, uint64_t gen);

/* ---- the gate: calls in flight, AIMD on 429/503 ---- */

static int64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Slots a call made ahead of need may take: all but KMS_WAITED_SLOTS, or a quarter of a smaller
 * window (kms_thread_ahead). */
static unsigned gate_ahead_limit(const struct kp *kp)
{
	unsigned keep = kp->gate_limit / 4 < KMS_WAITED_SLOTS ? kp->gate_limit / 4 : KMS_WAITED_SLOTS;

	return kp->gate_limit - keep;
}

/* Wait for a slot. Returns 0, or -ECANCELED when interrupted or cancelled meanwhile. */
static int gate_enter(struct kp *kp)
{
	bool ahead = kms_thread_is_ahead();
	uint64_t epoch;
	int64_t now;

	pthread_mutex_lock(&kp->gate_lock);
	epoch = kp->gate_epoch;
	for (;;) {
		if (kp->gate_cancelled || kp->gate_epoch != epoch) {
			pthread_mutex_unlock(&kp->gate_lock);
			return -ECANCELED;
		}
		now = mono_ms();
		if (now < kp->gate_pause_until) {
			int64_t until = kp->gate_pause_until;
			struct timespec ts;

			clock_gettime(CLOCK_MONOTONIC, &ts);
			ts.tv_sec += (until - now) / 1000;
			ts.tv_nsec += ((until - now) % 1000) * 1000000L;
			if (ts.tv_nsec >= 1000000000L) {
				ts.tv_sec++;
				ts.tv_nsec -= 1000000000L;
			}
			pthread_cond_timedwait(&kp->gate_cond, &kp->gate_lock, &ts);
			continue;
		}
		if (kp->gate_used < (ahead ? gate_ahead_limit(kp) : kp->gate_limit))
			break;
		pthread_cond_wait(&kp->gate_cond, &kp->gate_lock);
	}
	kp->gate_used++;
	pthread_mutex_unlock(&kp->gate_lock);
	return 0;
}

static void gate_leave(struct kp *kp)
{
	pthread_mutex_lock(&kp->gate_lock);
	kp->gate_used--;
	/* Every waiter: one made ahead of need may not take the slot, one waited for may. */
	pthread_cond_broadcast(&kp->gate_cond);
	pthread_mutex_unlock(&kp->gate_lock);
}

/* What one attempt of a gated call was answered: a 429/503 narrows the window and may pause
 * every new call; a success widens it again, one slot per window of successes. */
static void gate_note(struct kp *kp, long status, long retry_after)
{
	int64_t now;

	pthread_mutex_lock(&kp->gate_lock);
	if (status == 429 || status == 503) {
		now = mono_ms();
		if (kp->gate_limit == 1 && retry_after >= 0) {
			/* One call at a time is still too many: the whole client waits as asked. */
			int64_t until = now + (retry_after > KP_RETRY_AFTER_MAX ? KP_RETRY_AFTER_MAX : retry_after) * 1000;

			if (until > kp->gate_pause_until)
				kp->gate_pause_until = until;
		}
		if (now - kp->gate_cut_at >= KP_CUT_MS) {
			kp->gate_cut_at = kp->gate_grown_at = now;
			kp->gate_limit = (kp->gate_limit + 1) / 2;
			kp->gate_ok = 0;
			if (!kp->gate_busy_logged) {
				kp->gate_busy_logged = true;
				log_info("key protect: the service asks to slow down (HTTP %ld): at most %u wraps and unwraps at once until it keeps up",
					 status, kp->gate_limit);
			}
		}
	} else if (status >= 200 && status < 300 && kp->gate_limit < kp->gate_max) {
		now = mono_ms();
		if (++kp->gate_ok >= kp->gate_limit && now - kp->gate_grown_at >= KP_GROW_MS) {
			kp->gate_ok = 0;
			kp->gate_grown_at = now;
			kp->gate_limit++;
			pthread_cond_broadcast(&kp->gate_cond);
			if (kp->gate_limit == kp->gate_max && kp->gate_busy_logged) {
				kp->gate_busy_logged = false;
				log_info("key protect: the service keeps up again: %u wraps and unwraps at once", kp->gate_max);
			}
		}
	}
	pthread_mutex_unlock(&kp->gate_lock);
}

static void gate_wake(struct kp *kp, bool cancel)
{
	pthread_mutex_lock(&kp->gate_lock);
	kp->gate_epoch++;
	if (cancel)
		kp->gate_cancelled = true;
	pthread_cond_broadcast(&kp->gate_cond);
	pthread_mutex_unlock(&kp->gate_lock);
}

static void kp_set_concurrency(void *state, unsigned n)
{
	struct kp *kp = state;

	pthread_mutex_lock(&kp->gate_lock);
	kp->gate_max = n;
	kp->gate_limit = n;
	kp->gate_ok = 0;
	pthread_cond_broadcast(&kp->gate_cond);
	pthread_mutex_unlock(&kp->gate_lock);
	/* One idle connection per call in flight, and two more for polls and probes. */
	http_set_idle_max(kp->http, n + 2);
}

/*
 * Send one request with the retry policy of shared/keyprotect-api.md. kms: add the bearer
 * token and instance headers, and on a 401 fetch a fresh token once and send again. Returns 0
 * with the last answer in *resp (any status; 429/5xx only once the retries are spent), or
 * -errno with the message written.
 */
static int kp_send(struct kp_call *c, const char *method, const char *url, const char *site, bool kms,
		   bool action, const char *body, size_t body_len, struct http_response *resp, struct kms_err *err)
{
	struct kp *kp = c->kp;
	char cid_header[64], why[HTTP_WHY_MAX];
	const char *headers[8];
	struct http_request rq;
	unsigned retry = 0;
	bool refreshed = false;
	int r;

	snprintf(cid_header, sizeof(cid_header), "correlation-id: %s", c->cid);
	c->attempts = 0;
	for (;;) {
		size_t n = 0;

		if (kms) {
			r = token_header(c, err);
			if (r < 0)
				return r;
			headers[n++] = http_conn_scratch(c->conn);
			headers[n++] = kp->instance_header;
			if (action)
				headers[n++] = KP_ACTION_TYPE;
		} else {
			headers[n++] = "content-type: application/x-www-form-urlencoded";
		}
		headers[n++] = "accept: application/json";
		headers[n++] = cid_header;
		headers[n++] = "expect:";
		rq = (struct http_request){ .method = method, .url = url, .headers = headers, .nheaders = n,
					    .body = body, .body_len = body_len };
		c->attempts++;
		r = http_perform(c->conn, &rq, resp, why);
		if (kms)
			sodium_memzero(http_conn_scratch(c->conn), sizeof(KP_AUTH_PREFIX) + KP_TOKEN_MAX);
		/* The gate paces the key service; IAM's answers (a token fetch made for a wrap) do not
		 * move it. */
		if (r == 0 && c->gated && kms)
			gate_note(kp, resp->status, resp->retry_after);
		if (r == 0 && resp->status == 401 && kms && !refreshed) {
			/* The token may have been revoked or expired early: one fresh token, one more try. */
			token_invalidate(kp, c->token_gen);
			refreshed = true;
			continue;
		}
		if (!(r == 0 ? retryable_status(resp->status) : retryable_transport(r)))
			break;
		/* A service that paces us (429/503 with Retry-After) is not failing: it gets more
		 * patience than one that breaks. A 429 is never a key state answer (LOCKING.md). */
		if (retry >= (r == 0 && (resp->status == 429 || resp->status == 503) && resp->retry_after >= 0
			      ? KP_BUSY_RETRIES : kp->tun.retries))
			break;
		if (c->gated && kms) {
			/* A refused or failed call waits without holding a slot: the others may go on.
			 * Not a token fetch: calls holding slots wait for the token it brings (and so
			 * does the poller), so giving up its slot could leave it without one, for good. */
			gate_leave(kp);
			c->gated = false;
			sleep_ms(c, retry_delay_ms(kp, retry, resp, r == 0));
			if (gate_enter(kp) < 0) {
				call_fail(c, err, "call to '%s' %s", site,
					  http_cancelled(kp->http) ? "cancelled: shutting down" : "interrupted");
				return -ECANCELED;
			}
			c->gated = true;
		} else {
			sleep_ms(c, retry_delay_ms(kp, retry, resp, r == 0));
		}
		retry++;
	}
	if (r == 0)
		return 0;
	switch (r) {
	case -EHOSTUNREACH:
	case -ECONNRESET:
		call_fail(c, err, "cannot reach '%s': %s", site, why);
		return -EHOSTUNREACH;
	case -ETIMEDOUT:
		call_fail(c, err, "no answer from '%s' in time: %s", site, why);
		return -ETIMEDOUT;
	case -EPROTO:
		call_fail(c, err, "TLS certificate of '%s' is not trusted: %s (give the CA file when the service uses a private CA)",
			  site, why);
		return -EHOSTUNREACH;
	case -EMSGSIZE:
		call_fail(c, err, "'%s' sent a %s", site, why);
		return -EIO;
	case -EINVAL:
		call_fail(c, err, "bad URL for '%s': %s", site, why);
		return -EINVAL;
	case -ENOMEM:
		call_fail(c, err, "out of memory");
		return -ENOMEM;
	case -ECANCELED:
		call_fail(c, err, "call to '%s' %s", site, http_cancelled(kp->http) ? "cancelled: shutting down" : "interrupted");
		return -ECANCELED;
	default:
		call_fail(c, err, "talking to '%s' failed: %s", site, why);
		return -EIO;
	}
}

/* ---- IAM tokens ---- */

static bool token_fresh(const struct kp *kp)
{
	return kp->tok_ok && mono_now() < kp->tok_refresh_at && time(NULL) < kp->tok_use_until;
}

static void token_invalidate(struct kp *kp, uint64_t gen)
{
	pthread_mutex_lock(&kp->tok_lock);
	if (kp->tok_gen == gen)
		kp->tok_ok = false;
	pthread_mutex_unlock(&kp->tok_lock);
}

static void header_from_token(struct kp_call *c, const char *tok, size_t len)
{
	char *hdr = http_conn_scratch(c->conn);

	memcpy(hdr, KP_AUTH_PREFIX, sizeof(KP_AUTH_PREFIX) - 1);
	memcpy(hdr + sizeof(KP_AUTH_PREFIX) - 1, tok, len);
	hdr[sizeof(KP_AUTH_PREFIX) - 1 + len] = '\0';
}

static size_t form_encode(const char *in, size_t len, char *out)
{
	static const char hex[] = "0123456789ABCDEF";
	size_t j = 0;

	for (size_t i = 0; i < len; i++) {
		unsigned char ch = (unsigned char)in[i];

		if ((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '-' ||
		    ch == '_' || ch == '.' || ch == '~') {
			out[j++] = (char)ch;
		} else {
			out[j++] = '%';
			out[j++] = hex[ch >> 4];
			out[j++] = hex[ch & 15];
		}
	}
	out[j] = '\0';
	return j;
}

static int apikey_load(const struct kp *kp, char *buf, size_t *ret_len, struct kms_err *err);

/* POST {iam}/identity/token; on success store the token (unless kms_forget said not to) and
 * put its header in the scratch. The API key is read from its file for this request only. */
static int token_fetch(struct kp_call *c, struct kms_err *err)
{
	struct kp *kp = c->kp;
	char *form = http_conn_scratch(c->conn);
	char *apikey;
	struct http_response resp;
	struct kp_detail d;
	const cJSON *tok, *exp_in, *exp_at, *type;
	cJSON *root = NULL;
	size_t n, toklen, apikey_len = 0;
	time_t now_wall, now_mono, lifetime, expiration;
	bool has_in, has_at;
	int r;

	apikey = sodium_malloc(KP_APIKEY_MAX + 1);
	if (!apikey) {
		call_fail(c, err, "out of locked memory for the API key");
		return -ENOMEM;
	}
	r = apikey_load(kp, apikey, &apikey_len, err);
	if (r < 0)
		goto out;
	memcpy(form, KP_GRANT, sizeof(KP_GRANT) - 1);
	n = sizeof(KP_GRANT) - 1 + form_encode(apikey, apikey_len, form + sizeof(KP_GRANT) - 1);
	r = kp_send(c, "POST", kp->iam_url, kp->iam_url, false, false, form, n, &resp, err);
	sodium_memzero(form, n);
	if (r < 0)
		goto out;
	if (resp.status != 200) {
		error_detail(apikey, apikey_len, &resp, &d);
		if (resp.status == 400 || resp.status == 401 || resp.status == 403) {
			call_fail(c, err, "IAM '%s' refused the API key: HTTP %ld%s%s: %s", kp->iam_url, resp.status,
				  d.code[0] ? " " : "", d.code, d.msg[0] ? d.msg : "no details");
			r = -EACCES;
			goto out;
		}
		call_fail(c, err, "IAM '%s' gave no token: HTTP %ld%s%s: %s", kp->iam_url, resp.status,
			  d.code[0] ? " " : "", d.code, d.msg[0] ? d.msg : "no details");
		r = -EIO;
		goto out;
	}
	root = cJSON_ParseWithLength(resp.body, resp.len);
	tok = cJSON_GetObjectItemCaseSensitive(root, "access_token");
	exp_in = cJSON_GetObjectItemCaseSensitive(root, "expires_in");
	exp_at = cJSON_GetObjectItemCaseSensitive(root, "expiration");
	type = cJSON_GetObjectItemCaseSensitive(root, "token_type");
	has_in = cJSON_IsNumber(exp_in) && exp_in->valuedouble > 0 && exp_in->valuedouble < 1e9;
	has_at = cJSON_IsNumber(exp_at) && exp_at->valuedouble > 0 && exp_at->valuedouble < 1e12;
	if (!root || !cJSON_IsString(tok) || (!has_in && !has_at) ||
	    (type && (!cJSON_IsString(type) || strcasecmp(type->valuestring, "Bearer") != 0))) {
		call_fail(c, err, "IAM '%s' answered HTTP 200 without a usable bearer token", kp->iam_url);
		r = -EIO;
		goto out;
	}
	toklen = strlen(tok->valuestring);
	if (toklen == 0 || !printable_ok(tok->valuestring, KP_TOKEN_MAX)) {
		call_fail(c, err, "IAM '%s' answered with a malformed or oversized token", kp->iam_url);
		r = -EIO;
		goto out;
	}
	now_wall = time(NULL);
	now_mono = mono_now();
	expiration = has_at ? (time_t)exp_at->valuedouble : now_wall + (time_t)exp_in->valuedouble;
	lifetime = has_in ? (time_t)exp_in->valuedouble : expiration - now_wall;
	pthread_mutex_lock(&kp->tok_lock);
	if (!kp->tok_nocache) {
		memcpy(kp->token, tok->valuestring, toklen + 1);
		kp->token_len = toklen;
		kp->tok_ok = true;
		kp->tok_gen++;
		kp->tok_refresh_at = now_mono + (lifetime > 0 ? lifetime * 8 / 10 : 0);
		kp->tok_use_until = expiration - KP_TOKEN_MARGIN;
	}
	c->token_gen = kp->tok_gen;
	pthread_mutex_unlock(&kp->tok_lock);
	/* This call uses the token even if it is short-lived; the cache keeps it only while fresh. */
	header_from_token(c, tok->valuestring, toklen);
	r = 0;
out:
	cJSON_Delete(root);
	sodium_memzero(apikey, KP_APIKEY_MAX + 1);
	sodium_free(apikey);
	return r;
}

/* Put "authorization: Bearer <token>" in the call's scratch: cached, or fetched once for everyone. */
static int token_header(struct kp_call *c, struct kms_err *err)
{
	struct kp *kp = c->kp;
	uint64_t epoch;
	unsigned attempts;
	int r;

	pthread_mutex_lock(&kp->tok_lock);
	epoch = kp->tok_epoch;
	for (;;) {
		if (http_conn_interrupted(c->conn)) {
			pthread_mutex_unlock(&kp->tok_lock);
			kms_err_set(err, "key protect: call %s", http_cancelled(kp->http) ? "cancelled: shutting down" : "interrupted");
			return -ECANCELED;
		}
		if (token_fresh(kp)) {
			header_from_token(c, kp->token, kp->token_len);
			c->token_gen = kp->tok_gen;
			pthread_mutex_unlock(&kp->tok_lock);
			return 0;
		}
		/* A fetch we waited for failed: report it rather than asking IAM again at once. */
		if (kp->tok_epoch != epoch && kp->tok_fail) {
			r = kp->tok_fail;
			kms_err_set(err, "%s", kp->tok_fail_msg);
			pthread_mutex_unlock(&kp->tok_lock);
			return r;
		}
		if (!kp->tok_refreshing)
			break;
		pthread_cond_wait(&kp->tok_cond, &kp->tok_lock);
	}
	kp->tok_refreshing = true;
	pthread_mutex_unlock(&kp->tok_lock);

	/* The fetch counts its own attempts; the caller's count is about the KMS request. */
	attempts = c->attempts;
	r = token_fetch(c, err);
	c->attempts = attempts;

	pthread_mutex_lock(&kp->tok_lock);
	kp->tok_refreshing = false;
	kp->tok_epoch++;
	kp->tok_fail = r;
	if (r < 0)
		snprintf(kp->tok_fail_msg, sizeof(kp->tok_fail_msg), "%s", err->msg);
	pthread_cond_broadcast(&kp->tok_cond);
	pthread_mutex_unlock(&kp->tok_lock);
	return r;
}

/* ---- calls ---- */

static int call_begin(struct kp *kp, struct kp_call *c, const char *op, struct kms_err *err)
{
	int r;

	memset(c, 0, sizeof(*c));
	c->kp = kp;
	c->op = op;
	util_uuid4(c->cid);
	pthread_mutex_lock(&kp->tok_lock);
	c->forget_gen = kp->forget_gen;
	c->nocache = kp->tok_nocache;
	pthread_mutex_unlock(&kp->tok_lock);
	r = http_conn_get(kp->http, &c->conn);
	if (r < 0) {
		kms_err_set(err, "key protect: %s of key '%s' failed: out of memory", op, kp->key_id);
		return r;
	}
	return 0;
}

static void call_end(struct kp_call *c)
{
	http_conn_put(c->kp->http, c->conn);
	c->conn = NULL;
	if (c->gated) {
		c->gated = false;
		gate_leave(c->kp);
	}
	/* Forgotten (locked): this call's connection, buffers and TLS session go now. */
	if (c->nocache)
		http_forget(c->kp->http);
}

/* A wrap or unwrap worked: the mount is unlocked, tokens may be cached again. */
static void call_worked(struct kp_call *c)
{
	struct kp *kp = c->kp;

	pthread_mutex_lock(&kp->tok_lock);
	if (kp->forget_gen == c->forget_gen)
		kp->tok_nocache = false;
	pthread_mutex_unlock(&kp->tok_lock);
}

static int key_url(const struct kp *kp, const char *suffix, char url[KP_URL_MAX])
{
	int n = snprintf(url, KP_URL_MAX, "%s/api/v2/keys/%s%s", kp->endpoint, kp->key_id, suffix);

	return n < 0 || n >= KP_URL_MAX ? -ENAMETOOLONG : 0;
}

/* An error answer to errno and message. The metadata call handles 404 and 410 itself. */
static int status_error(struct kp_call *c, const struct http_response *resp, bool unwrap, struct kms_err *err)
{
	struct kp_detail d;
	const char *hint = NULL;
	int r;

	error_detail(NULL, 0, resp, &d);
	switch (resp->status) {
	case 401:
	case 403:
		hint = "access denied: the API key's service ID has no access to this key";
		r = -EACCES;
		break;
	case 404:
		hint = "key not found: purged, or never created";
		r = -EKEYREVOKED;
		break;
	case 409:
		if (strcmp(d.code, "KEY_ACTION_INVALID_STATE_ERR") == 0) {
			hint = "the key is suspended or not active";
			r = -ENOKEY;
		} else {
			r = -EIO;
		}
		break;
	case 410:
		hint = "the key is destroyed";
		r = -EKEYREVOKED;
		break;
	case 400:
	case 422:
		if (unwrap) {
			hint = "the wrapped key does not unwrap with this key and associated data (another volume, file or key, or damaged)";
			r = -EBADMSG;
		} else {
			r = -EINVAL;
		}
		break;
	default:
		r = -EIO;
		break;
	}
	if (resp->status >= 300 && resp->status < 400)
		hint = "unexpected redirect (not followed)";
	/* Not in the documentation we have, but unambiguous wherever it comes. */
	if (strcmp(d.code, "KEY_EXPIRED_ERR") == 0) {
		hint = "the key is deactivated (past its expiration date)";
		r = unwrap ? -ENOKEY : -EKEYEXPIRED;
	}
	call_fail(c, err, "HTTP %ld%s%s: %s", resp->status, d.code[0] ? " " : "", d.code,
		  hint ? hint : d.msg[0] ? d.msg : "no details");
	return r;
}

static cJSON *parse_answer(struct kp_call *c, const struct http_response *resp, struct kms_err *err)
{
	const char *end = NULL;
	cJSON *root = cJSON_ParseWithLengthOpts(resp->body, resp->len, &end, 0);

	if (root) {
		while (end && end < resp->body + resp->len &&
		       (*end == ' ' || *end == '\n' || *end == '\r' || *end == '\t'))
			end++;
		if (!cJSON_IsObject(root) || (end && end != resp->body + resp->len)) {
			cJSON_Delete(root);
			root = NULL;
		}
	}
	if (!root)
		call_fail(c, err, "HTTP %ld with a malformed JSON body (%zu bytes)", resp->status, resp->len);
	return root;
}

/* The state number in a metadata answer: a key collection, or (leniently) a bare key. */
static int parse_state(struct kp_call *c, const struct http_response *resp, int *ret_state, struct kms_err *err)
{
	const cJSON *key, *res, *st, *del;
	cJSON *root;
	int state;

	root = parse_answer(c, resp, err);
	if (!root)
		return -EIO;
	key = root;
	res = cJSON_GetObjectItemCaseSensitive(root, "resources");
	if (res) {
		key = cJSON_IsArray(res) ? res->child : NULL;
		if (!cJSON_IsObject(key))
			key = NULL;
	}
	st = key ? cJSON_GetObjectItemCaseSensitive(key, "state") : NULL;
	if (!cJSON_IsNumber(st) || st->valuedouble != (double)st->valueint || st->valueint < 0 || st->valueint > 5) {
		call_fail(c, err, "HTTP %ld without a key state in its body", resp->status);
		cJSON_Delete(root);
		return -EIO;
	}
	state = st->valueint;
	/* Some documentation has a deleted key sit in state 3 before 5: "deleted" decides. */
	del = cJSON_GetObjectItemCaseSensitive(key, "deleted");
	if (cJSON_IsTrue(del))
		state = KMS_STATE_DESTROYED;
	cJSON_Delete(root);
	*ret_state = state;
	return 0;
}

static int metadata_call(struct kp_call *c, int *ret_state, struct kms_err *err)
{
	struct http_response resp;
	char url[KP_URL_MAX];
	int r;

	r = key_url(c->kp, "/metadata", url);
	if (r < 0) {
		kms_err_set(err, "key protect: URL for key '%s' is too long", c->kp->key_id);
		return r;
	}
	r = kp_send(c, "GET", url, c->kp->endpoint, true, false, NULL, 0, &resp, err);
	if (r < 0)
		return r;
	if (resp.status == 200)
		return parse_state(c, &resp, ret_state, err);
	if (resp.status == 404) {
		*ret_state = KMS_STATE_PURGED;
		return 0;
	}
	if (resp.status == 410) {
		*ret_state = KMS_STATE_DESTROYED;
		return 0;
	}
	return status_error(c, &resp, false, err);
}

/* {"<field>": <value>, "aad": [...]} printed into cJSON-owned (wiped) memory. */
static char *action_body(const char *field, const char *value, const char *const *aad, size_t naad)
{
	cJSON *root = cJSON_CreateObject(), *arr;
	char *out = NULL;

	if (!root)
		return NULL;
	if (!cJSON_AddStringToObject(root, field, value))
		goto out;
	if (naad > 0) {
		arr = cJSON_AddArrayToObject(root, "aad");
		if (!arr)
			goto out;
		for (size_t i = 0; i < naad; i++) {
			cJSON *s = cJSON_CreateString(aad[i]);

			if (!s || !cJSON_AddItemToArray(arr, s)) {
				cJSON_Delete(s);
				goto out;
			}
		}
	}
	out = cJSON_PrintUnformatted(root);
out:
	cJSON_Delete(root);
	return out;
}

static int check_aad(const struct kp *kp, const char *const *aad, size_t naad, struct kms_err *err)
{
	for (size_t i = 0; i < naad; i++) {
		if (strlen(aad[i]) > KP_AAD_STRING_MAX) {
			kms_err_set(err, "key protect: associated data string %zu is longer than %d bytes", i,
				    KP_AAD_STRING_MAX);
			return -EINVAL;
		}
	}
	(void)kp;
	return 0;
}

/* A ciphertext string from the service into a kms_wrapped; false when it is not storable. */
static bool wrapped_from(const cJSON *ct, const cJSON *version_obj, struct kms_wrapped *out)
{
	const cJSON *vid;
	size_t len;

	if (!cJSON_IsString(ct))
		return false;
	len = strlen(ct->valuestring);
	if (!b64_string_ok(ct->valuestring, len, KMS_WRAPPED_MAX))
		return false;
	memset(out, 0, sizeof(*out));
	memcpy(out->blob, ct->valuestring, len);
	out->len = len;
	vid = cJSON_IsObject(version_obj) ? cJSON_GetObjectItemCaseSensitive(version_obj, "id") : NULL;
	if (vid) {
		if (!cJSON_IsString(vid) || !printable_ok(vid->valuestring, KMS_KEY_VERSION_MAX))
			return false;
		snprintf(out->key_version, sizeof(out->key_version), "%s", vid->valuestring);
	}
	return true;
}

/*
 * POST one key action ("wrap", "unwrap") with the body {field: value, "aad": [...]}. On success
 * the call is begun (the caller ends it with call_end) and resp holds the answer. The body, which
 * may hold a DEK, is freed before returning: cJSON's hooks wipe it.
 */
static int action_post(struct kp *kp, struct kp_call *c, const char *action, const char *field, const char *value,
		       const char *const *aad, size_t naad, struct http_response *resp, struct kms_err *err)
{
	char url[KP_URL_MAX], suffix[32];
	char *body;
	int r;

	snprintf(suffix, sizeof(suffix), "/actions/%s", action);
	if (key_url(kp, suffix, url) < 0) {
		kms_err_set(err, "key protect: URL for key '%s' is too long", kp->key_id);
		return -ENAMETOOLONG;
	}
	body = action_body(field, value, aad, naad);
	if (!body) {
		kms_err_set(err, "key protect: %s of key '%s' failed: out of memory", action, kp->key_id);
		return -ENOMEM;
	}
	r = gate_enter(kp);
	if (r < 0) {
		kms_err_set(err, "key protect: %s of key '%s' %s", action, kp->key_id,
			    http_cancelled(kp->http) ? "cancelled: shutting down" : "interrupted");
		cJSON_free(body);
		return r;
	}
	r = call_begin(kp, c, action, err);
	if (r == 0) {
		c->gated = true;
		r = kp_send(c, "POST", url, kp->endpoint, true, true, body, strlen(body), resp, err);
		if (r < 0)
			call_end(c);
	} else {
		gate_leave(kp);
	}
	cJSON_free(body);
	return r < 0 ? r : 0;
}

static int kp_wrap(void *state, const uint8_t dek[KMS_DEK_SIZE], const char *const *aad, size_t naad,
		   struct kms_wrapped *ret, struct kms_err *err)
{
	struct kp *kp = state;
	struct kp_call c;
	struct http_response resp;
	struct kms_wrapped out;
	char b64[sodium_base64_ENCODED_LEN(KMS_DEK_SIZE, sodium_base64_VARIANT_ORIGINAL)];
	cJSON *root = NULL;
	int r, st;

	r = check_aad(kp, aad, naad, err);
	if (r < 0)
		return r;
	sodium_bin2base64(b64, sizeof(b64), dek, KMS_DEK_SIZE, sodium_base64_VARIANT_ORIGINAL);
	r = action_post(kp, &c, "wrap", "plaintext", b64, aad, naad, &resp, err);
	sodium_memzero(b64, sizeof(b64));
	if (r < 0)
		return r;
	if (resp.status != 200 && resp.status != 201) {
		r = status_error(&c, &resp, false, err);
		/* 409 alike for suspended and deactivated keys: the key state tells them apart. */
		if (r == -ENOKEY && resp.status == 409) {
			struct kms_err scratch;
			unsigned attempts = c.attempts;

			if (metadata_call(&c, &st, &scratch) == 0 && st == KMS_STATE_DEACTIVATED) {
				c.attempts = attempts;
				call_fail(&c, err, "HTTP 409 KEY_ACTION_INVALID_STATE_ERR: the key is deactivated (past its expiration date): it unwraps existing keys but wraps no new ones");
				r = -EKEYEXPIRED;
			}
		}
		goto out;
	}
	root = parse_answer(&c, &resp, err);
	if (!root) {
		r = -EIO;
		goto out;
	}
	if (!wrapped_from(cJSON_GetObjectItemCaseSensitive(root, "ciphertext"),
			  cJSON_GetObjectItemCaseSensitive(root, "keyVersion"), &out)) {
		call_fail(&c, err, "HTTP %ld without a usable ciphertext (base64, at most %d bytes) and key version",
			  resp.status, KMS_WRAPPED_MAX);
		r = -EIO;
		goto out;
	}
	*ret = out;
	call_worked(&c);
	r = 0;
out:
	cJSON_Delete(root);
	call_end(&c);
	return r;
}

static int kp_unwrap(void *state, const uint8_t *blob, size_t len, const char *const *aad, size_t naad,
		     uint8_t dek_out[KMS_DEK_SIZE], struct kms_wrapped *rewrapped, bool *ret_was_rewrapped,
		     struct kms_err *err)
{
	struct kp *kp = state;
	struct kp_call c;
	struct http_response resp;
	struct kms_wrapped nw;
	char ct[KMS_WRAPPED_MAX + 1];
	const cJSON *pt, *nct, *nver;
	cJSON *root = NULL;
	size_t declen = 0;
	const char *b64end = NULL;
	bool was = false;
	int r;

	sodium_memzero(dek_out, KMS_DEK_SIZE);
	if (!b64_string_ok((const char *)blob, len, KMS_WRAPPED_MAX)) {
		kms_err_set(err, "wrapped key (%zu bytes) is not a key protect ciphertext", len);
		return -EBADMSG;
	}
	r = check_aad(kp, aad, naad, err);
	if (r < 0)
		return r;
	memcpy(ct, blob, len);
	ct[len] = '\0';
	r = action_post(kp, &c, "unwrap", "ciphertext", ct, aad, naad, &resp, err);
	if (r < 0)
		goto out_ct;
	if (resp.status != 200 && resp.status != 201) {
		r = status_error(&c, &resp, true, err);
		goto out;
	}
	root = parse_answer(&c, &resp, err);
	if (!root) {
		r = -EIO;
		goto out;
	}
	pt = cJSON_GetObjectItemCaseSensitive(root, "plaintext");
	if (!cJSON_IsString(pt) ||
	    sodium_base642bin(dek_out, KMS_DEK_SIZE, pt->valuestring, strlen(pt->valuestring), NULL, &declen, &b64end,
			      sodium_base64_VARIANT_ORIGINAL) != 0 ||
	    declen != KMS_DEK_SIZE || !b64end || *b64end != '\0') {
		sodium_memzero(dek_out, KMS_DEK_SIZE);
		call_fail(&c, err, "HTTP %ld without a %d-byte base64 plaintext", resp.status, KMS_DEK_SIZE);
		r = -EIO;
		goto out;
	}
	/* After a rotation the service also returns the DEK wrapped with the newest version. */
	nct = cJSON_GetObjectItemCaseSensitive(root, "ciphertext");
	nver = cJSON_GetObjectItemCaseSensitive(root, "rewrappedKeyVersion");
	if (rewrapped && nct && cJSON_IsObject(nver)) {
		if (wrapped_from(nct, nver, &nw)) {
			*rewrapped = nw;
			was = true;
		} else {
			log_warn("key protect: unwrap of key '%s' returned a re-wrapped key that cannot be stored: ignored (correlation-id %s)",
				 kp->key_id, c.cid);
		}
	}
	if (ret_was_rewrapped)
		*ret_was_rewrapped = was;
	call_worked(&c);
	r = 0;
out:
	cJSON_Delete(root);
	call_end(&c);
out_ct:
	sodium_memzero(ct, sizeof(ct));
	return r;
}

static int kp_key_state(void *state, int *ret_state, struct kms_err *err)
{
	struct kp *kp = state;
	struct kp_call c;
	int r, st = -1;

	r = call_begin(kp, &c, "metadata read", err);
	if (r < 0)
		return r;
	r = metadata_call(&c, &st, err);
	/* Which answer decided the state: the poller logs it with a lock or unlock. */
	if (r == 0)
		kms_err_set(err, "key protect: key '%s' is %s (correlation-id %s)", kp->key_id, kms_state_name(st),
			    c.cid);
	call_end(&c);
	if (r < 0)
		return r;
	*ret_state = st;
	return 0;
}

/* A string member of key that fits size and is printable; "" when absent. Returns false when bad. */
static bool info_string(const cJSON *key, const char *name, char *out, size_t size)
{
	const cJSON *s = cJSON_GetObjectItemCaseSensitive(key, name);

	out[0] = '\0';
	if (!s)
		return true;
	if (!cJSON_IsString(s) || !printable_ok(s->valuestring, size - 1))
		return false;
	snprintf(out, size, "%s", s->valuestring);
	return true;
}

/* Who the key named at open (id, alias or CRN's id) is: one metadata read. Needs only the
 * Reader role and never carries a payload, unlike GET /api/v2/keys/<id>. */
static int kp_key_info(void *state, struct kms_key_info *ret, struct kms_err *err)
{
	struct kp *kp = state;
	struct http_response resp;
	struct kp_call c;
	const cJSON *key, *res, *aliases, *st, *del;
	cJSON *root = NULL;
	char url[KP_URL_MAX];
	int r;

	if (key_url(kp, "/metadata", url) < 0) {
		kms_err_set(err, "key protect: URL for key '%s' is too long", kp->key_id);
		return -ENAMETOOLONG;
	}
	r = call_begin(kp, &c, "metadata read", err);
	if (r < 0)
		return r;
	r = kp_send(&c, "GET", url, kp->endpoint, true, false, NULL, 0, &resp, err);
	if (r < 0)
		goto out;
	if (resp.status == 404) {
		status_error(&c, &resp, false, err);
		r = -ENOENT;
		goto out;
	}
	if (resp.status != 200) {
		r = status_error(&c, &resp, false, err);
		goto out;
	}
	root = parse_answer(&c, &resp, err);
	if (!root) {
		r = -EIO;
		goto out;
	}
	res = cJSON_GetObjectItemCaseSensitive(root, "resources");
	key = cJSON_IsArray(res) ? res->child : root;
	st = cJSON_IsObject(key) ? cJSON_GetObjectItemCaseSensitive(key, "state") : NULL;
	aliases = cJSON_IsObject(key) ? cJSON_GetObjectItemCaseSensitive(key, "aliases") : NULL;
	if (!cJSON_IsNumber(st) || st->valueint < 0 || st->valueint > 5 ||
	    !info_string(key, "id", ret->id, sizeof(ret->id)) || !ident_ok(ret->id, 128) ||
	    !info_string(key, "crn", ret->crn, sizeof(ret->crn)) ||
	    (ret->crn[0] && strncmp(ret->crn, "crn:", 4) != 0) ||
	    (aliases && !cJSON_IsArray(aliases))) {
		call_fail(&c, err, "HTTP 200 without a key id, CRN and state in its body");
		r = -EIO;
		goto out;
	}
	/* The name is free text: only kept when printable. */
	if (!info_string(key, "name", ret->name, sizeof(ret->name)))
		ret->name[0] = '\0';
	if (aliases && cJSON_IsString(aliases->child) && ident_ok(aliases->child->valuestring, sizeof(ret->alias) - 1))
		snprintf(ret->alias, sizeof(ret->alias), "%s", aliases->child->valuestring);
	ret->state = st->valueint;
	del = cJSON_GetObjectItemCaseSensitive(key, "deleted");
	if (cJSON_IsTrue(del))
		ret->state = KMS_STATE_DESTROYED;
	kms_err_set(err, "key protect: key '%s' is %s (correlation-id %s)", kp->key_id, ret->id, c.cid);
	r = 0;
out:
	cJSON_Delete(root);
	call_end(&c);
	return r;
}

static void kp_free(void *state)
{
	struct kp *kp = state;

	if (!kp)
		return;
	http_free(kp->http);
	if (kp->token) {
		sodium_memzero(kp->token, KP_TOKEN_MAX + 1);
		sodium_free(kp->token);
	}
	pthread_mutex_destroy(&kp->tok_lock);
	pthread_cond_destroy(&kp->tok_cond);
	pthread_mutex_destroy(&kp->gate_lock);
	pthread_cond_destroy(&kp->gate_cond);
	free(kp);
}

static void kp_cancel(void *state)
{
	struct kp *kp = state;

	http_cancel(kp->http);
	gate_wake(kp, true);
	/* A thread waiting for another's token fetch wakes up and finds the cancel. */
	pthread_mutex_lock(&kp->tok_lock);
	pthread_cond_broadcast(&kp->tok_cond);
	pthread_mutex_unlock(&kp->tok_lock);
}

/* A lock: the cached token is wiped and no other is kept; idle connections and the TLS session
 * cache are closed now, connections in use when their call ends. */
static void kp_forget(void *state)
{
	struct kp *kp = state;

	pthread_mutex_lock(&kp->tok_lock);
	sodium_memzero(kp->token, KP_TOKEN_MAX + 1);
	kp->token_len = 0;
	kp->tok_ok = false;
	kp->tok_nocache = true;
	kp->forget_gen++;
	pthread_mutex_unlock(&kp->tok_lock);
	http_forget(kp->http);
}

static void kp_interrupt(void *state)
{
	struct kp *kp = state;

	http_interrupt(kp->http);
	/* A call waiting for a slot gives up, as one under way does. */
	gate_wake(kp, false);
	/* A call waiting for another's token fetch wakes up and finds the interrupt. */
	pthread_mutex_lock(&kp->tok_lock);
	pthread_cond_broadcast(&kp->tok_cond);
	pthread_mutex_unlock(&kp->tok_lock);
}

static const struct kms_backend keyprotect_backend = {
	.name = KMS_KIND_KEYPROTECT,
	.wrap = kp_wrap,
	.unwrap = kp_unwrap,
	.key_state = kp_key_state,
	.key_info = kp_key_info,
	.forget = kp_forget,
	.cancel = kp_cancel,
	.interrupt = kp_interrupt,
	.set_concurrency = kp_set_concurrency,
	.free = kp_free,
};

/* ---- open ---- */

/* crn:v1:<cname>:<ctype>:kms|hs-crypto:<region>:a/<account>:<instance>:key:<id> */
static int parse_crn(const char *crn, char *instance, size_t isz, char *id, size_t idsz, char *region, size_t rsz,
		     bool *ret_kms, struct kms_err *err)
{
	char buf[KMS_KEY_ID_MAX + 1];
	char *f[10], *p;
	size_t n = 0;

	if (snprintf(buf, sizeof(buf), "%s", crn) >= (int)sizeof(buf))
		goto bad;
	/* strtok_r would merge empty fields; split by hand. */
	p = buf;
	for (;;) {
		char *colon = strchr(p, ':');

		if (n == 10)
			goto bad;
		f[n++] = p;
		if (!colon)
			break;
		*colon = '\0';
		p = colon + 1;
	}
	if (n != 10 || strcmp(f[0], "crn") != 0 || strcmp(f[1], "v1") != 0 ||
	    (strcmp(f[4], "kms") != 0 && strcmp(f[4], "hs-crypto") != 0) || strcmp(f[8], "key") != 0 ||
	    !ident_ok(f[7], isz - 1) || !ident_ok(f[9], idsz - 1) || !ident_ok(f[5], rsz - 1))
		goto bad;
	snprintf(instance, isz, "%s", f[7]);
	snprintf(id, idsz, "%s", f[9]);
	snprintf(region, rsz, "%s", f[5]);
	*ret_kms = strcmp(f[4], "kms") == 0;
	return 0;
bad:
	kms_err_set(err, "key protect: '%s' is not a key CRN (crn:v1:...:kms|hs-crypto:REGION:a/ACCOUNT:INSTANCE:key:ID)",
		    crn);
	return -EINVAL;
}

/* Where the API key is: the file given, or the systemd credential. Made absolute, since the
 * daemon leaves its working directory once it runs in the background. */
static int apikey_locate(struct kp *kp, const struct kms_config *cfg, struct kms_err *err)
{
	char cwd[PATH_MAX];
	const char *dir;
	int r;

	if (cfg->apikey_file[0]) {
		if (cfg->apikey_file[0] == '/') {
			r = snprintf(kp->apikey_path, sizeof(kp->apikey_path), "%s", cfg->apikey_file);
		} else {
			if (!getcwd(cwd, sizeof(cwd))) {
				kms_err_set(err, "API key file '%s': cannot tell the working directory: %s",
					    cfg->apikey_file, strerror(errno));
				return -EACCES;
			}
			r = snprintf(kp->apikey_path, sizeof(kp->apikey_path), "%s/%s", cwd, cfg->apikey_file);
		}
		if (r < 0 || (size_t)r >= sizeof(kp->apikey_path)) {
			kms_err_set(err, "API key file '%s': path too long", cfg->apikey_file);
			return -EINVAL;
		}
		return 0;
	}
	dir = getenv("CREDENTIALS_DIRECTORY");
	if (!dir || !dir[0]) {
		kms_err_set(err, "key protect: no API key: give an API key file (apikey_file=), or run under systemd with LoadCredential=apikey:FILE");
		return -EACCES;
	}
	r = snprintf(kp->apikey_path, sizeof(kp->apikey_path), "%s/apikey", dir);
	if (r < 0 || (size_t)r >= sizeof(kp->apikey_path)) {
		kms_err_set(err, "key protect: $CREDENTIALS_DIRECTORY is too long");
		return -EINVAL;
	}
	kp->apikey_credential = true;
	return 0;
}

/*
 * Read the API key into buf (KP_APIKEY_MAX + 1 bytes, sodium memory; the caller wipes it as
 * soon as the request that needs it is built). The file is the credential and stays; keyfs
 * keeps no copy of it between token requests. Returns 0, -EACCES or -EINVAL.
 */
static int apikey_load(const struct kp *kp, char *buf, size_t *ret_len, struct kms_err *err)
{
	const char *p = kp->apikey_path;
	struct stat st;
	size_t len = 0, start = 0;
	ssize_t n;
	int fd, r;

	fd = open(p, O_RDONLY | O_CLOEXEC | O_NOCTTY);
	if (fd < 0) {
		r = -errno;
		kms_err_set(err, "API key file '%s': %s", p, strerror(-r));
		return -EACCES;
	}
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		close(fd);
		kms_err_set(err, "API key file '%s' is not a regular file", p);
		return -EACCES;
	}
	for (;;) {
		n = read(fd, buf + len, KP_APIKEY_MAX + 1 - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			r = -errno;
			close(fd);
			kms_err_set(err, "API key file '%s': %s", p, strerror(-r));
			return -EACCES;
		}
		if (n == 0)
			break;
		len += (size_t)n;
		if (len > KP_APIKEY_MAX) {
			close(fd);
			kms_err_set(err, "API key file '%s' is larger than %d bytes", p, KP_APIKEY_MAX);
			return -EINVAL;
		}
	}
	close(fd);
	while (start < len && (buf[start] == ' ' || buf[start] == '\t' || buf[start] == '\n' || buf[start] == '\r'))
		start++;
	while (len > start && (buf[len - 1] == ' ' || buf[len - 1] == '\t' || buf[len - 1] == '\n' ||
			       buf[len - 1] == '\r'))
		len--;
	memmove(buf, buf + start, len - start);
	len -= start;
	sodium_memzero(buf + len, KP_APIKEY_MAX + 1 - len);
	if (len == 0) {
		if (kp->apikey_credential)
			/* keyfs@.service falls back to an empty credential when the file is missing. */
			kms_err_set(err, "the systemd credential 'apikey' ('%s') is empty: put the API key in the file the unit's LoadCredential=apikey: names (keyfs@NAME.service: /etc/keyfs/NAME.apikey)",
				    p);
		else
			kms_err_set(err, "API key file '%s' is empty", p);
		return -EINVAL;
	}
	for (size_t i = 0; i < len; i++) {
		if (buf[i] < 0x21 || buf[i] > 0x7e) {
			kms_err_set(err, "API key file '%s' holds more than one word or a non-printable byte", p);
			return -EINVAL;
		}
	}
	*ret_len = len;
	return 0;
}

/* At open: the key file is there and well formed (a mount fails now, not at the first token);
 * what was read is wiped at once. */
static int apikey_check(struct kp *kp, const struct kms_config *cfg, struct kms_err *err)
{
	char *buf;
	size_t len = 0;
	struct stat st;
	int r;

	r = apikey_locate(kp, cfg, err);
	if (r < 0)
		return r;
	buf = sodium_malloc(KP_APIKEY_MAX + 1);
	if (!buf) {
		kms_err_set(err, "key protect: out of locked memory");
		return -ENOMEM;
	}
	r = apikey_load(kp, buf, &len, err);
	sodium_memzero(buf, KP_APIKEY_MAX + 1);
	sodium_free(buf);
	if (r == 0 && stat(kp->apikey_path, &st) == 0 && (st.st_mode & (S_IRGRP | S_IROTH)))
		log_warn("API key file '%s' is readable by group or others: chmod 600 it", kp->apikey_path);
	return r;
}

static void read_tunables(struct kp_tunables *t)
{
	const char *v;
	char *end;
	double scale;
	uint64_t ms;

	t->connect_timeout_ms = 10000;
	t->timeout_ms = 30000;
	t->retries = 4;
	t->backoff_ms = 1000;
	v = getenv("KEYFS_TEST_BACKOFF_SCALE");
	if (v && v[0]) {
		errno = 0;
		scale = strtod(v, &end);
		if (errno || *end || !(scale >= 0.0 && scale <= 1.0))
			log_warn("KEYFS_TEST_BACKOFF_SCALE='%s' is not a number from 0 to 1: ignored", v);
		else
			t->backoff_ms = (long)(1000.0 * scale + 0.5);
	}
	v = getenv("KEYFS_TEST_TIMEOUT_MS");
	if (v && v[0]) {
		if (util_parse_u64(v, 100, 30000, &ms) < 0) {
			log_warn("KEYFS_TEST_TIMEOUT_MS='%s' is not a number from 100 to 30000: ignored", v);
		} else {
			t->timeout_ms = (long)ms;
			if (t->connect_timeout_ms > t->timeout_ms)
				t->connect_timeout_ms = t->timeout_ms;
		}
	}
}

int kms_keyprotect_open(const struct kms_config *cfg, struct kms_backend_open *ret, struct kms_err *err)
{
	const char *key = cfg->key[0] ? cfg->key : cfg->key_id;
	char crn_instance[64] = "", region[64] = "", endpoint[600];
	struct http_settings hs;
	struct kp *kp;
	bool is_kms = false, crn = false;
	int r, n;

	if (http_global_init() < 0) {
		kms_err_set(err, "key protect: libcurl cannot be initialised");
		return -EIO;
	}
	kp = calloc(1, sizeof(*kp));
	if (!kp) {
		kms_err_set(err, "key protect: out of memory");
		return -ENOMEM;
	}
	pthread_mutex_init(&kp->tok_lock, NULL);
	pthread_cond_init(&kp->tok_cond, NULL);
	pthread_mutex_init(&kp->gate_lock, NULL);
	pthread_cond_init(&kp->gate_cond, NULL);
	kp->gate_max = kp->gate_limit = KMS_CONCURRENCY_DEFAULT;
	kp->gate_cut_at = INT64_MIN / 2;

	if (!key[0]) {
		kms_err_set(err, "the volume description names no key");
		r = -EINVAL;
		goto fail;
	}
	if (strncmp(key, "crn:", 4) == 0) {
		r = parse_crn(key, crn_instance, sizeof(crn_instance), kp->key_id, sizeof(kp->key_id), region,
			      sizeof(region), &is_kms, err);
		if (r < 0)
			goto fail;
		crn = true;
	} else if (ident_ok(key, 128)) {
		snprintf(kp->key_id, sizeof(kp->key_id), "%s", key);
	} else {
		kms_err_set(err, "key protect: '%s' is neither a key id, an alias nor a key CRN", key);
		r = -EINVAL;
		goto fail;
	}
	/* The id recorded at init names the key (a CRN still gives the instance): an alias moved
	 * since cannot redirect the volume. */
	if (cfg->key_id[0] && key != cfg->key_id) {
		if (!ident_ok(cfg->key_id, 128)) {
			kms_err_set(err, "key protect: key id '%s' is not a key id", cfg->key_id);
			r = -EINVAL;
			goto fail;
		}
		snprintf(kp->key_id, sizeof(kp->key_id), "%s", cfg->key_id);
	}
	if (cfg->instance[0] && crn && strcmp(cfg->instance, crn_instance) != 0) {
		kms_err_set(err, "key protect: instance '%s' is not the instance '%s' of the key CRN", cfg->instance,
			    crn_instance);
		r = -EINVAL;
		goto fail;
	}
	snprintf(kp->instance, sizeof(kp->instance), "%s", cfg->instance[0] ? cfg->instance : crn_instance);
	if (!kp->instance[0]) {
		kms_err_set(err, "key protect: no instance: give the instance GUID, or the key as a CRN");
		r = -EINVAL;
		goto fail;
	}
	if (!ident_ok(kp->instance, sizeof(kp->instance) - 1)) {
		kms_err_set(err, "key protect: '%s' is not an instance GUID", kp->instance);
		r = -EINVAL;
		goto fail;
	}
	snprintf(kp->instance_header, sizeof(kp->instance_header), "bluemix-instance: %s", kp->instance);

	if (cfg->endpoint[0]) {
		r = base_url(cfg->endpoint, kp->endpoint, sizeof(kp->endpoint), "endpoint", err);
	} else if (crn && is_kms) {
		/* The public endpoint of the CRN's region. */
		snprintf(endpoint, sizeof(endpoint), "https://%s.kms.cloud.ibm.com", region);
		r = base_url(endpoint, kp->endpoint, sizeof(kp->endpoint), "endpoint", err);
	} else {
		kms_err_set(err, "key protect: no endpoint URL (https://REGION.kms.cloud.ibm.com)");
		r = -EINVAL;
	}
	if (r < 0)
		goto fail;
	r = base_url(cfg->iam_endpoint[0] ? cfg->iam_endpoint : KP_DEFAULT_IAM, endpoint, sizeof(endpoint),
		     "IAM endpoint", err);
	if (r < 0)
		goto fail;
	/* A full token URL is accepted as given; a base URL gets the documented path. */
	n = snprintf(kp->iam_url, sizeof(kp->iam_url), "%s%s", endpoint,
		     strlen(endpoint) > 6 && strcmp(endpoint + strlen(endpoint) - 6, "/token") == 0 ? "" : "/identity/token");
	if (n < 0 || (size_t)n >= sizeof(kp->iam_url)) {
		kms_err_set(err, "key protect: IAM endpoint is too long");
		r = -EINVAL;
		goto fail;
	}
	if (cfg->ca_file[0]) {
		int fd = open(cfg->ca_file, O_RDONLY | O_CLOEXEC | O_NOCTTY);

		if (fd < 0) {
			r = -errno;
			kms_err_set(err, "CA file '%s': %s", cfg->ca_file, strerror(-r));
			r = -EACCES;
			goto fail;
		}
		close(fd);
	}
	r = apikey_check(kp, cfg, err);
	if (r < 0)
		goto fail;
	kp->token = sodium_malloc(KP_TOKEN_MAX + 1);
	if (!kp->token) {
		kms_err_set(err, "key protect: out of locked memory");
		r = -ENOMEM;
		goto fail;
	}
	kp->token[0] = '\0';
	read_tunables(&kp->tun);
	hs = (struct http_settings){
		.ca_file = cfg->ca_file[0] ? cfg->ca_file : NULL,
		.connect_timeout_ms = kp->tun.connect_timeout_ms,
		.timeout_ms = kp->tun.timeout_ms,
		.body_max = KP_BODY_MAX,
		.user_agent = "keyfs/" KEYFS_VERSION,
	};
	r = http_new(&hs, &kp->http);
	if (r < 0) {
		kms_err_set(err, "key protect: cannot set up HTTPS: %s", strerror(-r));
		goto fail;
	}
	http_set_idle_max(kp->http, KMS_CONCURRENCY_DEFAULT + 2);
	ret->ops = &keyprotect_backend;
	ret->state = kp;
	snprintf(ret->key_id, sizeof(ret->key_id), "%s", kp->key_id);
	return 0;
fail:
	kp_free(kp);
	return r;
}
