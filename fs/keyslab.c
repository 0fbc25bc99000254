/* keyslab.c: slots for per-file secrets carved out of sodium_malloc'd slabs (see keyslab.h for why) */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <sodium.h>

#include "keyfs/format.h"

#include "keyslab.h"

#define SLAB_SLOTS 1024                 /* 64 KiB of secrets per slab */

struct keyslab_slab {
	struct keyslab_slab *next;      /* plain memory: bookkeeping, no secret */
	uint8_t *mem;                   /* sodium_malloc(SLAB_SLOTS * KEYSLAB_SLOT_SIZE) */
};

_Static_assert(KEYSLAB_SLOT_SIZE >= sizeof(void *), "a free slot holds a pointer");
_Static_assert(KEYSLAB_SLOT_SIZE >= sizeof(struct fmt_keys) && KEYSLAB_SLOT_SIZE >= FMT_DEK_SIZE,
	       "a slot holds a file's keys or a DEK");

void keyslab_init(struct keyslab *s)
{
	pthread_mutex_init(&s->lock, NULL);
	s->slabs = NULL;
	s->free = NULL;
}

/* Called with s->lock held. */
static int slab_grow(struct keyslab *s)
{
	struct keyslab_slab *slab = malloc(sizeof(*slab));

	if (!slab)
		return -1;
	slab->mem = sodium_malloc((size_t)SLAB_SLOTS * KEYSLAB_SLOT_SIZE);
	if (!slab->mem) {
		free(slab);
		return -1;
	}
	for (size_t i = 0; i < SLAB_SLOTS; i++) {
		void *slot = slab->mem + i * KEYSLAB_SLOT_SIZE;

		memset(slot, 0, KEYSLAB_SLOT_SIZE);
		memcpy(slot, &s->free, sizeof(void *));
		s->free = slot;
	}
	slab->next = s->slabs;
	s->slabs = slab;
	return 0;
}

void *keyslab_alloc(struct keyslab *s)
{
	void *slot = NULL;

	pthread_mutex_lock(&s->lock);
	if (s->free || slab_grow(s) == 0) {
		slot = s->free;
		memcpy(&s->free, slot, sizeof(void *));
		memset(slot, 0, sizeof(void *));
	}
	pthread_mutex_unlock(&s->lock);
	return slot;
}

void keyslab_free(struct keyslab *s, void *p)
{
	if (!p)
		return;
	sodium_memzero(p, KEYSLAB_SLOT_SIZE);
	pthread_mutex_lock(&s->lock);
	memcpy(p, &s->free, sizeof(void *));
	s->free = p;
	pthread_mutex_unlock(&s->lock);
}

void keyslab_destroy(struct keyslab *s)
{
	struct keyslab_slab *slab, *next;

	pthread_mutex_lock(&s->lock);
	for (slab = s->slabs; slab; slab = next) {
		next = slab->next;
		sodium_free(slab->mem);         /* wipes the whole slab */
		free(slab);
	}
	s->slabs = NULL;
	s->free = NULL;
	pthread_mutex_unlock(&s->lock);
	pthread_mutex_destroy(&s->lock);
}
