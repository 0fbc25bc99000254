/* keystate.c: the poller (asks the key service, records what it hears) and the lock thread (decides and carries out locks) */
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <sodium.h>

#include "keyfs/audit.h"
#include "keyfs/control.h"
#include "keyfs/kms.h"
#include "keyfs/log.h"
#include "keyfs/util.h"
#include "keyfs/volkeys.h"

#include "bgthread.h"
#include "keystate.h"
#include "lockdecision.h"
#include "notify.h"

enum phase { PHASE_UNLOCKED, PHASE_LOCKING, PHASE_LOCKED };

/* During an outage within grace, one log line this often: not one per poll. */
#define OUTAGE_LOG_EVERY 300.0
/* While a lock is carried out, key service calls are interrupted this often: one that started
 * just after an interrupt must not hold a content lock the lock is waiting for. */
#define INTERRUPT_EVERY_MS 50
#define WHY_MAX (KMS_ERR_MAX + 96)

/*
 * Observation and action are apart. The poller thread only asks the key service and records
 * the answer; request handlers record what their wraps and unwraps heard (keystate_poke); the
 * lock thread alone decides (ks_decide) and carries out transitions, so neither a stalled key
 * service nor a request handler ever waits for a lock, and a lock never waits for the service.
 * phase, err and no_create are atomics read by every contents operation; the rest is under lock.
 */
struct keystate {
	struct keystate_config cfg;

	_Atomic int phase;
	_Atomic int err;
	_Atomic bool no_create;

	pthread_mutex_t lock;
	pthread_cond_t wake;            /* lock: the poller waits on it */
	pthread_cond_t decide;          /* lock: the lock thread waits on it */
	pthread_cond_t applied;         /* lock: manual requests wait on it */
	pthread_cond_t calm;            /* lock: interrupting ended (the interrupter and the poller wait) */
	bool poked;                     /* lock: poll now */
	bool stop;                      /* lock */
	bool manual;                    /* lock: keyfsctl lock is in force */
	unsigned manual_seq, applied_seq;       /* lock: manual requests asked and carried out */
	bool interrupting;              /* lock: a lock is being carried out */

	/* Observations, under lock; times are CLOCK_MONOTONIC seconds. */
	int key_state;                  /* newest key state heard (KMS_STATE_PURGED for 404) */
	bool revoked;                   /* the access-revoked latch */
	bool poll_failed;               /* the newest poll got no definite answer */
	bool polling;                   /* a poll is waiting for its answer, since poll_since */
	double poll_since;
	double poke_at;                 /* newest poke: a poll sent before it says nothing newer */
	double last_good;               /* newest definite answer */
	double outage_logged;           /* seconds into the current outage of its last log line; <0: none */
	char last_poll[32];             /* RFC 3339 of the newest poll answer (good or bad) */
	char why[KMS_ERR_MAX];          /* what the newest observation said, for the log */
	char outage_why[KMS_ERR_MAX];   /* why the newest poll failed */
	double event_at;                /* when the newest observation that changed something arrived */
	bool in_grace;                  /* an outage began and has not ended or locked (audit) */
	char rotated_to[KMS_KEY_VERSION_MAX + 1];       /* the newest key version picked up (audit) */
	/* The poller's key service calls, for status: count, failures, latency. */
	unsigned long long kms_calls, kms_errors;
	double kms_last_ms, kms_total_ms;

	struct ks_verdict verdict;      /* lock: the one in force (applied) */
	bool started;
	pthread_t poller_thread, lock_thread;
};

static double mono_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static struct timespec mono_at(double t)
{
	struct timespec ts;

	ts.tv_sec = (time_t)t;
	ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	return ts;
}

/* The observations as of now: the only place the clock meets the decision. Called with lock. */
static struct ks_observed observed_locked(const struct keystate *ks, double now)
{
	return (struct ks_observed){
		.key_state = ks->key_state,
		.unreachable = ks->poll_failed || (ks->polling && now - ks->poll_since > KS_STALL_MS / 1000.0),
		.quiet = now - ks->last_good,
		.grace = ks->cfg.grace,
		.manual = ks->manual,
		.revoked = ks->revoked,
	};
}

