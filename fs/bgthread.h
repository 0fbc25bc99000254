/* bgthread.h: background threads of the daemon (key pool, prefetch): started with every signal blocked */
#ifndef KEYFS_FS_BGTHREAD_H
#define KEYFS_FS_BGTHREAD_H

#include <pthread.h>
#include <stdbool.h>
#include <time.h>

/* Start fn(arg) with all signals blocked, so SIGTERM and SIGINT reach the FUSE loop's thread
 * (libfuse's own workers block them the same way). Returns 0 or -errno. */
int bgthread_start(pthread_t *ret, void *(*fn)(void *), void *arg);

/* A condition variable timed on CLOCK_MONOTONIC, for waits the wall clock must not stretch. */
int bgthread_cond_init(pthread_cond_t *c);

/* now + ms on CLOCK_MONOTONIC. */
struct timespec bgthread_deadline(unsigned ms);

/* The deadline has passed. */
bool bgthread_reached(const struct timespec *deadline);

#endif
