/* control.c: where a mount's control socket lives (include/keyfs/control.h) */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>

#include "keyfs/control.h"

int control_socket_dir(uid_t uid, char *buf, size_t size)
{
	int n = uid == 0 ? snprintf(buf, size, "%s", CONTROL_DIR_ROOT)
			 : snprintf(buf, size, "/run/user/%u/keyfs", (unsigned)uid);

	return n < 0 || (size_t)n >= size ? -ENAMETOOLONG : 0;
}

int control_socket_path(const char *mountpoint, uid_t uid, char *buf, size_t size)
{
	/* FNV-1a: a name, not a secret; the directory's owner and mode guard the socket. */
	uint64_t h = 0xcbf29ce484222325ull;
	char dir[256];
	int n;

	for (const unsigned char *p = (const unsigned char *)mountpoint; *p; p++) {
		h ^= *p;
		h *= 0x100000001b3ull;
	}
	if (control_socket_dir(uid, dir, sizeof(dir)) < 0)
		return -ENAMETOOLONG;
	n = snprintf(buf, size, "%s/%016" PRIx64 ".sock", dir, h);
	return n < 0 || (size_t)n >= size ? -ENAMETOOLONG : 0;
}
