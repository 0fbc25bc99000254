/* loop.c: the multithreaded FUSE request loop over receive buffers keyfs owns, wiped after each request */
#define FUSE_USE_VERSION 314
#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <sys/uio.h>

#include <fuse_lowlevel.h>
#include <sodium.h>

#include "keyfs/log.h"
#include "bgthread.h"
#include "killpriv.h"
#include "loop.h"

/*
 * libfuse 3.14 reads a request into the caller's buffer (fuse_buf.mem, when set) with one read
 * of its session buffer size: at most FUSE_MAX_MAX_PAGES (256) pages plus a 4 KiB header, set
 * in fuse_session_new and only ever lowered after INIT. Our buffers have that size and a
 * PROT_NONE page after them, so a library that read more would fault, not overwrite. Splice
 * (which would leave data in a pipe) is never asked for: ops.c init turns it off.
 */
#define LOOP_MAX_PAGES   256
#define LOOP_HEADER_SIZE 4096

/*
 * Workers live on one of two lists, under lock: running, or idle-exited (returned, waiting to
 * be joined by the next worker start or by loop_run). Once stopping is set the lists no longer
 * change, so loop_run can cancel and join from them without the lock.
 */
struct worker {
	struct loop *lp;
	pthread_t thread;
	uint8_t *mem;                   /* bufsize bytes, then a guard page */
	struct worker *next;
};

struct loop {
	struct fuse_session *se;
	size_t bufsize, mapsize;
	unsigned max_threads, max_idle;
	pthread_mutex_t lock;
	unsigned nworkers;              /* lock: on the running list */
	unsigned navail;                /* lock: of those, waiting for a request */
	struct worker *running;         /* lock */
	struct worker *exited;          /* lock */
	bool stopping;                  /* lock */
	bool start_failed_logged;       /* lock */
	int error;                      /* lock: -errno of a failed read of the device */
	sem_t finish;                   /* posted by a worker that found the session ended */
};

static void *worker_main(void *arg);

/* The worker this thread is, and how much of its buffer the request in hand has used. */
static _Thread_local struct worker *self;
static _Thread_local size_t self_used;

/* The device I/O libfuse would do, plus a look at each request and reply for kill-priv. */
static ssize_t io_read(int fd, void *buf, size_t len, void *userdata)
{
	ssize_t n = read(fd, buf, len);

	(void)userdata;
	if (n > 0)
		killpriv_request(buf, (size_t)n);
	return n;
}

static ssize_t io_writev(int fd, struct iovec *iov, int count, void *userdata)
{
	(void)userdata;
	killpriv_reply(iov, count);
	return writev(fd, iov, count);
}

static void worker_free(struct loop *lp, struct worker *w)
{
	/* Pages given back to the kernel are zeroed before anyone gets them again. */
	if (w->mem)
		munmap(w->mem, lp->mapsize);
	free(w);
}

/* Join and free the workers that exited for being idle. Called with lock held: they no longer take it. */
static void reap_exited(struct loop *lp)
{
	while (lp->exited) {
		struct worker *w = lp->exited;

		lp->exited = w->next;
		pthread_join(w->thread, NULL);
		worker_free(lp, w);
	}
}

