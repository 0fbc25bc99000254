/* keyslab.h: small fixed-size slots for per-file secrets (DEKs, derived keys) in sodium_malloc slabs */
#ifndef KEYFS_FS_KEYSLAB_H
#define KEYFS_FS_KEYSLAB_H

#include <pthread.h>
#include <stddef.h>

/*
 * Why not one sodium_malloc per file: each one costs about four memory mappings (guard pages,
 * an mlock'd page), and the kernel allows 65530 per process by default (vm.max_map_count), so a
 * tree of 20000 open or recently created files would exhaust them. Slots are carved out of
 * sodium_malloc'd slabs instead: still guarded, locked and never dumped, a few mappings per
 * thousand files. A freed slot is wiped at once.
 */
#define KEYSLAB_SLOT_SIZE 96            /* >= sizeof(struct fmt_keys) and FMT_DEK_SIZE */

struct keyslab_slab;

struct keyslab {
	pthread_mutex_t lock;
	struct keyslab_slab *slabs;     /* lock */
	void *free;                     /* lock: wiped slots, linked through their first bytes */
};

void keyslab_init(struct keyslab *s);
/* A zeroed slot of KEYSLAB_SLOT_SIZE bytes, or NULL when out of memory. */
void *keyslab_alloc(struct keyslab *s);
/* Wipe and return a slot (NULL is fine). */
void keyslab_free(struct keyslab *s, void *p);
/* Wipe and release every slab; every slot must have been freed or be forgotten. */
void keyslab_destroy(struct keyslab *s);

#endif
