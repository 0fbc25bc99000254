/* cmd_init.c: keyfsctl init: prove the key service works, then make a dir a keyfs volume */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sodium.h>

#include "keyfs/exitcode.h"
#include "keyfs/keystore.h"
#include "keyfs/kms.h"
#include "keyfs/log.h"
#include "keyfs/util.h"
#include "keyfs/voldesc.h"
#include "cli.h"

enum { OPT_KMS = CLI_OPT_BASE, OPT_KEYSTORE, OPT_KEY, OPT_CREATE_KEY, OPT_HELP };

static const struct option init_options[] = {
	{ "kms", required_argument, NULL, OPT_KMS },
	{ "keystore", required_argument, NULL, OPT_KEYSTORE },
	{ "key", required_argument, NULL, OPT_KEY },
	{ "create-key", no_argument, NULL, OPT_CREATE_KEY },
	{ "help", no_argument, NULL, OPT_HELP },
	{ NULL, 0, NULL, 0 },
};

/* BACKING must be missing or an empty dir. Returns 0 (ret_missing tells which) or an exit code. */
static int check_backing(const char *backing, bool *ret_missing)
{
	struct dirent *de;
	struct stat st;
	DIR *d;
	int dfd;

	if (stat(backing, &st) < 0) {
		if (errno == ENOENT) {
			*ret_missing = true;
			return 0;
		}
		log_err("backing dir '%s': %s", backing, strerror(errno));
		return errno == EACCES ? KEYFS_EXIT_CONFIG : KEYFS_EXIT_IO;
	}
	if (!S_ISDIR(st.st_mode)) {
		log_err("'%s' exists and is not a directory", backing);
		return KEYFS_EXIT_EXISTS;
	}
	dfd = open(backing, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0) {
		log_err("backing dir '%s': %s", backing, strerror(errno));
		return errno == EACCES ? KEYFS_EXIT_CONFIG : KEYFS_EXIT_IO;
	}
	if (fstatat(dfd, VOLDESC_NAME, &st, AT_SYMLINK_NOFOLLOW) == 0) {
		close(dfd);
		log_err("'%s' is already a keyfs volume (it has a %s file)", backing, VOLDESC_NAME);
		return KEYFS_EXIT_EXISTS;
	}
	d = fdopendir(dfd);
	if (!d) {
		log_err("backing dir '%s': %s", backing, strerror(errno));
		close(dfd);
		return KEYFS_EXIT_IO;
	}
	errno = 0;
	while ((de = readdir(d))) {
		if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
			continue;
		closedir(d);
		log_err("'%s' is not empty: keyfs init takes an empty or missing dir (copy data in through the mount)",
			backing);
		return KEYFS_EXIT_EXISTS;
	}
	if (errno) {
		log_err("backing dir '%s': %s", backing, strerror(errno));
		closedir(d);
		return KEYFS_EXIT_IO;
	}
	closedir(d);
	*ret_missing = false;
	return 0;
}

/* mkdir -p with 0755 (less the umask), like the mkdir -p a user would run. */
static int mkdir_p(const char *path)
{
	char buf[PATH_MAX];
	int r = cli_copy(buf, sizeof(buf), path);

	if (r < 0)
		return r;
	for (char *p = buf + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(buf, 0755) < 0 && errno != EEXIST)
			return -errno;
		*p = '/';
	}
	if (mkdir(buf, 0755) < 0 && errno != EEXIST)
		return -errno;
	return 0;
}

static int kms_exit(int r)
{
	return r == -ENOKEY || r == -EKEYREVOKED || r == -EKEYEXPIRED ? KEYFS_EXIT_LOCKED : KEYFS_EXIT_KMS;
}

