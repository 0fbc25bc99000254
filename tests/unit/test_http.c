/* test_http.c: unit test of keyclient/http.c's handle pool: a TLS share outlives every handle attached to it */
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>

#include <curl/curl.h>
#include <sodium.h>

#include "check.h"
#include "http.h"

/*
 * Linked with --wrap for curl_easy_cleanup, curl_share_init and curl_share_cleanup. The first
 * handle cleanup made by the "slow" thread stops until the main thread says go: meanwhile the
 * main thread closes the last other handle of the same share. A share cleaned up while a
 * handle is still attached (libcurl refuses: CURLSHE_IN_USE) means http.c freed the struct
 * whose mutexes that handle's cleanup then locks: the daemon crash this test is about.
 */
CURLSHcode __real_curl_share_cleanup(CURLSH *sh);
CURLSHcode __wrap_curl_share_cleanup(CURLSH *sh);
CURLSH *__wrap_curl_share_init(void);
void __wrap_curl_easy_cleanup(CURL *e);
CURLSH *__real_curl_share_init(void);
void __real_curl_easy_cleanup(CURL *e);

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static pthread_t slow_thread;
static bool hold_slow, slow_entered, go;
static unsigned shares_made, shares_cleaned, shares_refused;

CURLSH *__wrap_curl_share_init(void)
{
	CURLSH *sh = __real_curl_share_init();

	pthread_mutex_lock(&mu);
	shares_made += sh != NULL;
	pthread_mutex_unlock(&mu);
	return sh;
}

CURLSHcode __wrap_curl_share_cleanup(CURLSH *sh)
{
	CURLSHcode rc = __real_curl_share_cleanup(sh);

	pthread_mutex_lock(&mu);
	if (rc == CURLSHE_OK)
		shares_cleaned++;
	else
		shares_refused++;
	pthread_mutex_unlock(&mu);
	return rc;
}

void __wrap_curl_easy_cleanup(CURL *e)
{
	pthread_mutex_lock(&mu);
	if (hold_slow && pthread_equal(pthread_self(), slow_thread)) {
		hold_slow = false;
		slow_entered = true;
		pthread_cond_broadcast(&cond);
		while (!go)
			pthread_cond_wait(&cond, &mu);
	}
	pthread_mutex_unlock(&mu);
	__real_curl_easy_cleanup(e);
}

static void wait_entered(void)
{
	pthread_mutex_lock(&mu);
	while (!slow_entered)
		pthread_cond_wait(&cond, &mu);
	pthread_mutex_unlock(&mu);
}

static void release_slow(void)
{
	pthread_mutex_lock(&mu);
	go = true;
	pthread_cond_broadcast(&cond);
	pthread_mutex_unlock(&mu);
}

static void arm(void)
{
	pthread_mutex_lock(&mu);
	hold_slow = true;
	slow_entered = false;
	go = false;
	pthread_mutex_unlock(&mu);
}

/* One attempt, so that the handle is attached to its share (CURLOPT_SHARE): nothing listens on
 * port 1, the connection is refused at once. */
static void attach(struct http_conn *c)
{
	struct http_request rq = { .method = "GET", .url = "https://127.0.0.1:1/" };
	struct http_response resp;
	char why[HTTP_WHY_MAX];

	CHECK(http_perform(c, &rq, &resp, why) < 0);
}

struct job {
	struct http *h;
	struct http_conn *c;    /* put back by the slow thread, or NULL: it forgets instead */
};

static void *slow_main(void *arg)
{
	struct job *j = arg;

	if (j->c)
		http_conn_put(j->h, j->c);
	else
		http_forget(j->h);
	return NULL;
}

/* Two handles of one share. The slow thread closes one (a put after a forget, or a forget of
 * it idle); while its curl_easy_cleanup has not run, the main thread closes the other. */
static void race(bool slow_forgets)
{
	struct http_settings s = { .connect_timeout_ms = 2000, .timeout_ms = 2000, .body_max = 4096 };
	struct http *h;
	struct http_conn *c1, *c2;
	struct job j;

	CHECK_EQ(http_new(&s, &h), 0);
	CHECK_EQ(http_conn_get(h, &c1), 0);
	CHECK_EQ(http_conn_get(h, &c2), 0);
	attach(c1);
	attach(c2);
	if (slow_forgets) {
		http_conn_put(h, c1);   /* idle: the forget closes it */
		j = (struct job){ .h = h, .c = NULL };
	} else {
		http_forget(h);         /* a lock while both are out: neither goes back to the pool */
		j = (struct job){ .h = h, .c = c1 };
	}
	arm();
	CHECK_EQ(pthread_create(&slow_thread, NULL, slow_main, &j), 0);
	wait_entered();
	http_conn_put(h, c2);   /* the old share's last handle but the slow one */
	release_slow();
	pthread_join(slow_thread, NULL);
	http_free(h);
}

int main(void)
{
	CHECK(sodium_init() >= 0);
	CHECK_EQ(http_global_init(), 0);

	race(false);
	race(true);
	/* Every share was cleaned up once no handle used it, and none while one still did. */
	CHECK_EQ(shares_refused, 0);
	CHECK_EQ(shares_cleaned, shares_made);
	CHECK(shares_made >= 4);
	return check_done();
}
