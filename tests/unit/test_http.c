/* test_http.c: unit test of keyclient/http.c: a TLS share outlives its handles, an interrupt shuts down only their sockets */
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>

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

struct stall {
	struct http_conn *c;
	char url[64];
	int r;
};

static void *stall_main(void *arg)
{
	struct stall *st = arg;
	struct http_request rq = { .method = "GET", .url = st->url };
	struct http_response resp;
	char why[HTTP_WHY_MAX];

	st->r = http_perform(st->c, &rq, &resp, why);
	return NULL;
}

/*
 * connect(2) of this program, in front of the C library's (libcurl calls it through the dynamic
 * linker, so this definition wins): when armed, it interrupts its struct http first, so that the
 * transfer is interrupted between the opening of its socket and its connection.
 */
static struct http *connect_interrupts;

int connect(int fd, const struct sockaddr *a, socklen_t len)
{
	static int (*real)(int, const struct sockaddr *, socklen_t);
	struct http *h = __atomic_exchange_n(&connect_interrupts, NULL, __ATOMIC_SEQ_CST);

	if (!real)
		real = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
	if (h)
		http_interrupt(h);
	return real(fd, a, len);
}

/*
 * An interrupt shuts down the sockets of the transfers under way, and nothing else. libcurl
 * closes a socket that never got connected with close(), not the close callback: a file that
 * gets its number next (here a socketpair) must survive the next interrupt of that handle.
 */
static void interrupt_spares_reused_fd(void)
{
	struct http_settings s = { .connect_timeout_ms = 5000, .timeout_ms = 5000, .body_max = 4096 };
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t salen = sizeof(sa);
	struct stall st = { 0 };
	struct http *h;
	pthread_t t;
	int lfd, afd, pair[2] = { -1, -1 };
	char byte = 'x';

	/* A peer that accepts connections (backlog) and never answers a TLS hello. */
	lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	CHECK(lfd >= 0);
	CHECK_EQ(bind(lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	CHECK_EQ(listen(lfd, 8), 0);
	CHECK_EQ(getsockname(lfd, (struct sockaddr *)&sa, &salen), 0);
	snprintf(st.url, sizeof(st.url), "https://127.0.0.1:%u/", (unsigned)ntohs(sa.sin_port));

	CHECK_EQ(http_new(&s, &h), 0);
	CHECK_EQ(http_conn_get(h, &st.c), 0);
	/* Interrupted as its socket connects: libcurl closes that socket itself. */
	__atomic_store_n(&connect_interrupts, h, __ATOMIC_SEQ_CST);
	stall_main(&st);
	CHECK_EQ(st.r, -ECANCELED);
	/* The lowest free number: that socket's. */
	CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair), 0);
	http_conn_put(h, st.c);
	/* Whatever reached the listener of that attempt goes. */
	while ((afd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK)) >= 0)
		close(afd);
	/* The same handle, waiting for the server's hello, interrupted. */
	CHECK_EQ(http_conn_get(h, &st.c), 0);
	CHECK_EQ(pthread_create(&t, NULL, stall_main, &st), 0);
	/* Once its TLS hello has arrived, it waits for the answer. */
	CHECK_EQ(poll(&(struct pollfd){ .fd = lfd, .events = POLLIN }, 1, 10000), 1);
	afd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
	CHECK(afd >= 0);
	CHECK_EQ(poll(&(struct pollfd){ .fd = afd, .events = POLLIN }, 1, 10000), 1);
	CHECK(recv(afd, &byte, 1, MSG_PEEK) == 1);
	http_interrupt(h);
	pthread_join(t, NULL);
	CHECK_EQ(st.r, -ECANCELED);
	/* The socketpair was not shut down. */
	CHECK_EQ(send(pair[0], &byte, 1, MSG_NOSIGNAL | MSG_DONTWAIT), 1);
	CHECK_EQ(recv(pair[1], &byte, 1, MSG_DONTWAIT), 1);
	http_conn_put(h, st.c);
	http_free(h);
	close(afd);
	close(lfd);
	close(pair[0]);
	close(pair[1]);
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
	interrupt_spares_reused_fd();
	return check_done();
}
