/* loop.h: the FUSE request loop: worker threads reading into buffers keyfs owns and wipes after each request */
#ifndef KEYFS_LOOP_H
#define KEYFS_LOOP_H

#include <stddef.h>

struct fuse_session;

struct loop_config {
	unsigned max_threads;           /* workers at most; one more starts when all are busy */
	unsigned max_idle;              /* a worker finding more idle ones than this exits */
};

/*
 * Serve se until it is unmounted or a signal (fuse_set_signal_handlers) ends it; then every
 * worker is stopped and joined and its buffer wiped. Each request is read into a buffer of
 * ours (libfuse's own loop mallocs buffers and never wipes them: written plaintext stayed in
 * them) and the bytes received are zeroed once the request has been answered.
 * Returns 0 after an unmount or a signal, -errno when reading the FUSE device failed.
 */
int loop_run(struct fuse_session *se, const struct loop_config *cfg);

/*
 * size bytes of the calling worker's own buffer for the reply to the request in hand (a READ's
 * plaintext), past the request itself: no malloc per request, and the loop wipes them with the
 * request once it is answered. NULL when the caller is not a worker, the request is large (a
 * WRITE) or size is more than the buffer holds: then use memory of your own. One per request.
 */
void *loop_reply_buffer(size_t size);

#endif