/* Start one more worker. Called with lock held. */
static int worker_start(struct loop *lp)
{
	struct worker *w;
	long page = sysconf(_SC_PAGESIZE);
	int r;

	reap_exited(lp);
	w = calloc(1, sizeof(*w));
	if (!w)
		return -ENOMEM;
	w->lp = lp;
	w->mem = mmap(NULL, lp->mapsize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (w->mem == MAP_FAILED) {
		w->mem = NULL;
		worker_free(lp, w);
		return -ENOMEM;
	}
	if (mprotect(w->mem + lp->mapsize - (size_t)page, (size_t)page, PROT_NONE) < 0) {
		r = -errno;
		worker_free(lp, w);
		return r;
	}
	/* Written plaintext passes through here: never in a core dump. */
	madvise(w->mem, lp->mapsize - (size_t)page, MADV_DONTDUMP);
	r = bgthread_start(&w->thread, worker_main, w);
	if (r < 0) {
		worker_free(lp, w);
		return r;
	}
	w->next = lp->running;
	lp->running = w;
	lp->nworkers++;
	lp->navail++;
	return 0;
}

/* Idle for good: off the running list, onto the exited one. Called with lock held. */
static void worker_retire(struct loop *lp, struct worker *w)
{
	for (struct worker **p = &lp->running; *p; p = &(*p)->next) {
		if (*p == w) {
			*p = w->next;
			break;
		}
	}
	w->next = lp->exited;
	lp->exited = w;
	lp->nworkers--;
	lp->navail--;
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct loop *lp = w->lp;
	int r;

	/* Cancelled (by loop_run, at the end) only while waiting for a request. */
	pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, NULL);
	while (!fuse_session_exited(lp->se)) {
		struct fuse_buf buf = { .mem = w->mem, .size = lp->bufsize };

		pthread_setcancelstate(PTHREAD_CANCEL_ENABLE, NULL);
		r = fuse_session_receive_buf(lp->se, &buf);
		pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, NULL);
		if (r == -EINTR || r == -EAGAIN)
			continue;
		if (r <= 0) {
			if (r < 0) {
				pthread_mutex_lock(&lp->lock);
				if (!lp->error)
					lp->error = r;
				pthread_mutex_unlock(&lp->lock);
				fuse_session_exit(lp->se);
			}
			break;
		}

		pthread_mutex_lock(&lp->lock);
		lp->navail--;
		/* Everyone busy: one more worker, so a slow request (a key service call) blocks no other. */
		if (lp->navail == 0 && lp->nworkers < lp->max_threads && !lp->stopping) {
			int s = worker_start(lp);

			if (s < 0 && !lp->start_failed_logged) {
				log_warn("fuse loop: cannot start another worker (%d running): %s", lp->nworkers,
					 strerror(-s));
				lp->start_failed_logged = true;
			}
		}
		pthread_mutex_unlock(&lp->lock);

		self = w;
		self_used = (size_t)r < lp->bufsize ? (size_t)r : lp->bufsize;
		fuse_session_process_buf(lp->se, &buf);
		self = NULL;
		/* Answered: the request (a write's plaintext, a name) and the reply (a read's
		 * plaintext, loop_reply_buffer) are of no more use. */
		if (!(buf.flags & FUSE_BUF_IS_FD))
			sodium_memzero(w->mem, self_used);

		pthread_mutex_lock(&lp->lock);
		lp->navail++;
		if (lp->navail > lp->max_idle && lp->nworkers > 1 && !lp->stopping) {
			worker_retire(lp, w);
			pthread_mutex_unlock(&lp->lock);
			return NULL;
		}
		pthread_mutex_unlock(&lp->lock);
	}
	sem_post(&lp->finish);
	return NULL;
}

void *loop_reply_buffer(size_t size)
{
	struct worker *w = self;

	/* The request must end before the reply starts: true of a READ (a header and its
	 * arguments), not of a WRITE, whose data fills the buffer. */
	if (!w || self_used > LOOP_HEADER_SIZE || size > w->lp->bufsize - LOOP_HEADER_SIZE)
		return NULL;
	self_used = LOOP_HEADER_SIZE + size;
	return w->mem + LOOP_HEADER_SIZE;
}

int loop_run(struct fuse_session *se, const struct loop_config *cfg)
{
	struct loop lp = { .se = se };
	struct worker *list[2];
	long page = sysconf(_SC_PAGESIZE);
	int r;

	if (page <= 0)
		return -EINVAL;
	lp.bufsize = LOOP_MAX_PAGES * (size_t)page + LOOP_HEADER_SIZE;
	lp.mapsize = (lp.bufsize + (size_t)page - 1) / (size_t)page * (size_t)page + (size_t)page;
	lp.max_threads = cfg->max_threads ? cfg->max_threads : 1;
	lp.max_idle = cfg->max_idle;
	/* Read and write the device ourselves (no splice: every byte is transformed anyway). */
	r = fuse_session_custom_io(se, &(struct fuse_custom_io){ .read = io_read, .writev = io_writev },
				   fuse_session_fd(se));
	if (r < 0)
		return r;
	pthread_mutex_init(&lp.lock, NULL);
	if (sem_init(&lp.finish, 0, 0) < 0) {
		r = -errno;
		pthread_mutex_destroy(&lp.lock);
		return r;
	}

	pthread_mutex_lock(&lp.lock);
	r = worker_start(&lp);
	pthread_mutex_unlock(&lp.lock);
	if (r < 0) {
		sem_destroy(&lp.finish);
		pthread_mutex_destroy(&lp.lock);
		return r;
	}

	/* Signals (SIGTERM, SIGINT, SIGHUP) reach this thread only: workers block them. libfuse's
	 * handler ends the session and interrupts the wait; the timeout covers a signal that
	 * came between the check and the wait. */
	while (!fuse_session_exited(se)) {
		struct timespec t;

		clock_gettime(CLOCK_REALTIME, &t);
		t.tv_sec += 1;
		sem_timedwait(&lp.finish, &t);
	}

	pthread_mutex_lock(&lp.lock);
	lp.stopping = true;
	list[0] = lp.running;
	list[1] = lp.exited;
	r = lp.error;
	pthread_mutex_unlock(&lp.lock);
	/* Workers waiting in a read of the device end there; one answering a request finishes it. */
	for (struct worker *w = list[0]; w; w = w->next)
		pthread_cancel(w->thread);
	for (int i = 0; i < 2; i++) {
		while (list[i]) {
			struct worker *w = list[i];

			list[i] = w->next;
			pthread_join(w->thread, NULL);
			worker_free(&lp, w);
		}
	}
	sem_destroy(&lp.finish);
	pthread_mutex_destroy(&lp.lock);
	fuse_session_reset(se);
	return r;
}
