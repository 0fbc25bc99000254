/* content.c: plaintext ranges of one backing file (layouts v1 and v2): few preads/pwrites per request,
 * partial-chunk RMW, holes */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <sodium.h>

#include "keyfs/content.h"
#include "keyfs/util.h"

#define CS  ((uint64_t)FMT_CHUNK_SIZE)
#define CDS ((uint64_t)FMT_CHUNK_DISK_SIZE)
#define GC  ((uint64_t)FMT_V2_GROUP_CHUNKS)
#define ES  ((size_t)FMT_V2_ENTRY_SIZE)
#define V1  FMT_LAYOUT_V1

/*
 * Per-thread ciphertext scratch buffer. FUSE worker threads serve one request at a time, and
 * a 1 MiB request needs a 1 MiB buffer: allocating it per request would fault pages in every
 * time. It only ever holds ciphertext and nonces, never plaintext, so it needs no wiping.
 */
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

struct scratch {
	size_t size;
	uint8_t data[];
};

static void scratch_key_create(void)
{
	pthread_key_create(&scratch_key, free);
}

static uint8_t *scratch_get(size_t size)
{
	struct scratch *s;

	pthread_once(&scratch_once, scratch_key_create);
	s = pthread_getspecific(scratch_key);
	if (s && s->size >= size)
		return s->data;
	/* Grow in 256 KiB steps so a thread settles on one buffer quickly. */
	size = (size + (256u << 10) - 1) & ~(size_t)((256u << 10) - 1);
	free(s);
	s = malloc(sizeof(*s) + size);
	pthread_setspecific(scratch_key, s);
	if (!s)
		return NULL;
	s->size = size;
	return s->data;
}

/*
 * Nonce randomness, from a per-thread pool that getrandom fills 4 KiB at a time: a 4 KiB write
 * needs 16 bytes (v2) or 24 (v1), and a getrandom syscall per request was 3 % of the daemon's
 * CPU in 4 KiB random writes. Every byte is handed out once. Nonces are public (they are stored
 * in clear next to the chunk), so the pool needs no wiping; only their uniqueness matters, which
 * is the kernel's CSPRNG's as before. A request larger than the pool draws directly.
 */
#define NONCE_POOL 4096

static _Thread_local uint8_t nonce_pool[NONCE_POOL];
static _Thread_local size_t nonce_left;
static pthread_once_t nonce_once = PTHREAD_ONCE_INIT;

/* A forked child (the only thread there is the one that forked) must not hand out what its
 * parent will. */
static void nonce_pool_forget(void)
{
	nonce_left = 0;
}

static void nonce_atfork(void)
{
	pthread_atfork(NULL, NULL, nonce_pool_forget);
}

static void nonce_random(uint8_t *out, size_t n)
{
	pthread_once(&nonce_once, nonce_atfork);
	if (n > NONCE_POOL / 4) {
		randombytes_buf(out, n);
		return;
	}
	if (nonce_left < n) {
		randombytes_buf(nonce_pool, sizeof(nonce_pool));
		nonce_left = sizeof(nonce_pool);
	}
	memcpy(out, nonce_pool + (sizeof(nonce_pool) - nonce_left), n);
	nonce_left -= n;
}

static int pwrite_full(int fd, const void *buf, size_t len, uint64_t off)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n = pwrite(fd, (const uint8_t *)buf + done, len - done, (off_t)(off + done));

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		done += (size_t)n;
	}
	return 0;
}

static int backing_size(int fd, uint64_t *ret)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		return -errno;
	*ret = (uint64_t)st.st_size;
	return 0;
}

/* The backing size of f: the caller's when it knows it (content_file), else fstat. */
static int file_backing_size(const struct content_file *f, uint64_t *ret)
{
	if (f->backing_size_known) {
		*ret = f->backing_size;
		return 0;
	}
	return backing_size(f->fd, ret);
}

/*
 * The tag cache (v2, exclusive mounts): whole tag pages of recently touched groups, so that a
 * read whose tag page is cached needs only the pread of its data pages, and a write rewrites
 * its tag page whole (page-aligned: the backing filesystem never reads it from disk first).
 * Keyed by (content_file.tags_id, group): the caller gives a file an id no other file had and
 * changes it whenever the file's tag entries change outside content_write (truncate,
 * fallocate, a new header), so a page of an old id is never found again and just ages out.
 * Every path here that changes entries under an id updates its cached page, or forgets the
 * id's pages when the backing state is unknown (a failed write). Global, bounded (LRU), one
 * mutex: entries are copied in and out under it, never used in place. Tags are not secret.
 */
#define TAGS_MAX_PAGES 1024u            /* 4 MiB: the tag pages of 512 MiB of data */
#define TAGS_BUCKETS   2048u

struct tag_page {
	struct tag_page *hnext;         /* hash chain */
	struct tag_page *prev, *next;   /* LRU list, most recent first */
	uint64_t id, group;
	uint8_t ents[FMT_V2_PAGE];
};

static pthread_mutex_t tags_lock = PTHREAD_MUTEX_INITIALIZER;
static struct tag_page *tags_hash[TAGS_BUCKETS];        /* tags_lock */
static struct tag_page *tags_head, *tags_tail;           /* tags_lock */
static size_t tags_count;                                /* tags_lock */
static _Atomic uint64_t tags_next_id = 1;

uint64_t content_tags_id(void)
{
	return atomic_fetch_add(&tags_next_id, 1);
}

static size_t tags_bucket(uint64_t id, uint64_t group)
{
	uint64_t h = (id * 0x9e3779b97f4a7c15ull) ^ (group * 0xc2b2ae3d27d4eb4full);

	return (size_t)(h >> 32) & (TAGS_BUCKETS - 1);
}

/*
 * Overwrites beside reads (v2, tag cache on). content_overwrite runs under the caller's shared
 * access, beside reads and other overwrites of the file, so a chunk's data page and its entry
 * no longer change together for everyone else:
 * - Chunk locks: a writer holds the locks of its chunks from writing their data pages until their
 *   entries are in the tag page and the cache, so two overwrites of one chunk leave one of them
 *   whole, data and entry.
 * - Group locks: the tag page of a group is read, changed and written whole by one writer at a
 *   time (short: no disk read once the page is cached). Each has a write sequence, odd while a
 *   tag page write is under way, bumped again after it and its cache update.
 * - Reads take no lock. A chunk that does not authenticate may have met an overwrite half done
 *   (new data under an old entry, or a page torn by a pwrite under way): it is read again under
 *   its chunk lock, which settles it (chunk_open_locked). A read that missed the cache keeps the
 *   tag page it read only if no tag page write of its group overlapped that read (the write
 *   sequence did not move and was even), so the cache never goes back to an older page.
 * Striped by (tags id, chunk or group) over fixed tables; lock order: chunk locks in ascending
 * index, then one group lock, then tags_lock. Nothing here runs when tags_id is 0: without the
 * tag cache (shared mounts, v1) writes are all exclusive.
 */
#define CHUNK_LOCKS 256u
#define GROUP_LOCKS 64u

static pthread_mutex_t chunk_locks[CHUNK_LOCKS];
static pthread_mutex_t group_locks[GROUP_LOCKS];
static _Atomic uint64_t group_seq[GROUP_LOCKS];
static pthread_once_t overwrite_locks_once = PTHREAD_ONCE_INIT;

static void overwrite_locks_init(void)
{
	pthread_mutexattr_t attr;

	/* Held for a pwrite or two: spinning a little beats sleeping on two cores. */
	pthread_mutexattr_init(&attr);
	pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ADAPTIVE_NP);
	for (size_t k = 0; k < CHUNK_LOCKS; k++)
		pthread_mutex_init(&chunk_locks[k], &attr);
	for (size_t k = 0; k < GROUP_LOCKS; k++)
		pthread_mutex_init(&group_locks[k], &attr);
	pthread_mutexattr_destroy(&attr);
}

static size_t chunk_lock_index(const struct content_file *f, uint64_t idx)
{
	return tags_bucket(f->tags_id, idx) % CHUNK_LOCKS;
}

static size_t group_lock_index(const struct content_file *f, uint64_t g)
{
	/* Another mix than the chunks': a group's lock is not one of its chunks' by design. */
	return tags_bucket(f->tags_id ^ 0x5bd1e995u, g) % GROUP_LOCKS;
}

/* The chunk locks of chunks a..b (one group) into ks, ascending, each once; returns how many. */
static size_t chunk_locks_of(const struct content_file *f, uint64_t a, uint64_t b, size_t ks[GC])
{
	size_t n = 0;

	for (uint64_t i = a; i <= b; i++) {
		size_t k = chunk_lock_index(f, i), j = n;

		/* Insertion into the sorted list: a request has a few chunks, 128 at most. */
		while (j > 0 && ks[j - 1] > k)
			j--;
		if (j > 0 && ks[j - 1] == k)
			continue;
		memmove(ks + j + 1, ks + j, (n - j) * sizeof(*ks));
		ks[j] = k;
		n++;
	}
	return n;
}

