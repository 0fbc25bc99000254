/* keystate.c: the poller thread and the lock state machine: when contents are served, and how a lock is carried out */
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <sodium.h>

#include "keyfs/kms.h"
#include "keyfs/log.h"
#include "keyfs/util.h"

#include "bgthread.h"
#include "dekpool.h"
#include "filekeys.h"
#include "fs.h"
#include "keystate.h"
#include "notify.h"
#include "prefetch.h"

enum phase { PHASE_UNLOCKED, PHASE_LOCKING, PHASE_LOCKED };

enum reason {
	REASON_NONE,
	REASON_SUSPENDED,
	REASON_DESTROYED,
	REASON_REVOKED,
	REASON_UNREACHABLE,
	REASON_MANUAL,
};

static const char *const reason_names[] = {
	[REASON_NONE] = NULL,
	[REASON_SUSPENDED] = "key-suspended",
	[REASON_DESTROYED] = "key-destroyed",
	[REASON_REVOKED] = "access-revoked",
	[REASON_UNREACHABLE] = "kms-unreachable",
	[REASON_MANUAL] = "manual",
};

/* During an outage within grace, one log line this often: not one per poll. */
#define OUTAGE_LOG_EVERY 300.0

/* What the KMS answers mean for the mount: the pure part of the state machine. */
struct verdict {
	bool locked;
	enum reason reason;
	int err;                /* ENOKEY or EKEYREVOKED when locked */
	bool no_create;         /* deactivated key: existing files only */
};

/*
 * The poller thread alone changes the phase and carries out locks and unlocks: transitions are
 * never made inside a request handler (cache invalidations from there can deadlock the kernel).
 * phase, err and no_create are atomics read by every contents operation; the rest is under lock.
 */
struct keystate {
	struct keyfs *fs;
	unsigned poll, grace;

	_Atomic int phase;
	_Atomic int err;
	_Atomic bool no_create;

	pthread_mutex_t lock;
	pthread_cond_t wake;            /* lock: the poller waits on it; manual requests wait on applied */
	pthread_cond_t applied;
	bool poked;                     /* lock: poll now */
	bool stop;                      /* lock */
	bool manual;                    /* lock: keyfsctl lock is in force */
	unsigned manual_seq, applied_seq;       /* lock: manual requests asked and carried out */
	struct verdict verdict;         /* lock: the current one */
	int key_state;                  /* lock: last state the KMS gave, -1 before any */
	char last_poll[32];             /* lock: RFC 3339 of the last answer (good or bad) */
	struct timespec last_good;      /* lock: CLOCK_MONOTONIC of the last definite answer */
	double outage_logged;           /* lock: seconds into the current outage of its last log line; <0: none */
	bool started;
	pthread_t thread;
};

static struct verdict verdict_of_state(int state)
{
	switch (state) {
	case KMS_STATE_ACTIVE:
		return (struct verdict){ .locked = false };
	case KMS_STATE_DEACTIVATED:
		return (struct verdict){ .locked = false, .no_create = true };
	case KMS_STATE_DESTROYED:
	case KMS_STATE_PURGED:
		return (struct verdict){ .locked = true, .reason = REASON_DESTROYED, .err = EKEYREVOKED };
	default:        /* suspended, pre-active, anything unknown: not usable, maybe later */
		return (struct verdict){ .locked = true, .reason = REASON_SUSPENDED, .err = ENOKEY };
	}
}

int keystate_new(struct keyfs *fs, unsigned poll, unsigned grace, int initial_state, struct keystate **ret)
{
	struct keystate *ks = calloc(1, sizeof(*ks));

	if (!ks)
		return -ENOMEM;
	ks->fs = fs;
	ks->poll = poll;
	ks->grace = grace;
	pthread_mutex_init(&ks->lock, NULL);
	bgthread_cond_init(&ks->wake);
	bgthread_cond_init(&ks->applied);
	ks->verdict = verdict_of_state(initial_state);
	ks->key_state = initial_state;
	util_now_rfc3339(ks->last_poll);
	clock_gettime(CLOCK_MONOTONIC, &ks->last_good);
	ks->outage_logged = -1;
	/* Nothing is cached yet: a mount that starts locked has nothing to flush or wipe. */
	atomic_store(&ks->phase, ks->verdict.locked ? PHASE_LOCKED : PHASE_UNLOCKED);
	atomic_store(&ks->err, ks->verdict.err);
	atomic_store(&ks->no_create, ks->verdict.no_create);
	*ret = ks;
	return 0;
}

