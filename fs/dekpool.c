/* dekpool.c: keys for new files wrapped ahead of need by background threads, handed out once each; the pool grows with the create rate */
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
/* After this long without a create, the pool halves (down to its floor), wiping what is over. */
#define IDLE_SHRINK_MS   30000
/* Creates closer together than this are a burst: the pool refills what each one takes at once,
 * with the whole window, instead of topping up with a few calls. */
#define BURST_MS         1000

/*
 * Lock order: lock -> the key slab's lock. lock is never held across a KMS call: a worker counts
 * itself in `inflight`, drops the lock, wraps, and takes the lock again to store the entry.
 * `gen` tells a worker that the pool was drained while it was wrapping: its entry is wiped.
 */
struct dekpool {
	struct kms *kms;
	const char *volume;
	struct keyslab *slab;
	unsigned capacity;              /* the bound: -o dek_pool= */
	unsigned floor;                 /* the size at rest: min(capacity, DEKPOOL_FLOOR) */
	unsigned max_threads;           /* wraps in flight at most */

	pthread_mutex_t lock;
	pthread_cond_t work;            /* lock: something a worker waits for changed */
	pthread_cond_t ready;           /* lock: an entry arrived or a wrap in flight ended */
	struct dekpool_entry *ring;     /* lock: capacity entries, count ready from head */
	unsigned target;                /* lock: floor..capacity, what the workers fill up to */
	struct timespec shrink_at;      /* lock: CLOCK_MONOTONIC, halve target if no create till then */
	struct timespec take_window;    /* lock: a create before then follows the last one closely */
	struct timespec burst_until;    /* lock: creates came in a burst: refills use the window till then */
	unsigned head, count;           /* lock */
	unsigned inflight;              /* lock: wraps under way */
	uint64_t gen;                   /* lock: bumped by every drain */
	bool filling;                   /* lock: refill until full */
	bool paused;                    /* lock */
	bool stop;                      /* lock */
	bool announced;                 /* lock: "ready" logged, once per mount */
	unsigned backoff_ms;            /* lock: 0, or the wait after the last failed wrap */
	struct timespec retry_at;       /* lock: CLOCK_MONOTONIC, when backoff_ms != 0 */

	unsigned idle;                  /* lock: workers waiting */
	pthread_t threads[DEKPOOL_WORKERS_MAX];
	unsigned nthreads;              /* lock: started, as wraps were wanted */
};

static void *worker(void *arg);

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
	pthread_cond_broadcast(&p->ready);
	return n;
}

/* Called with p->lock held. While backing off, one wrap at a time probes the service. */
/* Wraps in flight at most now. Topping up the floor (at start, after an unlock, creates slower
 * than the pool) is nobody's wait: a few calls do it, so that many mounts unlocking together
 * do not flood the service (and their polls) with a window's worth each. A pool that grew
 * because creates outran it, or creates that come in a burst (the second within BURST_MS of
 * the first), use the whole window from the start: waiting for the pool to run low before
 * widening cost a burst its first few hundred milliseconds. */
static unsigned inflight_cap(const struct dekpool *p)
{
	if (p->target > p->floor || p->max_threads < DEKPOOL_REST_INFLIGHT || !bgthread_reached(&p->burst_until))
		return p->max_threads;
	return DEKPOOL_REST_INFLIGHT;
}

static bool wants_wrap(const struct dekpool *p)
{
	if (p->stop || p->paused || !p->filling || p->inflight >= inflight_cap(p))
		return false;
	if (p->backoff_ms && (p->inflight > 0 || !bgthread_reached(&p->retry_at)))
		return false;
	return p->count + p->inflight < p->target;
}

/* Called with p->lock held: wake one idle worker per wrap wanted (a worker that finishes a wrap
 * goes on by itself, so without this the calls in flight would stay at what they were when the
 * refill began), and start workers while more wraps are wanted than workers are idle, up to
 * max_threads. A pool at rest keeps the few it needed. */
static void spawn_locked(struct dekpool *p)
{
	unsigned want, cap = inflight_cap(p), room = p->inflight < cap ? cap - p->inflight : 0;

	if (p->stop || p->paused || !p->filling || p->backoff_ms)
		return;
	want = p->target > p->count + p->inflight ? p->target - p->count - p->inflight : 0;
	if (want > room)
		want = room;
	for (unsigned k = 0; k < want && k < p->idle; k++)
		pthread_cond_signal(&p->work);
	while (p->idle < want && p->nthreads < p->max_threads) {
		if (bgthread_start(&p->threads[p->nthreads], worker, p) < 0)
			break;
		p->nthreads++;
		want--;
	}
}

/* Called with p->lock held, by a create that found the pool low: the create rate outruns the
 * pool, so the pool doubles (up to its bound) and refills. */
static void grow_locked(struct dekpool *p)
{
	p->shrink_at = bgthread_deadline(IDLE_SHRINK_MS);
	if (p->count >= p->target / 4 || p->target >= p->capacity)
		return;
	p->target = p->target * 2 < p->capacity ? p->target * 2 : p->capacity;
	p->filling = true;
	pthread_cond_broadcast(&p->work);
	log_debug("dek pool: creates outrun the pool: up to %u keys ahead", p->target);
}

/* Called with p->lock held, by a worker: no create for IDLE_SHRINK_MS, so the pool halves back
 * towards its floor; the keys over the new size are wiped (oldest first). */