static void tags_lru_unlink(struct tag_page *t)
{
	if (t->prev)
		t->prev->next = t->next;
	else
		tags_head = t->next;
	if (t->next)
		t->next->prev = t->prev;
	else
		tags_tail = t->prev;
	t->prev = t->next = NULL;
}

static void tags_lru_front(struct tag_page *t)
{
	t->prev = NULL;
	t->next = tags_head;
	if (tags_head)
		tags_head->prev = t;
	tags_head = t;
	if (!tags_tail)
		tags_tail = t;
}

static void tags_hash_unlink(struct tag_page *t)
{
	struct tag_page **pp = &tags_hash[tags_bucket(t->id, t->group)];

	while (*pp && *pp != t)
		pp = &(*pp)->hnext;
	if (*pp)
		*pp = t->hnext;
}

/* The cached page of (id, group), made the most recent; NULL when not cached. tags_lock held. */
static struct tag_page *tags_find(uint64_t id, uint64_t group)
{
	struct tag_page *t = tags_hash[tags_bucket(id, group)];

	while (t && !(t->id == id && t->group == group))
		t = t->hnext;
	if (t && t != tags_head) {
		tags_lru_unlink(t);
		tags_lru_front(t);
	}
	return t;
}

/* Copy n entries of chunks idx.. (one group) of f out of the cache. Returns true on a hit. */
static bool tags_get(const struct content_file *f, uint64_t idx, size_t n, uint8_t *e)
{
	struct tag_page *t;

	if (!f->tags_id)
		return false;
	pthread_mutex_lock(&tags_lock);
	t = tags_find(f->tags_id, idx / GC);
	if (t)
		memcpy(e, t->ents + (idx % GC) * ES, n * ES);
	pthread_mutex_unlock(&tags_lock);
	return t != NULL;
}

/* The whole cached tag page of group g of f into page. Returns true on a hit. */
static bool tags_get_page(const struct content_file *f, uint64_t g, uint8_t page[FMT_V2_PAGE])
{
	return tags_get(f, g * GC, GC, page);
}

/* Cache page as the tag page of group g of f (unless only_new and one is cached). tags_lock held. */
static void tags_put_locked(const struct content_file *f, uint64_t g, const uint8_t page[FMT_V2_PAGE], bool only_new)
{
	struct tag_page *t = tags_find(f->tags_id, g);

	if (t && only_new)
		return;
	if (!t) {
		if (tags_count >= TAGS_MAX_PAGES) {
			/* Full: the least recently used page becomes this one. */
			t = tags_tail;
			tags_hash_unlink(t);
			tags_lru_unlink(t);
		} else {
			t = malloc(sizeof(*t));
			if (!t)
				return;
			tags_count++;
		}
		t->id = f->tags_id;
		t->group = g;
		t->hnext = tags_hash[tags_bucket(t->id, g)];
		tags_hash[tags_bucket(t->id, g)] = t;
		tags_lru_front(t);
	}
	memcpy(t->ents, page, FMT_V2_PAGE);
}

/* Cache page as the tag page of group g of f, as the backing file holds it now. */
static void tags_put_page(const struct content_file *f, uint64_t g, const uint8_t page[FMT_V2_PAGE])
{
	if (!f->tags_id)
		return;
	pthread_mutex_lock(&tags_lock);
	tags_put_locked(f, g, page, false);
	pthread_mutex_unlock(&tags_lock);
}

/* The sequence of group g's tag page writes by overwrites, for tags_put_page_read. */
static uint64_t group_seq_now(const struct content_file *f, uint64_t g)
{
	return f->tags_id ? atomic_load(&group_seq[group_lock_index(f, g)]) : 0;
}

/* Cache page, read from the backing file, as group g's tag page: only if no overwrite wrote that
 * tag page while it was read (its group sequence is still seq0, and was even) and none is
 * cached (one that is came from a write or a read no older than this one). */
static void tags_put_page_read(const struct content_file *f, uint64_t g, const uint8_t page[FMT_V2_PAGE],
			       uint64_t seq0)
{
	if (!f->tags_id || seq0 % 2)
		return;
	/* Under tags_lock: a write that starts after this check wrote its page after this read,
	 * and caches it after this one (tags_lock), in its place. */
	pthread_mutex_lock(&tags_lock);
	if (group_seq_now(f, g) == seq0)
		tags_put_locked(f, g, page, true);
	pthread_mutex_unlock(&tags_lock);
}

/* Entries of chunks idx..idx+n-1 (one group) of f now hold e (NULL: zeros, holes) in the
 * backing file: a cached page of theirs follows. */
static void tags_note(const struct content_file *f, uint64_t idx, size_t n, const uint8_t *e)
{
	struct tag_page *t;

	if (!f->tags_id)
		return;
	pthread_mutex_lock(&tags_lock);
	t = tags_find(f->tags_id, idx / GC);
	if (t && e)
		memcpy(t->ents + (idx % GC) * ES, e, n * ES);
	else if (t)
		memset(t->ents + (idx % GC) * ES, 0, n * ES);
	pthread_mutex_unlock(&tags_lock);
}

/* Forget every cached page of id: what the backing file holds is not known any more. */
static void tags_forget(uint64_t id)
{
	struct tag_page *t, *next;

	if (!id)
		return;
	pthread_mutex_lock(&tags_lock);
	for (t = tags_head; t; t = next) {
		next = t->next;
		if (t->id != id)
			continue;
		tags_hash_unlink(t);
		tags_lru_unlink(t);
		tags_count--;
		free(t);
	}
	pthread_mutex_unlock(&tags_lock);
}

void content_tags_drop_all(void)
{
	struct tag_page *t, *next;

	pthread_mutex_lock(&tags_lock);
	for (t = tags_head; t; t = next) {
		next = t->next;
		free(t);
	}
	memset(tags_hash, 0, sizeof(tags_hash));
	tags_head = tags_tail = NULL;
	tags_count = 0;
	pthread_mutex_unlock(&tags_lock);
}

size_t content_tags_cached(void)
{
	size_t n;

	pthread_mutex_lock(&tags_lock);
	n = tags_count;
	pthread_mutex_unlock(&tags_lock);
	return n;
}

int content_headers_read(int fd, enum fmt_layout layout, struct content_headers *ret)
{
	uint8_t area[FMT_V2_HEADER_AREA];
	struct content_headers hs;
	int first_err = -EIO;
	size_t want = layout == FMT_LAYOUT_ANY ? FMT_DATA_OFFSET : (size_t)fmt_header_area(layout);
	ssize_t n;

	/* The whole header area: a v2 file cut inside its header page is as damaged as a v1 file
	 * cut inside its slots, though both slots may still be there. */
	n = util_pread_full(fd, area, want, 0);
	if (n < 0)
		return (int)n;
	if (n == 0)
		return -ENODATA;
	if (n < (ssize_t)want)
		return -EIO;
	memset(&hs, 0, sizeof(hs));
	for (unsigned i = 0; i < FMT_HEADER_SLOTS; i++) {
		const uint8_t *raw = area + fmt_header_offset(i);
		struct fmt_header h;
		int r = fmt_header_parse(raw, &h);

		if (r < 0) {
			if (r == -EPROTONOSUPPORT)
				first_err = r;
			continue;
		}
		/* A file of the other layout: its sizes cannot be read from the backing size. */
		if (layout != FMT_LAYOUT_ANY && h.version != layout)
			continue;
		/* Keep newest first. */
		unsigned at = hs.count == 1 && h.generation > hs.hdr[0].generation ? 0 : hs.count;

		if (at == 0 && hs.count == 1) {
			hs.hdr[1] = hs.hdr[0];
			hs.slot[1] = hs.slot[0];
			memcpy(hs.raw[1], hs.raw[0], FMT_HEADER_SIZE);
		}
		hs.hdr[at] = h;
		hs.slot[at] = i;
		memcpy(hs.raw[at], raw, FMT_HEADER_SIZE);
		hs.count++;
	}
	if (hs.count == 0)
		return first_err;
	*ret = hs;
	return 0;
}

int content_header_read(int fd, enum fmt_layout layout, struct fmt_header *ret_hdr, uint8_t raw[FMT_HEADER_SIZE])
{
	struct content_headers hs;
	int r = content_headers_read(fd, layout, &hs);

	if (r < 0)
		return r;
	*ret_hdr = hs.hdr[0];
	if (raw)
		memcpy(raw, hs.raw[0], FMT_HEADER_SIZE);
	return 0;
}

int content_header_init(int fd, const uint8_t raw[FMT_HEADER_SIZE])
{
	uint8_t area[FMT_V2_HEADER_AREA] = { 0 };
	/* The header says its version (bytes 8..9, LE): a v2 file's header area is a whole page. */
	enum fmt_layout l = raw[8] == FMT_LAYOUT_V2 && raw[9] == 0 ? FMT_LAYOUT_V2 : FMT_LAYOUT_V1;

	memcpy(area, raw, FMT_HEADER_SIZE);
	return pwrite_full(fd, area, (size_t)fmt_header_area(l), 0);
}

