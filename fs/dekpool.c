/* dekpool.c: keys for new files wrapped ahead of need by a few background threads, handed out once each */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sodium.h>

#include "keyfs/log.h"
#include "keyfs/volkeys.h"

#include "bgthread.h"
#include "dekpool.h"

#define BACKOFF_FIRST_MS 1000
#define BACKOFF_MAX_MS   60000

/*
 * Lock order: lock -> the key slab's lock. lock is never held across a KMS call: a worker counts
 * itself in `inflight`, drops the lock, wraps, and takes the lock again to store the entry.
 * `gen` tells a worker that the pool was drained while it was wrapping: its entry is wiped.
 */
struct dekpool {
	struct kms *kms;
	const char *volume;
	struct keyslab *slab;
	unsigned capacity;
	unsigned low;                   /* refill starts below this many ready entries */

	pthread_mutex_t lock;
	pthread_cond_t work;            /* lock: something a worker waits for changed */
	struct dekpool_entry *ring;     /* lock: capacity entries, count ready from head */
	unsigned head, count;           /* lock */
	unsigned inflight;              /* lock: wraps under way */
	uint64_t gen;                   /* lock: bumped by every drain */
	bool filling;                   /* lock: refill until full */
	bool paused;                    /* lock */
	bool stop;                      /* lock */
	bool announced;                 /* lock: "ready" logged, once per mount */
	unsigned backoff_ms;            /* lock: 0, or the wait after the last failed wrap */
	struct timespec retry_at;       /* lock: CLOCK_MONOTONIC, when backoff_ms != 0 */

	pthread_t threads[DEKPOOL_WORKERS];
	unsigned nthreads;
};

/* The key itself is unusable: a wrapped entry made before must not give a file life now. */
static bool key_unusable(int r)
{
	return r == -ENOKEY || r == -EACCES || r == -EKEYREVOKED || r == -EKEYEXPIRED;
}

static void entry_wipe(struct dekpool *p, struct dekpool_entry *e)
{
	keyslab_free(p->slab, e->dek);
	sodium_memzero(e, sizeof(*e));
}

/* A new file id and DEK, wrapped for that file id. No lock held: this is the KMS round trip. */
static int entry_make(struct dekpool *p, struct dekpool_entry *e, struct kms_err *err)
{
	int r;

	memset(e, 0, sizeof(*e));
	e->dek = keyslab_alloc(p->slab);
	if (!e->dek) {
		snprintf(err->msg, sizeof(err->msg), "out of memory for a file key");
		return -ENOMEM;
	}
	r = vol_keys_new(p->kms, p->volume, e->dek, e->file_id, &e->wrapped, err);
	if (r < 0)
		entry_wipe(p, e);
	return r;
}

/* Called with p->lock held. */
static unsigned drain_locked(struct dekpool *p)
{
	unsigned n = p->count;

	for (; p->count > 0; p->count--) {
		entry_wipe(p, &p->ring[p->head]);
		p->head = (p->head + 1) % p->capacity;
	}
	p->head = 0;
	p->gen++;
	p->filling = true;
	pthread_cond_broadcast(&p->work);
	return n;
}

/* Called with p->lock held. While backing off, one wrap at a time probes the service. */
static bool wants_wrap(const struct dekpool *p)
{
	if (p->stop || p->paused || !p->filling)
		return false;
	if (p->backoff_ms && (p->inflight > 0 || !bgthread_reached(&p->retry_at)))
		return false;
	return p->count + p->inflight < p->capacity;
}

/* Called with p->lock held, after a failed wrap. */
static void backoff_locked(struct dekpool *p, int r, const struct kms_err *err)
{
	/* Shutting down: the pool is about to be wiped, nothing to report or retry. */
	if (r == -ECANCELED)
		return;
	if (key_unusable(r))
		drain_locked(p);
	/* Wraps that were in flight together fail together: one failure, one step of backoff. */
	if (p->backoff_ms && !bgthread_reached(&p->retry_at))
		return;
	if (!p->backoff_ms)
		log_warn("dek pool: cannot make keys for new files ahead: %s: creates wrap their own until it works",
			 err->msg[0] ? err->msg : strerror(-r));
	p->backoff_ms = p->backoff_ms ? p->backoff_ms * 2 : BACKOFF_FIRST_MS;
	if (p->backoff_ms > BACKOFF_MAX_MS)
		p->backoff_ms = BACKOFF_MAX_MS;
	p->retry_at = bgthread_deadline(p->backoff_ms);
}

/* Called with p->lock held, after a wrap that worked. */
static void recovered_locked(struct dekpool *p)
{
	if (!p->backoff_ms)
		return;
	p->backoff_ms = 0;
	log_info("dek pool: making keys for new files ahead again");
	pthread_cond_broadcast(&p->work);
}