static void shrink_locked(struct dekpool *p)
{
	unsigned n = p->target / 2 > p->floor ? p->target / 2 : p->floor;

	p->shrink_at = bgthread_deadline(IDLE_SHRINK_MS);
	if (n >= p->target)
		return;
	p->target = n;
	while (p->count > p->target) {
		entry_wipe(p, &p->ring[p->head]);
		p->head = (p->head + 1) % p->capacity;
		p->count--;
	}
	log_debug("dek pool: idle: %u keys ahead", p->target);
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

	kms_thread_ahead();
	pthread_mutex_lock(&p->lock);
	for (;;) {
		while (!p->stop && !wants_wrap(p)) {
			p->idle++;
			if (p->backoff_ms && p->inflight == 0 && !p->paused && p->filling)
				pthread_cond_timedwait(&p->work, &p->lock, &p->retry_at);
			else if (p->target > p->floor)
				pthread_cond_timedwait(&p->work, &p->lock, &p->shrink_at);
			else
				pthread_cond_wait(&p->work, &p->lock);
			p->idle--;
			if (p->target > p->floor && bgthread_reached(&p->shrink_at))
				shrink_locked(p);
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
		pthread_cond_broadcast(&p->ready);
		if (r < 0) {
			backoff_locked(p, r, &err);
			continue;
		}
		recovered_locked(p);
		if (gen != p->gen || p->paused || p->stop || p->count >= p->target) {
			entry_wipe(p, &e);
			continue;
		}
		p->ring[(p->head + p->count) % p->capacity] = e;
		p->count++;
		sodium_memzero(&e, sizeof(e));
		if (p->count + p->inflight >= p->target)
			p->filling = false;
		if (p->count == p->target && !p->announced) {
			/* Once: the first full pool also says that wrapping works from this host. */
			p->announced = true;
			log_info("dek pool: %u keys for new files ready", p->target);
		}
	}
	pthread_mutex_unlock(&p->lock);
	return NULL;
}

int dekpool_new(struct kms *kms, const char *volume_uuid, struct keyslab *slab, unsigned capacity,
		unsigned workers, struct dekpool **ret)
{
	struct dekpool *p;
	int r;

	if (capacity > DEKPOOL_MAX || workers < 1 || workers > DEKPOOL_WORKERS_MAX)
		return -EINVAL;
	p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->kms = kms;
	p->volume = volume_uuid;
	p->slab = slab;
	p->capacity = capacity;
	p->floor = capacity < DEKPOOL_FLOOR ? capacity : DEKPOOL_FLOOR;
	p->target = p->floor;
	p->max_threads = workers;
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
	if (r == 0) {
		r = bgthread_cond_init(&p->ready);
		if (r < 0)
			pthread_cond_destroy(&p->work);
	}
	if (r < 0) {
		pthread_mutex_destroy(&p->lock);
		free(p->ring);
		free(p);
		return r;
	}
	p->shrink_at = bgthread_deadline(IDLE_SHRINK_MS);
	if (capacity > 0) {
		pthread_mutex_lock(&p->lock);
		spawn_locked(p);
		r = p->nthreads > 0 ? 0 : -EAGAIN;
		pthread_mutex_unlock(&p->lock);
		if (r < 0) {
			dekpool_free(p);
			return r;
		}
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
	pthread_cond_destroy(&p->ready);
	pthread_mutex_destroy(&p->lock);
	free(p->ring);
	free(p);
}

int dekpool_get(struct dekpool *p, struct dekpool_entry *ret, struct kms_err *err)
{
	struct dekpool_entry e;
	bool burst;
	int r;

	if (p->capacity > 0) {
		pthread_mutex_lock(&p->lock);
		/* Empty, but keys are on their way: one of them is sooner than a wrap of our own, and
		 * makes no wrap more than the pool's bound. */
		while (p->count == 0 && p->inflight > 0 && !p->paused && !p->stop)
			pthread_cond_wait(&p->ready, &p->lock);
		grow_locked(p);
		burst = !bgthread_reached(&p->take_window);
		p->take_window = bgthread_deadline(BURST_MS);
		if (burst)
			p->burst_until = p->take_window;
		if (p->count > 0 && !p->paused) {
			*ret = p->ring[p->head];
			sodium_memzero(&p->ring[p->head], sizeof(p->ring[p->head]));
			p->head = (p->head + 1) % p->capacity;
			p->count--;
			/* In a burst, every key taken is replaced at once (the pool must not run dry
			 * before a refill that waited for a quarter of it comes back); a lone create
			 * refills below three quarters of the pool. */
			if (!p->filling && (burst || p->count < p->target - p->target / 4)) {
				p->filling = true;
				pthread_cond_broadcast(&p->work);
			}
			spawn_locked(p);
			pthread_mutex_unlock(&p->lock);
			return 0;
		}
		spawn_locked(p);
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

unsigned dekpool_pause(struct dekpool *p, bool paused)
{
	unsigned n;

	if (!p || p->capacity == 0)
		return 0;
	pthread_mutex_lock(&p->lock);
	p->paused = paused;
	/* A lock ends a burst and what creates grew the pool to: after the unlock the pool tops up
	 * its floor with a few calls, and the first create is a lone one again. */
	p->take_window = p->burst_until = (struct timespec){ 0, 0 };
	if (paused)
		p->target = p->floor;
	n = drain_locked(p);
	spawn_locked(p);
	pthread_mutex_unlock(&p->lock);
	return n;
}
