/* ctlsock.h: the control socket server: status, lock and unlock for root and the mount's owner */
#ifndef KEYFS_FS_CTLSOCK_H
#define KEYFS_FS_CTLSOCK_H

struct keyfs;
struct keystate;
struct control;

/* Listen on the socket include/keyfs/control.h names for fs->mountpoint and answer requests in a
 * thread of its own. A socket that cannot be made is a warning, not a failure: the mount still
 * works, keyfsctl status does not. Returns 0 or -ENOMEM. */
int control_start(struct keyfs *fs, struct keystate *ks, struct control **ret);

/* Stop the thread, close and remove the socket. */
void control_stop(struct control *c);

#endif