int content_header_store(int fd, unsigned slot, const uint8_t raw[FMT_HEADER_SIZE])
{
	int r;

	if (slot >= FMT_HEADER_SLOTS)
		return -EINVAL;
	r = pwrite_full(fd, raw, FMT_HEADER_SIZE, fmt_header_offset(slot));
	if (r == 0 && fdatasync(fd) < 0)
		r = -errno;
	return r;
}

int content_header_clear(int fd, unsigned slot)
{
	static const uint8_t zeros[FMT_HEADER_SIZE];
	int r;

	if (slot >= FMT_HEADER_SLOTS)
		return -EINVAL;
	r = pwrite_full(fd, zeros, sizeof(zeros), fmt_header_offset(slot));
	if (r == 0 && fdatasync(fd) < 0)
		r = -errno;
	return r;
}

int content_header_rewrite(int fd, unsigned slot, const uint8_t raw[FMT_HEADER_SIZE])
{
	int r = content_header_store(fd, slot, raw);

	/* Only once the new slot is durable may the old one go: at every moment one slot
	 * authenticates. Both hold the same DEK, so a torn clear only costs a log line. */
	if (r == 0)
		r = content_header_clear(fd, 1 - slot);
	return r;
}

static int header_lock_op(int fd, short type)
{
	struct flock fl = {
		.l_type = type,
		.l_whence = SEEK_SET,
		.l_start = 0,
		.l_len = FMT_DATA_OFFSET,
	};

	while (fcntl(fd, F_OFD_SETLKW, &fl) < 0) {
		if (errno != EINTR)
			return -errno;
	}
	return 0;
}

int content_header_lock(int fd)
{
	return header_lock_op(fd, F_WRLCK);
}

void content_header_unlock(int fd)
{
	(void)header_lock_op(fd, F_UNLCK);
}

int content_backing_size(int fd, uint64_t *ret_size)
{
	return backing_size(fd, ret_size);
}

int content_size(int fd, enum fmt_layout layout, uint64_t *ret_size)
{
	uint64_t b;
	int r = backing_size(fd, &b);

	if (r < 0)
		return r;
	*ret_size = fmt_plain_size(layout, b);
	return 0;
}

/* Length of plaintext chunk idx in a file of plain size p (0 when past the end). */
static size_t chunk_len(uint64_t idx, uint64_t p)
{
	uint64_t start = idx * CS;

	if (start >= p)
		return 0;
	return (size_t)(p - start < CS ? p - start : CS);
}

/* Read the ctlen sealed bytes of chunk idx into ct; a backing file that ends short of them is damaged. */
static int chunk_read(const struct content_file *f, uint64_t idx, size_t ctlen, uint8_t ct[FMT_CHUNK_DISK_SIZE])
{
	ssize_t n = util_pread_full(f->fd, ct, ctlen, fmt_chunk_offset(idx));

	if (n < 0)
		return (int)n;
	return (size_t)n == ctlen ? 0 : -EIO;
}

/* Read n tag entries of v2 chunks idx.. (one group) into e. */
static int entries_read(const struct content_file *f, uint64_t idx, size_t n, uint8_t *e)
{
	ssize_t r = util_pread_full(f->fd, e, n * ES, fmt_v2_entry_offset(idx));

	if (r < 0)
		return (int)r;
	return (size_t)r == n * ES ? 0 : -EIO;
}

/* Make the tag entries of v2 chunks [from, to) holes, as far as they lie in the tag page of
 * from's group and that page exists (from is not the first chunk of its group). Chunks past the
 * end of a file may keep the entries of an earlier, longer size there; a grown file must read
 * them as holes. */
static int entries_clear(const struct content_file *f, uint64_t from, uint64_t to)
{
	static const uint8_t zeros[FMT_V2_GROUP_CHUNKS * FMT_V2_ENTRY_SIZE];
	uint64_t gend = (from / GC + 1) * GC;
	int r;

	if (from % GC == 0 || from >= to)
		return 0;
	if (to > gend)
		to = gend;
	r = pwrite_full(f->fd, zeros, (size_t)(to - from) * ES, fmt_v2_entry_offset(from));
	if (r == 0)
		tags_note(f, from, (size_t)(to - from), NULL);
	else
		tags_forget(f->tags_id);
	return r;
}

/* Read and open chunk idx of a file of plain size p into pt (FMT_CHUNK_SIZE bytes). */
static int chunk_load(const struct content_file *f, uint64_t idx, uint64_t p, uint8_t *pt)
{
	uint8_t ct[FMT_CHUNK_DISK_SIZE];
	size_t len = chunk_len(idx, p), ctlen = len + FMT_CHUNK_OVERHEAD;
	int r;

	if (f->layout == FMT_LAYOUT_V2) {
		uint8_t e[FMT_V2_ENTRY_SIZE];
		ssize_t n;

		r = tags_get(f, idx, 1, e) ? 0 : entries_read(f, idx, 1, e);
		if (r < 0)
			return r;
		n = util_pread_full(f->fd, pt, len, fmt_v2_page_offset(idx));
		if (n < 0)
			return (int)n;
		if ((size_t)n != len)
			return -EIO;
		/* Opened in place: the page's ciphertext becomes the plaintext. */
		return fmt_chunk_open_v2(f->keys, f->file_id, idx, e, pt, len, pt) == (int)len ? 0 : -EIO;
	}

	r = chunk_read(f, idx, ctlen, ct);
	if (r < 0)
		return r;
	r = fmt_chunk_open(f->keys, f->file_id, idx, ct, ctlen, pt);
	if (r != (int)len)
		return -EIO;
	return 0;
}

/* A chunk written in part: what chunk idx of a file of plain size p holds (zeros past the old
 * end), with bytes from..to-1 replaced by src, into pt (FMT_CHUNK_SIZE bytes, wiped on failure). */
static int chunk_merge(const struct content_file *f, uint64_t idx, uint64_t p, const uint8_t *src,
		       uint64_t from, uint64_t to, uint8_t *pt)
{
	memset(pt, 0, FMT_CHUNK_SIZE);
	if (chunk_len(idx, p) > 0) {
		int r = chunk_load(f, idx, p, pt);

		if (r < 0) {
			sodium_memzero(pt, FMT_CHUNK_SIZE);
			return r;
		}
	}
	memcpy(pt + from, src, to - from);
	return 0;
}

/* Seal len bytes of pt as chunk idx with a fresh nonce and write it in place. */
static int chunk_store(const struct content_file *f, uint64_t idx, const uint8_t *pt, size_t len)
{
	uint8_t ct[FMT_CHUNK_DISK_SIZE], nonce[FMT_NONCE_SIZE];

	if (f->layout == FMT_LAYOUT_V2) {
		uint8_t rnd[FMT_V2_RANDOM_SIZE], e[FMT_V2_ENTRY_SIZE];
		int r;

		nonce_random(rnd, sizeof(rnd));
		if (fmt_chunk_seal_v2(f->keys, f->file_id, idx, rnd, pt, len, ct, e) < 0)
			return -EIO;
		/* Data page first, then the entry: a crash in between leaves the old entry, under
		 * which the new page does not authenticate (docs/FORMAT.md, crash behaviour). */
		r = pwrite_full(f->fd, ct, len, fmt_v2_page_offset(idx));
		if (r == 0)
			r = pwrite_full(f->fd, e, ES, fmt_v2_entry_offset(idx));
		if (r == 0)
			tags_note(f, idx, 1, e);
		else
			tags_forget(f->tags_id);
		return r;
	}

	nonce_random(nonce, sizeof(nonce));
	fmt_chunk_seal(f->keys, f->file_id, idx, nonce, pt, len, ct);
	return pwrite_full(f->fd, ct, len + FMT_CHUNK_OVERHEAD, fmt_chunk_offset(idx));
}

/* Re-seal chunk idx, now old_len bytes long, as new_len bytes (zero-extended or cut). */
static int chunk_resize(const struct content_file *f, uint64_t idx, uint64_t p, size_t new_len)
{
	uint8_t pt[FMT_CHUNK_SIZE];
	size_t old_len = chunk_len(idx, p);
	int r;

	r = chunk_load(f, idx, p, pt);
	if (r == 0) {
		if (new_len > old_len)
			memset(pt + old_len, 0, new_len - old_len);
		r = chunk_store(f, idx, pt, new_len);
	}
	sodium_memzero(pt, sizeof(pt));
	return r;
}

/* Set once the backing filesystem refused RWF_NOWAIT: then entries are read the plain way. */
static atomic_bool nowait_unsupported;

/* Data reads up to this long (random ones: FUSE sends 4 KiB when readahead is off) get their
 * pages started ahead of a tag page miss. Longer ones are sequential and the backing file's own
 * readahead is ahead of them; a WILLNEED there would read outside its window and its markers. */
#define OVERLAP_MAX (32u << 10)

/*
 * Read n tag entries of v2 chunks idx.. (one group) into e, for a read of the data pages
 * [doff, doff + dlen) that follows. The entries and the pages are two backing reads one after
 * the other; when the tag page is not cached (RWF_NOWAIT says so without waiting) the read of
 * the pages is started first (WILLNEED, asynchronous), so the two disk reads overlap instead of
 * adding up: a cold random 4 KiB read otherwise waits for its tag page, then for its data page.
 * A cached tag page costs nothing more than the plain pread. Short reads only (OVERLAP_MAX).
 */
