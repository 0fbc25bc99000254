/* shared.h: a shared mount's byte-range locks around the content operations (docs/LOCKING.md, "Shared volumes") */
#ifndef KEYFS_FS_SHARED_H
#define KEYFS_FS_SHARED_H

#include <stddef.h>
#include <stdint.h>

#include "fs.h"

/*
 * Several daemons (hosts) may mount one volume when it is shared. Each content operation then
 * holds OFD locks (F_OFD_SETLKW, which NFSv4, CephFS and other cluster filesystems carry
 * across hosts) in the lock space of include/keyfs/lockspace.h of its backing file, taken after
 * the inode's content lock and dropped before it:
 *   read                   chunks of the request, shared;
 *   write inside the file  size shared, chunks of the request exclusive;
 *   extending write,       size exclusive, chunks from the old last one to the last written,
 *   append                 exclusive; an append's offset is the size read under that lock;
 *   truncate, fallocate    size and every chunk exclusive.
 * Locks of one open file description do not exclude each other, so a shared mount takes them
 * only while it holds the inode's content lock exclusively (reads included: contents.c).
 * Every function is a no-op returning 0 on an exclusive mount (shared_write_begin still gives
 * an append its offset). On failure nothing is held. Returns 0 or -errno (-ENOLCK when the
 * backing filesystem cannot lock, logged once).
 */
int shared_read_begin(struct keyfs *fs, int fd, uint64_t off, size_t size);
/* *pos: the offset to write at (the request's; for append, the plaintext size). */
int shared_write_begin(struct keyfs *fs, int fd, bool append, size_t size, uint64_t *pos);
int shared_all_begin(struct keyfs *fs, int fd);
void shared_end(struct keyfs *fs, int fd);

#endif
