/* exitcode.h: the exit codes of keyfs and keyfsctl, an append-only interface (docs/EXIT-CODES.md) */
#ifndef KEYFS_EXITCODE_H
#define KEYFS_EXITCODE_H

enum keyfs_exit {
	KEYFS_EXIT_OK = 0,
	KEYFS_EXIT_FAILURE = 1,     /* unexpected failure not covered below */
	KEYFS_EXIT_USAGE = 2,       /* bad command line or mount options */
	KEYFS_EXIT_CONFIG = 3,      /* backing dir missing, not a volume, bad volume description */
	KEYFS_EXIT_KMS = 4,         /* key service unusable: keystore unreadable, key unknown or not active */
	KEYFS_EXIT_MOUNT = 5,       /* mountpoint unusable or the mount itself failed */
	KEYFS_EXIT_IO = 6,          /* I/O error on the backing files */
	KEYFS_EXIT_DAMAGED = 7,     /* fsck: damaged files found */
	KEYFS_EXIT_LOCKED = 8,      /* the key is suspended or destroyed: contents unavailable */
	KEYFS_EXIT_EXISTS = 9,      /* refusing to overwrite: volume or key already exists, dir not empty */
	KEYFS_EXIT_DENIED = 10,     /* not allowed: the control socket is for root and the mount's owner */
	KEYFS_EXIT_UNTRUSTED = 11,  /* the host does not trust the key service the volume description names */
};

#endif
