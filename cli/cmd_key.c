/* cmd_key.c: keyfsctl key: create, show, rotate, suspend, enable and destroy keys of the local keystore */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "keyfs/exitcode.h"
#include "keyfs/keystore.h"
#include "keyfs/kms.h"
#include "keyfs/log.h"
#include "cli.h"

enum { OPT_KEYSTORE = CLI_OPT_BASE, OPT_HELP };

static const struct option key_options[] = {
	{ "keystore", required_argument, NULL, OPT_KEYSTORE },
	{ "help", no_argument, NULL, OPT_HELP },
	{ NULL, 0, NULL, 0 },
};

static int key_create(const char *dir, const char *name)
{
	struct keystore_info info;
	int r = keystore_create(dir, name, &info);

	if (r < 0)
		return cli_keystore_error(r, dir, name);
	printf("created key '%s' (id %s) in keystore '%s'\n", name, info.id, dir);
	return KEYFS_EXIT_OK;
}

static int key_show(const char *dir, const char *name)
{
	struct keystore_info info;
	int r = keystore_show(dir, name, &info);

	if (r < 0)
		return cli_keystore_error(r, dir, name);
	printf("name: %s\n"
	       "id: %s\n"
	       "state: %s (%d)\n"
	       "version: %u\n"
	       "created: %s\n"
	       "updated: %s\n"
	       "path: %s\n",
	       info.name, info.id, kms_state_name(info.state), info.state, info.version, info.created,
	       info.updated, info.path);
	if (info.note[0])
		printf("note: %s; finish with 'keyfsctl key destroy %s'\n", info.note, name);
	return KEYFS_EXIT_OK;
}

static int key_set_state(const char *dir, const char *name, int state)
{
	struct keystore_info info;
	int r;

	r = keystore_show(dir, name, &info);
	if (r == 0 && info.state == state) {
		printf("key '%s' (id %s) is already %s\n", name, info.id, kms_state_name(state));
		return KEYFS_EXIT_OK;
	}
	if (r == 0 && info.note[0]) {
		log_err("key '%s': %s: it cannot be %s; finish the destroy with 'keyfsctl key destroy %s'", name,
			info.note, state == KMS_STATE_ACTIVE ? "enabled" : "suspended", name);
		return KEYFS_EXIT_LOCKED;
	}
	if (r == 0)
		r = keystore_set_state(dir, name, state);
	if (r == -EKEYREVOKED || (r == 0 && info.state == KMS_STATE_DESTROYED)) {
		log_err("key '%s' in keystore '%s' is destroyed: it can never be %s again", name, dir,
			state == KMS_STATE_ACTIVE ? "enabled" : "suspended");
		return KEYFS_EXIT_LOCKED;
	}
	if (r < 0)
		return cli_keystore_error(r, dir, name);
	if (state == KMS_STATE_SUSPENDED)
		printf("suspended key '%s' (id %s): mounts using it lock at their next key poll\n", name, info.id);
	else
		printf("enabled key '%s' (id %s): it is active again; mounts using it unlock at their next key poll\n",
		       name, info.id);
	return KEYFS_EXIT_OK;
}

static int key_rotate(const char *dir, const char *name)
{
	struct keystore_info info;
	int r = keystore_rotate(dir, name, &info);

	if (r == -ENOKEY) {
		if (keystore_show(dir, name, &info) == 0)
			log_err("key '%s' (id %s) is %s: only an active key can be rotated", name, info.id,
				kms_state_name(info.state));
		else
			log_err("key '%s' is not active: only an active key can be rotated", name);
		return KEYFS_EXIT_LOCKED;
	}
	if (r == -ENOBUFS || r == -EOVERFLOW) {
		log_err("key '%s' in keystore '%s' has as many versions as its key file holds: create a new key for new volumes",
			name, dir);
		return KEYFS_EXIT_KMS;
	}
	if (r < 0)
		return cli_keystore_error(r, dir, name);
	printf("rotated key '%s' (id %s): new files are wrapped with version %u; older versions still unwrap\n"
	       "to re-wrap the keys of existing files: keyfsctl rewrap BACKING (for each volume on this key)\n",
	       name, info.id, info.version);
	return KEYFS_EXIT_OK;
}

