/* inode.c: the inode table: a hash of backing (dev, ino) to inodes holding O_PATH fds */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "keyfs/log.h"

#include "inode.h"

#define MIN_BUCKETS 1024

static size_t bucket_of(dev_t dev, ino_t ino, size_t nbuckets)
{
	uint64_t h = (uint64_t)ino * 0x9e3779b97f4a7c15ull ^ (uint64_t)dev * 0xc2b2ae3d27d4eb4full;

	return (size_t)(h ^ (h >> 29)) & (nbuckets - 1);
}

static int inode_setup(struct kfs_inode *i, int fd, const struct stat *st)
{
	pthread_rwlockattr_t attr;
	int r;

	i->dev = st->st_dev;
	i->ino = st->st_ino;
	i->type = st->st_mode & S_IFMT;
	i->fd = fd;
	i->nlookup = 1;
	i->keys = NULL;
	/* Writer preference: a steady stream of reads must not starve a write or a truncate. */
	pthread_rwlockattr_init(&attr);
	pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
	r = pthread_rwlock_init(&i->content, &attr);
	pthread_rwlockattr_destroy(&attr);
	if (r)
		return -r;
	r = pthread_mutex_init(&i->keys_lock, NULL);
	if (r) {
		pthread_rwlock_destroy(&i->content);
		return -r;
	}
	r = pthread_cond_init(&i->keys_cond, NULL);
	if (r) {
		pthread_mutex_destroy(&i->keys_lock);
		pthread_rwlock_destroy(&i->content);
		return -r;
	}
	return 0;
}

static void inode_release(struct inode_table *t, struct kfs_inode *i)
{
	close(i->fd);
	keyslab_free(t->slab, i->keys);
	i->keys = NULL;
	pthread_rwlock_destroy(&i->content);
	pthread_cond_destroy(&i->keys_cond);
	pthread_mutex_destroy(&i->keys_lock);
}

int inode_table_init(struct inode_table *t, int root_fd, const struct stat *root_st, struct keyslab *slab)
{
	int r;

	t->buckets = calloc(MIN_BUCKETS, sizeof(*t->buckets));
	if (!t->buckets)
		return -ENOMEM;
	t->nbuckets = MIN_BUCKETS;
	t->count = 0;
	t->slab = slab;
	r = inode_setup(&t->root, root_fd, root_st);
	if (r < 0) {
		free(t->buckets);
		return r;
	}
	t->root.is_root = true;
	t->root.nlookup = 2;
	pthread_mutex_init(&t->lock, NULL);
	return 0;
}

void inode_table_free(struct inode_table *t)
{
	for (size_t b = 0; b < t->nbuckets; b++) {
		struct kfs_inode *i, *next;

		for (i = t->buckets[b]; i; i = next) {
			next = i->hnext;
			inode_release(t, i);
			free(i);
		}
	}
	free(t->buckets);
	t->buckets = NULL;
	t->count = 0;
	inode_release(t, &t->root);
	pthread_mutex_destroy(&t->lock);
}

/* Called with t->lock held. Growing is best effort: a full table only gets slower. */
static void table_grow(struct inode_table *t)
{
	size_t n = t->nbuckets * 2;
	struct kfs_inode **nb = calloc(n, sizeof(*nb));

	if (!nb)
		return;
	for (size_t b = 0; b < t->nbuckets; b++) {
		struct kfs_inode *i, *next;

		for (i = t->buckets[b]; i; i = next) {
			size_t nbk = bucket_of(i->dev, i->ino, n);

			next = i->hnext;
			i->hnext = nb[nbk];
			nb[nbk] = i;
		}
	}
	free(t->buckets);
	t->buckets = nb;
	t->nbuckets = n;
}

int inode_get(struct inode_table *t, int fd, const struct stat *st, struct kfs_inode **ret)
{
	struct kfs_inode *i, *fresh;
	size_t b;
	int r;

	pthread_mutex_lock(&t->lock);
	b = bucket_of(st->st_dev, st->st_ino, t->nbuckets);
	for (i = t->buckets[b]; i; i = i->hnext)
		if (i->ino == st->st_ino && i->dev == st->st_dev)
			break;
	if (i) {
		i->nlookup++;
		pthread_mutex_unlock(&t->lock);
		close(fd);
		*ret = i;
		return 0;
	}
	fresh = calloc(1, sizeof(*fresh));
	if (!fresh) {
		r = -ENOMEM;
		goto fail;
	}
	r = inode_setup(fresh, fd, st);
	if (r < 0) {
		free(fresh);
		goto fail;
	}
	if (t->count >= t->nbuckets) {
		table_grow(t);
		b = bucket_of(st->st_dev, st->st_ino, t->nbuckets);
	}
	fresh->hnext = t->buckets[b];
	t->buckets[b] = fresh;
	t->count++;
	pthread_mutex_unlock(&t->lock);
	*ret = fresh;
	return 0;
fail:
	pthread_mutex_unlock(&t->lock);
	close(fd);
	return r;
}

void inode_label(const struct kfs_inode *i, char *buf, size_t size)
{
	snprintf(buf, size, "inode %u:%u/%lu", major(i->dev), minor(i->dev), (unsigned long)i->ino);
}

void inode_ref(struct inode_table *t, struct kfs_inode *i)
{
	pthread_mutex_lock(&t->lock);
	i->nlookup++;
	pthread_mutex_unlock(&t->lock);
}

void inode_unref(struct inode_table *t, struct kfs_inode *i, uint64_t n)
{
	struct kfs_inode **pp;

	if (i->is_root)
		return;
	pthread_mutex_lock(&t->lock);
	if (n > i->nlookup) {
		log_warn("inode %lu: forget of %lu references, it has %lu", (unsigned long)i->ino,
			 (unsigned long)n, (unsigned long)i->nlookup);
		n = i->nlookup;
	}
	i->nlookup -= n;
	if (i->nlookup > 0) {
		pthread_mutex_unlock(&t->lock);
		return;
	}
	for (pp = &t->buckets[bucket_of(i->dev, i->ino, t->nbuckets)]; *pp; pp = &(*pp)->hnext) {
		if (*pp == i) {
			*pp = i->hnext;
			t->count--;
			break;
		}
	}
	pthread_mutex_unlock(&t->lock);
	inode_release(t, i);
	free(i);
}

size_t inode_table_snapshot(struct inode_table *t, struct kfs_inode ***ret)
{
	struct kfs_inode **v;
	size_t n = 0;

	pthread_mutex_lock(&t->lock);
	v = malloc((t->count + 1) * sizeof(*v));
	if (!v) {
		pthread_mutex_unlock(&t->lock);
		log_err("lock: out of memory listing %zu inodes", t->count);
		*ret = NULL;
		return 0;
	}
	for (size_t b = 0; b < t->nbuckets; b++) {
		for (struct kfs_inode *i = t->buckets[b]; i; i = i->hnext) {
			if (i->type != S_IFREG)
				continue;
			/* A reference of our own: a forget meanwhile cannot free it. */
			i->nlookup++;
			v[n++] = i;
		}
	}
	pthread_mutex_unlock(&t->lock);
	*ret = v;
	return n;
}

void inode_table_release(struct inode_table *t, struct kfs_inode **inodes, size_t n)
{
	for (size_t k = 0; k < n; k++)
		inode_unref(t, inodes[k], 1);
	free(inodes);
}
