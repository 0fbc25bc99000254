/* ctlsock.c: the control socket server (include/keyfs/control.h): one thread per connection, one request each */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "keyfs/control.h"
#include "keyfs/log.h"
#include "keyfs/util.h"

#include "bgthread.h"
#include "ctlsock.h"
#include "fs.h"
#include "keystate.h"

/* Connections served at once; one more is refused at once. A lock request waits for the lock
 * thread and a slow peer for its request line: neither may keep status from answering. */
#define CONTROL_CLIENTS_MAX 8

struct control {
	struct keystate *ks;
	int listen_fd;
	int stop_pipe[2];               /* a byte on [1] ends the thread */
	bool started;
	pthread_t thread;
	struct sockaddr_un addr;
	pthread_mutex_t lock;
	pthread_cond_t gone;            /* lock: a client thread ended */
	int client_fd[CONTROL_CLIENTS_MAX];     /* lock: -1 when the slot is free */
	unsigned nclients;              /* lock */
};

struct client {
	struct control *c;
	unsigned slot;
};

static void answer(int fd, const char *text)
{
	size_t len = strlen(text), done = 0;

	while (done < len) {
		ssize_t n = send(fd, text + done, len - done, MSG_NOSIGNAL);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return;
		done += (size_t)n;
	}
}

static void answer_error(int fd, const char *msg)
{
	char buf[CONTROL_ERROR_MAX + 16];

	if (control_error_format(msg, buf, sizeof(buf)) > 0)
		answer(fd, buf);
}

static void serve_one(struct control *c, int fd)
{
	struct ucred cred;
	socklen_t clen = sizeof(cred);
	struct timeval tv = { .tv_sec = 5 };
	char req[CONTROL_REQUEST_MAX + 1], out[CONTROL_ANSWER_MAX];
	struct control_status *st;
	size_t got = 0;
	int request;

	/* Read the request first, even from a peer that is refused: answering before reading
	 * would reset the connection and lose the answer. A peer that never sends a full line
	 * cannot hold the thread for long. */
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	while (got < CONTROL_REQUEST_MAX && !memchr(req, '\n', got)) {
		ssize_t n = recv(fd, req + got, CONTROL_REQUEST_MAX - got, 0);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		got += (size_t)n;
	}
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) < 0 ||
	    (cred.uid != 0 && cred.uid != geteuid())) {
		answer_error(fd, "permission denied: only root and the owner of the mount may use it");
		return;
	}
	req[got] = '\0';
	request = control_request_parse(req);
	if (request == CONTROL_LOCK || request == CONTROL_UNLOCK) {
		bool lock = request == CONTROL_LOCK;

		struct timespec t0, t1;

		log_info("manual %s requested (uid %u)", control_request_name(request), (unsigned)cred.uid);
		clock_gettime(CLOCK_MONOTONIC, &t0);
		if (keystate_manual(c->ks, lock) < 0)
			log_warn("manual %s: not carried out within %d s; answering the status as it is",
				 control_request_name(request), KS_MANUAL_WAIT_MS / 1000);
		clock_gettime(CLOCK_MONOTONIC, &t1);
		/* The uid is the kernel's word (SO_PEERCRED), not the peer's. */
		keystate_audit_manual(c->ks, lock, (unsigned)cred.uid,
				      (long long)(t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000);
	} else if (request != CONTROL_STATUS) {
		answer_error(fd, "unknown request: expected status, lock or unlock");
		return;
	}
	st = malloc(sizeof(*st));
	if (!st) {
		answer_error(fd, "out of memory");
		return;
	}
	if (keystate_status(c->ks, st) < 0 || control_status_format(st, out, sizeof(out)) < 0)
		answer_error(fd, "status too large");
	else
		answer(fd, out);
	free(st);
}

static void *client_thread(void *arg)
{
	struct client *cl = arg;
	struct control *c = cl->c;
	int fd;

	pthread_mutex_lock(&c->lock);
	fd = c->client_fd[cl->slot];
	pthread_mutex_unlock(&c->lock);
	serve_one(c, fd);
	pthread_mutex_lock(&c->lock);
	c->client_fd[cl->slot] = -1;
	close(fd);
	c->nclients--;
	pthread_cond_broadcast(&c->gone);
	pthread_mutex_unlock(&c->lock);
	free(cl);
	return NULL;
}