static int key_destroy(const char *dir, const char *name)
{
	struct keystore_info info;
	int r;

	r = keystore_show(dir, name, &info);
	if (r == 0 && info.state == KMS_STATE_DESTROYED && !info.note[0]) {
		log_err("key '%s' (id %s) in keystore '%s' was already destroyed on %s", name, info.id, dir, info.updated);
		return KEYFS_EXIT_LOCKED;
	}
	if (r == 0)
		r = keystore_destroy(dir, name);
	if (r < 0)
		return cli_keystore_error(r, dir, name);
	/* Say what was done, and no more: copies outside the keystore's files are out of reach. */
	printf("destroyed key '%s' (id %s): the only copy of its material (%u version%s) was overwritten in place with random bytes, flushed to disk and removed\n",
	       name, info.id, info.version, info.version == 1 ? "" : "s");
	if (info.format == 1)
		printf("note: this key file was in the layout of an earlier keyfs, which rewrote it on every suspend, enable and rotate: copies of the material may remain in disk blocks those rewrites freed\n");
	printf("data it protected can no longer be decrypted, unless a copy survives outside this keystore's files: backups, snapshots, copy-on-write filesystems, flash wear levelling (see keyfsctl(8))\n"
	       "mounts using it lock at their next key poll\n"
	       "tombstone left at '%s': the name '%s' cannot be reused\n",
	       info.path, name);
	return KEYFS_EXIT_OK;
}

int cmd_key(int argc, char **argv)
{
	const char *keystore_arg = NULL, *pos[2] = { NULL, NULL };
	char dir[PATH_MAX];
	int npos = 0, c, rc;

	optind = 0;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "-:h", key_options, NULL)) != -1) {
		switch (c) {
		case 1:
			if (npos == 2)
				return cli_usage_error("key", "unexpected argument '%s'", optarg);
			pos[npos++] = optarg;
			break;
		case OPT_KEYSTORE: keystore_arg = optarg; break;
		case 'h':
		case OPT_HELP:
			cli_print_usage(stdout, "key");
			return KEYFS_EXIT_OK;
		default:
			return cli_option_error("key", c, argv);
		}
	}
	for (; optind < argc; optind++) {
		if (npos == 2)
			return cli_usage_error("key", "unexpected argument '%s'", argv[optind]);
		pos[npos++] = argv[optind];
	}
	if (npos == 0)
		return cli_usage_error("key", "missing action: create, show, rotate, suspend, enable or destroy");
	if (strcmp(pos[0], "create") != 0 && strcmp(pos[0], "show") != 0 && strcmp(pos[0], "rotate") != 0 &&
	    strcmp(pos[0], "suspend") != 0 && strcmp(pos[0], "enable") != 0 && strcmp(pos[0], "destroy") != 0)
		return cli_usage_error("key", "unknown action '%s': use create, show, rotate, suspend, enable or destroy",
				       pos[0]);
	if (npos < 2)
		return cli_usage_error("key", "missing key NAME");
	if (keystore_name_valid(pos[1]) < 0)
		return cli_usage_error("key", "'%s' is not a valid key name: use 1-%d letters, digits, '.', '_' or '-', starting with a letter or digit",
				       pos[1], KEYSTORE_NAME_MAX);
	rc = cli_keystore_dir(keystore_arg, dir, sizeof(dir));
	if (rc)
		return rc;
	if (strcmp(pos[0], "create") == 0)
		return key_create(dir, pos[1]);
	if (strcmp(pos[0], "show") == 0)
		return key_show(dir, pos[1]);
	if (strcmp(pos[0], "rotate") == 0)
		return key_rotate(dir, pos[1]);
	if (strcmp(pos[0], "suspend") == 0)
		return key_set_state(dir, pos[1], KMS_STATE_SUSPENDED);
	if (strcmp(pos[0], "enable") == 0)
		return key_set_state(dir, pos[1], KMS_STATE_ACTIVE);
	return key_destroy(dir, pos[1]);
}