int keystate_new(const struct keystate_config *cfg, struct keystate **ret)
{
	struct keystate *ks = calloc(1, sizeof(*ks));

	if (!ks)
		return -ENOMEM;
	ks->cfg = *cfg;
	pthread_mutex_init(&ks->lock, NULL);
	bgthread_cond_init(&ks->wake);
	bgthread_cond_init(&ks->decide);
	bgthread_cond_init(&ks->applied);
	bgthread_cond_init(&ks->calm);
	ks->key_state = cfg->initial_state;
	ks->last_good = mono_now();
	ks->poke_at = -1;
	ks->outage_logged = -1;
	util_now_rfc3339(ks->last_poll);
	ks->verdict = ks_decide(&(struct ks_observed){ .key_state = cfg->initial_state, .grace = cfg->grace });
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
		return -atomic_load(&ks->err);
	if (op == KS_OP_CREATE && atomic_load(&ks->no_create))
		return -ENOKEY;
	return 0;
}

void keystate_note_rotation(struct keystate *ks, const char *key_version)
{
	char line[KMS_KEY_VERSION_MAX + 64];
	bool news;

	pthread_mutex_lock(&ks->lock);
	news = strcmp(ks->rotated_to, key_version) != 0;
	if (news)
		snprintf(ks->rotated_to, sizeof(ks->rotated_to), "%s", key_version);
	pthread_mutex_unlock(&ks->lock);
	if (!news)
		return;
	snprintf(line, sizeof(line), "key version '%s' picked up: re-wrapped keys are stored", key_version);
	/* Queued only: the audit thread sends it. */
	audit_emit(&(struct audit_event){
		.kind = AUDIT_ROTATION, .volume = ks->cfg.volume, .mountpoint = ks->cfg.mountpoint,
		.backing = ks->cfg.backing, .key_id = ks->cfg.key_id, .key_crn = ks->cfg.key_crn,
		.reason = "rewrapped", .key_version = key_version, .latency_ms = -1, .uid = -1, .message = line,
	});
}

void keystate_audit_manual(struct keystate *ks, bool lock, unsigned uid, long long ms)
{
	char line[128];
	bool locked = keystate_locked(ks);

	snprintf(line, sizeof(line), "keyfsctl %s by uid %u: the mount is %s", lock ? "lock" : "unlock", uid,
		 locked ? "locked" : "unlocked");
	audit_emit(&(struct audit_event){
		.kind = lock ? AUDIT_MANUAL_LOCK : AUDIT_MANUAL_UNLOCK, .volume = ks->cfg.volume,
		.mountpoint = ks->cfg.mountpoint, .backing = ks->cfg.backing, .key_id = ks->cfg.key_id,
		.key_crn = ks->cfg.key_crn, .reason = locked ? "locked" : "unlocked", .latency_ms = ms,
		.uid = uid, .message = line,
	});
}

bool keystate_locked(struct keystate *ks)
{
	return atomic_load(&ks->phase) != PHASE_UNLOCKED;
}

void keystate_refuse_writes(struct keystate *ks)
{
	atomic_store_explicit(&ks->phase, PHASE_LOCKED, memory_order_release);
}

void keystate_poke(struct keystate *ks, int r)
{
	int state;

	switch (r) {
	case -ENOKEY:
		state = KMS_STATE_SUSPENDED;
		break;
	case -EKEYREVOKED:
		state = KMS_STATE_DESTROYED;
		break;
	case -EKEYEXPIRED:
		state = KMS_STATE_DEACTIVATED;
		break;
	case -EACCES:
		state = -1;
		break;
	default:
		return;
	}
	pthread_mutex_lock(&ks->lock);
	if (state < 0) {
		if (!ks->revoked)
			snprintf(ks->why, sizeof(ks->why), "a wrap or unwrap was refused: access denied");
		ks->revoked = true;
	} else {
		/* The newest answer about the key: a poll already under way may be older. */
		if (ks->key_state != state)
			snprintf(ks->why, sizeof(ks->why), "a wrap or unwrap found the key %s", kms_state_name(state));
		ks->key_state = state;
		ks->poke_at = mono_now();
	}
	ks->event_at = mono_now();
	ks->poked = true;
	pthread_cond_signal(&ks->wake);
	pthread_cond_signal(&ks->decide);
	pthread_mutex_unlock(&ks->lock);
}

