/* test_lockdecision.c: the lock decision (fs/lockdecision.c), one case per row of DESIGN §3 and the edges of grace and the 403 latch */
#include <errno.h>
#include <stdbool.h>
#include <string.h>

#include "keyfs/kms.h"

#include "check.h"
#include "lockdecision.h"

struct row {
	const char *name;
	struct ks_observed in;
	bool locked;
	const char *reason;     /* as status and the log name it; NULL when unlocked */
	int err;
	bool no_create;
};

#define ACTIVE KMS_STATE_ACTIVE

static const struct row rows[] = {
	/* DESIGN §3, one row each. */
	{ "active", { .key_state = ACTIVE, .grace = 300 }, false, NULL, 0, false },
	{ "suspended", { .key_state = KMS_STATE_SUSPENDED, .grace = 300 }, true, "key-suspended", ENOKEY, false },
	{ "pre-active", { .key_state = KMS_STATE_PREACTIVE, .grace = 300 }, true, "key-suspended", ENOKEY, false },
	{ "deactivated", { .key_state = KMS_STATE_DEACTIVATED, .grace = 300 }, false, NULL, 0, true },
	{ "destroyed", { .key_state = KMS_STATE_DESTROYED, .grace = 300 }, true, "key-destroyed", EKEYREVOKED, false },
	{ "purged (404)", { .key_state = KMS_STATE_PURGED, .grace = 300 }, true, "key-destroyed", EKEYREVOKED, false },
	{ "401/403 after a fresh token", { .key_state = ACTIVE, .grace = 300, .revoked = true }, true, "access-revoked",
	  ENOKEY, false },
	{ "unreachable within grace", { .key_state = ACTIVE, .grace = 300, .unreachable = true, .quiet = 299 }, false,
	  NULL, 0, false },
	{ "unreachable past grace", { .key_state = ACTIVE, .grace = 300, .unreachable = true, .quiet = 301 }, true,
	  "kms-unreachable", ENOKEY, false },
	{ "manual", { .key_state = ACTIVE, .grace = 300, .manual = true }, true, "manual", ENOKEY, false },

	/* The 403 latch: it wins over a metadata answer that says active, and over manual. */
	{ "latch, metadata active", { .key_state = ACTIVE, .grace = 300, .revoked = true, .quiet = 0 }, true,
	  "access-revoked", ENOKEY, false },
	{ "latch and manual", { .key_state = ACTIVE, .grace = 300, .revoked = true, .manual = true }, true,
	  "access-revoked", ENOKEY, false },
	{ "latch, key deactivated", { .key_state = KMS_STATE_DEACTIVATED, .grace = 300, .revoked = true }, true,
	  "access-revoked", ENOKEY, false },
	{ "latch, unreachable past grace", { .key_state = ACTIVE, .grace = 0, .revoked = true, .unreachable = true,
					      .quiet = 5 }, true, "access-revoked", ENOKEY, false },
	/* ... but a destroyed key is the worse news: EKEYREVOKED. */
	{ "latch, key destroyed", { .key_state = KMS_STATE_DESTROYED, .grace = 300, .revoked = true }, true,
	  "key-destroyed", EKEYREVOKED, false },

	/* Grace edges: locked only once more than grace has passed, and only while unreachable. */
	{ "grace: exactly grace", { .key_state = ACTIVE, .grace = 300, .unreachable = true, .quiet = 300 }, false, NULL,
	  0, false },
	{ "grace: just past", { .key_state = ACTIVE, .grace = 300, .unreachable = true, .quiet = 300.001 }, true,
	  "kms-unreachable", ENOKEY, false },
	{ "grace: quiet but reachable", { .key_state = ACTIVE, .grace = 300, .quiet = 5000 }, false, NULL, 0, false },
	{ "grace=0: unreachable at once", { .key_state = ACTIVE, .grace = 0, .unreachable = true, .quiet = 0.001 },
	  true, "kms-unreachable", ENOKEY, false },
	{ "grace=0: reachable", { .key_state = ACTIVE, .grace = 0, .quiet = 86400 }, false, NULL, 0, false },
	{ "grace=0: answered just now", { .key_state = ACTIVE, .grace = 0, .unreachable = true, .quiet = 0 }, false,
	  NULL, 0, false },
	/* An outage keeps the last answer: a suspended key stays key-suspended, not kms-unreachable. */
	{ "suspended, then unreachable", { .key_state = KMS_STATE_SUSPENDED, .grace = 0, .unreachable = true,
					   .quiet = 10 }, true, "key-suspended", ENOKEY, false },
	{ "unreachable past grace and manual", { .key_state = ACTIVE, .grace = 1, .unreachable = true, .quiet = 2,
						 .manual = true }, true, "kms-unreachable", ENOKEY, false },
	{ "deactivated and manual", { .key_state = KMS_STATE_DEACTIVATED, .grace = 300, .manual = true }, true, "manual",
	  ENOKEY, true },
	{ "deactivated, unreachable within grace", { .key_state = KMS_STATE_DEACTIVATED, .grace = 300,
						     .unreachable = true, .quiet = 10 }, false, NULL, 0, true },
	{ "unknown state", { .key_state = 7, .grace = 300 }, true, "key-suspended", ENOKEY, false },
};

static void check_row(const struct row *r)
{
	struct ks_verdict v = ks_decide(&r->in);
	const char *reason = v.locked ? ks_reason_name(v.reason) : NULL;
	bool same_reason = (!reason && !r->reason) || (reason && r->reason && strcmp(reason, r->reason) == 0);

	CHECK_EQ(v.locked, r->locked);
	CHECK_EQ(v.err, r->err);
	CHECK_EQ(v.no_create, r->no_create);
	CHECK(same_reason);
	if (v.locked != r->locked || v.err != r->err || v.no_create != r->no_create || !same_reason)
		fprintf(stderr, "  in row '%s': got locked=%d reason=%s err=%d no_create=%d\n", r->name, v.locked,
			reason ? reason : "(none)", v.err, v.no_create);
	/* Unlocked means no reason at all. */
	if (!v.locked)
		CHECK_EQ(v.reason, KS_REASON_NONE);
}

static void test_equal(void)
{
	struct ks_verdict a = { .locked = true, .reason = KS_REASON_MANUAL, .err = ENOKEY };
	struct ks_verdict b = a;

	CHECK(ks_verdict_equal(&a, &b));
	b.no_create = true;
	CHECK(!ks_verdict_equal(&a, &b));
	b = a;
	b.reason = KS_REASON_REVOKED;
	CHECK(!ks_verdict_equal(&a, &b));
}

int main(void)
{
	for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++)
		check_row(&rows[i]);
	test_equal();
	CHECK(ks_reason_name(KS_REASON_NONE) == NULL);
	return check_done();
}
