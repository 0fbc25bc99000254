/* inode.c: the inode table: a hash of backing (dev, ino) to inodes, and a bounded cache of their O_PATH fds */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include "keyfs/log.h"

#include "inode.h"
#include "keycache.h"

_Static_assert(sizeof(((struct kfs_inode *)0)->header_hash) == KEYCACHE_HASH_SIZE, "a header hash fits");

/*
 * Why an fd cache. The kernel keeps a node for every file a walk has seen, and forgets them only
 * under memory pressure: a `find` over a million files leaves a million nodes. One O_PATH fd per
 * node met the fd limit (which root may raise, but a unit or a container may cap) and then every
 * lookup, create and mkdir failed with EMFILE. So an inode keeps its fd only while it is among the
 * fd_cap most recently used ones; the others are closed and opened again on demand:
 *
 * - by file handle: name_to_handle_at() on the fd just before it is closed the first time (at
 *   the lookup it cost every lookup a syscall and an allocation, for the few inodes that are ever
 *   evicted; the name is kept until then, and stays the way back where no handle is given),
 *   open_by_handle_at() on the backing root's mount. That needs CAP_DAC_READ_SEARCH (the daemon as root; the systemd unit
 *   keeps it in its bounding set) and a backing filesystem that gives handles. A handle names the
 *   inode itself, exactly like the fd it stands for: no name is resolved, so no symlink can be
 *   followed, and a rename in the backing dir changes nothing; a deleted file answers ESTALE.
 * - otherwise by parent inode and name (unprivileged daemons, nested mounts, filesystems without
 *   handles): openat(parent fd, name, O_PATH | O_NOFOLLOW), one component and never following a
 *   symlink, then the result must be this inode again (dev, ino and type). Anything else - the
 *   file renamed away in the backing dir, or replaced by a symlink or another file - answers
 *   ESTALE: the kernel then drops its node and looks the name up afresh, so the user sees what
 *   the backing dir holds now, never another file's bytes under the old node. Renames through
 *   the mount update the stored name (inode_moved), so they keep working.
 *
 * An fd in use (between inode_fd() and inode_fd_put(), which open files hold for as long as they
 * are open) is never closed: an fd number could otherwise be reused under a caller. fd_cap leaves
 * a quarter of the limit for those, directory handles, /dev/fuse clones and key service sockets;
 * if an open still fails with EMFILE, half the cache is closed, the open retried once, and that
 * is logged (rate-limited) with what to do. The alternative of asking the kernel to forget nodes
 * (notify_inval_entry) was not taken: the kernel may keep a node it has in use, and forgetting
 * costs every later access a full lookup.
 */

/* More fds than this buy nothing: a reopen by handle costs about a microsecond. */
#define FD_CAP_MAX 65536
#define FD_CAP_MIN 32
/* Ancestors opened again by name for one reopen; a cycle of stale names ends here too. */
#define REOPEN_DEPTH_MAX 256
#define SHORTAGE_LOG_INTERVAL 60

#define MIN_BUCKETS 1024

static size_t bucket_of(dev_t dev, ino_t ino, size_t nbuckets)
{
	uint64_t h = (uint64_t)ino * 0x9e3779b97f4a7c15ull ^ (uint64_t)dev * 0xc2b2ae3d27d4eb4full;

	return (size_t)(h ^ (h >> 29)) & (nbuckets - 1);
}

/* ---- logging a shortage: once, then at most once a minute with a count ---- */

static pthread_mutex_t shortage_lock = PTHREAD_MUTEX_INITIALIZER;

/* True when a line is due now; *skipped: events since the last line. */
static bool shortage_due(time_t *last, unsigned long *count, unsigned long *skipped)
{
	struct timespec now;
	bool due;

	clock_gettime(CLOCK_MONOTONIC, &now);
	pthread_mutex_lock(&shortage_lock);
	due = *last == 0 || now.tv_sec - *last >= SHORTAGE_LOG_INTERVAL;
	*skipped = *count;
	if (due) {
		*last = now.tv_sec ? now.tv_sec : 1;
		*count = 0;
	} else {
		(*count)++;
	}
	pthread_mutex_unlock(&shortage_lock);
	return due;
}