static int entries_read_before(const struct content_file *f, uint64_t idx, size_t n, uint8_t *e, uint64_t doff,
			       uint64_t dlen)
{
	/* With the tag cache on, a miss reads the whole tag page (one syscall as well) and keeps it. */
	uint8_t page[FMT_V2_PAGE];
	bool whole = f->tags_id != 0;
	struct iovec iov = whole ? (struct iovec){ page, sizeof(page) } : (struct iovec){ e, n * ES };
	off_t at = (off_t)(whole ? fmt_v2_group_offset(idx / GC) : fmt_v2_entry_offset(idx));
	ssize_t r = -1;
	uint64_t seq0;

	if (tags_get(f, idx, n, e))
		return 0;
	seq0 = group_seq_now(f, idx / GC);
	if (dlen <= OVERLAP_MAX && !atomic_load_explicit(&nowait_unsupported, memory_order_relaxed)) {
		do
			r = preadv2(f->fd, &iov, 1, at, RWF_NOWAIT);
		while (r < 0 && errno == EINTR);
		if (r == (ssize_t)iov.iov_len)
			goto got;
		if (r < 0 && (errno == EOPNOTSUPP || errno == EINVAL || errno == ENOSYS))
			atomic_store(&nowait_unsupported, true);
		else
			(void)posix_fadvise(f->fd, (off_t)doff, (off_t)dlen, POSIX_FADV_WILLNEED);
	}
	if (!whole)
		return entries_read(f, idx, n, e);
	/* The tag page lies before the data pages read next: a file that ends inside it is cut. */
	r = util_pread_full(f->fd, page, sizeof(page), (uint64_t)at);
	if (r < 0)
		return (int)r;
	if (r != (ssize_t)sizeof(page))
		return -EIO;
got:
	if (whole) {
		tags_put_page_read(f, idx / GC, page, seq0);
		memcpy(e, page + (idx % GC) * ES, n * ES);
	}
	return 0;
}

/*
 * Chunk idx (len bytes) of a v2 file opened into pt, read again under its chunk lock: for a chunk
 * that did not authenticate while overwrites may run (f->tags_id), which settles whether it met
 * one half done or is damaged. Returns 0 or -errno (-EIO: damaged); pt holds no plaintext then.
 */
static int chunk_open_locked(const struct content_file *f, uint64_t idx, size_t len, uint8_t *pt)
{
	pthread_mutex_t *l = &chunk_locks[chunk_lock_index(f, idx)];
	uint8_t e[FMT_V2_ENTRY_SIZE];
	ssize_t n = 0;
	int r;

	pthread_once(&overwrite_locks_once, overwrite_locks_init);
	pthread_mutex_lock(l);
	r = tags_get(f, idx, 1, e) ? 0 : entries_read(f, idx, 1, e);
	if (r == 0)
		n = util_pread_full(f->fd, pt, len, fmt_v2_page_offset(idx));
	pthread_mutex_unlock(l);
	if (r == 0 && n < 0)
		r = (int)n;
	else if (r == 0 && (size_t)n != len)
		r = -EIO;
	if (r == 0 && fmt_chunk_open_v2(f->keys, f->file_id, idx, e, pt, len, pt) != (int)len)
		r = -EIO;
	if (r < 0)
		sodium_memzero(pt, len);
	return r;
}

/* Open chunk idx of a v2 read in place (ct to pt, the same buffer): once more under its chunk
 * lock if it does not authenticate and an overwrite may have been under way. */
static int chunk_open_read(const struct content_file *f, uint64_t idx, const uint8_t *e, size_t len, uint8_t *pt)
{
	if (fmt_chunk_open_v2(f->keys, f->file_id, idx, e, pt, len, pt) == (int)len)
		return 0;
	return f->tags_id ? chunk_open_locked(f, idx, len, pt) : -EIO;
}

/*
 * v2 read of plaintext [off, end) (end <= p) into out: per group touched, one preadv of the data
 * pages and one pread of their tag entries. Whole chunks are read into the caller's buffer and
 * opened there in place; only a chunk the range covers in part (the first or the last) goes
 * through a page of its own.
 */
static ssize_t read_v2(const struct content_file *f, uint8_t *out, uint64_t off, uint64_t end, uint64_t p)
{
	uint64_t c0 = off / CS, c1 = (end - 1) / CS;
	uint8_t ents[FMT_V2_GROUP_CHUNKS * FMT_V2_ENTRY_SIZE];
	uint8_t head[FMT_CHUNK_SIZE], tail[FMT_CHUNK_SIZE];
	bool head_used = false, tail_used = false;
	int r = 0;

	for (uint64_t a = c0; a <= c1;) {
		uint64_t z = (a / GC + 1) * GC - 1 < c1 ? (a / GC + 1) * GC - 1 : c1;
		size_t alen = chunk_len(a, p), zlen = chunk_len(z, p);
		bool hpart = a * CS < off || (a == z && end < a * CS + alen);
		bool tpart = z != a && end < z * CS + zlen;
		uint64_t want = (z - a) * CS + zlen;
		struct iovec iov[3];
		int cnt = 0;
		ssize_t n;

		/* The data pages of a..z are contiguous in the backing file. */
		r = entries_read_before(f, a, (size_t)(z - a + 1), ents, fmt_v2_page_offset(a), want);
		if (r < 0)
			break;
		head_used |= hpart;
		tail_used |= tpart;
		if (hpart)
			iov[cnt++] = (struct iovec){ head, alen };
		if (z > a || !hpart) {
			uint64_t from = hpart ? a + 1 : a, to = tpart ? z : z + 1;   /* whole chunks [from, to) */

			if (to > from)
				iov[cnt++] = (struct iovec){ out + (from * CS - off),
							     (size_t)((to - 1 - from) * CS + chunk_len(to - 1, p)) };
		}
		if (tpart)
			iov[cnt++] = (struct iovec){ tail, zlen };
		n = util_preadv_full(f->fd, iov, cnt, fmt_v2_page_offset(a));
		if (n < 0) {
			r = (int)n;
			break;
		}
		if ((uint64_t)n != want) {
			r = -EIO;       /* the file shrank under us: not through this mount */
			break;
		}
		for (uint64_t i = a; i <= z; i++) {
			size_t len = chunk_len(i, p);
			const uint8_t *e = ents + (i - a) * ES;
			uint64_t cstart = i * CS;
			uint8_t *pg = i == a && hpart ? head : i == z && tpart ? tail : NULL;

			if (!pg) {
				r = chunk_open_read(f, i, e, len, out + (cstart - off));
				if (r < 0)
					break;
				continue;
			}
			r = chunk_open_read(f, i, e, len, pg);
			if (r < 0)
				break;
			{
				uint64_t from = off > cstart ? off - cstart : 0;
				uint64_t to = end < cstart + len ? end - cstart : len;

				memcpy(out + (cstart + from - off), pg + from, to - from);
			}
		}
		if (r < 0)
			break;
		a = z + 1;
	}
	/* Only a partial first or last chunk went through them (most reads use neither). */
	if (head_used)
		sodium_memzero(head, sizeof(head));
	if (tail_used)
		sodium_memzero(tail, sizeof(tail));
	return r < 0 ? r : (ssize_t)(end - off);
}

static ssize_t read_chunks(const struct content_file *f, void *buf, size_t size, uint64_t off)
{
	uint64_t b = 0, p, end, c0, c1, boff, bend;
	uint8_t *ct, *out = buf;
	ssize_t n;
	int r;

	r = file_backing_size(f, &b);
	if (r < 0)
		return r;
	p = fmt_plain_size(f->layout, b);
	if (off >= p || size == 0)
		return fmt_backing_size_valid(f->layout, b) || off < p ? 0 : -EIO;
	end = off + size < p ? off + size : p;
	/* A read that reaches a damaged tail (a cut inside the last chunk) fails. */
	if (end == p && !fmt_backing_size_valid(f->layout, b))
		return -EIO;

	c0 = off / CS;
	c1 = (end - 1) / CS;
	if (f->layout == FMT_LAYOUT_V2)
		return read_v2(f, out, off, end, p);
	boff = fmt_chunk_offset(c0);
	bend = fmt_chunk_offset(c1) + chunk_len(c1, p) + FMT_CHUNK_OVERHEAD;
	ct = scratch_get(bend - boff);
	if (!ct)
		return -ENOMEM;
	n = util_pread_full(f->fd, ct, bend - boff, boff);
	if (n < 0)
		return n;
	if ((uint64_t)n != bend - boff)
		return -EIO;        /* the file shrank under us: not through this mount */

	for (uint64_t i = c0; i <= c1; i++) {
		const uint8_t *c = ct + (i - c0) * CDS;
		size_t len = chunk_len(i, p);
		uint64_t cstart = i * CS;
		uint64_t from = off > cstart ? off - cstart : 0;
		uint64_t to = end < cstart + len ? end - cstart : len;
		uint8_t *dst = out + (cstart + from - off);

		if (from == 0 && to == len) {
			/* Whole chunk wanted: open it straight into the caller's buffer. */
			if (fmt_chunk_open(f->keys, f->file_id, i, c, len + FMT_CHUNK_OVERHEAD, dst) != (int)len)
				return -EIO;
		} else {
			uint8_t pt[FMT_CHUNK_SIZE];

			r = fmt_chunk_open(f->keys, f->file_id, i, c, len + FMT_CHUNK_OVERHEAD, pt);
			if (r == (int)len)
				memcpy(dst, pt + from, to - from);
			sodium_memzero(pt, sizeof(pt));
			if (r != (int)len)
				return -EIO;
		}
	}
	return (ssize_t)(end - off);
}

