/* prefetch.c: a bounded queue of listed or looked-up files whose DEKs threads unwrap before they are opened */
#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "keyfs/log.h"

#include "bgthread.h"
#include "filekeys.h"
#include "prefetch.h"

/* After a failure that says the service or the key is unusable, prefetching rests this long:
 * opens still unwrap their own keys, and report the failure. */
#define PAUSE_MS 10000

/* A file waiting past its listing's window stays this long at most. */
#define LATER_MS 30000

struct later {
	struct kfs_inode *inode;
	struct timespec until;
};

struct ahead {
	dev_t dev;
	ino_t ino;                      /* 0: a free slot */
};

static size_t ahead_bucket(dev_t dev, ino_t ino)
{
	uint64_t h = ((uint64_t)ino ^ ((uint64_t)dev << 32)) * 0x9e3779b97f4a7c15ULL;

	return (size_t)(h >> 52) % PREFETCH_QUEUE;
}

/* Lock order: lock is a leaf; it is never held across a KMS call or an inode_unref. */
struct prefetch {
	struct keyfs *fs;
	pthread_mutex_t lock;
	pthread_cond_t more;            /* lock: queue not empty, or stop */
	struct kfs_inode **queue;       /* lock: ring of PREFETCH_QUEUE, each holding a reference */
	size_t head, count;             /* lock */
	bool stop;                      /* lock */
	bool resting;                   /* lock: since a failure, until rest_until */
	struct timespec rest_until;     /* lock */
	unsigned idle;                  /* lock: threads waiting for a file */
	unsigned max_threads;           /* the unwraps in flight at most */
	pthread_t threads[PREFETCH_THREADS_MAX];
	unsigned nthreads;              /* lock: started (a mount that lists nothing starts none) */
	/*
	 * The sliding window. later: files listed past the first prefetch_max of their listing,
	 * each holding a reference, queued one per listed file opened, and dropped unqueued after
	 * LATER_MS (a listing nobody reads, ls of a big directory, pins nothing for long). ahead:
	 * the backing (dev, ino) of listed files queued and not yet seen opened (an open may come
	 * through another inode object, made by the open's own lookup after the kernel forgot the
	 * listed one, or never knew it). Both FIFO rings of PREFETCH_QUEUE; a full later takes no
	 * more, a full ahead forgets the oldest.
	 */
	struct later *later;            /* lock */
	size_t later_head;              /* lock */
	atomic_size_t later_count;      /* written under lock; read without it by prefetch_opened */
	struct ahead *ahead;            /* lock */
	size_t ahead_next;              /* lock: the slot the next queued file takes */
	/* lock: per bucket of ahead_bucket(), how many slots of ahead hold such a file (255:
	 * at least that many, never lowered again): an open of a file not there (a re-read, a
	 * file nobody listed) is told so without a walk through ahead. */
	uint8_t ahead_in[PREFETCH_QUEUE];
};

static bool service_failed(int r)
{
	switch (r) {
	case -ENOKEY:
	case -EKEYREVOKED:
	case -EKEYEXPIRED:
	case -EACCES:
	case -EHOSTUNREACH:
	case -ETIMEDOUT:
		return true;
	default:
		return false;
	}
}

/* Called with p->lock held. */
static bool resting_locked(struct prefetch *p)
{
	if (p->resting && bgthread_reached(&p->rest_until))
		p->resting = false;
	return p->resting;
}

bool prefetch_wanted(struct kfs_inode *inode)
{
	return S_ISREG(inode->type) && filekeys_wanted(inode);
}

static void *worker(void *arg)
{
	struct prefetch *p = arg;
	struct kfs_inode *i;
	bool rest;
	int r;

	kms_thread_ahead();
	pthread_mutex_lock(&p->lock);
	for (;;) {
		while (!p->stop && p->count == 0) {
			p->idle++;
			pthread_cond_wait(&p->more, &p->lock);
			p->idle--;
		}
		if (p->stop)
			break;
		i = p->queue[p->head];
		p->head = (p->head + 1) % PREFETCH_QUEUE;
		p->count--;
		rest = resting_locked(p);
		pthread_mutex_unlock(&p->lock);

		/* A file the kernel forgot while it waited here (it does, for files a readdirplus
		 * listed, under memory pressure) is loaded too: its keys go to the keycache when we
		 * let go, and the open that looks it up again takes them from there. */
		r = rest ? 0 : filekeys_prefetch(p->fs, i);
		inode_unref(&p->fs->table, i, 1);

		pthread_mutex_lock(&p->lock);
		if (service_failed(r) && !p->resting) {
			log_debug("prefetch: resting %u s after a key service failure: %s", PAUSE_MS / 1000,
				  strerror(-r));
			p->resting = true;
			p->rest_until = bgthread_deadline(PAUSE_MS);
		}
	}
	pthread_mutex_unlock(&p->lock);
	return NULL;
}