static void log_nomem(size_t count)
{
	static time_t last;
	static unsigned long count_since;
	unsigned long skipped;

	if (shortage_due(&last, &count_since, &skipped))
		log_err("out of memory for the inode table (%zu inodes known, %lu more failures since the last "
			"message): lookups fail with ENOMEM; give the keyfs daemon more memory (MemoryMax= of "
			"its unit) or make the kernel forget inodes (echo 2 > /proc/sys/vm/drop_caches)",
			count, skipped);
}

/* ---- the LRU list of cached fds not in use; all under t->lock ---- */

static bool lru_on(const struct inode_table *t, const struct kfs_inode *i)
{
	return i->lru_prev || t->lru_head == i;
}

static void lru_remove(struct inode_table *t, struct kfs_inode *i)
{
	if (i->lru_prev)
		i->lru_prev->lru_next = i->lru_next;
	else
		t->lru_head = i->lru_next;
	if (i->lru_next)
		i->lru_next->lru_prev = i->lru_prev;
	else
		t->lru_tail = i->lru_prev;
	i->lru_prev = i->lru_next = NULL;
}

static void lru_push(struct inode_table *t, struct kfs_inode *i)
{
	i->lru_prev = NULL;
	i->lru_next = t->lru_head;
	if (t->lru_head)
		t->lru_head->lru_prev = i;
	else
		t->lru_tail = i;
	t->lru_head = i;
}

static struct file_handle *handle_of(const struct inode_table *t, int fd);

/* Close least recently used fds not in use until at most target are open. */
static void shrink_locked(struct inode_table *t, size_t target)
{
	while (t->nfds > target && t->lru_tail) {
		struct kfs_inode *i = t->lru_tail;

		lru_remove(t, i);
		if (i->handle_later) {
			/* The one moment the handle is needed, from the fd that is this inode. */
			i->handle = handle_of(t, i->fd);
			i->handle_later = false;
		}
		close(i->fd);
		i->fd = -1;
		t->nfds--;
	}
}

static size_t nofile_limit(void)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
		return 1024;
	if (rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur > SIZE_MAX / 2)
		return SIZE_MAX / 2;
	return (size_t)rl.rlim_cur;
}

/* Called once, at the first lookup: main() has set the fd limit by then. */
static void cap_init(struct inode_table *t)
{
	size_t limit = nofile_limit();
	size_t reserve = limit / 4 > 64 ? limit / 4 : 64;

	t->fd_cap = limit > reserve + FD_CAP_MIN ? limit - reserve : FD_CAP_MIN;
	if (t->fd_cap > FD_CAP_MAX)
		t->fd_cap = FD_CAP_MAX;
	log_info("inode fds: at most %zu kept open (fd limit %zu), reopened by %s", t->fd_cap, limit,
		 t->mount_fd >= 0 ? "file handle" : "parent and name");
}

/* ---- inodes ---- */

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
	if (i->fd >= 0)
		close(i->fd);
	i->fd = -1;
	keyslab_free(t->slab, i->keys);
	i->keys = NULL;
	free(i->handle);
	i->handle = NULL;
	free(i->name);
	i->name = NULL;
	pthread_rwlock_destroy(&i->content);
	pthread_cond_destroy(&i->keys_cond);
	pthread_mutex_destroy(&i->keys_lock);
}

/* The handle of fd, when handles are usable and fd is on the root's mount; NULL otherwise. */
static struct file_handle *handle_of(const struct inode_table *t, int fd)
{
	_Alignas(struct file_handle) unsigned char buf[sizeof(struct file_handle) + MAX_HANDLE_SZ];
	struct file_handle *fh = (struct file_handle *)buf, *copy;
	int mount_id;

	if (t->mount_fd < 0)
		return NULL;
	fh->handle_bytes = MAX_HANDLE_SZ;
	if (name_to_handle_at(fd, "", fh, &mount_id, AT_EMPTY_PATH) < 0 || mount_id != t->mount_id ||
	    fh->handle_bytes > MAX_HANDLE_SZ)
		return NULL;
	copy = malloc(sizeof(*fh) + fh->handle_bytes);
	if (copy)
		memcpy(copy, fh, sizeof(*fh) + fh->handle_bytes);
	return copy;
}