int keystate_manual(struct keystate *ks, bool lock)
{
	struct timespec deadline = bgthread_deadline(KS_MANUAL_WAIT_MS);
	unsigned seq;
	int r = 0;

	pthread_mutex_lock(&ks->lock);
	ks->manual = lock;
	ks->event_at = mono_now();
	seq = ++ks->manual_seq;
	pthread_cond_signal(&ks->decide);
	/* The lock thread applies requests in order; wait for ours, not for the key service. */
	while (ks->started && !ks->stop && ks->applied_seq < seq && r == 0)
		r = -pthread_cond_timedwait(&ks->applied, &ks->lock, &deadline);
	pthread_mutex_unlock(&ks->lock);
	return r;
}

/* ---- carrying out a lock ---- */

/* While a lock is carried out: interrupt every key service call, now and every 50 ms. */
static void *interrupter(void *arg)
{
	struct keystate *ks = arg;

	pthread_mutex_lock(&ks->lock);
	while (ks->interrupting) {
		struct timespec next = bgthread_deadline(INTERRUPT_EVERY_MS);

		pthread_mutex_unlock(&ks->lock);
		kms_interrupt(ks->cfg.kms);
		pthread_mutex_lock(&ks->lock);
		if (ks->interrupting)
			pthread_cond_timedwait(&ks->calm, &ks->lock, &next);
	}
	pthread_mutex_unlock(&ks->lock);
	return NULL;
}

static void interrupting(struct keystate *ks, bool on, pthread_t *thread, bool *started)
{
	pthread_mutex_lock(&ks->lock);
	ks->interrupting = on;
	pthread_cond_broadcast(&ks->calm);
	pthread_mutex_unlock(&ks->lock);
	if (on) {
		kms_interrupt(ks->cfg.kms);
		*started = bgthread_start(thread, interrupter, ks) == 0;
	} else if (*started) {
		pthread_join(*thread, NULL);
	}
}

/* One audit event about this mount. */
static void audit(const struct keystate *ks, enum audit_kind kind, const char *reason, const char *why,
		  long long latency_ms)
{
	char cid[37];

	audit_correlation_id(why, cid);
	audit_emit(&(struct audit_event){
		.kind = kind, .volume = ks->cfg.volume, .mountpoint = ks->cfg.mountpoint,
		.backing = ks->cfg.backing, .key_id = ks->cfg.key_id, .key_crn = ks->cfg.key_crn,
		.reason = reason, .correlation_id = cid, .latency_ms = latency_ms, .uid = -1, .message = why,
	});
}

/* Milliseconds from the observation that led here (a poll answer, a refused call, a request). */
static long long since_event(struct keystate *ks)
{
	double at;

	pthread_mutex_lock(&ks->lock);
	at = ks->event_at;
	pthread_mutex_unlock(&ks->lock);
	return at > 0 ? (long long)((mono_now() - at) * 1000 + 0.5) : -1;
}