ssize_t content_read(const struct content_file *f, void *buf, size_t size, uint64_t off)
{
	ssize_t n;

	/* The chunks of one request share one cipher context, freed (wiped) when it ends. */
	fmt_chunk_hold();
	n = read_chunks(f, buf, size, off);
	fmt_chunk_release();
	return n;
}

/*
 * v2 writes. A request's chunks are sealed into the scratch buffer (data pages, then their tag
 * entries), then written per group: one pwrite of the data pages and one of their entries, in
 * that order, so a 4 KiB aligned write touches one data page and one entry.
 */

/* Where a v2 request's sealed chunks wait: data pages, then entries, then the random halves of
 * their nonces. Per thread, so it survives from content_write_seal to content_write_sealed. */
static uint8_t *v2_buffer(uint64_t nchunks, uint8_t **ents, uint8_t **rnd)
{
	uint8_t *data = scratch_get(nchunks * (CS + ES + FMT_V2_RANDOM_SIZE));

	if (data) {
		*ents = data + nchunks * CS;
		*rnd = *ents + nchunks * ES;
	}
	return data;
}

/* Before a v2 write of [off, end) into a file of backing size b, plain size p: past the end,
 * the old partial last chunk becomes a full one padded with zeros, unless this write rewrites
 * it; chunks in between are holes, and their entries in the old last group's tag page are
 * cleared (a shrink may have left older ones there). *rollback: the backing size a failed
 * write cuts the file back to. */
static int write_v2_gap(const struct content_file *f, uint64_t off, uint64_t b, uint64_t p, uint64_t *rollback)
{
	uint64_t c0 = off / CS, first_new = (p + CS - 1) / CS;
	int r;

	*rollback = b;
	if (off > p && p % CS && p / CS < c0) {
		r = chunk_resize(f, p / CS, p, FMT_CHUNK_SIZE);
		if (r < 0)
			return r;
		*rollback = fmt_backing_size(FMT_LAYOUT_V2, (p / CS + 1) * CS);
	}
	return c0 > first_new ? entries_clear(f, first_new, c0) : 0;
}

/*
 * Tag page read-ahead for writes (tag cache on). A write that misses the cache reads its tag page
 * before it writes it whole: on a backing file that is not cached, a disk read waited for under
 * the group's lock. The kernel writes a file's dirty pages back in ascending order, many requests
 * at once (an fsync after scattered writes: a write or more per group), so misses that climb
 * through a file's groups read ahead: the tag pages of the next TAGS_AHEAD groups are started
 * (POSIX_FADV_WILLNEED, asynchronous) and the writes there find them cached or on their way. A
 * miss that does not climb (the first, or random O_DIRECT writes) starts nothing. State per file
 * (tags id) in a small table, like the kernel's per-file readahead state; under tags_lock.
 */
#define TAGS_AHEAD       16u
#define TAGS_AHEAD_SLOTS 64u

struct tags_ahead {
	uint64_t id;            /* a file's tags id; another file's id takes the slot over */
	uint64_t last;          /* the group of its last miss */
	uint64_t until;         /* tag pages up to this group are started */
};

static struct tags_ahead tags_ahead[TAGS_AHEAD_SLOTS];  /* tags_lock */

/* Group g of f (backing size b) missed the tag cache: read ahead if its misses climb. */
static void tags_read_ahead(const struct content_file *f, uint64_t g, uint64_t b)
{
	struct tags_ahead *s = &tags_ahead[f->tags_id % TAGS_AHEAD_SLOTS];
	bool climbs;
	uint64_t from = 0, to = g + TAGS_AHEAD;

	pthread_mutex_lock(&tags_lock);
	if (s->id != f->tags_id)
		*s = (struct tags_ahead){ .id = f->tags_id, .last = g, .until = g };
	climbs = g > s->last && g - s->last <= TAGS_AHEAD;
	if (climbs) {
		/* Pages started by an earlier miss of this climb are not started again. */
		from = s->until > g && s->until < to ? s->until + 1 : g + 1;
		s->until = to;
	}
	s->last = g;
	pthread_mutex_unlock(&tags_lock);
	if (!climbs)
		return;
	for (uint64_t x = from; x <= to; x++) {
		uint64_t at = fmt_v2_group_offset(x);

		if (at >= b)
			break;
		(void)posix_fadvise(f->fd, (off_t)at, FMT_V2_PAGE, POSIX_FADV_WILLNEED);
	}
}

/*
 * Write n entries e of chunks a.. (one group) of a file whose backing size was b before the
 * write began. With the tag cache, the whole tag page: the cached one, or the backing one read
 * now (zeros when it lay past the end), with the entries put in; the bytes of the other entries
 * are rewritten unchanged (docs/FORMAT.md, crash behaviour). Else just the entries. ahead: an
 * overwrite, whose misses may climb (tags_read_ahead); writes that extend a file meet tag pages
 * of their own making, or holes.
 */
static int entries_write(const struct content_file *f, uint64_t a, size_t n, const uint8_t *e, uint64_t b,
			 bool ahead)
{
	uint8_t page[FMT_V2_PAGE];
	uint64_t g = a / GC, at = fmt_v2_group_offset(g);
	int r;

	if (!f->tags_id)
		return pwrite_full(f->fd, e, n * ES, fmt_v2_entry_offset(a));
	if (!tags_get_page(f, g, page)) {
		ssize_t k = 0;

		if (at < b) {
			if (ahead)
				tags_read_ahead(f, g, b);
			k = util_pread_full(f->fd, page, sizeof(page), at);
		}

		if (k < 0)
			return (int)k;
		memset(page + k, 0, sizeof(page) - (size_t)k);
	}
	memcpy(page + (a % GC) * ES, e, n * ES);
	r = pwrite_full(f->fd, page, sizeof(page), at);
	if (r == 0)
		tags_put_page(f, g, page);
	return r;
}

/* Write the sealed chunks c0..c1 of a file of new plain size newp, backing size b before the
 * write: per group, the data pages first, then their entries (docs/FORMAT.md, crash behaviour). */
static int write_v2_put(const struct content_file *f, uint64_t c0, uint64_t c1, uint64_t newp, uint64_t b,
			const uint8_t *data, const uint8_t *ents)
{
	for (uint64_t a = c0; a <= c1;) {
		uint64_t z = (a / GC + 1) * GC - 1 < c1 ? (a / GC + 1) * GC - 1 : c1;
		int r = pwrite_full(f->fd, data + (a - c0) * CS, (size_t)((z - a) * CS + chunk_len(z, newp)),
				    fmt_v2_page_offset(a));

		if (r == 0)
			r = entries_write(f, a, (size_t)(z - a + 1), ents + (a - c0) * ES, b, false);
		if (r < 0)
			return r;
		a = z + 1;
	}
	return 0;
}

/* v2 write of size bytes at off into a valid file of backing size b, plain size p. */
static ssize_t write_v2(const struct content_file *f, const uint8_t *in, size_t size, uint64_t off, uint64_t b,
			uint64_t p)
{
	uint64_t end = off + size, newp = end > p ? end : p, c0 = off / CS, c1 = (end - 1) / CS;
	uint64_t nchunks = c1 - c0 + 1, rollback = b;
	uint8_t *data, *ents, *rnd;
	int r;

	r = write_v2_gap(f, off, b, p, &rollback);
	if (r < 0)
		goto fail;
	data = v2_buffer(nchunks, &ents, &rnd);
	if (!data) {
		r = -ENOMEM;
		goto fail;
	}
	nonce_random(rnd, nchunks * FMT_V2_RANDOM_SIZE);

	for (uint64_t i = c0; i <= c1; i++) {
		uint64_t cstart = i * CS;
		size_t len = chunk_len(i, newp);
		uint64_t from = off > cstart ? off - cstart : 0;
		uint64_t to = end < cstart + len ? end - cstart : len;
		uint8_t *w = data + (i - c0) * CS, *e = ents + (i - c0) * ES;
		const uint8_t *rn = rnd + (i - c0) * FMT_V2_RANDOM_SIZE;

		if (from == 0 && to == len) {
			r = fmt_chunk_seal_v2(f->keys, f->file_id, i, rn, in + (cstart - off), len, w, e);
		} else {
			uint8_t pt[FMT_CHUNK_SIZE];

			r = chunk_merge(f, i, p, in + (cstart + from - off), from, to, pt);
			if (r < 0)
				goto fail;
			r = fmt_chunk_seal_v2(f->keys, f->file_id, i, rn, pt, len, w, e);
			sodium_memzero(pt, sizeof(pt));
		}
		if (r < 0) {
			r = -EIO;
			goto fail;
		}
	}
	r = write_v2_put(f, c0, c1, newp, b, data, ents);
	if (r < 0)
		goto fail;
	return (ssize_t)size;
fail:
	/* What the failed write left in the tag pages is not known. */
	tags_forget(f->tags_id);
	/* Keep the file well-formed: a failed append (ENOSPC) must not leave a cut chunk. */
	if (newp > p && ftruncate(f->fd, (off_t)rollback) < 0)
		return -errno;
	return r;
}

