/* keycache.c: the keys of files the kernel just forgot, kept a short while for the open that follows */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <sodium.h>

#include "keyfs/log.h"

#include "bgthread.h"
#include "keycache.h"
#include "keystate.h"

/*
 * Entries are on a hash chain by (dev, ino) and on one list oldest first: every entry lives
 * KEYCACHE_TTL_MS from its put, so the oldest is also the next to expire. lock is a leaf but
 * for the key slab's lock (keyslab_free) and keystate_check (atomic loads).
 */
struct entry {
	struct entry *hnext;
	struct entry *older, *newer;
	dev_t dev;
	ino_t ino;
	unsigned slot;
	uint8_t hash[KEYCACHE_HASH_SIZE];
	struct fmt_keys *keys;          /* keyslab slot */
	struct timespec expires;        /* CLOCK_MONOTONIC */
};

struct keycache {
	struct keyslab *slab;
	struct keystate *ks;
	unsigned capacity;

	pthread_mutex_t lock;
	pthread_cond_t changed;         /* lock: an entry arrived while none was, or stop */
	struct entry **buckets;         /* lock */
	size_t nbuckets;                /* a power of two */
	struct entry *oldest, *newest;  /* lock */
	unsigned count;                 /* lock */
	bool stop;                      /* lock */
	pthread_t thread;
	bool started;
};

static size_t bucket_of(const struct keycache *c, dev_t dev, ino_t ino)
{
	uint64_t h = (uint64_t)ino * 0x9e3779b97f4a7c15ULL ^ (uint64_t)dev;

	return (size_t)(h ^ h >> 29) & (c->nbuckets - 1);
}

/* Called with c->lock held: unlink e from its chain and the list, and wipe and free it. */
static void drop_locked(struct keycache *c, struct entry *e)
{
	for (struct entry **pp = &c->buckets[bucket_of(c, e->dev, e->ino)]; *pp; pp = &(*pp)->hnext) {
		if (*pp == e) {
			*pp = e->hnext;
			break;
		}
	}
	if (e->older)
		e->older->newer = e->newer;
	else
		c->oldest = e->newer;
	if (e->newer)
		e->newer->older = e->older;
	else
		c->newest = e->older;
	c->count--;
	keyslab_free(c->slab, e->keys);
	free(e);
}

static struct entry *find_locked(struct keycache *c, dev_t dev, ino_t ino)
{
	for (struct entry *e = c->buckets[bucket_of(c, dev, ino)]; e; e = e->hnext)
		if (e->dev == dev && e->ino == ino)
			return e;
	return NULL;
}

static void expire_locked(struct keycache *c)
{
	while (c->oldest && bgthread_reached(&c->oldest->expires))
		drop_locked(c, c->oldest);
}

/* Wipes each entry when its time is up, so keys of a mount that went quiet do not linger. */
static void *expirer(void *arg)
{
	struct keycache *c = arg;

	pthread_mutex_lock(&c->lock);
	while (!c->stop) {
		expire_locked(c);
		if (c->oldest) {
			struct timespec at = c->oldest->expires;

			pthread_cond_timedwait(&c->changed, &c->lock, &at);
		} else {
			pthread_cond_wait(&c->changed, &c->lock);
		}
	}
	pthread_mutex_unlock(&c->lock);
	return NULL;
}

int keycache_new(struct keyslab *slab, struct keystate *ks, unsigned capacity, struct keycache **ret)
{
	struct keycache *c = calloc(1, sizeof(*c));
	int r;

	if (!c)
		return -ENOMEM;
	c->slab = slab;
	c->ks = ks;
	c->capacity = capacity;
	c->nbuckets = 16;
	while (c->nbuckets < capacity)
		c->nbuckets *= 2;
	c->buckets = calloc(c->nbuckets, sizeof(*c->buckets));
	if (!c->buckets) {
		free(c);
		return -ENOMEM;
	}
	pthread_mutex_init(&c->lock, NULL);
	r = bgthread_cond_init(&c->changed);
	if (r == 0 && capacity > 0) {
		r = bgthread_start(&c->thread, expirer, c);
		c->started = r == 0;
		if (r < 0)
			pthread_cond_destroy(&c->changed);
	}
	if (r < 0) {
		pthread_mutex_destroy(&c->lock);
		free(c->buckets);
		free(c);
		return r;
	}
	*ret = c;
	return 0;
}

