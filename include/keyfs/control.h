/* control.h: the control socket between a keyfs daemon and keyfsctl: where it lives and what it speaks */
#ifndef KEYFS_CONTROL_H
#define KEYFS_CONTROL_H

#include <stddef.h>
#include <sys/types.h>

/*
 * Each mount has one unix stream socket, 0600 in a 0700 directory owned by the mount's owner:
 *   uid 0:     /run/keyfs/<id>.sock
 *   other uid: /run/user/<uid>/keyfs/<id>.sock      ($XDG_RUNTIME_DIR's systemd default)
 * where <id> is the 16-hex-digit FNV-1a 64 hash of the canonical (realpath) mountpoint. keyfsctl
 * finds the owner's uid in the mount's "user_id=" option in /proc/self/mountinfo.
 *
 * Protocol: the client sends one request line, the daemon answers one line of JSON and closes.
 *   "status\n"  -> the status object (docs/LOCKING.md): state, reason, key, key_state, last_poll,
 *                  poll, grace, deactivated, backing, mountpoint
 *   "lock\n"    -> the status object after a manual lock took effect (locking is complete)
 *   "unlock\n"  -> the status object after a manual unlock (the mount may stay locked for a
 *                  KMS reason, which "reason" then names)
 *   anything else, or a peer that is neither root nor the daemon's uid (SO_PEERCRED):
 *               -> {"error":"<message>"}
 * Requests are at most CONTROL_REQUEST_MAX bytes; answers at most CONTROL_ANSWER_MAX.
 */
#define CONTROL_REQUEST_MAX 64
#define CONTROL_ANSWER_MAX 8192
#define CONTROL_DIR_ROOT "/run/keyfs"

/* The socket path for the mount at mountpoint (canonical) owned by uid. Returns 0 or -ENAMETOOLONG. */
int control_socket_path(const char *mountpoint, uid_t uid, char *buf, size_t size);

/* The directory that holds it. Returns 0 or -ENAMETOOLONG. */
int control_socket_dir(uid_t uid, char *buf, size_t size);

#endif