/* Wrap and unwrap a random DEK the way the daemon will: the key service works before we commit. */
static int prove_kms(struct kms *k, const char *volume)
{
	static const char zero_id[2 * 16 + 1] = "00000000000000000000000000000000";
	const char *aad[KMS_AAD_COUNT];
	struct kms_wrapped w;
	struct kms_err err;
	uint8_t *dek, *back;
	bool rewrapped = false;
	int r, rc = 0;

	dek = sodium_malloc(FMT_DEK_SIZE);
	back = sodium_malloc(FMT_DEK_SIZE);
	if (!dek || !back) {
		log_err("out of locked memory");
		rc = KEYFS_EXIT_FAILURE;
		goto out;
	}
	randombytes_buf(dek, FMT_DEK_SIZE);
	kms_file_aad(volume, zero_id, aad);
	r = kms_wrap(k, dek, aad, KMS_AAD_COUNT, &w, &err);
	if (r < 0) {
		log_err("test wrap failed: %s", err.msg);
		rc = kms_exit(r);
		goto out;
	}
	r = kms_unwrap(k, w.blob, w.len, aad, KMS_AAD_COUNT, back, NULL, &rewrapped, &err);
	if (r < 0) {
		log_err("test unwrap failed: %s", err.msg);
		rc = kms_exit(r);
		goto out;
	}
	if (sodium_memcmp(dek, back, FMT_DEK_SIZE) != 0) {
		log_err("test unwrap returned a different key: the key service is not usable");
		rc = KEYFS_EXIT_KMS;
	}
out:
	if (dek) {
		sodium_memzero(dek, FMT_DEK_SIZE);
		sodium_free(dek);
	}
	if (back) {
		sodium_memzero(back, FMT_DEK_SIZE);
		sodium_free(back);
	}
	return rc;
}

static int check_state(struct kms *k, const char *name, const char *keystore)
{
	struct kms_err err;
	int r, state;

	r = kms_key_state(k, &state, &err);
	if (r < 0) {
		log_err("%s", err.msg);
		return kms_exit(r);
	}
	switch (state) {
	case KMS_STATE_ACTIVE:
		return 0;
	case KMS_STATE_SUSPENDED:
	case KMS_STATE_PREACTIVE:
		log_err("key '%s' is %s: enable it first with 'keyfsctl key enable %s --keystore %s'", name,
			kms_state_name(state), name, keystore);
		return KEYFS_EXIT_LOCKED;
	case KMS_STATE_DEACTIVATED:
		log_err("key '%s' is deactivated: it cannot protect a new volume; use another key", name);
		return KEYFS_EXIT_LOCKED;
	default:
		log_err("key '%s' is %s: use another key (create one with --create-key)", name, kms_state_name(state));
		return KEYFS_EXIT_LOCKED;
	}
}

static int write_voldesc(const char *backing, const struct voldesc *vol)
{
	char buf[VOLDESC_MAX];
	int dfd, n, r;

	n = voldesc_format(vol, buf, sizeof(buf));
	if (n < 0) {
		log_err("volume description for '%s' cannot be written: %s", backing, strerror(-n));
		return KEYFS_EXIT_FAILURE;
	}
	dfd = open(backing, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0) {
		log_err("backing dir '%s': %s", backing, strerror(errno));
		return KEYFS_EXIT_IO;
	}
	/* Re-check right before writing: another init may have raced us since the first look. */
	if (faccessat(dfd, VOLDESC_NAME, F_OK, AT_SYMLINK_NOFOLLOW) == 0) {
		close(dfd);
		log_err("'%s' is already a keyfs volume (it has a %s file)", backing, VOLDESC_NAME);
		return KEYFS_EXIT_EXISTS;
	}
	r = util_write_file_atomic(dfd, VOLDESC_NAME, buf, (size_t)n, 0644);
	close(dfd);
	if (r < 0) {
		log_err("writing '%s/%s': %s", backing, VOLDESC_NAME, strerror(-r));
		return KEYFS_EXIT_IO;
	}
	return 0;
}