/* Carry out a change of verdict. Called by the lock thread only, without ks->lock. */
static void transition(struct keystate *ks, const struct ks_verdict *was, const struct ks_verdict *now,
		       const char *why)
{
	const char *key = ks->cfg.key;
	const char *name = ks_reason_name(now->reason);
	char line[WHY_MAX + 64];

	if (now->locked && !was->locked) {
		pthread_t thread;
		bool started = false;

		/* Step 1: refuse opens and reads; then nothing waits for the key service. */
		atomic_store(&ks->err, now->err);
		atomic_store_explicit(&ks->phase, PHASE_LOCKING, memory_order_release);
		interrupting(ks, true, &thread, &started);
		ks->cfg.hooks.lockdown(ks->cfg.hooks.ctx, ks);
		keystate_refuse_writes(ks);
		kms_forget(ks->cfg.kms);
		interrupting(ks, false, &thread, &started);
		log_warn("locked (%s): key '%s'%s%s", name, key, why[0] ? ": " : "", why);
		notify_send("STATUS=locked (%s): key %s", name, key);
		snprintf(line, sizeof(line), "locked (%s)%s%s", name, why[0] ? ": " : "", why);
		audit(ks, AUDIT_LOCK, name, line,
		      now->reason == KS_REASON_UNREACHABLE ? -1 : since_event(ks));
		pthread_mutex_lock(&ks->lock);
		ks->in_grace = false;
		pthread_mutex_unlock(&ks->lock);
	} else if (now->locked) {
		/* Still locked, for another reason: the errno follows the worse news. */
		atomic_store(&ks->err, now->err);
		if (now->reason != was->reason) {
			log_warn("still locked, now %s: key '%s'%s%s", name, key, why[0] ? ": " : "", why);
			notify_send("STATUS=locked (%s): key %s", name, key);
		}
	} else if (was->locked) {
		atomic_store(&ks->no_create, now->no_create);
		ks->cfg.hooks.unlocked(ks->cfg.hooks.ctx);
		atomic_store_explicit(&ks->phase, PHASE_UNLOCKED, memory_order_release);
		log_info("unlocked: key '%s' is usable again%s%s", key, why[0] ? ": " : "", why);
		snprintf(line, sizeof(line), "unlocked%s%s", why[0] ? ": " : "", why);
		audit(ks, AUDIT_UNLOCK, ks_reason_name(was->reason), line, since_event(ks));
		notify_send("STATUS=unlocked: key %s%s", key, now->no_create ? " (deactivated: no new files)" : "");
	}
	if (!now->locked && now->no_create != was->no_create) {
		atomic_store(&ks->no_create, now->no_create);
		log_warn("key '%s' is %s", key, now->no_create ? "deactivated: existing files stay usable, no new files"
								: "active again: new files allowed");
	}
}

/* The message a transition to v logs. Called with lock. */
static void why_of(const struct keystate *ks, const struct ks_verdict *v, const struct ks_observed *o,
		   char *why, size_t size)
{
	if (v->reason == KS_REASON_UNREACHABLE && ks->poll_failed)
		snprintf(why, size, "no answer for %lu s (grace %u s): %s", (unsigned long)o->quiet, o->grace,
			 ks->outage_why);
	else if (v->reason == KS_REASON_UNREACHABLE)
		snprintf(why, size, "no answer for %lu s (grace %u s): a key poll has waited %lu ms for its answer",
			 (unsigned long)o->quiet, o->grace, (unsigned long)((mono_now() - ks->poll_since) * 1000));
	else if (v->reason == KS_REASON_MANUAL)
		snprintf(why, size, "requested with keyfsctl lock");
	else
		snprintf(why, size, "%s", ks->why);
}

/* When the observations change by themselves: a poll becomes stalled, or grace runs out. */
static struct timespec next_look(const struct keystate *ks, double now)
{
	double at = now + 1.0;
	double stalled = ks->poll_since + KS_STALL_MS / 1000.0 + 0.001;
	double graceless = ks->last_good + ks->cfg.grace + 0.001;

	if (ks->polling && stalled > now && stalled < at)
		at = stalled;
	if ((ks->polling || ks->poll_failed) && graceless > now && graceless < at)
		at = graceless;
	return mono_at(at);
}