int keystate_check(struct keystate *ks, enum ks_op op)
{
	int phase = atomic_load_explicit(&ks->phase, memory_order_acquire);

	if (phase == PHASE_LOCKED || (phase == PHASE_LOCKING && op != KS_OP_WRITE))
		return atomic_load(&ks->err);
	if (op == KS_OP_CREATE && atomic_load(&ks->no_create))
		return ENOKEY;
	return 0;
}

bool keystate_locked(struct keystate *ks)
{
	return atomic_load(&ks->phase) != PHASE_UNLOCKED;
}

void keystate_poke(struct keystate *ks, int r)
{
	if (r != -ENOKEY && r != -EKEYREVOKED && r != -EKEYEXPIRED)
		return;
	pthread_mutex_lock(&ks->lock);
	ks->poked = true;
	pthread_cond_signal(&ks->wake);
	pthread_mutex_unlock(&ks->lock);
}

void keystate_manual(struct keystate *ks, bool lock)
{
	unsigned seq;

	pthread_mutex_lock(&ks->lock);
	ks->manual = lock;
	seq = ++ks->manual_seq;
	ks->poked = true;
	pthread_cond_signal(&ks->wake);
	/* The poller applies requests in order; wait for ours (or for the end of the mount). */
	while (ks->started && !ks->stop && ks->applied_seq < seq)
		pthread_cond_wait(&ks->applied, &ks->lock);
	pthread_mutex_unlock(&ks->lock);
}

static void invalidate(struct keyfs *fs, struct kfs_inode **inodes, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		int r = fuse_lowlevel_notify_inval_inode(fs->se, inode_node_id(inodes[i]), 0, 0);

		if (r < 0 && r != -ENOENT)
			log_warn("lock: cache invalidation of an inode failed: %s", strerror(-r));
	}
}

/* Drop cached plaintext and keys of every file: steps 2 to 4 of docs/LOCKING.md. */
static void lockdown(struct keystate *ks)
{
	struct keyfs *fs = ks->fs;
	struct kfs_inode **inodes = NULL;
	size_t n = 0, wiped = 0, pooled;

	pooled = dekpool_drain(fs->pool);
	dekpool_pause(fs->pool, true);
	if (fs->prefetch)
		prefetch_clear(fs->prefetch);
	/* Every inode the kernel knows: it may have pages cached or mapped, however it was opened.
	 * Dirty pages of shared mappings come back as writes, still accepted while locking. */
	n = inode_table_snapshot(&fs->table, &inodes);
	invalidate(fs, inodes, n);
	atomic_store_explicit(&ks->phase, PHASE_LOCKED, memory_order_release);
	/* Exclusive content lock: a read or write still running with the keys finishes first. */
	for (size_t i = 0; i < n; i++) {
		pthread_rwlock_wrlock(&inodes[i]->content);
		wiped += filekeys_forget(fs, inodes[i]);
		pthread_rwlock_unlock(&inodes[i]->content);
	}
	/* A read that passed its check just before locking began may have filled pages after the
	 * first pass; it has finished now (content locks), and no read succeeds any more. */
	invalidate(fs, inodes, n);
	inode_table_release(&fs->table, inodes, n);
	kms_forget(fs->kms);
	log_info("lock: caches of %zu files invalidated, %zu file keys and %zu pooled keys wiped", n, wiped, pooled);
}