int prefetch_new(struct keyfs *fs, unsigned threads, struct prefetch **ret)
{
	struct prefetch *p = calloc(1, sizeof(*p));

	if (!p)
		return -ENOMEM;
	p->fs = fs;
	p->max_threads = threads < 1 ? 1 : threads > PREFETCH_THREADS_MAX ? PREFETCH_THREADS_MAX : threads;
	p->queue = calloc(PREFETCH_QUEUE, sizeof(*p->queue));
	p->later = calloc(PREFETCH_QUEUE, sizeof(*p->later));
	p->ahead = calloc(PREFETCH_QUEUE, sizeof(*p->ahead));
	if (!p->queue || !p->later || !p->ahead) {
		free(p->queue);
		free(p->later);
		free(p->ahead);
		free(p);
		return -ENOMEM;
	}
	pthread_mutex_init(&p->lock, NULL);
	pthread_cond_init(&p->more, NULL);
	*ret = p;
	return 0;
}

void prefetch_clear(struct prefetch *p)
{
	struct kfs_inode *i;
	size_t n;

	if (!p)
		return;
	/* One at a time: a reference is never dropped under the lock (inode_unref takes the
	 * table's lock and may free the inode). */
	for (;;) {
		pthread_mutex_lock(&p->lock);
		n = atomic_load(&p->later_count);
		if (p->count > 0) {
			i = p->queue[p->head];
			p->head = (p->head + 1) % PREFETCH_QUEUE;
			p->count--;
		} else if (n > 0) {
			i = p->later[p->later_head].inode;
			p->later_head = (p->later_head + 1) % PREFETCH_QUEUE;
			atomic_store(&p->later_count, n - 1);
		} else {
			memset(p->ahead, 0, PREFETCH_QUEUE * sizeof(*p->ahead));
			memset(p->ahead_in, 0, sizeof(p->ahead_in));
			pthread_mutex_unlock(&p->lock);
			return;
		}
		pthread_mutex_unlock(&p->lock);
		inode_unref(&p->fs->table, i, 1);
	}
}

void prefetch_free(struct prefetch *p)
{
	if (!p)
		return;
	pthread_mutex_lock(&p->lock);
	p->stop = true;
	pthread_cond_broadcast(&p->more);
	pthread_mutex_unlock(&p->lock);
	/* No thread starts after stop: nthreads is final. */
	for (unsigned k = 0; k < p->nthreads; k++)
		pthread_join(p->threads[k], NULL);
	/* No thread left: the queue is ours. */
	for (size_t k = 0; k < p->count; k++)
		inode_unref(&p->fs->table, p->queue[(p->head + k) % PREFETCH_QUEUE], 1);
	for (size_t k = 0; k < atomic_load(&p->later_count); k++)
		inode_unref(&p->fs->table, p->later[(p->later_head + k) % PREFETCH_QUEUE].inode, 1);
	pthread_cond_destroy(&p->more);
	pthread_mutex_destroy(&p->lock);
	free(p->queue);
	free(p->later);
	free(p->ahead);
	free(p);
}

/* Called with p->lock held: queue inode (its reference goes with it), remembered in ahead when
 * a listing queued it. Returns false when it cannot be queued (the caller drops the reference). */
