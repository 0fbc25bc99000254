/* killpriv.h: FUSE_HANDLE_KILLPRIV_V2 for libfuse 3.14, which knows the protocol but not the flag */
#ifndef KEYFS_KILLPRIV_H
#define KEYFS_KILLPRIV_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/uio.h>

/*
 * Without kill-priv handled, the kernel asks GETXATTR security.capability before every write
 * (file_remove_privs on a superblock without SB_NOSEC). With FUSE_HANDLE_KILLPRIV_V2 it sets
 * SB_NOSEC, remembers "no privileges to drop" per inode until its attributes change, and
 * tells the filesystem in the request when a write, a truncate or an O_TRUNC open must drop
 * suid/sgid: the daemon writes as itself (root has CAP_FSETID), so the backing filesystem
 * would not drop them. libfuse 3.14 neither offers the flag nor passes the per-request bits
 * on, so the loop's custom I/O (loop.c) shows each request and the INIT reply here.
 */

/* A request was read into buf (len bytes) on this thread: note its kill-suid/sgid bit. */
void killpriv_request(const void *buf, size_t len);
/* A reply is about to be written: the INIT reply gets FUSE_HANDLE_KILLPRIV_V2 if offered. */
void killpriv_reply(struct iovec *iov, int count);
/* The request this thread is answering asked to drop suid/sgid (and security.capability). */
bool killpriv_wanted(void);
/* Drop suid, sgid (only with group execute, as the VFS does) and security.capability of the
 * backing file at path (a /proc/self/fd path). Returns 0 or -errno. */
int killpriv_apply(const char *path);

#endif
