/* lockdecision.c: the lock decision of DESIGN §3 as one pure function: no clock, no I/O, no state */
#include <errno.h>

#include "keyfs/kms.h"

#include "lockdecision.h"

const char *ks_reason_name(enum ks_reason reason)
{
	switch (reason) {
	case KS_REASON_SUSPENDED: return "key-suspended";
	case KS_REASON_DESTROYED: return "key-destroyed";
	case KS_REASON_REVOKED: return "access-revoked";
	case KS_REASON_UNREACHABLE: return "kms-unreachable";
	case KS_REASON_MANUAL: return "manual";
	default: return NULL;
	}
}

static struct ks_verdict locked(enum ks_reason reason, int err)
{
	return (struct ks_verdict){ .locked = true, .reason = reason, .err = err };
}

struct ks_verdict ks_decide(const struct ks_observed *o)
{
	bool usable = o->key_state == KMS_STATE_ACTIVE || o->key_state == KMS_STATE_DEACTIVATED;
	struct ks_verdict v;

	if (o->key_state == KMS_STATE_DESTROYED || o->key_state == KMS_STATE_PURGED)
		return locked(KS_REASON_DESTROYED, EKEYREVOKED);
	if (o->revoked)
		return locked(KS_REASON_REVOKED, ENOKEY);
	/* Suspended, pre-active, anything unknown: not usable, maybe later. */
	if (!usable)
		return locked(KS_REASON_SUSPENDED, ENOKEY);
	/* Within grace an outage changes nothing: the last answer stands. */
	if (o->unreachable && o->quiet > (double)o->grace)
		return locked(KS_REASON_UNREACHABLE, ENOKEY);
	if (o->manual)
		v = locked(KS_REASON_MANUAL, ENOKEY);
	else
		v = (struct ks_verdict){ .locked = false };
	v.no_create = o->key_state == KMS_STATE_DEACTIVATED;
	return v;
}

bool ks_verdict_equal(const struct ks_verdict *a, const struct ks_verdict *b)
{
	return a->locked == b->locked && a->reason == b->reason && a->err == b->err && a->no_create == b->no_create;
}