static bool add_locked(struct prefetch *p, struct kfs_inode *inode, bool listed)
{
	if (p->stop || p->count >= PREFETCH_QUEUE || resting_locked(p))
		return false;
	p->queue[(p->head + p->count) % PREFETCH_QUEUE] = inode;
	p->count++;
	if (listed) {
		struct ahead *slot = &p->ahead[p->ahead_next];
		uint8_t *in;

		/* The oldest is forgotten when the ring is full. */
		if (slot->ino) {
			in = &p->ahead_in[ahead_bucket(slot->dev, slot->ino)];
			if (*in < UINT8_MAX)
				(*in)--;
		}
		*slot = (struct ahead){ .dev = inode->dev, .ino = inode->ino };
		in = &p->ahead_in[ahead_bucket(inode->dev, inode->ino)];
		if (*in < UINT8_MAX)
			(*in)++;
		p->ahead_next = (p->ahead_next + 1) % PREFETCH_QUEUE;
	}
	/* One more unwrap in flight while more files wait than threads are idle, up to the
	 * bound: a mount that reads little keeps few threads. A thread that cannot be started
	 * leaves the file to those there are (or to its open). */
	if (p->count > p->idle && p->nthreads < p->max_threads &&
	    bgthread_start(&p->threads[p->nthreads], worker, p) == 0)
		p->nthreads++;
	pthread_cond_signal(&p->more);
	return true;
}

void prefetch_add(struct prefetch *p, struct kfs_inode *inode)
{
	bool queued;

	pthread_mutex_lock(&p->lock);
	queued = add_locked(p, inode, false);
	pthread_mutex_unlock(&p->lock);
	if (!queued)
		inode_unref(&p->fs->table, inode, 1);
}

/* Drop the files that waited past LATER_MS, one at a time (no reference dropped under lock). */
static void later_expire(struct prefetch *p)
{
	struct kfs_inode *i;
	size_t n;

	while (atomic_load(&p->later_count) > 0) {
		i = NULL;
		pthread_mutex_lock(&p->lock);
		n = atomic_load(&p->later_count);
		if (n > 0 && bgthread_reached(&p->later[p->later_head].until)) {
			i = p->later[p->later_head].inode;
			p->later_head = (p->later_head + 1) % PREFETCH_QUEUE;
			atomic_store(&p->later_count, n - 1);
		}
		pthread_mutex_unlock(&p->lock);
		if (!i)
			return;
		inode_unref(&p->fs->table, i, 1);
	}
}

bool prefetch_later_room(struct prefetch *p)
{
	return atomic_load(&p->later_count) < PREFETCH_QUEUE;
}

void prefetch_listed(struct prefetch *p, struct kfs_inode *inode, bool later)
{
	bool kept = false;
	size_t n;

	later_expire(p);
	pthread_mutex_lock(&p->lock);
	n = atomic_load(&p->later_count);
	if (!later) {
		kept = add_locked(p, inode, true);
	} else if (!p->stop && n < PREFETCH_QUEUE) {
		p->later[(p->later_head + n) % PREFETCH_QUEUE] = (struct later){
			.inode = inode, .until = bgthread_deadline(LATER_MS) };
		atomic_store(&p->later_count, n + 1);
		kept = true;
	}
	pthread_mutex_unlock(&p->lock);
	if (!kept)
		inode_unref(&p->fs->table, inode, 1);
}

void prefetch_opened(struct prefetch *p, const struct kfs_inode *inode)
{
	struct kfs_inode *next = NULL;
	size_t n, b;

	/* Every read passes here: nothing to slide is the common case, and costs no lock. */
	if (!p || atomic_load(&p->later_count) == 0)
		return;
	later_expire(p);
	b = ahead_bucket(inode->dev, inode->ino);
	pthread_mutex_lock(&p->lock);
	for (size_t k = 0; p->ahead_in[b] > 0 && k < PREFETCH_QUEUE; k++) {
		if (p->ahead[k].ino != inode->ino || p->ahead[k].dev != inode->dev)
			continue;
		p->ahead[k].ino = 0;
		if (p->ahead_in[b] < UINT8_MAX)
			p->ahead_in[b]--;
		n = atomic_load(&p->later_count);
		if (n == 0)
			break;
		next = p->later[p->later_head].inode;
		p->later_head = (p->later_head + 1) % PREFETCH_QUEUE;
		atomic_store(&p->later_count, n - 1);
		if (add_locked(p, next, true))
			next = NULL;
		break;
	}
	pthread_mutex_unlock(&p->lock);
	if (next)
		inode_unref(&p->fs->table, next, 1);
}
