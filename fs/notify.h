/* notify.h: the systemd notification protocol (sd_notify), spoken directly: no libsystemd needed */
#ifndef KEYFS_FS_NOTIFY_H
#define KEYFS_FS_NOTIFY_H

/* Send one notification ("READY=1", "STATUS=...") to $NOTIFY_SOCKET; nothing when it is unset.
 * Best effort: a failure is logged once and otherwise ignored. */
void notify_send(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
