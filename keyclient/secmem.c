/* secmem.c: wipe-on-free heaps for libcurl, OpenSSL and cJSON, and mlockall where the limits allow it */
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>

#include <cjson/cJSON.h>
#include <curl/curl.h>
#include <openssl/crypto.h>
#include <sodium.h>

#include "keyfs/log.h"
#include "keyfs/secmem.h"

/*
 * Blocks come from the C library's malloc; malloc_usable_size tells how much of a block the
 * library may have written to, so the whole of it is zeroed, slack included. A realloc is a
 * new block, a copy and a wiped old block: the C library's realloc may move the data and
 * leave the old copy behind untouched.
 */

static void wipe_free(void *p)
{
	if (!p)
		return;
	sodium_memzero(p, malloc_usable_size(p));
	free(p);
}

static void *wipe_realloc(void *p, size_t n)
{
	size_t old;
	void *q;

	if (!p)
		return malloc(n);
	if (n == 0) {
		wipe_free(p);
		return NULL;
	}
	old = malloc_usable_size(p);
	if (n <= old)
		return p;       /* the block already holds n bytes: nothing moves, nothing is left behind */
	q = malloc(n);
	if (!q)
		return NULL;
	memcpy(q, p, old);
	wipe_free(p);
	return q;
}

static char *wipe_strdup(const char *s)
{
	size_t n = strlen(s) + 1;
	char *p = malloc(n);

	if (p)
		memcpy(p, s, n);
	return p;
}

static void *ossl_malloc(size_t n, const char *file, int line)
{
	(void)file;
	(void)line;
	return malloc(n);
}

static void *ossl_realloc(void *p, size_t n, const char *file, int line)
{
	(void)file;
	(void)line;
	return wipe_realloc(p, n);
}

static void ossl_free(void *p, const char *file, int line)
{
	(void)file;
	(void)line;
	wipe_free(p);
}

static pthread_once_t secmem_once = PTHREAD_ONCE_INIT;
static int secmem_result;

static void secmem_init_once(void)
{
	cJSON_Hooks hooks = { .malloc_fn = malloc, .free_fn = wipe_free };

	/* First OpenSSL: libcurl's initialisation below makes OpenSSL's first allocations. */
	if (!CRYPTO_set_mem_functions(ossl_malloc, ossl_realloc, ossl_free))
		log_warn("openssl had allocated memory before keyfs could set its wiping allocator: TLS buffers are freed without being wiped");
	if (curl_global_init_mem(CURL_GLOBAL_DEFAULT, malloc, wipe_free, wipe_realloc, wipe_strdup, calloc) !=
	    CURLE_OK) {
		secmem_result = -EIO;
		return;
	}
	/* cJSON's hooks are process-wide: the Key Protect bodies (keyclient) and the control
	 * protocol's answers (control/) are both wiped when freed. With a free that is not free(),
	 * cJSON grows its print buffers by malloc + copy + free. */
	cJSON_InitHooks(&hooks);
	secmem_result = 0;
}

int secmem_init(void)
{
	pthread_once(&secmem_once, secmem_init_once);
	return secmem_result;
}

/* CAP_IPC_LOCK in the effective set: the kernel then ignores RLIMIT_MEMLOCK. */
static bool cap_ipc_lock(void)
{
	char line[256];
	unsigned long long eff;
	bool yes = false;
	FILE *f = fopen("/proc/self/status", "re");

	if (!f)
		return false;
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "CapEff: %llx", &eff) == 1) {
			yes = (eff >> 14) & 1;  /* CAP_IPC_LOCK */
			break;
		}
	}
	fclose(f);
	return yes;
}

int secmem_lock_all(void)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_MEMLOCK, &rl) < 0)
		return -errno;
	if (rl.rlim_cur != RLIM_INFINITY && !cap_ipc_lock())
		return 0;
	/* MCL_ONFAULT: reserved but untouched memory (thread stacks, buffers) costs nothing. */
	if (mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) < 0)
		return -errno;
	return 1;
}