int cmd_init(int argc, char **argv)
{
	const char *kms_kind = NULL, *keystore_arg = NULL, *key = "default", *backing_arg = NULL;
	char keystore[PATH_MAX], backing[PATH_MAX];
	struct kms_config cfg;
	struct kms_err err;
	struct voldesc vol;
	struct kms *k = NULL;
	bool create_key = false, missing = false;
	int c, r, rc;

	optind = 0;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "-:h", init_options, NULL)) != -1) {
		switch (c) {
		case 1:
			if (backing_arg)
				return cli_usage_error("init", "unexpected argument '%s'", optarg);
			backing_arg = optarg;
			break;
		case OPT_KMS: kms_kind = optarg; break;
		case OPT_KEYSTORE: keystore_arg = optarg; break;
		case OPT_KEY: key = optarg; break;
		case OPT_CREATE_KEY: create_key = true; break;
		case 'h':
		case OPT_HELP:
			cli_print_usage(stdout, "init");
			return KEYFS_EXIT_OK;
		default:
			return cli_option_error("init", c, argv);
		}
	}
	for (; optind < argc; optind++) {
		if (backing_arg)
			return cli_usage_error("init", "unexpected argument '%s'", argv[optind]);
		backing_arg = argv[optind];
	}
	if (!backing_arg || !backing_arg[0])
		return cli_usage_error("init", "missing BACKING dir");
	if (!kms_kind)
		return cli_usage_error("init", "missing --kms (local or keyprotect)");
	if (strcmp(kms_kind, VOLDESC_KMS_LOCAL) != 0 && strcmp(kms_kind, VOLDESC_KMS_KEYPROTECT) != 0)
		return cli_usage_error("init", "unknown kms '%s': use local or keyprotect", kms_kind);
	if (strcmp(kms_kind, VOLDESC_KMS_LOCAL) == 0) {
		if (keystore_name_valid(key) < 0)
			return cli_usage_error("init", "'%s' is not a valid key name: use 1-%d letters, digits, '.', '_' or '-', starting with a letter or digit",
					       key, KEYSTORE_NAME_MAX);
		rc = cli_keystore_dir(keystore_arg, keystore, sizeof(keystore));
		if (rc)
			return rc;
	} else {
		if (create_key || keystore_arg)
			return cli_usage_error("init", "%s works only with --kms local",
					       create_key ? "--create-key" : "--keystore");
		keystore[0] = '\0';
	}
	r = cli_abs_path(backing_arg, backing, sizeof(backing));
	if (r < 0) {
		log_err("backing dir '%s': %s", backing_arg, strerror(-r));
		return KEYFS_EXIT_USAGE;
	}
	if (sodium_init() < 0) {
		log_err("libsodium cannot be initialised");
		return KEYFS_EXIT_FAILURE;
	}

	rc = check_backing(backing, &missing);
	if (rc)
		return rc;

	if (create_key) {
		struct keystore_info info;

		r = keystore_create(keystore, key, &info);
		if (r < 0)
			return cli_keystore_error(r, keystore, key);
		printf("created key '%s' (id %s) in keystore '%s'\n", key, info.id, keystore);
	}

	memset(&vol, 0, sizeof(vol));
	vol.format = VOLDESC_FORMAT;
	util_uuid4(vol.volume);
	util_now_rfc3339(vol.created);
	if (cli_copy(vol.kms, sizeof(vol.kms), kms_kind) < 0 || cli_copy(vol.key, sizeof(vol.key), key) < 0 ||
	    cli_copy(vol.keystore, sizeof(vol.keystore), keystore) < 0)
		return cli_usage_error("init", "key name or keystore path too long");
	memset(&cfg, 0, sizeof(cfg));
	cfg.vol = &vol;
	r = kms_open(&cfg, &k, &err);
	if (r < 0) {
		log_err("%s", err.msg);
		return kms_exit(r);
	}
	rc = check_state(k, key, keystore);
	if (rc == 0)
		rc = prove_kms(k, vol.volume);
	if (rc == 0 && cli_copy(vol.key_id, sizeof(vol.key_id), kms_key_id(k)) < 0) {
		log_err("key id of '%s' is too long", key);
		rc = KEYFS_EXIT_KMS;
	}
	kms_free(k);
	if (rc)
		return rc;

	if (missing) {
		r = mkdir_p(backing);
		if (r < 0) {
			log_err("cannot create backing dir '%s': %s", backing, strerror(-r));
			return KEYFS_EXIT_IO;
		}
	}
	rc = write_voldesc(backing, &vol);
	if (rc)
		return rc;

	printf("created keyfs volume '%s'\n"
	       "  volume:   %s\n"
	       "  kms:      %s\n"
	       "  key:      %s (id %s)\n",
	       backing, vol.volume, vol.kms, vol.key, vol.key_id);
	if (keystore[0])
		printf("  keystore: %s\n", keystore);
	printf("mount it with: keyfs %s MOUNTPOINT\n", backing);
	return KEYFS_EXIT_OK;
}