static void *lock_thread(void *arg)
{
	struct keystate *ks = arg;

	pthread_mutex_lock(&ks->lock);
	while (!ks->stop) {
		double now = mono_now();
		struct ks_observed o = observed_locked(ks, now);
		struct ks_verdict v = ks_decide(&o), was = ks->verdict;
		unsigned seq = ks->manual_seq;
		struct timespec next;
		char why[WHY_MAX];

		if (!ks_verdict_equal(&v, &was)) {
			why_of(ks, &v, &o, why, sizeof(why));
			pthread_mutex_unlock(&ks->lock);
			transition(ks, &was, &v, why);
			pthread_mutex_lock(&ks->lock);
			ks->verdict = v;
		}
		if (ks->applied_seq < seq) {
			ks->applied_seq = seq;
			pthread_cond_broadcast(&ks->applied);
		}
		/* Something may have changed during a transition: look again before sleeping. */
		if (!ks_verdict_equal(&v, &was) || ks->manual_seq != seq)
			continue;
		next = next_look(ks, now);
		pthread_cond_timedwait(&ks->decide, &ks->lock, &next);
	}
	pthread_mutex_unlock(&ks->lock);
	return NULL;
}

/* ---- polling ---- */

/* While access is revoked: wrap a throwaway key and unwrap it, as keyfsctl init proves a key.
 * Returns 0 when both work, else the errno of the first that failed. */
static int probe_access(struct keystate *ks, struct kms_err *err)
{
	enum vol_probe_step step;
	struct kms_wrapped w;

	return vol_kms_probe(ks->cfg.kms, ks->cfg.volume, true, &w, err, &step);
}

/* Ask the key service, again after an interrupt (a lock under way). Returns its errno, or
 * -ECANCELED once the poller is to stop. */
static int ask(struct keystate *ks, int *state, struct kms_err *err)
{
	for (;;) {
		int r = kms_key_state(ks->cfg.kms, state, err);

		if (r != -ECANCELED)
			return r;
		/* Interrupted by a lock, or cancelled for good by the unmount (then stop follows). */
		pthread_mutex_lock(&ks->lock);
		if (ks->interrupting) {
			while (!ks->stop && ks->interrupting)
				pthread_cond_wait(&ks->calm, &ks->lock);
		} else if (!ks->stop) {
			struct timespec soon = bgthread_deadline(INTERRUPT_EVERY_MS);

			pthread_cond_timedwait(&ks->calm, &ks->lock, &soon);
		}
		if (ks->stop) {
			pthread_mutex_unlock(&ks->lock);
			return -ECANCELED;
		}
		pthread_mutex_unlock(&ks->lock);
		err->msg[0] = '\0';
	}
}

