/* volume.h: open a volume the one way, for keyfs and keyfsctl: description, host trust, one-mount lock, key service */
#ifndef KEYFS_VOLUME_H
#define KEYFS_VOLUME_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/stat.h>

#include "keyfs/kms.h"
#include "keyfs/voldesc.h"

/*
 * The volume description lives in the backing dir, which keyfs defends against: nothing in it
 * may choose where the API key or a DEK goes, or which key wraps new files. Where a volume's
 * key service is (its location: the fields below) is the host's word, one of:
 *   - a trust record on the host, keyed by the volume uuid, written by 'keyfsctl init' or
 *     'keyfsctl trust': $KEYFS_TRUST_DIR/<uuid>, else /etc/keyfs/volumes/<uuid> for root,
 *     else $XDG_CONFIG_HOME/keyfs/volumes/<uuid> (~/.config/keyfs/volumes/<uuid>);
 *   - the whole location stated on the command line (keyfs -o kms=...,key=...).
 * A keystore or CA file the host names on the command line (-o keystore=, -o ca_file=,
 * --keystore, --ca-file) is the host's word too: it replaces that field, whose value in the
 * description is then neither used nor compared. Any other disagreement is refused, naming the
 * field, before any file but .keyfs is read and before any connection is made.
 */
#define VOL_TRUST_DIR_ENV "KEYFS_TRUST_DIR"

/* What the host says on its command line. Paths absolute; NULL when not given. */
struct vol_host {
	const char *keystore;           /* local: instead of the trusted keystore */
	const char *ca_file;            /* keyprotect: instead of the trusted CA file */
	const char *apikey_file;        /* keyprotect: else $CREDENTIALS_DIRECTORY/apikey */
	/* The location stated whole (keyfs -o kms=...): when kms is set no record is consulted, a
	 * field not given counts as empty, and key_id is checked against the key service's own
	 * id once it is open (before any call to it). */
	const char *kms;
	const char *key;
	const char *endpoint;
	const char *instance;
	const char *iam_endpoint;
};

enum vol_flags {
	VOL_DAEMON = 1 << 0,            /* root fd O_PATH, messages for keyfs (else for keyfsctl) */
	VOL_SKIP_TRUST = 1 << 1,        /* keyfsctl trust only: read the description, trust nothing */
};

struct vol {
	char backing[PATH_MAX];         /* realpath of the backing dir */
	int root_fd;                    /* O_PATH (VOL_DAEMON) or O_RDONLY, O_DIRECTORY */
	struct stat root_st;
	struct voldesc vol;             /* the description, agreeing with the host */
	int lock_fd;                    /* after vol_lock: the locked .keyfs; else -1 */
	struct kms *kms;                /* after vol_kms_open */
	int key_state;                  /* enum kms_key_state, after vol_kms_open */
	/* private */
	unsigned flags;
	bool locked;                    /* lock_fd is ours to close */
	bool stated;                    /* the location came from the command line */
	char keystore[PATH_MAX];        /* the host's keystore, "" for none */
	char ca_file[PATH_MAX];
	char apikey_file[PATH_MAX];
};

/*
 * Open the backing dir arg, read its description and check it against the host (h may be
 * NULL: no command-line word). Returns 0 or an exit code after printing why: 3 not a volume or
 * a bad description, 11 (KEYFS_EXIT_UNTRUSTED) no record, an unsafe record, or a disagreement.
 */
int vol_open(const char *arg, const struct vol_host *h, unsigned flags, struct vol *ret);

/* One daemon per volume, or shared mounts only: flock .keyfs (exclusive) and an OFD lock on its
 * mode byte (include/keyfs/lockspace.h: exclusive or shared), held until vol_close (or the
 * holder of lock_fd closes it). Held by a daemon whose volume is mounted nowhere here (one
 * exiting after its unmount, or a mount on another host), it is waited for, up to 10 s, with an
 * info line saying how long. Returns 0 or an exit code: 5 mounted and live elsewhere (an
 * exclusive mount: by any mount; a shared one: by an exclusive one), or still held after the
 * wait; 3 cannot lock (a shared mount: no OFD locks on the backing filesystem). */
int vol_lock(struct vol *v, bool shared);

/* Mark the lock with the calling process, so that a mount waiting for it can name it: vol_lock
 * does this; a daemon calls it again after it forks to the background. */
void vol_lock_owner(int lock_fd);

/*
 * Open the key service the host trusts and read the key's state into v->key_state (-EKEYREVOKED
 * counts as destroyed). what names the keyfsctl command for messages ("fsck"), NULL for the
 * daemon. Returns 0, or an exit code after printing why: 4 unusable service, 8 key not usable,
 * 11 (stated location) the description's key_id is not the key's.
 */
int vol_kms_open(struct vol *v, const char *what);

void vol_close(struct vol *v);

/* ---- trust records ---- */

/* The directory of trust records for this process (see above). Returns 0 or -errno. */
int vol_trust_dir(char *buf, size_t size);

/* The location fields, in display order: their .keyfs names and values. */
#define VOL_LOCATION_FIELDS 9
const char *vol_location_name(size_t i);
const char *vol_location_value(const struct voldesc *d, size_t i);
/* Is field i part of the location of a volume of d's kms? */
bool vol_location_applies(const struct voldesc *d, size_t i);

/* The record of volume uuid into ret; its path into path. Returns 0, -ENOENT (none), -EPERM
 * (unsafe owner or mode: msg says why), -EINVAL (unreadable contents: msg says why) or -errno. */
int vol_trust_read(const char *uuid, struct voldesc *ret, char *path, size_t path_size, char *msg,
		   size_t msg_size);

/* Record d's location as trusted by this host (atomically; dirs made as needed). Returns 0 or
 * -errno (-EPERM: unsafe trust dir, msg says why); path receives the record's path. */
int vol_trust_write(const struct voldesc *d, char *path, size_t path_size, char *msg, size_t msg_size);

/* Remove the record of volume uuid. Returns 0, -ENOENT or -errno; path receives its path. */
int vol_trust_forget(const char *uuid, char *path, size_t path_size);

#endif
