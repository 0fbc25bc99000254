/* prefetch.c: a bounded queue of listed or looked-up files whose DEKs threads unwrap before they are opened */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "keyfs/log.h"

#include "bgthread.h"
#include "filekeys.h"
#include "prefetch.h"

/* After a failure that says the service or the key is unusable, prefetching rests this long:
 * opens still unwrap their own keys, and report the failure. */
#define PAUSE_MS 10000

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
	if (!p->queue) {
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

	if (!p)
		return;
	/* One at a time: a reference is never dropped under the lock (inode_unref takes the
	 * table's lock and may free the inode). */
	for (;;) {
		pthread_mutex_lock(&p->lock);
		if (p->count == 0) {
			pthread_mutex_unlock(&p->lock);
			return;
		}
		i = p->queue[p->head];
		p->head = (p->head + 1) % PREFETCH_QUEUE;
		p->count--;
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
	pthread_cond_destroy(&p->more);
	pthread_mutex_destroy(&p->lock);
	free(p->queue);
	free(p);
}

void prefetch_add(struct prefetch *p, struct kfs_inode *inode)
{
	bool queued = false;

	pthread_mutex_lock(&p->lock);
	if (!p->stop && p->count < PREFETCH_QUEUE && !resting_locked(p)) {
		p->queue[(p->head + p->count) % PREFETCH_QUEUE] = inode;
		p->count++;
		queued = true;
		/* One more unwrap in flight while more files wait than threads are idle, up to the
		 * bound: a mount that reads little keeps few threads. A thread that cannot be started
		 * leaves the file to those there are (or to its open). */
		if (p->count > p->idle && p->nthreads < p->max_threads &&
		    bgthread_start(&p->threads[p->nthreads], worker, p) == 0)
			p->nthreads++;
		pthread_cond_signal(&p->more);
	}
	pthread_mutex_unlock(&p->lock);
	if (!queued)
		inode_unref(&p->fs->table, inode, 1);
}