/* Serve fd on a thread of its own; refuse it when CONTROL_CLIENTS_MAX are being served. */
static void dispatch(struct control *c, int fd)
{
	struct client *cl = NULL;
	pthread_attr_t attr;
	pthread_t t;
	unsigned slot = CONTROL_CLIENTS_MAX;

	pthread_mutex_lock(&c->lock);
	for (unsigned i = 0; i < CONTROL_CLIENTS_MAX && slot == CONTROL_CLIENTS_MAX; i++)
		if (c->client_fd[i] < 0)
			slot = i;
	if (slot < CONTROL_CLIENTS_MAX && (cl = malloc(sizeof(*cl)))) {
		*cl = (struct client){ .c = c, .slot = slot };
		c->client_fd[slot] = fd;
		c->nclients++;
	}
	pthread_mutex_unlock(&c->lock);
	if (!cl) {
		answer_error(fd, "busy: too many control requests at once, try again");
		close(fd);
		return;
	}
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	if (pthread_create(&t, &attr, client_thread, cl) != 0) {
		pthread_mutex_lock(&c->lock);
		c->client_fd[slot] = -1;
		c->nclients--;
		pthread_mutex_unlock(&c->lock);
		free(cl);
		answer_error(fd, "busy: cannot start a thread for the request, try again");
		close(fd);
	}
	pthread_attr_destroy(&attr);
}

static void *control_thread(void *arg)
{
	struct control *c = arg;

	for (;;) {
		struct pollfd p[2] = { { .fd = c->listen_fd, .events = POLLIN },
				       { .fd = c->stop_pipe[0], .events = POLLIN } };
		int fd;

		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (p[1].revents)
			break;
		fd = accept4(c->listen_fd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0)
			continue;
		dispatch(c, fd);
	}
	return NULL;
}

/* The socket's directory: created 0700, or an existing one that only its owner can write. */
static int socket_dir(const char *dir)
{
	struct stat st;

	if (mkdir(dir, 0700) < 0 && errno != EEXIST)
		return -errno;
	if (lstat(dir, &st) < 0)
		return -errno;
	if (!S_ISDIR(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & 022))
		return -EPERM;
	return 0;
}

int control_start(struct keyfs *fs, struct keystate *ks, struct control **ret)
{
	struct control *c = calloc(1, sizeof(*c));
	char dir[256];
	int r;

	if (!c)
		return -ENOMEM;
	c->ks = ks;
	c->listen_fd = c->stop_pipe[0] = c->stop_pipe[1] = -1;
	pthread_mutex_init(&c->lock, NULL);
	pthread_cond_init(&c->gone, NULL);
	for (unsigned i = 0; i < CONTROL_CLIENTS_MAX; i++)
		c->client_fd[i] = -1;
	*ret = c;
	c->addr.sun_family = AF_UNIX;
	if (control_socket_dir(geteuid(), dir, sizeof(dir)) < 0 ||
	    control_socket_path(fs->mountpoint, geteuid(), c->addr.sun_path, sizeof(c->addr.sun_path)) < 0) {
		r = -ENAMETOOLONG;
		goto fail;
	}
	r = socket_dir(dir);
	if (r < 0)
		goto fail;
	c->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c->listen_fd < 0 || pipe2(c->stop_pipe, O_CLOEXEC) < 0) {
		r = -errno;
		goto fail;
	}
	/* A socket left by a daemon that died: nobody answers on it any more. */
	unlink(c->addr.sun_path);
	if (bind(c->listen_fd, (struct sockaddr *)&c->addr, sizeof(c->addr)) < 0 ||
	    chmod(c->addr.sun_path, 0600) < 0 || listen(c->listen_fd, 8) < 0) {
		r = -errno;
		goto fail;
	}
	r = bgthread_start(&c->thread, control_thread, c);
	if (r < 0)
		goto fail;
	c->started = true;
	return 0;
fail:
	log_warn("no control socket '%s': %s; keyfsctl status, lock and unlock will not reach this mount",
		 c->addr.sun_path, strerror(-r));
	if (c->listen_fd >= 0)
		close(c->listen_fd);
	c->listen_fd = -1;
	return 0;
}

void control_stop(struct control *c)
{
	if (!c)
		return;
	if (c->started) {
		if (write(c->stop_pipe[1], "x", 1) < 0)
			log_warn("control: cannot stop the control thread: %s", strerror(errno));
		pthread_join(c->thread, NULL);
	}
	/* Client threads: a peer still sending its request is cut off; a lock request ends when
	 * the key state stops (the caller frees it after this). */
	pthread_mutex_lock(&c->lock);
	for (unsigned i = 0; i < CONTROL_CLIENTS_MAX; i++)
		if (c->client_fd[i] >= 0)
			shutdown(c->client_fd[i], SHUT_RDWR);
	while (c->nclients > 0)
		pthread_cond_wait(&c->gone, &c->lock);
	pthread_mutex_unlock(&c->lock);
	pthread_cond_destroy(&c->gone);
	pthread_mutex_destroy(&c->lock);
	if (c->listen_fd >= 0) {
		close(c->listen_fd);
		unlink(c->addr.sun_path);
	}
	if (c->stop_pipe[0] >= 0) {
		close(c->stop_pipe[0]);
		close(c->stop_pipe[1]);
	}
	free(c);
}