void keycache_free(struct keycache *c)
{
	if (!c)
		return;
	pthread_mutex_lock(&c->lock);
	c->stop = true;
	pthread_cond_broadcast(&c->changed);
	pthread_mutex_unlock(&c->lock);
	if (c->started)
		pthread_join(c->thread, NULL);
	keycache_wipe(c);
	pthread_cond_destroy(&c->changed);
	pthread_mutex_destroy(&c->lock);
	free(c->buckets);
	free(c);
}

bool keycache_put(struct keycache *c, dev_t dev, ino_t ino, unsigned slot, const uint8_t hash[KEYCACHE_HASH_SIZE],
		  struct fmt_keys *keys)
{
	struct entry *e, *old;

	if (!c || c->capacity == 0 || !keys)
		return false;
	e = malloc(sizeof(*e));
	if (!e)
		return false;
	pthread_mutex_lock(&c->lock);
	/* Checked under our lock: a lock sets its phase before it wipes us (under this lock too),
	 * so keys put after the wipe began are refused here, never kept past it. */
	if (c->stop || keystate_check(c->ks, KS_OP_OPEN) < 0) {
		pthread_mutex_unlock(&c->lock);
		free(e);
		return false;
	}
	old = find_locked(c, dev, ino);
	if (old)
		drop_locked(c, old);
	expire_locked(c);
	if (c->count >= c->capacity)
		drop_locked(c, c->oldest);
	e->dev = dev;
	e->ino = ino;
	e->slot = slot;
	memcpy(e->hash, hash, KEYCACHE_HASH_SIZE);
	e->keys = keys;
	e->expires = bgthread_deadline(KEYCACHE_TTL_MS);
	e->hnext = c->buckets[bucket_of(c, dev, ino)];
	c->buckets[bucket_of(c, dev, ino)] = e;
	e->older = c->newest;
	e->newer = NULL;
	if (c->newest)
		c->newest->newer = e;
	else
		c->oldest = e;
	c->newest = e;
	if (c->count++ == 0)
		pthread_cond_signal(&c->changed);
	pthread_mutex_unlock(&c->lock);
	return true;
}

struct fmt_keys *keycache_take(struct keycache *c, dev_t dev, ino_t ino, unsigned slot,
			       const uint8_t hash[KEYCACHE_HASH_SIZE])
{
	struct fmt_keys *keys = NULL;
	struct entry *e;

	if (!c || c->capacity == 0)
		return NULL;
	pthread_mutex_lock(&c->lock);
	expire_locked(c);
	e = find_locked(c, dev, ino);
	if (e && e->slot == slot && sodium_memcmp(e->hash, hash, KEYCACHE_HASH_SIZE) == 0) {
		keys = e->keys;
		e->keys = NULL;
	}
	/* Taken, or kept for a header the file no longer has (replaced, re-wrapped): gone either way. */
	if (e)
		drop_locked(c, e);
	pthread_mutex_unlock(&c->lock);
	return keys;
}

size_t keycache_wipe(struct keycache *c)
{
	size_t n;

	if (!c)
		return 0;
	pthread_mutex_lock(&c->lock);
	n = c->count;
	while (c->oldest)
		drop_locked(c, c->oldest);
	pthread_mutex_unlock(&c->lock);
	return n;
}

void keycache_hash(const uint8_t raw[FMT_HEADER_SIZE], uint8_t out[KEYCACHE_HASH_SIZE])
{
	crypto_generichash(out, KEYCACHE_HASH_SIZE, raw, FMT_HEADER_SIZE, NULL, 0);
}
