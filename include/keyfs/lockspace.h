/* lockspace.h: the byte ranges keyfs locks with OFD locks, beyond any real data (docs/FORMAT.md, "Lock space") */
#ifndef KEYFS_LOCKSPACE_H
#define KEYFS_LOCKSPACE_H

#include <stdint.h>

/*
 * A byte-range lock need not cover bytes that exist, so these ranges are independent of the
 * file layout: they lie far past any size a file can reach in its low half, and a later format
 * that moves chunks around keeps them. Only their meaning is the interface:
 *
 * In a regular file (shared mounts; the header lock on the header area is separate):
 *   LOCKSPACE_SIZE             one byte: exclusive for whatever changes the plaintext size
 *                              (extending write, append, truncate, fallocate), shared for a
 *                              write inside the file;
 *   LOCKSPACE_CHUNK(c)         one byte per plaintext chunk c (4096 bytes): shared to read it,
 *                              exclusive to read-modify-write it.
 * In .keyfs (every mount):
 *   LOCKSPACE_MODE             one byte: exclusive for an exclusive mount, shared for a shared
 *                              one, so the two kinds exclude each other on every host the
 *                              backing filesystem carries OFD locks to.
 */
#define LOCKSPACE_BASE          (UINT64_C(1) << 62)
#define LOCKSPACE_SIZE          (LOCKSPACE_BASE - 1)
#define LOCKSPACE_CHUNK(c)      (LOCKSPACE_BASE + (uint64_t)(c))
#define LOCKSPACE_MODE          LOCKSPACE_BASE

#endif
