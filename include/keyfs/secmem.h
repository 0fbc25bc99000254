/* secmem.h: process-wide memory hygiene for secrets: wipe-on-free heaps for libcurl, OpenSSL, cJSON; mlockall */
#ifndef KEYFS_SECMEM_H
#define KEYFS_SECMEM_H

/*
 * Route every allocation of libcurl, OpenSSL (libcurl's TLS) and cJSON through functions that
 * zero a block before freeing it: request and response buffers, TLS records, session tickets
 * and parsed JSON hold API keys, tokens and DEKs. Call it first in main(), before any thread
 * and before anything else touches those libraries: OpenSSL accepts new functions only before
 * its first allocation. Idempotent and thread-safe. Returns 0, or -EIO when libcurl cannot be
 * initialised. If OpenSSL had allocated already, its blocks are not wiped: logged once.
 */
int secmem_init(void);

/*
 * Keep this process's memory out of swap: mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT),
 * but only where every later allocation can stay locked (RLIMIT_MEMLOCK infinity, or
 * CAP_IPC_LOCK): under a finite limit MCL_FUTURE would make allocations fail once it is
 * reached. Returns 1 when locked, 0 when not allowed (nothing done), -errno on failure.
 */
int secmem_lock_all(void);

#endif
