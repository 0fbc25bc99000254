/* killpriv.c: FUSE_HANDLE_KILLPRIV_V2 from raw requests and the INIT reply (see killpriv.h) */
#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/xattr.h>

#include <linux/fuse.h>

#include "killpriv.h"

static _Atomic uint64_t init_unique;            /* the INIT request that offered the flag; 0: none */
static _Thread_local bool kill_wanted;

void killpriv_request(const void *buf, size_t len)
{
	const struct fuse_in_header *in = buf;
	const char *arg = (const char *)buf + sizeof(*in);
	size_t alen = len > sizeof(*in) ? len - sizeof(*in) : 0;

	kill_wanted = false;
	if (len < sizeof(*in))
		return;
	switch (in->opcode) {
	case FUSE_INIT:
		if (alen >= sizeof(struct fuse_init_in) - sizeof(((struct fuse_init_in *)0)->unused) &&
		    (((const struct fuse_init_in *)arg)->flags & FUSE_HANDLE_KILLPRIV_V2))
			atomic_store(&init_unique, in->unique);
		break;
	case FUSE_WRITE:
		if (alen >= sizeof(struct fuse_write_in))
			kill_wanted = (((const struct fuse_write_in *)arg)->write_flags & FUSE_WRITE_KILL_SUIDGID) != 0;
		break;
	case FUSE_SETATTR:
		if (alen >= sizeof(struct fuse_setattr_in))
			kill_wanted = (((const struct fuse_setattr_in *)arg)->valid & FATTR_KILL_SUIDGID) != 0;
		break;
	case FUSE_OPEN:
		if (alen >= sizeof(struct fuse_open_in))
			kill_wanted = (((const struct fuse_open_in *)arg)->open_flags & FUSE_OPEN_KILL_SUIDGID) != 0;
		break;
	case FUSE_CREATE:
		if (alen >= sizeof(struct fuse_create_in))
			kill_wanted = (((const struct fuse_create_in *)arg)->open_flags & FUSE_OPEN_KILL_SUIDGID) != 0;
		break;
	default:
		break;
	}
}

void killpriv_reply(struct iovec *iov, int count)
{
	const struct fuse_out_header *out;
	struct fuse_init_out *init;
	uint64_t u = atomic_load(&init_unique);

	if (!u || count < 2 || iov[0].iov_len < sizeof(*out))
		return;
	out = iov[0].iov_base;
	if (out->unique != u || out->error != 0 || iov[1].iov_len < offsetof(struct fuse_init_out, flags) + sizeof(init->flags))
		return;
	init = iov[1].iov_base;
	init->flags |= FUSE_HANDLE_KILLPRIV_V2;
	atomic_store(&init_unique, 0);
}

bool killpriv_wanted(void)
{
	return kill_wanted;
}

int killpriv_apply(const char *path)
{
	struct stat st;
	mode_t mode;

	if (stat(path, &st) < 0)
		return -errno;
	mode = st.st_mode & 07777 & ~(mode_t)S_ISUID;
	if (st.st_mode & S_IXGRP)
		mode &= ~(mode_t)S_ISGID;
	if (mode != (st.st_mode & 07777) && chmod(path, mode) < 0)
		return -errno;
	/* Asked first: removing it needs CAP_SETFCAP even when there is none. */
	if (getxattr(path, "security.capability", NULL, 0) >= 0 && removexattr(path, "security.capability") < 0)
		return -errno;
	return 0;
}
