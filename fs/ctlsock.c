/* ctlsock.c: the control socket server (include/keyfs/control.h): one thread, one request per connection */
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
#include <unistd.h>

#include "keyfs/control.h"
#include "keyfs/log.h"
#include "keyfs/util.h"

#include "bgthread.h"
#include "ctlsock.h"
#include "fs.h"
#include "keystate.h"

struct control {
	struct keystate *ks;
	int listen_fd;
	int stop_pipe[2];               /* a byte on [1] ends the thread */
	bool started;
	pthread_t thread;
	struct sockaddr_un addr;
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
	char buf[256];

	snprintf(buf, sizeof(buf), "{\"error\":\"%s\"}\n", msg);
	answer(fd, buf);
}

static void serve_one(struct control *c, int fd)
{
	struct ucred cred;
	socklen_t clen = sizeof(cred);
	struct timeval tv = { .tv_sec = 5 };
	char req[CONTROL_REQUEST_MAX + 1], out[CONTROL_ANSWER_MAX];
	size_t got = 0;

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
	if (strcmp(req, "lock\n") == 0) {
		log_info("manual lock requested (uid %u)", (unsigned)cred.uid);
		keystate_manual(c->ks, true);
	} else if (strcmp(req, "unlock\n") == 0) {
		log_info("manual unlock requested (uid %u)", (unsigned)cred.uid);
		keystate_manual(c->ks, false);
	} else if (strcmp(req, "status\n") != 0) {
		answer_error(fd, "unknown request: expected status, lock or unlock");
		return;
	}
	if (keystate_status_json(c->ks, out, sizeof(out)) < 0)
		answer_error(fd, "status too large");
	else
		answer(fd, out);
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
		serve_one(c, fd);
		close(fd);
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
