/* fs.h: the daemon context shared by the fs/ files, and the libfuse API level they are written against */
#ifndef KEYFS_FS_FS_H
#define KEYFS_FS_FS_H

/* FUSE_MAKE_VERSION(3, 14): the libfuse of Debian 12, with fuse_loop_cfg_* and noflush. */
#define FUSE_USE_VERSION 314

#include <limits.h>
#include <stdatomic.h>
#include <stdbool.h>

#include <fuse_lowlevel.h>

#include "keyfs/kms.h"
#include "keyfs/voldesc.h"

#include "inode.h"
#include "keyslab.h"

struct control;
struct dekpool;
struct keystate;
struct prefetch;

/*
 * The one daemon context, passed to libfuse as session userdata. Everything in it is written
 * before the session starts and read-only afterwards, except the inode table and the key slab,
 * which lock themselves, and the atomic counters.
 */
struct keyfs {
	struct voldesc vol;
	struct kms *kms;
	struct keyslab slab;            /* per-file keys, in sodium_malloc memory */
	struct inode_table table;       /* includes the root inode */
	char backing[PATH_MAX];         /* absolute */
	int volume_lock_fd;             /* flock'd BACKING/.keyfs: one daemon per volume; -1 before */
	char mountpoint[PATH_MAX];      /* absolute */
	double timeout;                 /* entry and attribute timeout, seconds */
	bool as_root;                   /* euid 0: new nodes are given to the caller (fchown) */
	bool debug;
	bool writeback;                 /* -o writeback asked; */
	bool writeback_on;              /* ... and the kernel agreed (set by init, before any request) */
	bool shared;                    /* a shared volume: other daemons may mount it (shared.h) */
	/* Counted by contents.c, read by a lock (lockdown.c): WRITE requests accepted while it is
	 * carried out (dirty pages written back), and page write-backs refused once writes are. */
	_Atomic unsigned long lock_writes;
	_Atomic unsigned long lock_refused;
	unsigned long refused_at_lock;  /* lock thread only: lock_refused when the lock began */
	struct fuse_session *se;
	struct dekpool *pool;           /* keys for new files; always set (capacity 0: none ready ahead) */
	struct prefetch *prefetch;      /* NULL: no unwrapping ahead after a readdir */
	unsigned prefetch_max;          /* files per directory listing */
	struct keystate *ks;            /* the root key's state: set before the session starts */
	struct control *control;        /* the control socket; NULL before the mount is live */
	int initial_key_state;          /* as read at startup */
};

/* The request handlers (ops.c: the table; names.c, contents.c, dirs.c, xattrs.c). */
extern const struct fuse_lowlevel_ops keyfs_ops;

#endif