/* Carry out a change of verdict. Called by the poller only, without ks->lock. */
static void transition(struct keystate *ks, const struct verdict *was, const struct verdict *now, const char *why)
{
	const char *key = ks->fs->vol.key;

	if (now->locked && !was->locked) {
		atomic_store(&ks->err, now->err);
		atomic_store_explicit(&ks->phase, PHASE_LOCKING, memory_order_release);
		lockdown(ks);
		log_warn("locked (%s): key '%s'%s%s", reason_names[now->reason], key, why[0] ? ": " : "", why);
		notify_send("STATUS=locked (%s): key %s", reason_names[now->reason], key);
	} else if (now->locked) {
		/* Still locked, for another reason: the errno follows the worse news. */
		atomic_store(&ks->err, now->err);
		if (now->reason != was->reason) {
			log_warn("still locked, now %s: key '%s'%s%s", reason_names[now->reason], key,
				 why[0] ? ": " : "", why);
			notify_send("STATUS=locked (%s): key %s", reason_names[now->reason], key);
		}
	} else if (was->locked) {
		atomic_store(&ks->no_create, now->no_create);
		dekpool_pause(ks->fs->pool, false);
		atomic_store_explicit(&ks->phase, PHASE_UNLOCKED, memory_order_release);
		log_info("unlocked: key '%s' is usable again%s%s", key, why[0] ? ": " : "", why);
		notify_send("STATUS=unlocked: key %s%s", key, now->no_create ? " (deactivated: no new files)" : "");
	}
	if (!now->locked && now->no_create != was->no_create) {
		atomic_store(&ks->no_create, now->no_create);
		log_warn("key '%s' is %s", key, now->no_create ? "deactivated: existing files stay usable, no new files"
								: "active again: new files allowed");
	}
}

/* One poll: ask the KMS and decide. Returns the verdict; *why gets a message worth logging. */
static struct verdict poll_once(struct keystate *ks, const struct verdict *prev, char *why, size_t whylen)
{
	struct kms_err err = { .msg = "" };
	struct timespec now;
	struct verdict v;
	int state = -1, r;

	r = kms_key_state(ks->fs->kms, &state, &err);
	/* Cancelled because the mount is gone: no verdict, nothing to log. */
	if (r == -ECANCELED) {
		why[0] = '\0';
		return *prev;
	}
	clock_gettime(CLOCK_MONOTONIC, &now);
	pthread_mutex_lock(&ks->lock);
	util_now_rfc3339(ks->last_poll);
	/* An outage is logged when it starts, every OUTAGE_LOG_EVERY s while it lasts, and when it ends. */
	if (r == 0 || r == -EKEYREVOKED || r == -ENOKEY || r == -EACCES) {
		if (ks->outage_logged >= 0)
			log_info("key service answers again after %.0f s without an answer",
				 (double)(now.tv_sec - ks->last_good.tv_sec));
		ks->outage_logged = -1;
	}
	if (r == 0) {
		ks->key_state = state;
		ks->last_good = now;
		v = verdict_of_state(state);
		if (err.msg[0])
			snprintf(why, whylen, "%s", err.msg);
		else
			snprintf(why, whylen, "the key service reports it %s", kms_state_name(state));
	} else if (r == -EKEYREVOKED) {
		ks->last_good = now;
		ks->key_state = KMS_STATE_PURGED;
		v = verdict_of_state(KMS_STATE_PURGED);
		snprintf(why, whylen, "%s", err.msg);
	} else if (r == -ENOKEY || r == -EACCES) {
		/* The client already retried with a fresh token: access itself is revoked. */
		ks->last_good = now;
		v = (struct verdict){ .locked = true, .reason = REASON_REVOKED, .err = ENOKEY };
		snprintf(why, whylen, "%s", err.msg);
	} else {
		double quiet = (double)(now.tv_sec - ks->last_good.tv_sec) +
			       (double)(now.tv_nsec - ks->last_good.tv_nsec) / 1e9;

		if (quiet > ks->grace) {
			v = (struct verdict){ .locked = true, .reason = REASON_UNREACHABLE, .err = ENOKEY };
			snprintf(why, whylen, "no answer for %.0f s (grace %u s): %s", quiet, ks->grace, err.msg);
		} else {
			/* Within grace an outage changes nothing, the lock it may have caused included. */
			v = *prev;
			if ((!prev->locked || prev->reason != REASON_UNREACHABLE) &&
			    (ks->outage_logged < 0 || quiet - ks->outage_logged >= OUTAGE_LOG_EVERY)) {
				log_warn("key service unreachable for %.0f s (grace %u s): %s", quiet, ks->grace, err.msg);
				ks->outage_logged = quiet;
			}
			why[0] = '\0';
		}
	}
	if (!v.locked && ks->manual)
		v = (struct verdict){ .locked = true, .reason = REASON_MANUAL, .err = ENOKEY, .no_create = v.no_create };
	pthread_mutex_unlock(&ks->lock);
	return v;
}

