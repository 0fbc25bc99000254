/* volume.c: a volume opened from its backing dir, with its key service, for the commands that need the key */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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

int cli_volume_open(const char *arg, struct cli_volume *ret)
{
	char err[256], *text = NULL;
	struct stat st;
	size_t len;
	int r;

	memset(ret, 0, sizeof(*ret));
	ret->root_fd = -1;
	if (!realpath(arg, ret->backing)) {
		log_err("backing dir '%s': %s", arg, strerror(errno));
		return KEYFS_EXIT_CONFIG;
	}
	ret->root_fd = open(ret->backing, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (ret->root_fd < 0) {
		log_err(errno == ENOTDIR ? "backing dir '%s' is not a directory" : "backing dir '%s': %s", arg,
			strerror(errno));
		return KEYFS_EXIT_CONFIG;
	}
	if (fstat(ret->root_fd, &st) < 0) {
		log_err("backing dir '%s': %s", arg, strerror(errno));
		return KEYFS_EXIT_CONFIG;
	}
	r = util_read_file(ret->root_fd, VOLDESC_NAME, VOLDESC_MAX, &text, &len);
	if (r == -ENOENT) {
		log_err("'%s' is not a keyfs volume (no %s): give the backing dir, not the mountpoint", arg,
			VOLDESC_NAME);
		return KEYFS_EXIT_CONFIG;
	}
	if (r < 0) {
		log_err("volume description '%s/%s': %s", ret->backing, VOLDESC_NAME,
			r == -EFBIG ? "too large" : r == -EINVAL ? "not a regular file" : strerror(-r));
		return KEYFS_EXIT_CONFIG;
	}
	err[0] = '\0';
	r = voldesc_parse(text, len, &ret->vol, err, sizeof(err));
	free(text);
	if (r < 0) {
		log_err("volume description '%s/%s': %s", ret->backing, VOLDESC_NAME, err[0] ? err : strerror(-r));
		return KEYFS_EXIT_CONFIG;
	}
	return 0;
}

int cli_volume_kms(struct cli_volume *v, const struct cli_kms_args *a, const char *what)
{
	char keystore[PATH_MAX], apikey[PATH_MAX], ca[PATH_MAX];
	struct kms_config cfg = { .vol = &v->vol };
	struct kms_err err = { .msg = "" };
	int r, state = -1;

	if (a->keystore) {
		r = cli_keystore_dir(a->keystore, keystore, sizeof(keystore));
		if (r)
			return r;
		cfg.keystore = keystore;
	}
	if (a->apikey_file) {
		r = a->apikey_file[0] ? cli_abs_path(a->apikey_file, apikey, sizeof(apikey)) : -ENOENT;
		if (r < 0)
			return cli_usage_error(what, "--apikey-file '%s': %s", a->apikey_file, strerror(-r));
		cfg.apikey_file = apikey;
	}
	if (a->ca_file) {
		r = a->ca_file[0] ? cli_abs_path(a->ca_file, ca, sizeof(ca)) : -ENOENT;
		if (r < 0)
			return cli_usage_error(what, "--ca-file '%s': %s", a->ca_file, strerror(-r));
		cfg.ca_file = ca;
	} else if (v->vol.ca_file[0]) {
		cfg.ca_file = v->vol.ca_file;
	}
	if (strcmp(v->vol.kms, VOLDESC_KMS_KEYPROTECT) == 0 && !cfg.apikey_file) {
		const char *creds = getenv("CREDENTIALS_DIRECTORY");

		if (!creds || !creds[0]) {
			log_err("volume '%s' uses Key Protect: give --apikey-file FILE, or set CREDENTIALS_DIRECTORY to a dir holding the API key as 'apikey'",
				v->backing);
			return KEYFS_EXIT_KMS;
		}
	}
	r = kms_open(&cfg, &v->kms, &err);
	if (r < 0) {
		log_err("%s", err.msg[0] ? err.msg : strerror(-r));
		return KEYFS_EXIT_KMS;
	}
	r = kms_key_state(v->kms, &state, &err);
	if (r == -EKEYREVOKED) {
		state = KMS_STATE_DESTROYED;
	} else if (r == -ENOKEY) {
		log_err("key '%s' is not usable: %s", v->vol.key, err.msg[0] ? err.msg : strerror(-r));
		return KEYFS_EXIT_LOCKED;
	} else if (r < 0) {
		log_err("%s", err.msg[0] ? err.msg : strerror(-r));
		return KEYFS_EXIT_KMS;
	}
	v->key_state = state;
	switch (state) {
	case KMS_STATE_ACTIVE:
	case KMS_STATE_DEACTIVATED:
		return 0;
	case KMS_STATE_SUSPENDED:
	case KMS_STATE_DESTROYED:
	case KMS_STATE_PURGED:
		log_err("key '%s' is %s: no file key of '%s' can be unwrapped, so %s cannot run", v->vol.key,
			kms_state_name(state), v->backing, what);
		return KEYFS_EXIT_LOCKED;
	default:
		log_err("key '%s' is %s: it cannot unwrap file keys", v->vol.key, kms_state_name(state));
		return KEYFS_EXIT_KMS;
	}
}

void cli_volume_close(struct cli_volume *v)
{
	kms_free(v->kms);
	v->kms = NULL;
	if (v->root_fd >= 0)
		close(v->root_fd);
	v->root_fd = -1;
}