/* One poll: ask the key service and record the answer, with the log lines an outage deserves. */
static void poll_once(struct keystate *ks)
{
	struct kms_err err = { .msg = "" }, perr = { .msg = "" };
	double sent, now;
	int state = -1, r, probed = 1;
	bool revoked;

	pthread_mutex_lock(&ks->lock);
	sent = ks->poll_since = mono_now();
	ks->polling = true;
	pthread_cond_signal(&ks->decide);
	pthread_mutex_unlock(&ks->lock);

	r = ask(ks, &state, &err);
	now = mono_now();
	pthread_mutex_lock(&ks->lock);
	if (r != -ECANCELED) {
		ks->kms_calls++;
		ks->kms_errors += r < 0 && r != -EKEYREVOKED;
		ks->kms_last_ms = (now - sent) * 1000;
		ks->kms_total_ms += ks->kms_last_ms;
	}
	pthread_mutex_unlock(&ks->lock);
	if (r == -ECANCELED) {
		pthread_mutex_lock(&ks->lock);
		ks->polling = false;
		pthread_mutex_unlock(&ks->lock);
		return;
	}
	pthread_mutex_lock(&ks->lock);
	revoked = ks->revoked;
	pthread_mutex_unlock(&ks->lock);
	/* The latch is cured only by the calls that set it working again. */
	if (r == 0 && revoked)
		probed = probe_access(ks, &perr);

	now = mono_now();
	pthread_mutex_lock(&ks->lock);
	ks->polling = false;
	util_now_rfc3339(ks->last_poll);
	if (r == 0 || r == -EKEYREVOKED || r == -EACCES) {
		/* An outage is logged when it starts, every OUTAGE_LOG_EVERY s while it lasts, and when it ends. */
		if (ks->outage_logged >= 0)
			log_info("key service answers again after %.0f s without an answer", now - ks->last_good);
		if (ks->in_grace) {
			char line[KMS_ERR_MAX + 96];

			ks->in_grace = false;
			snprintf(line, sizeof(line), "key service answers again after %.0f s without an answer%s%s",
				 now - ks->last_good, err.msg[0] ? ": " : "", err.msg);
			audit(ks, AUDIT_GRACE_END, "answered", line, (long long)((now - ks->last_good) * 1000));
		}
		ks->outage_logged = -1;
		ks->poll_failed = false;
		ks->last_good = now;
	}
	if ((r == 0 || r == -EKEYREVOKED) && sent >= ks->poke_at) {
		if (ks->key_state != (r == 0 ? state : KMS_STATE_PURGED))
			ks->event_at = now;
		ks->key_state = r == 0 ? state : KMS_STATE_PURGED;
		if (err.msg[0])
			snprintf(ks->why, sizeof(ks->why), "%s", err.msg);
		else
			snprintf(ks->why, sizeof(ks->why), "the key service reports it %s", kms_state_name(ks->key_state));
	} else if (r == -EACCES) {
		/* The client already retried with a fresh token: access itself is revoked. */
		if (!ks->revoked)
			ks->event_at = now;
		ks->revoked = true;
		snprintf(ks->why, sizeof(ks->why), "%s", err.msg);
	} else if (r < 0) {
		double quiet = now - ks->last_good;

		ks->poll_failed = true;
		snprintf(ks->outage_why, sizeof(ks->outage_why), "%s", err.msg);
		if (!ks->in_grace && !ks->verdict.locked) {
			char line[KMS_ERR_MAX + 64];

			ks->in_grace = true;
			snprintf(line, sizeof(line), "key service unreachable (grace %u s): %s", ks->cfg.grace, err.msg);
			audit(ks, AUDIT_GRACE_START, "unreachable", line, (long long)(quiet * 1000));
		}
		if (!(ks->verdict.locked && ks->verdict.reason == KS_REASON_UNREACHABLE) && quiet <= ks->cfg.grace &&
		    (ks->outage_logged < 0 || quiet - ks->outage_logged >= OUTAGE_LOG_EVERY)) {
			log_warn("key service unreachable for %.0f s (grace %u s): %s", quiet, ks->cfg.grace, err.msg);
			ks->outage_logged = quiet;
		}
	}
	if (probed == 0 && ks->revoked) {
		ks->revoked = false;
		snprintf(ks->why, sizeof(ks->why), "a test wrap and unwrap work again");
	} else if (revoked && r == 0 && probed < 0) {
		log_debug("access probe: %s", perr.msg);
	}
	pthread_cond_signal(&ks->decide);
	pthread_mutex_unlock(&ks->lock);
}

static void *poller(void *arg)
{
	struct keystate *ks = arg;

	pthread_mutex_lock(&ks->lock);
	while (!ks->stop) {
		/* Spread a fleet's polls: each interval is poll ± 10 %. */
		unsigned ms = ks->cfg.poll * 900u + randombytes_uniform(ks->cfg.poll * 200u + 1);
		struct timespec deadline = bgthread_deadline(ms);

		while (!ks->stop && !ks->poked && !bgthread_reached(&deadline))
			pthread_cond_timedwait(&ks->wake, &ks->lock, &deadline);
		if (ks->stop)
			break;
		ks->poked = false;
		pthread_mutex_unlock(&ks->lock);
		poll_once(ks);
		pthread_mutex_lock(&ks->lock);
	}
	pthread_mutex_unlock(&ks->lock);
	return NULL;
}

int keystate_start(struct keystate *ks)
{
	int r = bgthread_start(&ks->lock_thread, lock_thread, ks);

	if (r < 0)
		return r;
	r = bgthread_start(&ks->poller_thread, poller, ks);
	if (r < 0) {
		pthread_mutex_lock(&ks->lock);
		ks->stop = true;
		pthread_cond_broadcast(&ks->decide);
		pthread_mutex_unlock(&ks->lock);
		pthread_join(ks->lock_thread, NULL);
		return r;
	}
	ks->started = true;
	return 0;
}