static void *poller(void *arg)
{
	struct keystate *ks = arg;

	pthread_mutex_lock(&ks->lock);
	while (!ks->stop) {
		/* Spread a fleet's polls: each interval is poll ± 10 %. */
		unsigned ms = ks->poll * 900u + randombytes_uniform(ks->poll * 200u + 1);
		struct timespec deadline = bgthread_deadline(ms);
		struct verdict was, now;
		unsigned seq;
		char why[KMS_ERR_MAX + 64];

		while (!ks->stop && !ks->poked && !bgthread_reached(&deadline))
			pthread_cond_timedwait(&ks->wake, &ks->lock, &deadline);
		if (ks->stop)
			break;
		ks->poked = false;
		seq = ks->manual_seq;
		was = ks->verdict;
		pthread_mutex_unlock(&ks->lock);

		now = poll_once(ks, &was, why, sizeof(why));
		transition(ks, &was, &now, why);

		pthread_mutex_lock(&ks->lock);
		ks->verdict = now;
		if (ks->applied_seq < seq)
			ks->applied_seq = seq;
		pthread_cond_broadcast(&ks->applied);
	}
	pthread_mutex_unlock(&ks->lock);
	return NULL;
}

int keystate_start(struct keystate *ks)
{
	int r = bgthread_start(&ks->thread, poller, ks);

	if (r == 0)
		ks->started = true;
	return r;
}

void keystate_free(struct keystate *ks)
{
	if (!ks)
		return;
	pthread_mutex_lock(&ks->lock);
	ks->stop = true;
	pthread_cond_broadcast(&ks->wake);
	pthread_cond_broadcast(&ks->applied);
	pthread_mutex_unlock(&ks->lock);
	if (ks->started)
		pthread_join(ks->thread, NULL);
	pthread_cond_destroy(&ks->wake);
	pthread_cond_destroy(&ks->applied);
	pthread_mutex_destroy(&ks->lock);
	free(ks);
}

int keystate_status_json(struct keystate *ks, char *buf, size_t size)
{
	FILE *f = fmemopen(buf, size, "w");
	struct verdict v;
	const char *reason;
	long len;

	if (!f)
		return -ENOBUFS;
	pthread_mutex_lock(&ks->lock);
	v = ks->verdict;
	reason = v.locked ? reason_names[v.reason] : NULL;
	fprintf(f, "{\"state\":\"%s\",\"reason\":", v.locked ? "locked" : "unlocked");
	if (reason)
		util_json_string(f, reason);
	else
		fputs("null", f);
	fputs(",\"key\":", f);
	util_json_string(f, ks->fs->vol.key);
	/* A purged key (404) has no state number any more. */
	if (ks->key_state < 0 || ks->key_state == KMS_STATE_PURGED)
		fputs(",\"key_state\":null,\"last_poll\":", f);
	else
		fprintf(f, ",\"key_state\":%d,\"last_poll\":", ks->key_state);
	util_json_string(f, ks->last_poll);
	fprintf(f, ",\"poll\":%u,\"grace\":%u,\"deactivated\":%s,\"backing\":", ks->poll, ks->grace,
		v.no_create ? "true" : "false");
	util_json_string(f, ks->fs->backing);
	fputs(",\"mountpoint\":", f);
	util_json_string(f, ks->fs->mountpoint);
	fputs("}\n", f);
	pthread_mutex_unlock(&ks->lock);
	len = ftell(f);
	if (fclose(f) != 0 || len < 0 || (size_t)len >= size)
		return -ENOBUFS;
	return (int)len;
}
