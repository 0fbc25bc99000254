/* volume.c: the key service options of fsck and rewrap, handed to the volume layer that opens volumes for all */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "keyfs/exitcode.h"
#include "keyfs/log.h"
#include "keyfs/util.h"
#include "volume.h"

int cli_kms_option(struct cli_kms_args *a, int c, const char *arg)
{
	switch (c) {
	case CLI_OPT_KEYSTORE: a->keystore = arg; return 1;
	case CLI_OPT_APIKEY_FILE: a->apikey_file = arg; return 1;
	case CLI_OPT_CA_FILE: a->ca_file = arg; return 1;
	default: return 0;
	}
}

static int volume_open(const char *arg, const struct cli_kms_args *a, const char *what, unsigned flags,
		       struct vol *ret)
{
	char keystore[PATH_MAX], apikey[PATH_MAX], ca[PATH_MAX];
	struct vol_host h = { NULL };
	int r;

	memset(ret, 0, sizeof(*ret));
	ret->root_fd = ret->lock_fd = -1;
	if (a->keystore) {
		r = cli_keystore_dir(a->keystore, keystore, sizeof(keystore));
		if (r)
			return r;
		h.keystore = keystore;
	}
	if (a->apikey_file) {
		r = a->apikey_file[0] ? cli_abs_path(a->apikey_file, apikey, sizeof(apikey)) : -ENOENT;
		if (r < 0)
			return cli_usage_error(what, "--apikey-file '%s': %s", a->apikey_file, strerror(-r));
		h.apikey_file = apikey;
	}
	if (a->ca_file) {
		r = a->ca_file[0] ? cli_abs_path(a->ca_file, ca, sizeof(ca)) : -ENOENT;
		if (r < 0)
			return cli_usage_error(what, "--ca-file '%s': %s", a->ca_file, strerror(-r));
		h.ca_file = ca;
	}
	return vol_open(arg, &h, flags, ret);
}

int cli_volume_open(const char *arg, const struct cli_kms_args *a, const char *what, struct vol *ret)
{
	return volume_open(arg, a, what, 0, ret);
}

int cli_volume_open_untrusted(const char *arg, const struct cli_kms_args *a, const char *what, struct vol *ret)
{
	return volume_open(arg, a, what, VOL_SKIP_TRUST, ret);
}

bool cli_key_id_is_alias(const char *key_id)
{
	return key_id[0] && !util_uuid_valid(key_id) && strncmp(key_id, "crn:", 4) != 0;
}

void cli_key_id_hint(const char *backing, const char *key_id)
{
	char a[1024], b[PATH_MAX * 2];

	/* Both are the backing dir's bytes (the daemon's, for status): escaped for the terminal. */
	cli_escape(key_id, true, a, sizeof(a));
	cli_escape(backing, true, b, sizeof(b));
	fprintf(stderr, "keyfsctl: hint: volume '%s' names its key by the alias '%s' (moving the alias would move the volume): "
		"'keyfsctl trust --resolve-key %s' records the key's uuid instead\n", b, a, b);
}

int cli_volume_kms(struct vol *v, const char *what)
{
	int rc = vol_kms_open(v, what);

	if (rc)
		return rc;
	switch (v->key_state) {
	case KMS_STATE_ACTIVE:
	case KMS_STATE_DEACTIVATED:
		return 0;
	case KMS_STATE_SUSPENDED:
	case KMS_STATE_DESTROYED:
	case KMS_STATE_PURGED:
		log_err("key '%s' is %s: no file key of '%s' can be unwrapped, so %s cannot run", v->vol.key,
			kms_state_name(v->key_state), v->backing, what);
		return KEYFS_EXIT_LOCKED;
	default:
		log_err("key '%s' is %s: it cannot unwrap file keys", v->vol.key, kms_state_name(v->key_state));
		return KEYFS_EXIT_KMS;
	}
}

void cli_volume_close(struct vol *v)
{
	vol_close(v);
}