/* Whether a write of [off, off + size) to a v2 file of plain size p is made of whole chunks
 * of the file as it will be, none of which needs its old contents: it starts on a chunk and
 * ends on one, or at or past the end of the file. */
static bool v2_sealable(uint64_t off, size_t size, uint64_t p)
{
	return off % CS == 0 && ((off + size) % CS == 0 || p <= off + size);
}

bool content_write_sealable(enum fmt_layout layout, size_t size, uint64_t off)
{
	return layout == FMT_LAYOUT_V2 && size > 0 && off % CS == 0 && off <= fmt_max_plain_size(layout) &&
	       size <= fmt_max_plain_size(layout) - off;
}

/* Seal the chunks of [off, end) (off on a chunk) from in into the thread's v2 buffer, every one
 * whole, the last one as long as the write leaves it (the file ends there, or it is whole). */
static int seal_whole(const struct content_file *f, const uint8_t *in, uint64_t off, uint64_t end)
{
	uint64_t c0 = off / CS, c1 = (end - 1) / CS, nchunks = c1 - c0 + 1;
	uint8_t *data, *ents, *rnd;
	int r = 0;

	data = v2_buffer(nchunks, &ents, &rnd);
	if (!data)
		return -ENOMEM;
	nonce_random(rnd, nchunks * FMT_V2_RANDOM_SIZE);
	fmt_chunk_hold();
	for (uint64_t i = c0; i <= c1 && r == 0; i++)
		r = fmt_chunk_seal_v2(f->keys, f->file_id, i, rnd + (i - c0) * FMT_V2_RANDOM_SIZE,
				      in + (i * CS - off), chunk_len(i, end), data + (i - c0) * CS, ents + (i - c0) * ES);
	fmt_chunk_release();
	return r < 0 ? -EIO : 0;
}

int content_write_seal(const struct content_file *f, const void *buf, size_t size, uint64_t off,
		       struct content_sealed *s)
{
	uint64_t b = 0;
	int r;

	s->ready = false;
	if (!f->keys || !content_write_sealable(f->layout, size, off))
		return -EAGAIN;
	r = file_backing_size(f, &b);
	if (r < 0)
		return r;
	if (b == 0 || !fmt_backing_size_valid(f->layout, b) || !v2_sealable(off, size, fmt_plain_size(f->layout, b)))
		return -EAGAIN;
	r = seal_whole(f, buf, off, off + size);
	if (r < 0)
		return r;
	s->keys = f->keys;
	memcpy(s->file_id, f->file_id, FMT_FILE_ID_SIZE);
	s->off = off;
	s->size = size;
	s->ready = true;
	return 0;
}

ssize_t content_write_sealed(const struct content_file *f, const void *buf, size_t size, uint64_t off,
			     struct content_sealed *s)
{
	uint64_t b = 0, p, end = off + size, rollback;
	uint8_t *data, *ents, *rnd;
	int r;

	/* Sealed for these keys (the same header: a new one has a new random file id) and this
	 * range, and the file still ends where the chunks need it to: else seal again. */
	if (!s->ready || s->keys != f->keys || !f->keys || memcmp(s->file_id, f->file_id, FMT_FILE_ID_SIZE) != 0 ||
	    s->off != off || s->size != size)
		return content_write(f, buf, size, off);
	s->ready = false;
	r = file_backing_size(f, &b);
	if (r < 0)
		return r;
	if (b == 0 || !fmt_backing_size_valid(f->layout, b))
		return content_write(f, buf, size, off);
	p = fmt_plain_size(f->layout, b);
	if (!v2_sealable(off, size, p))
		return content_write(f, buf, size, off);
	data = v2_buffer((end - 1) / CS - off / CS + 1, &ents, &rnd);    /* the buffer sealed into */
	if (!data)
		return -ENOMEM;
	fmt_chunk_hold();
	r = write_v2_gap(f, off, b, p, &rollback);
	fmt_chunk_release();
	if (r == 0)
		r = write_v2_put(f, off / CS, (end - 1) / CS, end > p ? end : p, b, data, ents);
	if (r == 0)
		return (ssize_t)size;
	tags_forget(f->tags_id);
	/* Keep the file well-formed: a failed append (ENOSPC) must not leave a cut chunk. */
	if (end > p && ftruncate(f->fd, (off_t)rollback) < 0)
		return -errno;
	return r;
}

ssize_t content_overwrite(const struct content_file *f, const void *buf, size_t size, uint64_t off)
{
	uint64_t b = 0, end = off + size, c0 = off / CS, c1;
	uint8_t *data, *ents, *rnd;
	int r;

	if (!f->keys || !f->tags_id || !content_write_sealable(f->layout, size, off) || size % CS)
		return -EAGAIN;
	r = file_backing_size(f, &b);
	if (r < 0)
		return r;
	/* Whole chunks inside the file: end <= p makes the last of them a full one too. */
	if (b == 0 || !fmt_backing_size_valid(f->layout, b) || end > fmt_plain_size(f->layout, b))
		return -EAGAIN;
	c1 = (end - 1) / CS;
	pthread_once(&overwrite_locks_once, overwrite_locks_init);
	r = seal_whole(f, buf, off, end);
	if (r < 0)
		return r;
	data = v2_buffer(c1 - c0 + 1, &ents, &rnd);     /* the buffer sealed into */
	if (!data)
		return -ENOMEM;
	/* Per group: under its chunks' locks, the data pages, then the tag page under its lock. */
	for (uint64_t a = c0; a <= c1 && r == 0;) {
		uint64_t z = (a / GC + 1) * GC - 1 < c1 ? (a / GC + 1) * GC - 1 : c1;
		size_t ks[GC], nk = chunk_locks_of(f, a, z, ks);

		for (size_t j = 0; j < nk; j++)
			pthread_mutex_lock(&chunk_locks[ks[j]]);
		r = pwrite_full(f->fd, data + (a - c0) * CS, (size_t)((z - a + 1) * CS), fmt_v2_page_offset(a));
		if (r == 0) {
			size_t k = group_lock_index(f, a / GC);

			pthread_mutex_lock(&group_locks[k]);
			atomic_fetch_add(&group_seq[k], 1);
			r = entries_write(f, a, (size_t)(z - a + 1), ents + (a - c0) * ES, b, true);
			/* What the failed write left in the tag pages is not known. */
			if (r < 0)
				tags_forget(f->tags_id);
			atomic_fetch_add(&group_seq[k], 1);
			pthread_mutex_unlock(&group_locks[k]);
		}
		for (size_t j = nk; j-- > 0;)
			pthread_mutex_unlock(&chunk_locks[ks[j]]);
		a = z + 1;
	}
	return r < 0 ? r : (ssize_t)size;
}

static ssize_t write_any(const struct content_file *f, const void *buf, size_t size, uint64_t off);

ssize_t content_write(const struct content_file *f, const void *buf, size_t size, uint64_t off)
{
	ssize_t n;

	/* One cipher context for all the chunks of the request, wiped at its end. */
	fmt_chunk_hold();
	n = write_any(f, buf, size, off);
	fmt_chunk_release();
	return n;
}

static ssize_t write_any(const struct content_file *f, const void *buf, size_t size, uint64_t off)
{
	const uint8_t *in = buf;
	uint64_t b = 0, p, end, newp, c0, c1, nchunks, rollback;
	uint8_t *ct, *nonces, *w;
	int r;

	if (size == 0)
		return 0;
	if (off > fmt_max_plain_size(f->layout) || size > fmt_max_plain_size(f->layout) - off)
		return -EFBIG;
	r = file_backing_size(f, &b);
	if (r < 0)
		return r;
	if (b == 0)
		return -ENODATA;
	if (!fmt_backing_size_valid(f->layout, b))
		return -EIO;
	p = fmt_plain_size(f->layout, b);
	if (f->layout == FMT_LAYOUT_V2)
		return write_v2(f, in, size, off, b, p);
	end = off + size;
	newp = end > p ? end : p;
	c0 = off / CS;
	c1 = (end - 1) / CS;
	rollback = b;

	/* Writing past the end: the old partial last chunk becomes a full one padded with zeros,
	 * unless this write rewrites that chunk itself. Chunks in between stay sparse (holes). */
	if (off > p && p % CS && p / CS < c0) {
		r = chunk_resize(f, p / CS, p, FMT_CHUNK_SIZE);
		if (r < 0)
			return r;
		rollback = fmt_chunk_offset(p / CS + 1);
	}

	nchunks = c1 - c0 + 1;
	ct = scratch_get(nchunks * (CDS + FMT_NONCE_SIZE));
	if (!ct)
		return -ENOMEM;
	nonces = ct + nchunks * CDS;
	nonce_random(nonces, nchunks * FMT_NONCE_SIZE);

	w = ct;
	for (uint64_t i = c0; i <= c1; i++) {
		uint64_t cstart = i * CS;
		size_t len = chunk_len(i, newp);
		uint64_t from = off > cstart ? off - cstart : 0;
		uint64_t to = end < cstart + len ? end - cstart : len;
		const uint8_t *nonce = nonces + (i - c0) * FMT_NONCE_SIZE;

		if (from == 0 && to == len) {
			fmt_chunk_seal(f->keys, f->file_id, i, nonce, in + (cstart - off), len, w);
		} else {
			uint8_t pt[FMT_CHUNK_SIZE];

			r = chunk_merge(f, i, p, in + (cstart + from - off), from, to, pt);
			if (r < 0)
				goto fail;
			fmt_chunk_seal(f->keys, f->file_id, i, nonce, pt, len, w);
			sodium_memzero(pt, sizeof(pt));
		}
		w += len + FMT_CHUNK_OVERHEAD;
	}
	r = pwrite_full(f->fd, ct, (size_t)(w - ct), fmt_chunk_offset(c0));
	if (r < 0)
		goto fail;
	return (ssize_t)size;
fail:
	/* Keep the file well-formed: a failed append (ENOSPC) must not leave a cut chunk. */
	if (newp > p && ftruncate(f->fd, (off_t)rollback) < 0)
		return -errno;
	return r;
}

