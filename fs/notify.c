/* notify.c: sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET per message */
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "keyfs/log.h"

#include "notify.h"

void notify_send(const char *fmt, ...)
{
	static bool warned;
	const char *path = getenv("NOTIFY_SOCKET");
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	char msg[512];
	size_t plen;
	socklen_t salen;
	va_list ap;
	int fd, n;

	if (!path || !path[0])
		return;
	plen = strlen(path);
	/* "@name" is an abstract socket; anything else must be an absolute path. */
	if ((path[0] != '/' && path[0] != '@') || plen >= sizeof(sa.sun_path))
		goto fail;
	memcpy(sa.sun_path, path, plen);
	if (path[0] == '@')
		sa.sun_path[0] = '\0';
	salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen + (path[0] == '/'));
	va_start(ap, fmt);
	n = vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		goto fail;
	if (sendto(fd, msg, strnlen(msg, sizeof(msg)), MSG_NOSIGNAL, (struct sockaddr *)&sa, salen) < 0) {
		close(fd);
		goto fail;
	}
	close(fd);
	return;
fail:
	if (!warned) {
		warned = true;
		log_warn("cannot notify systemd through '%s': %s", path, strerror(errno));
	}
}
