/* lockdown.h: what a lock does to the daemon's caches and keys, wired into the key state as its hooks */
#ifndef KEYFS_FS_LOCKDOWN_H
#define KEYFS_FS_LOCKDOWN_H

struct keyfs;
struct keystate;

/* keystate_new for the daemon fs: its key, volume and paths, with lockdown as the lock hooks.
 * Returns 0 or -ENOMEM. */
int lockdown_keystate_new(struct keyfs *fs, unsigned poll, unsigned grace, int initial_state,
			  struct keystate **ret);

#endif