int content_truncate(const struct content_file *f, uint64_t size)
{
	enum fmt_layout l = f->layout;
	uint64_t b = 0, p, last;
	int r;

	if (size > fmt_max_plain_size(l))
		return -EFBIG;
	r = backing_size(f->fd, &b);
	if (r < 0)
		return r;
	if (b == 0)
		return size == 0 ? 0 : -ENODATA;
	if (b < fmt_header_area(l))
		return -EIO;
	/* Truncating to 0 always works: it is how a damaged file is emptied and reused. */
	if (size == 0)
		return ftruncate(f->fd, (off_t)fmt_header_area(l)) < 0 ? -errno : 0;
	if (!fmt_backing_size_valid(l, b))
		return -EIO;
	p = fmt_plain_size(l, b);
	if (size == p)
		return 0;

	if (size < p) {
		if (size % CS) {
			r = chunk_resize(f, size / CS, p, (size_t)(size % CS));
			if (r < 0)
				return r;
		}
		return ftruncate(f->fd, (off_t)fmt_backing_size(l, size)) < 0 ? -errno : 0;
	}

	/* Grow. The old last chunk, if partial, grows in place: up to the new size if that ends
	 * inside it, else to a full chunk. */
	last = p / CS;
	if (p % CS) {
		size_t len = size < (last + 1) * CS ? (size_t)(size - last * CS) : FMT_CHUNK_SIZE;

		r = chunk_resize(f, last, p, len);
		if (r < 0 || size <= (last + 1) * CS)
			return r;
	}
	/* v2: the chunks the file grows by read as holes, whatever an earlier size left in their
	 * entries (a partial new last chunk gets its own entry below). */
	if (l == FMT_LAYOUT_V2) {
		r = entries_clear(f, (p + CS - 1) / CS, size / CS);
		if (r < 0)
			return r;
	}
	/* Full chunks in between are holes; a partial new last chunk must authenticate, so it is
	 * sealed for real. */
	if (size % CS == 0)
		return ftruncate(f->fd, (off_t)fmt_backing_size(l, size)) < 0 ? -errno : 0;
	{
		uint8_t zeros[FMT_CHUNK_SIZE] = { 0 };
		uint64_t idx = size / CS;
		off_t at = (off_t)(l == FMT_LAYOUT_V2 ? fmt_v2_page_offset(idx) : fmt_chunk_offset(idx));

		if (ftruncate(f->fd, at) < 0)
			return -errno;
		r = chunk_store(f, idx, zeros, (size_t)(size % CS));
		if (r < 0 && ftruncate(f->fd, at) < 0)
			return -errno;
		return r;
	}
}

/* Make backing bytes [off, off + len) read as zeros, which is a hole for every full chunk in
 * them. keep_alloc (ZERO_RANGE) prefers leaving the blocks allocated, like a local filesystem;
 * otherwise (PUNCH_HOLE) it prefers freeing them. When the backing filesystem can do neither,
 * zeros are written over the data it reports (what is already a backing hole stays one). */
static int backing_zero(int fd, uint64_t off, uint64_t len, bool keep_alloc)
{
	static const uint8_t zeros[64u << 10];
	const int modes[2] = {
		(keep_alloc ? FALLOC_FL_ZERO_RANGE : FALLOC_FL_PUNCH_HOLE) | FALLOC_FL_KEEP_SIZE,
		(keep_alloc ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE) | FALLOC_FL_KEEP_SIZE,
	};
	uint64_t pos = off, end = off + len;

	for (unsigned m = 0; m < 2; m++) {
		if (fallocate(fd, modes[m], (off_t)off, (off_t)len) == 0)
			return 0;
		if (errno != EOPNOTSUPP)
			return -errno;
	}
	while (pos < end) {
		off_t data = lseek(fd, (off_t)pos, SEEK_DATA), hole;
		uint64_t stop;

		if (data < 0 && errno == ENXIO)
			return 0;
		if (data < 0) {
			/* No SEEK_DATA here: treat the whole rest as data. */
			data = (off_t)pos;
			hole = (off_t)end;
		} else {
			hole = lseek(fd, data, SEEK_HOLE);
			if (hole < 0)
				hole = (off_t)end;
		}
		if ((uint64_t)data >= end)
			return 0;
		stop = (uint64_t)hole < end ? (uint64_t)hole : end;
		for (pos = (uint64_t)data; pos < stop;) {
			size_t n = stop - pos < sizeof(zeros) ? (size_t)(stop - pos) : sizeof(zeros);
			int r = pwrite_full(fd, zeros, n, pos);

			if (r < 0)
				return r;
			pos += n;
		}
	}
	return 0;
}

/* Zero plaintext [from, to) of chunk idx of a file of plain size p, re-sealed at its length. A
 * full chunk that is a hole already reads as zeros: it stays a hole. Sealing a hole would not
 * be wrong, but turning a partly zeroed chunk into a hole would tell a backing reader that the
 * rest of it was zero: only a chunk the range covers entirely becomes one (content_fallocate). */
static int chunk_zero(const struct content_file *f, uint64_t idx, uint64_t p, size_t from, size_t to)
{
	uint8_t ct[FMT_CHUNK_DISK_SIZE], pt[FMT_CHUNK_SIZE];
	size_t len = chunk_len(idx, p), ctlen = len + FMT_CHUNK_OVERHEAD;
	int r;

	if (f->layout == FMT_LAYOUT_V2) {
		uint8_t e[FMT_V2_ENTRY_SIZE];

		r = entries_read(f, idx, 1, e);
		if (r < 0)
			return r;
		if (len == CS && fmt_v2_entry_is_hole(e))
			return 0;
		r = chunk_load(f, idx, p, pt) == 0 ? (int)len : -EIO;
		goto loaded;
	}
	r = chunk_read(f, idx, ctlen, ct);
	if (r < 0)
		return r;
	if (len == CS && sodium_is_zero(ct, ctlen))
		return 0;
	r = fmt_chunk_open(f->keys, f->file_id, idx, ct, ctlen, pt);
loaded:
	if (r == (int)len) {
		memset(pt + from, 0, to - from);
		r = chunk_store(f, idx, pt, len);
	} else {
		r = -EIO;
	}
	sodium_memzero(pt, sizeof(pt));
	return r;
}

/*
 * Plaintext [off, end) of a file of plain size p (end <= p) reads as zeros afterwards. Full
 * chunks inside the range become holes in the backing file; a chunk the range covers only in
 * part, and the partial last chunk of the file (which must stay sealed at its exact length),
 * are read, zeroed in the range and sealed again, so everything still authenticates.
 */