/* Reopening by handle needs CAP_DAC_READ_SEARCH: try it on the root. */
static void handles_init(struct inode_table *t)
{
	_Alignas(struct file_handle) unsigned char buf[sizeof(struct file_handle) + MAX_HANDLE_SZ];
	struct file_handle *fh = (struct file_handle *)buf;
	char proc[32];
	int mount_fd, fd, mount_id;

	t->mount_fd = -1;
	fh->handle_bytes = MAX_HANDLE_SZ;
	if (name_to_handle_at(t->root.fd, "", fh, &mount_id, AT_EMPTY_PATH) < 0)
		return;
	/* open_by_handle_at() wants an fd of the mount that is not O_PATH. */
	snprintf(proc, sizeof(proc), "/proc/self/fd/%d", t->root.fd);
	mount_fd = open(proc, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (mount_fd < 0)
		return;
	fd = open_by_handle_at(mount_fd, fh, O_PATH | O_CLOEXEC);
	if (fd < 0) {
		close(mount_fd);
		return;
	}
	close(fd);
	t->mount_fd = mount_fd;
	t->mount_id = mount_id;
}

int inode_table_init(struct inode_table *t, int root_fd, const struct stat *root_st, struct keyslab *slab)
{
	int r;

	memset(t, 0, sizeof(*t));
	t->buckets = calloc(MIN_BUCKETS, sizeof(*t->buckets));
	if (!t->buckets)
		return -ENOMEM;
	t->nbuckets = MIN_BUCKETS;
	t->slab = slab;
	r = inode_setup(&t->root, root_fd, root_st);
	if (r < 0) {
		free(t->buckets);
		return r;
	}
	t->root.is_root = true;
	t->root.nlookup = 2;
	handles_init(t);
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
	t->lru_head = t->lru_tail = NULL;
	t->nfds = 0;
	if (t->mount_fd >= 0)
		close(t->mount_fd);
	t->mount_fd = -1;
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

static struct kfs_inode *find_locked(struct inode_table *t, dev_t dev, ino_t ino)
{
	struct kfs_inode *i;

	for (i = t->buckets[bucket_of(dev, ino, t->nbuckets)]; i; i = i->hnext)
		if (i->ino == ino && i->dev == dev)
			return i;
	return NULL;
}

/* Remember name in parent as how i is reopened. Returns the old parent, whose reference the
 * caller drops after unlocking (NULL: none to drop). Keeps the old name when out of memory. */
static struct kfs_inode *name_set_locked(struct kfs_inode *i, struct kfs_inode *parent, const char *name)
{
	struct kfs_inode *old = i->parent;
	char *copy;

	if (i->handle || (old == parent && i->name && strcmp(i->name, name) == 0))
		return NULL;
	copy = strdup(name);
	if (!copy)
		return NULL;
	free(i->name);
	i->name = copy;
	if (!parent->is_root)
		parent->nlookup++;
	i->parent = parent;
	return old && !old->is_root ? old : NULL;
}

/* A new inode, not in the table yet and without its fd (the caller gives it one). */
static int inode_new(struct inode_table *t, int fd, const struct stat *st, struct kfs_inode *parent,
		     const char *name, struct kfs_inode **ret)
{
	struct kfs_inode *i = calloc(1, sizeof(*i));
	int r;

	if (!i)
		return -ENOMEM;
	r = inode_setup(i, -1, st);
	if (r < 0) {
		free(i);
		return r;
	}
	/* The handle comes at the first eviction (shrink_locked); until then, and when there is
	 * none, the name the lookup used (the parent's reference is taken when the inode goes into
	 * the table). With neither, the fd is never evicted. */
	i->handle_later = t->mount_fd >= 0;
	if (parent && name) {
		i->name = strdup(name);
		if (!i->name) {
			inode_release(t, i);
			free(i);
			return -ENOMEM;
		}
		i->parent = parent;
	}
	*ret = i;
	return 0;
}

int inode_get(struct inode_table *t, int fd, const struct stat *st, struct kfs_inode *parent, const char *name,
	      struct kfs_inode **ret)
{
	struct kfs_inode *i, *fresh = NULL, *drop = NULL;
	int r;

	pthread_mutex_lock(&t->lock);
	if (!t->fd_cap)
		cap_init(t);
	/* Make a new inode (handle, name) without the lock, then look again. */
	while (!(i = find_locked(t, st->st_dev, st->st_ino)) && !fresh) {
		pthread_mutex_unlock(&t->lock);
		r = inode_new(t, fd, st, parent, name, &fresh);
		if (r < 0) {
			if (r == -ENOMEM)
				log_nomem(t->count);
			close(fd);
			return r;
		}
		pthread_mutex_lock(&t->lock);
	}
	if (i) {
		i->nlookup++;
		/* This lookup just found it there: the freshest name to reopen it by. */
		if (parent && name)
			drop = name_set_locked(i, parent, name);
	} else {
		i = fresh;
		fresh = NULL;
		if (t->count >= t->nbuckets)
			table_grow(t);
		size_t b = bucket_of(i->dev, i->ino, t->nbuckets);

		i->hnext = t->buckets[b];
		t->buckets[b] = i;
		t->count++;
		if (i->parent && !i->parent->is_root)
			i->parent->nlookup++;
	}
	if (i->fd < 0) {
		/* Evicted (or new): the lookup's fd saves a reopen. */
		i->fd = fd;
		fd = -1;
		t->nfds++;
		lru_push(t, i);
		shrink_locked(t, t->fd_cap);
	} else if (lru_on(t, i)) {
		lru_remove(t, i);
		lru_push(t, i);
	}
	pthread_mutex_unlock(&t->lock);
	if (fd >= 0)
		close(fd);
	if (fresh) {
		/* Lost a race with another lookup of the same file: never in the table. */
		inode_release(t, fresh);
		free(fresh);
	}
	if (drop)
		inode_unref(t, drop, 1);
	*ret = i;
	return 0;
}

void inode_moved(struct inode_table *t, const struct stat *st, struct kfs_inode *parent, const char *name)
{
	struct kfs_inode *i, *drop = NULL;

	pthread_mutex_lock(&t->lock);
	i = find_locked(t, st->st_dev, st->st_ino);
	if (i && !i->is_root)
		drop = name_set_locked(i, parent, name);
	pthread_mutex_unlock(&t->lock);
	if (drop)
		inode_unref(t, drop, 1);
}

bool inode_fd_shortage(struct inode_table *t, int err)
{
	static time_t last;
	static unsigned long count_since;
	unsigned long skipped;
	size_t cached, closed;

	if (err != EMFILE && err != ENFILE)
		return false;
	pthread_mutex_lock(&t->lock);
	cached = t->nfds;
	shrink_locked(t, t->nfds / 2);
	closed = cached - t->nfds;
	pthread_mutex_unlock(&t->lock);
	if (shortage_due(&last, &count_since, &skipped)) {
		if (err == EMFILE)
			log_warn("out of file descriptors (EMFILE, limit %zu) with %zu inode fds cached: closed %zu "
				 "of them; the rest are open files and directories. Raise the daemon's limit "
				 "(LimitNOFILE= in its unit, ulimit -n) if this repeats (%lu times since the last "
				 "message)", nofile_limit(), cached, closed, skipped);
		else
			log_warn("the system is out of file descriptors (ENFILE) with %zu inode fds cached: closed "
				 "%zu of them; raise fs.file-max (sysctl) if this repeats (%lu times since the last "
				 "message)", cached, closed, skipped);
	}
	errno = err;
	return closed > 0;
}

static int fd_get(struct inode_table *t, struct kfs_inode *i, unsigned depth);

/* Open i's backing inode again, without t->lock; the result is verified to be i. */
static int reopen(struct inode_table *t, struct kfs_inode *i, unsigned depth)
{
	struct stat st;
	int fd;

	if (i->handle) {
		fd = open_by_handle_at(t->mount_fd, i->handle, O_PATH | O_CLOEXEC);
		if (fd < 0 && inode_fd_shortage(t, errno))
			fd = open_by_handle_at(t->mount_fd, i->handle, O_PATH | O_CLOEXEC);
		if (fd < 0)
			return errno == ENOENT ? -ESTALE : -errno;
	} else {
		char name[NAME_MAX + 1];
		struct kfs_inode *parent;
		int pfd;

		if (depth >= REOPEN_DEPTH_MAX)
			return -ESTALE;
		pthread_mutex_lock(&t->lock);
		parent = i->parent;
		if (!parent || !i->name || strlen(i->name) > NAME_MAX) {
			pthread_mutex_unlock(&t->lock);
			return -ESTALE;
		}
		strcpy(name, i->name);
		/* Our own reference: a rename meanwhile may drop i's on this parent. */
		if (!parent->is_root)
			parent->nlookup++;
		pthread_mutex_unlock(&t->lock);
		pfd = fd_get(t, parent, depth + 1);
		fd = pfd;
		if (pfd >= 0) {
			fd = openat(pfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
			if (fd < 0 && inode_fd_shortage(t, errno))
				fd = openat(pfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
			if (fd < 0)
				fd = errno == ENOENT || errno == ENOTDIR ? -ESTALE : -errno;
			inode_fd_put(t, parent);
		}
		inode_unref(t, parent, 1);
		if (fd < 0)
			return fd;
	}
	if (fstatat(fd, "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0 || st.st_dev != i->dev ||
	    st.st_ino != i->ino || (st.st_mode & S_IFMT) != i->type) {
		close(fd);
		return -ESTALE;
	}
	return fd;
}

static int fd_get(struct inode_table *t, struct kfs_inode *i, unsigned depth)
{
	int fd, extra = -1;

	if (i->is_root)
		return i->fd;
	pthread_mutex_lock(&t->lock);
	if (i->fd >= 0) {
		if (lru_on(t, i))
			lru_remove(t, i);
		i->fd_users++;
		fd = i->fd;
		pthread_mutex_unlock(&t->lock);
		return fd;
	}
	pthread_mutex_unlock(&t->lock);
	fd = reopen(t, i, depth);
	if (fd < 0)
		return fd;
	pthread_mutex_lock(&t->lock);
	if (i->fd >= 0) {
		extra = fd;     /* reopened by another thread meanwhile */
		if (lru_on(t, i))
			lru_remove(t, i);
	} else {
		i->fd = fd;
		t->nfds++;
		t->reopens++;
	}
	i->fd_users++;
	fd = i->fd;
	shrink_locked(t, t->fd_cap);
	pthread_mutex_unlock(&t->lock);
	if (extra >= 0)
		close(extra);
	return fd;
}

int inode_fd(struct inode_table *t, struct kfs_inode *i)
{
	return fd_get(t, i, 0);
}

void inode_fd_put(struct inode_table *t, struct kfs_inode *i)
{
	if (i->is_root)
		return;
	pthread_mutex_lock(&t->lock);
	if (i->fd_users > 0 && --i->fd_users == 0 && i->fd >= 0) {
		lru_push(t, i);
		shrink_locked(t, t->fd_cap);
	}
	pthread_mutex_unlock(&t->lock);
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
	/* Freeing an inode drops its reference on the parent it is reopened through: a loop, not
	 * recursion, for deep trees. */
	while (i && !i->is_root) {
		struct kfs_inode **pp, *parent;

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
		if (lru_on(t, i))
			lru_remove(t, i);
		if (i->fd >= 0)
			t->nfds--;
		parent = i->parent;
		i->parent = NULL;
		pthread_mutex_unlock(&t->lock);
		/* Nobody else holds it: its keys may serve the open that comes for the same file. */
		if (i->keys && i->header_hashed &&
		    keycache_put(t->keycache, i->dev, i->ino, i->header_slot, i->header_hash, i->keys))
			i->keys = NULL;
		inode_release(t, i);
		free(i);
		i = parent;
		n = 1;
	}
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