static void *worker(void *arg)
{
	struct dekpool *p = arg;
	struct dekpool_entry e;
	struct kms_err err;
	uint64_t gen;
	int r;

	pthread_mutex_lock(&p->lock);
	for (;;) {
		while (!p->stop && !wants_wrap(p)) {
			if (p->backoff_ms && p->inflight == 0 && !p->paused && p->filling)
				pthread_cond_timedwait(&p->work, &p->lock, &p->retry_at);
			else
				pthread_cond_wait(&p->work, &p->lock);
		}
		if (p->stop)
			break;
		p->inflight++;
		gen = p->gen;
		pthread_mutex_unlock(&p->lock);

		err.msg[0] = '\0';
		r = entry_make(p, &e, &err);

		pthread_mutex_lock(&p->lock);
		p->inflight--;
		if (r < 0) {
			backoff_locked(p, r, &err);
			continue;
		}
		recovered_locked(p);
		if (gen != p->gen || p->paused || p->stop || p->count >= p->capacity) {
			entry_wipe(p, &e);
			continue;
		}
		p->ring[(p->head + p->count) % p->capacity] = e;
		p->count++;
		sodium_memzero(&e, sizeof(e));
		if (p->count + p->inflight >= p->capacity)
			p->filling = false;
		if (p->count == p->capacity && !p->announced) {
			/* Once: the first full pool also says that wrapping works from this host. */
			p->announced = true;
			log_info("dek pool: %u keys for new files ready", p->capacity);
		}
	}
	pthread_mutex_unlock(&p->lock);
	return NULL;
}

int dekpool_new(struct kms *kms, const char *volume_uuid, struct keyslab *slab, unsigned capacity,
		struct dekpool **ret)
{
	struct dekpool *p;
	int r;

	if (capacity > DEKPOOL_MAX)
		return -EINVAL;
	p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->kms = kms;
	p->volume = volume_uuid;
	p->slab = slab;
	p->capacity = capacity;
	p->low = capacity - capacity / 4;
	p->filling = true;
	if (capacity > 0) {
		/* Plain memory: an entry's secret lives in its keyslab slot; the rest is not secret. */
		p->ring = calloc(capacity, sizeof(*p->ring));
		if (!p->ring) {
			free(p);
			return -ENOMEM;
		}
	}
	pthread_mutex_init(&p->lock, NULL);
	r = bgthread_cond_init(&p->work);
	if (r < 0) {
		pthread_mutex_destroy(&p->lock);
		free(p->ring);
		free(p);
		return r;
	}
	for (unsigned k = 0; k < DEKPOOL_WORKERS && k < capacity; k++) {
		r = bgthread_start(&p->threads[k], worker, p);
		if (r < 0) {
			dekpool_free(p);
			return r;
		}
		p->nthreads++;
	}
	*ret = p;
	return 0;
}

void dekpool_free(struct dekpool *p)
{
	unsigned n;

	if (!p)
		return;
	pthread_mutex_lock(&p->lock);
	p->stop = true;
	pthread_cond_broadcast(&p->work);
	pthread_mutex_unlock(&p->lock);
	for (unsigned k = 0; k < p->nthreads; k++)
		pthread_join(p->threads[k], NULL);
	pthread_mutex_lock(&p->lock);
	n = p->capacity ? drain_locked(p) : 0;
	pthread_mutex_unlock(&p->lock);
	if (p->capacity)
		log_info("dek pool: %u unused keys for new files wiped", n);
	pthread_cond_destroy(&p->work);
	pthread_mutex_destroy(&p->lock);
	free(p->ring);
	free(p);
}

int dekpool_get(struct dekpool *p, struct dekpool_entry *ret, struct kms_err *err)
{
	struct dekpool_entry e;
	int r;

	if (p->capacity > 0) {
		pthread_mutex_lock(&p->lock);
		if (p->count > 0 && !p->paused) {
			*ret = p->ring[p->head];
			sodium_memzero(&p->ring[p->head], sizeof(p->ring[p->head]));
			p->head = (p->head + 1) % p->capacity;
			p->count--;
			if (!p->filling && p->count < p->low) {
				p->filling = true;
				pthread_cond_broadcast(&p->work);
			}
			pthread_mutex_unlock(&p->lock);
			return 0;
		}
		pthread_mutex_unlock(&p->lock);
	}
	err->msg[0] = '\0';
	r = entry_make(p, &e, err);
	if (r < 0)
		return r;
	if (p->capacity > 0) {
		/* The service works again: workers waiting out a backoff may start now. */
		pthread_mutex_lock(&p->lock);
		recovered_locked(p);
		pthread_mutex_unlock(&p->lock);
	}
	*ret = e;
	return 0;
}

unsigned dekpool_drain(struct dekpool *p)
{
	unsigned n;

	if (!p || p->capacity == 0)
		return 0;
	pthread_mutex_lock(&p->lock);
	n = drain_locked(p);
	pthread_mutex_unlock(&p->lock);
	return n;
}

void dekpool_pause(struct dekpool *p, bool paused)
{
	if (!p || p->capacity == 0)
		return;
	pthread_mutex_lock(&p->lock);
	p->paused = paused;
	drain_locked(p);
	pthread_mutex_unlock(&p->lock);
}