void keystate_stop(struct keystate *ks)
{
	bool started;

	if (!ks)
		return;
	pthread_mutex_lock(&ks->lock);
	ks->stop = true;
	started = ks->started;
	ks->started = false;
	pthread_cond_broadcast(&ks->wake);
	pthread_cond_broadcast(&ks->decide);
	pthread_cond_broadcast(&ks->applied);
	pthread_cond_broadcast(&ks->calm);
	pthread_mutex_unlock(&ks->lock);
	if (started) {
		pthread_join(ks->poller_thread, NULL);
		pthread_join(ks->lock_thread, NULL);
	}
}

void keystate_free(struct keystate *ks)
{
	if (!ks)
		return;
	keystate_stop(ks);
	pthread_cond_destroy(&ks->wake);
	pthread_cond_destroy(&ks->decide);
	pthread_cond_destroy(&ks->applied);
	pthread_cond_destroy(&ks->calm);
	pthread_mutex_destroy(&ks->lock);
	free(ks);
}

/* Copy src into dst of size bytes. Returns whether it was cut. */
static bool status_copy(char *dst, size_t size, const char *src)
{
	return (size_t)snprintf(dst, size, "%s", src) >= size;
}

int keystate_status(struct keystate *ks, struct control_status *st)
{
	struct ks_verdict v;
	struct kms_counts c;
	bool cut = false;

	memset(st, 0, sizeof(*st));
	pthread_mutex_lock(&ks->lock);
	v = ks->verdict;
	st->locked = v.locked;
	if (v.locked)
		cut |= status_copy(st->reason, sizeof(st->reason), ks_reason_name(v.reason));
	cut |= status_copy(st->key, sizeof(st->key), ks->cfg.key);
	/* A purged key (404) has no state number any more. */
	st->key_state = ks->key_state < 0 || ks->key_state == KMS_STATE_PURGED ? -1 : ks->key_state;
	cut |= status_copy(st->last_poll, sizeof(st->last_poll), ks->last_poll);
	st->poll = ks->cfg.poll;
	st->grace = ks->cfg.grace;
	st->deactivated = v.no_create;
	cut |= status_copy(st->backing, sizeof(st->backing), ks->cfg.backing);
	cut |= status_copy(st->mountpoint, sizeof(st->mountpoint), ks->cfg.mountpoint);
	cut |= status_copy(st->volume, sizeof(st->volume), ks->cfg.volume);
	cut |= status_copy(st->key_id, sizeof(st->key_id), ks->cfg.key_id ? ks->cfg.key_id : "");
	cut |= status_copy(st->key_crn, sizeof(st->key_crn), ks->cfg.key_crn ? ks->cfg.key_crn : "");
	st->last_good_age = (int64_t)(mono_now() - ks->last_good);
	st->kms_calls = (int64_t)ks->kms_calls;
	st->kms_errors = (int64_t)ks->kms_errors;
	st->kms_latency_ms = ks->kms_calls ? (int64_t)(ks->kms_last_ms + 0.5) : -1;
	st->kms_latency_avg_ms = ks->kms_calls ? (int64_t)(ks->kms_total_ms / (double)ks->kms_calls + 0.5) : -1;
	pthread_mutex_unlock(&ks->lock);
	st->files_keyed = ks->cfg.hooks.files_keyed ? (int64_t)ks->cfg.hooks.files_keyed(ks->cfg.hooks.ctx) : -1;
	st->audit_dropped = (int64_t)audit_dropped();
	kms_counts(ks->cfg.kms, &c);
	st->kms_wraps = (int64_t)c.wraps;
	st->kms_unwraps = (int64_t)c.unwraps;
	st->kms_key_errors = (int64_t)c.failed;
	return cut ? -ENAMETOOLONG : 0;
}