static int zero_range(const struct content_file *f, uint64_t p, uint64_t off, uint64_t end, bool keep_alloc)
{
	uint64_t c0 = off / CS, c1 = (end - 1) / CS, h0 = c0, h1 = c1 + 1;
	int r;

	if (off > c0 * CS || chunk_len(c0, p) < CS || end < c0 * CS + CS) {
		size_t to = end < c0 * CS + chunk_len(c0, p) ? (size_t)(end - c0 * CS) : chunk_len(c0, p);

		r = chunk_zero(f, c0, p, (size_t)(off - c0 * CS), to);
		if (r < 0)
			return r;
		h0 = c0 + 1;
	}
	if (c1 >= h0 && (chunk_len(c1, p) < CS || end < c1 * CS + CS)) {
		size_t to = end < c1 * CS + chunk_len(c1, p) ? (size_t)(end - c1 * CS) : chunk_len(c1, p);

		r = chunk_zero(f, c1, p, 0, to);
		if (r < 0)
			return r;
		h1 = c1;
	}
	if (h0 >= h1)
		return 0;
	if (f->layout != FMT_LAYOUT_V2)
		return backing_zero(f->fd, fmt_chunk_offset(h0), (h1 - h0) * CDS, keep_alloc);
	/* v2: per group, the entries become holes first (the chunks read as zeros from then on,
	 * crash or not), then their data pages are punched or zeroed. */
	for (uint64_t a = h0; a < h1;) {
		uint8_t ents[FMT_V2_GROUP_CHUNKS * FMT_V2_ENTRY_SIZE];
		uint64_t z = (a / GC + 1) * GC < h1 ? (a / GC + 1) * GC : h1;     /* [a, z) */
		size_t lo = 0, hi;

		/* Only the entries that are not holes yet are written: zeroing a sparse file must
		 * not allocate its tag pages. */
		r = entries_read(f, a, (size_t)(z - a), ents);
		if (r < 0)
			return r;
		for (hi = (size_t)(z - a) * ES; hi > 0 && ents[hi - 1] == 0; hi--)
			;
		while (lo < hi && ents[lo] == 0)
			lo++;
		if (lo < hi) {
			memset(ents, 0, sizeof(ents));
			r = pwrite_full(f->fd, ents, hi - lo, fmt_v2_entry_offset(a) + lo);
			if (r < 0)
				return r;
		}
		r = backing_zero(f->fd, fmt_v2_page_offset(a), (z - a) * CS, keep_alloc);
		if (r < 0)
			return r;
		a = z;
	}
	return 0;
}

int content_fallocate(const struct content_file *f, int mode, uint64_t off, uint64_t len)
{
	uint64_t b = 0, p, end, boff, bend;
	int op = mode & ~FALLOC_FL_KEEP_SIZE;
	bool keep = mode & FALLOC_FL_KEEP_SIZE;
	int r;

	if (op != 0 && op != FALLOC_FL_ZERO_RANGE && !(op == FALLOC_FL_PUNCH_HOLE && keep))
		return -EOPNOTSUPP;
	if (len == 0)
		return -EINVAL;
	if (off > fmt_max_plain_size(f->layout) || len > fmt_max_plain_size(f->layout) - off)
		return -EFBIG;
	end = off + len;
	r = backing_size(f->fd, &b);
	if (r < 0)
		return r;
	/* Zeroing re-seals chunks, which a damaged tail does not allow (as for write). */
	if (op && b != 0 && !fmt_backing_size_valid(f->layout, b))
		return -EIO;
	p = fmt_plain_size(f->layout, b);

	/* Allocate first, so that running out of space changes nothing. A punch allocates nothing;
	 * the part of a zeroed range inside the file is allocated by backing_zero or the re-seal,
	 * so only its part past the end is preallocated here. A backing filesystem that cannot
	 * preallocate still gets its zeros: they are what a zero-range promises. */
	if (op == 0 || (op == FALLOC_FL_ZERO_RANGE && end > p)) {
		uint64_t from = op == 0 || off > p ? off : p;

		if (f->layout == FMT_LAYOUT_V2) {
			/* From the tag page of the first chunk's group to the end of the last data page. */
			boff = fmt_v2_group_offset(from / CS / GC);
			bend = fmt_v2_page_offset((end + CS - 1) / CS - 1) + CS;
		} else {
			boff = fmt_chunk_offset(from / CS);
			bend = fmt_chunk_offset((end + CS - 1) / CS);
		}
		if (fallocate(f->fd, FALLOC_FL_KEEP_SIZE, (off_t)boff, (off_t)(bend - boff)) < 0 &&
		    !(op && errno == EOPNOTSUPP))
			return -errno;
	}
	if (op && off < p) {
		r = zero_range(f, p, off, end < p ? end : p, op == FALLOC_FL_ZERO_RANGE);
		if (r < 0)
			return r;
	}
	if (keep || end <= p)
		return 0;
	/* Grown blocks read back as zeros, which are holes, so growing stays cheap. */
	return content_truncate(f, end);
}

/* True when chunk idx (a full one) is a hole: no backing data in its range, or only zero bytes
 * there (a neighbouring chunk's data shares a backing block with it: chunks are 4136 bytes). */
static int chunk_is_hole(const struct content_file *f, uint64_t idx, bool *ret)
{
	uint8_t ct[FMT_CHUNK_DISK_SIZE];
	uint64_t cstart = fmt_chunk_offset(idx);
	off_t data = lseek(f->fd, (off_t)cstart, SEEK_DATA);
	ssize_t n;

	if (data < 0 && errno != ENXIO)
		return -errno;
	if (data < 0 || (uint64_t)data >= cstart + CDS) {
		*ret = true;
		return 0;
	}
	n = util_pread_full(f->fd, ct, sizeof(ct), cstart);
	if (n < 0)
		return (int)n;
	*ret = (size_t)n == sizeof(ct) && sodium_is_zero(ct, sizeof(ct));
	return 0;
}

/*
 * v2 SEEK_DATA / SEEK_HOLE (off < p): the tag entries say exactly which full chunks are holes.
 * SEEK_DATA reads the entries of a group and jumps over groups whose tag pages and data pages
 * are all sparse in the backing file; SEEK_HOLE reads the entries group by group.
 */
static int lseek_v2(const struct content_file *f, uint64_t p, uint64_t off, int whence, uint64_t *ret_off)
{
	uint8_t ents[FMT_V2_GROUP_CHUNKS * FMT_V2_ENTRY_SIZE];
	uint64_t idx = off / CS, nfull = p / CS;
	int r;

	while (idx < nfull) {
		uint64_t z = (idx / GC + 1) * GC < nfull ? (idx / GC + 1) * GC : nfull;      /* [idx, z) */

		r = entries_read(f, idx, (size_t)(z - idx), ents);
		if (r < 0)
			return r;
		for (uint64_t i = idx; i < z; i++) {
			if (fmt_v2_entry_is_hole(ents + (i - idx) * ES) == (whence == SEEK_HOLE)) {
				*ret_off = i * CS > off ? i * CS : off;
				return 0;
			}
		}
		idx = z;
		if (whence == SEEK_DATA && idx < nfull) {
			/* Skip groups that hold no backing data at all: their entries are all holes. */
			off_t pos = lseek(f->fd, (off_t)fmt_v2_group_offset(idx / GC), SEEK_DATA);
			uint64_t g;

			if (pos < 0 && errno != ENXIO)
				return -errno;
			if (pos < 0)
				g = nfull / GC + 1;
			else
				g = ((uint64_t)pos - FMT_V2_HEADER_AREA) / FMT_V2_GROUP_DISK;
			if (g * GC > idx)
				idx = g * GC < nfull ? g * GC : nfull;
		}
	}
	/* Past the full chunks: the partial last chunk is always data; the end is a hole. */
	if (whence == SEEK_HOLE) {
		*ret_off = p;
		return 0;
	}
	if (p % CS == 0)
		return -ENXIO;
	*ret_off = nfull * CS > off ? nfull * CS : off;
	return 0;
}

int content_lseek(const struct content_file *f, uint64_t off, int whence, uint64_t *ret_off)
{
	uint64_t b = 0, p, idx;
	bool hole;
	off_t pos;
	int r;

	if (whence != SEEK_DATA && whence != SEEK_HOLE)
		return -EINVAL;
	r = backing_size(f->fd, &b);
	if (r < 0)
		return r;
	p = fmt_plain_size(f->layout, b);
	if (off >= p)
		return -ENXIO;
	if (f->layout == FMT_LAYOUT_V2)
		return lseek_v2(f, p, off, whence, ret_off);
	idx = off / CS;

	/* Both searches jump through the backing file with lseek and only read a chunk where a
	 * backing block it shares with a neighbour makes the answer unclear. A partial last
	 * chunk is always sealed data, never a hole. */
	if (whence == SEEK_DATA) {
		for (;;) {
			if (idx * CS >= p)
				return -ENXIO;
			pos = lseek(f->fd, (off_t)fmt_chunk_offset(idx), SEEK_DATA);
			if (pos < 0)
				return errno == ENXIO ? -ENXIO : -errno;
			idx = ((uint64_t)pos - FMT_DATA_OFFSET) / CDS;
			if (idx * CS >= p)
				return -ENXIO;
			if (chunk_len(idx, p) < CS)
				break;
			r = chunk_is_hole(f, idx, &hole);
			if (r < 0)
				return r;
			if (!hole)
				break;
			idx++;
		}
		*ret_off = idx * CS > off ? idx * CS : off;
		return 0;
	}

	while (idx * CS < p && chunk_len(idx, p) == CS) {
		r = chunk_is_hole(f, idx, &hole);
		if (r < 0)
			return r;
		if (hole) {
			*ret_off = idx * CS > off ? idx * CS : off;
			return 0;
		}
		/* Data here: jump to the next backing hole, to the first chunk that can lie in it. */
		pos = lseek(f->fd, (off_t)fmt_chunk_offset(idx), SEEK_HOLE);
		if (pos < 0)
			return -errno;
		{
			uint64_t next = ((uint64_t)pos - FMT_DATA_OFFSET) / CDS;

			idx = next > idx ? next : idx + 1;
		}
	}
	*ret_off = p;
	return 0;
}
