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
#include "keyfs/volkeys.h"
#include "keyfs/volume.h"
#include "cli.h"

enum {
	OPT_KMS = CLI_OPT_BASE, OPT_KEYSTORE, OPT_KEY, OPT_CREATE_KEY, OPT_ENDPOINT, OPT_INSTANCE, OPT_IAM_ENDPOINT,
	OPT_APIKEY_FILE, OPT_CA_FILE, OPT_FORMAT, OPT_HELP, OPT_SHARED, OPT_CIPHER,
};

static const struct option init_options[] = {
	{ "kms", required_argument, NULL, OPT_KMS },
	{ "keystore", required_argument, NULL, OPT_KEYSTORE },
	{ "key", required_argument, NULL, OPT_KEY },
	{ "create-key", no_argument, NULL, OPT_CREATE_KEY },
	{ "endpoint", required_argument, NULL, OPT_ENDPOINT },
	{ "instance", required_argument, NULL, OPT_INSTANCE },
	{ "iam-endpoint", required_argument, NULL, OPT_IAM_ENDPOINT },
	{ "apikey-file", required_argument, NULL, OPT_APIKEY_FILE },
	{ "ca-file", required_argument, NULL, OPT_CA_FILE },
	{ "format", required_argument, NULL, OPT_FORMAT },
	{ "help", no_argument, NULL, OPT_HELP },
	{ "shared", no_argument, NULL, OPT_SHARED },
	{ "cipher", required_argument, NULL, OPT_CIPHER },
	{ NULL, 0, NULL, 0 },
};

/* What the command line says; the paths in it as given (made absolute later). */
struct init_args {
	const char *backing;
	const char *kms;
	const char *keystore;
	const char *key;
	bool key_given;
	bool create_key;
	const char *endpoint;
	const char *instance;
	const char *iam_endpoint;
	const char *apikey_file;
	const char *ca_file;
	bool shared;                    /* --shared: several hosts mount it (docs/LOCKING.md) */
	int format;             /* file layout: 1 or 2 (docs/FORMAT.md) */
	const char *cipher;     /* --cipher, or NULL: fmt_cipher_default (v2), xchacha20-poly1305 (v1) */
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

static bool is_keyprotect(const struct voldesc *vol)
{
	return strcmp(vol->kms, VOLDESC_KMS_KEYPROTECT) == 0;
}

/* Where a Key Protect key lives, for messages: "URL (instance GUID)". */
#define WHERE_MAX (sizeof(((struct voldesc *)0)->endpoint) + sizeof(((struct voldesc *)0)->instance) + 16)
static void kp_where(const struct voldesc *vol, char where[WHERE_MAX])
{
	snprintf(where, WHERE_MAX, "%s (instance %s)", vol->endpoint, vol->instance);
}

#define KP_ACCESS_HINT \
	"check the API key, and that its service ID has a Key Protect service role that allows wrap and unwrap (ReaderPlus or above) on this instance or key"

/* A failed test wrap or unwrap: the message, and the exit code. */
static int prove_failed(struct kms *k, const struct voldesc *vol, const char *op, int r, const struct kms_err *err)
{
	char where[WHERE_MAX];

	(void)k;
	if (!is_keyprotect(vol)) {
		log_err("test %s failed: %s", op, err->msg);
		return kms_exit(r);
	}
	kp_where(vol, where);
	if (r == -EACCES) {
		log_err("test %s with key '%s' at %s was denied: %s: %s", op, vol->key, where, KP_ACCESS_HINT,
			err->msg);
		return KEYFS_EXIT_KMS;
	}
	log_err("test %s with key '%s' at %s failed: %s", op, vol->key, where, err->msg);
	return kms_exit(r);
}

/* Wrap and unwrap a random DEK the way the daemon will: the key service works before we commit.
 * The associated data is the new volume's uuid and an all-zero file id, which no file has. */
static int prove_kms(struct kms *k, const struct voldesc *vol, char *ret_version, size_t version_size)
{
	enum vol_probe_step step;
	struct kms_wrapped w;
	struct kms_err err;
	int r;

	r = vol_kms_probe(k, vol->volume, true, &w, &err, &step);
	if (r == -ENOMEM) {
		log_err("out of locked memory");
		return KEYFS_EXIT_FAILURE;
	}
	if (r < 0 && step == VOL_PROBE_COMPARE) {
		log_err("test unwrap returned a different key: the key service is not usable");
		return KEYFS_EXIT_KMS;
	}
	if (r < 0)
		return prove_failed(k, vol, step == VOL_PROBE_WRAP ? "wrap" : "unwrap", r, &err);
	snprintf(ret_version, version_size, "%s", w.key_version);
	return 0;
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

/*
 * Why the service refuses a key that is not active, in its own words: the metadata call answers
 * a state, not an error, and so names no correlation id; a test wrap's refusal does.
 */
static void kp_refusal(struct kms *k, const struct voldesc *vol, int state, struct kms_err *why)
{
	enum vol_probe_step step;
	struct kms_wrapped w;
	int r;

	why->msg[0] = '\0';
	r = vol_kms_probe(k, vol->volume, false, &w, why, &step);
	if (r == 0 || !why->msg[0])
		snprintf(why->msg, sizeof(why->msg), "its metadata gives state %d (%s)", state,
			 kms_state_name(state));
}

/* The key must be active: every other answer is one message naming the endpoint and key. */
static int kp_check_state(struct kms *k, const struct voldesc *vol)
{
	char where[WHERE_MAX];
	struct kms_err err, why;
	int r, state;

	kp_where(vol, where);
	r = kms_key_state(k, &state, &err);
	if (r == -EACCES) {
		log_err("access to key '%s' at %s was denied: %s: %s", vol->key, where, KP_ACCESS_HINT, err.msg);
		return KEYFS_EXIT_KMS;
	}
	if (r < 0) {
		log_err("key service at %s cannot be used: %s", where, err.msg);
		return kms_exit(r);
	}
	if (state == KMS_STATE_ACTIVE)
		return 0;
	kp_refusal(k, vol, state, &why);
	switch (state) {
	case KMS_STATE_PURGED:
		log_err("key '%s' not found at %s: check the key id and the instance (a purged key is gone for good): %s",
			vol->key, where, why.msg);
		return KEYFS_EXIT_KMS;
	case KMS_STATE_SUSPENDED:
		log_err("key '%s' at %s is suspended: enable it in Key Protect first ('ibmcloud kp key enable %s'): %s",
			vol->key, where, vol->key_id[0] ? vol->key_id : vol->key, why.msg);
		return KEYFS_EXIT_LOCKED;
	case KMS_STATE_DEACTIVATED:
		log_err("key '%s' at %s is deactivated (past its expiration date): it cannot protect a new volume; use another key: %s",
			vol->key, where, why.msg);
		return KEYFS_EXIT_LOCKED;
	case KMS_STATE_DESTROYED:
		log_err("key '%s' at %s is destroyed: use another key (a deleted key can be restored within 30 days): %s",
			vol->key, where, why.msg);
		return KEYFS_EXIT_LOCKED;
	default:
		log_err("key '%s' at %s is %s: only an active key can protect a volume: %s", vol->key, where,
			kms_state_name(state), why.msg);
		return KEYFS_EXIT_LOCKED;
	}
}

/*
 * An alias (or a CRN) names a key only until it is moved: the volume records the key's uuid and
 * CRN as the service resolves them now, and from here on every call names the uuid. *k is
 * reopened on the uuid when init was given anything else. Returns 0 or an exit code.
 */
static int kp_resolve(struct kms **k, struct voldesc *vol, struct kms_config *cfg)
{
	struct kms_key_info info;
	struct kms_err err;
	char where[WHERE_MAX];
	int r;

	kp_where(vol, where);
	r = kms_key_info(*k, &info, &err);
	if (r == -EACCES) {
		log_err("access to key '%s' at %s was denied: %s: %s", vol->key, where, KP_ACCESS_HINT, err.msg);
		return KEYFS_EXIT_KMS;
	}
	if (r == -ENOENT) {
		log_err("key '%s' not found at %s: give its id, alias or CRN in instance %s: %s", vol->key, where,
			vol->instance, err.msg);
		return KEYFS_EXIT_KMS;
	}
	if (r < 0) {
		log_err("key service at %s cannot be used: %s", where, err.msg);
		return kms_exit(r);
	}
	if (cli_copy(vol->key_id, sizeof(vol->key_id), info.id) < 0 ||
	    cli_copy(vol->key_crn, sizeof(vol->key_crn), info.crn) < 0) {
		log_err("key '%s' at %s: its id or CRN is too long", vol->key, where);
		return KEYFS_EXIT_KMS;
	}
	if (strcmp(info.id, kms_key_id(*k)) == 0)
		return 0;
	/* Given an alias: every later call names the uuid it stands for now. */
	kms_free(*k);
	*k = NULL;
	cfg->key_id = vol->key_id;
	r = kms_open(cfg, k, &err);
	if (r < 0) {
		log_err("%s", err.msg);
		return kms_exit(r);
	}
	return 0;
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

/* An https:// URL for --endpoint or --iam-endpoint, trailing slashes dropped. Returns 0 or an exit code. */
static int https_url(const char *opt, const char *in, char *out, size_t size)
{
	size_t n = strlen(in);

	while (n > 0 && in[n - 1] == '/')
		n--;
	if (strncmp(in, "https://", 8) != 0 || n <= 8)
		return cli_usage_error("init", "%s '%s' is not an https:// URL: keyfs talks to the key service over HTTPS only",
				       opt, in);
	if (n >= size)
		return cli_usage_error("init", "%s is longer than %zu bytes", opt, size - 1);
	memcpy(out, in, n);
	out[n] = '\0';
	return 0;
}

/* The instance GUID of a key CRN (crn:v1:CNAME:CTYPE:kms|hs-crypto:REGION:a/ACCOUNT:INSTANCE:key:ID).
 * Returns 0 or -EINVAL; the Key Protect client checks the other fields. */
static int crn_instance(const char *crn, char *out, size_t size)
{
	const char *f[10], *p = crn;
	size_t len[10], n = 0;

	for (;;) {
		const char *colon = strchr(p, ':');

		if (n == 10)
			return -EINVAL;
		f[n] = p;
		len[n] = colon ? (size_t)(colon - p) : strlen(p);
		n++;
		if (!colon)
			break;
		p = colon + 1;
	}
#define FIELD_IS(i, s) (len[i] == sizeof(s) - 1 && memcmp(f[i], s, len[i]) == 0)
	if (n != 10 || !FIELD_IS(0, "crn") || !FIELD_IS(1, "v1") || !(FIELD_IS(4, "kms") || FIELD_IS(4, "hs-crypto")) ||
	    !FIELD_IS(8, "key") || len[7] == 0 || len[9] == 0 || len[7] >= size)
		return -EINVAL;
#undef FIELD_IS
	memcpy(out, f[7], len[7]);
	out[len[7]] = '\0';
	return 0;
}

/*
 * The Key Protect part of the volume description and of the client's configuration, from the
 * command line. apikey_buf receives the absolute --apikey-file. Returns 0 or an exit code.
 */
static int kp_setup(const struct init_args *a, struct voldesc *vol, struct kms_config *cfg, char *apikey_buf,
		    size_t apikey_size)
{
	char crn_inst[sizeof(vol->instance)];
	const char *creds;
	struct stat st;
	int r, rc;

	if (!a->key_given)
		return cli_usage_error("init", "missing --key ID|CRN: the id, alias or CRN of the root key in Key Protect");
	if (!a->endpoint)
		return cli_usage_error("init", "missing --endpoint URL (https://REGION.kms.cloud.ibm.com, or the Hyper Protect Crypto Services endpoint)");
	rc = https_url("--endpoint", a->endpoint, vol->endpoint, sizeof(vol->endpoint));
	if (rc)
		return rc;
	if (a->iam_endpoint) {
		rc = https_url("--iam-endpoint", a->iam_endpoint, vol->iam_endpoint, sizeof(vol->iam_endpoint));
		if (rc)
			return rc;
	}
	if (strncmp(a->key, "crn:", 4) == 0) {
		if (crn_instance(a->key, crn_inst, sizeof(crn_inst)) < 0)
			return cli_usage_error("init", "'%s' is not a key CRN (crn:v1:...:kms|hs-crypto:REGION:a/ACCOUNT:INSTANCE:key:ID)",
					       a->key);
		if (a->instance && strcmp(a->instance, crn_inst) != 0)
			return cli_usage_error("init", "--instance '%s' is not the instance '%s' named in the key CRN",
					       a->instance, crn_inst);
		snprintf(vol->instance, sizeof(vol->instance), "%s", crn_inst);
	} else if (!a->instance || !a->instance[0]) {
		return cli_usage_error("init", "missing --instance GUID (or give the key as a CRN, which names its instance)");
	} else if (cli_copy(vol->instance, sizeof(vol->instance), a->instance) < 0) {
		return cli_usage_error("init", "--instance is longer than %zu bytes", sizeof(vol->instance) - 1);
	}

	/* The API key never comes from argv or from an environment variable's contents. */
	if (a->apikey_file) {
		r = a->apikey_file[0] ? cli_abs_path(a->apikey_file, apikey_buf, apikey_size) : -ENOENT;
		if (r < 0)
			return cli_usage_error("init", "--apikey-file '%s': %s", a->apikey_file, strerror(-r));
		cfg->apikey_file = apikey_buf;
	} else {
		creds = getenv("CREDENTIALS_DIRECTORY");
		if (!creds || !creds[0]) {
			log_err("no API key: give --apikey-file FILE (a file holding the service ID's API key), or set CREDENTIALS_DIRECTORY to a dir holding it as 'apikey'");
			return KEYFS_EXIT_KMS;
		}
	}
	if (a->ca_file) {
		r = a->ca_file[0] ? cli_abs_path(a->ca_file, vol->ca_file, sizeof(vol->ca_file)) : -ENOENT;
		if (r < 0)
			return cli_usage_error("init", "--ca-file '%s': %s", a->ca_file, strerror(-r));
		if (stat(vol->ca_file, &st) < 0) {
			log_err("CA file '%s': %s", vol->ca_file, strerror(errno));
			return KEYFS_EXIT_KMS;
		}
		if (!S_ISREG(st.st_mode)) {
			log_err("CA file '%s' is not a regular file (give a PEM file of CA certificates)", vol->ca_file);
			return KEYFS_EXIT_KMS;
		}
		cfg->ca_file = vol->ca_file;
	}
	return 0;
}

/* Print s as one shell word: as it is when plain, else single-quoted. */
static void print_shell_word(const char *s)
{
	static const char plain[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./:=,@%+-";

	if (s[0] && strspn(s, plain) == strlen(s)) {
		fputs(s, stdout);
		return;
	}
	putchar('\'');
	for (; *s; s++) {
		if (*s == '\'')
			fputs("'\\''", stdout);
		else
			putchar(*s);
	}
	putchar('\'');
}

/* The exact mount command: the API key file as -o apikey_file= ("\," is a comma inside a value),
 * or the credentials dir it came from. */
static void print_mount_command(const char *backing, const char *apikey_file)
{
	char opt[PATH_MAX * 2 + 16];
	size_t n;

	fputs("mount it with: ", stdout);
	if (!apikey_file) {
		fputs("CREDENTIALS_DIRECTORY=", stdout);
		print_shell_word(getenv("CREDENTIALS_DIRECTORY"));
		putchar(' ');
	}
	fputs("keyfs ", stdout);
	print_shell_word(backing);
	fputs(" MOUNTPOINT", stdout);
	if (apikey_file) {
		n = (size_t)snprintf(opt, sizeof(opt), "apikey_file=");
		for (const char *p = apikey_file; *p && n + 3 < sizeof(opt); p++) {
			if (*p == ',' || *p == '\\')
				opt[n++] = '\\';
			opt[n++] = *p;
		}
		opt[n] = '\0';
		fputs(" -o ", stdout);
		print_shell_word(opt);
	}
	putchar('\n');
}

int cmd_init(int argc, char **argv)
{
	struct init_args a = { .key = "default", .format = FMT_LAYOUT_DEFAULT };
	char keystore[PATH_MAX], backing[PATH_MAX], apikey_file[PATH_MAX], version[FMT_KEY_VERSION_MAX + 1] = "";
	char trust_path[PATH_MAX + 64] = "", msg[PATH_MAX + 128];
	struct kms_config cfg;
	struct kms_err err;
	struct voldesc vol;
	struct kms *k = NULL;
	bool missing = false, kp;
	int c, r, rc;

	optind = 0;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "-:h", init_options, NULL)) != -1) {
		switch (c) {
		case 1:
			if (a.backing)
				return cli_usage_error("init", "unexpected argument '%s'", optarg);
			a.backing = optarg;
			break;
		case OPT_KMS: a.kms = optarg; break;
		case OPT_KEYSTORE: a.keystore = optarg; break;
		case OPT_KEY: a.key = optarg; a.key_given = true; break;
		case OPT_CREATE_KEY: a.create_key = true; break;
		case OPT_ENDPOINT: a.endpoint = optarg; break;
		case OPT_INSTANCE: a.instance = optarg; break;
		case OPT_IAM_ENDPOINT: a.iam_endpoint = optarg; break;
		case OPT_APIKEY_FILE: a.apikey_file = optarg; break;
		case OPT_CA_FILE: a.ca_file = optarg; break;
		case OPT_SHARED: a.shared = true; break;
		case OPT_FORMAT:
			if (strcmp(optarg, "1") != 0 && strcmp(optarg, "2") != 0)
				return cli_usage_error("init", "--format '%s': use 1 or 2", optarg);
			a.format = optarg[0] - '0';
			break;
		case OPT_CIPHER:
			if (!fmt_cipher_by_name(optarg))
				return cli_usage_error("init", "--cipher '%s': use xaes-256-gcm or xchacha20-poly1305", optarg);
			a.cipher = optarg;
			break;
		case 'h':
		case OPT_HELP:
			cli_print_usage(stdout, "init");
			return KEYFS_EXIT_OK;
		default:
			return cli_option_error("init", c, argv);
		}
	}
	for (; optind < argc; optind++) {
		if (a.backing)
			return cli_usage_error("init", "unexpected argument '%s'", argv[optind]);
		a.backing = argv[optind];
	}
	if (!a.backing || !a.backing[0])
		return cli_usage_error("init", "missing BACKING dir");
	if (!a.kms)
		return cli_usage_error("init", "missing --kms (local or keyprotect)");
	if (strcmp(a.kms, VOLDESC_KMS_LOCAL) != 0 && strcmp(a.kms, VOLDESC_KMS_KEYPROTECT) != 0)
		return cli_usage_error("init", "unknown kms '%s': use local or keyprotect", a.kms);
	kp = strcmp(a.kms, VOLDESC_KMS_KEYPROTECT) == 0;

	memset(&vol, 0, sizeof(vol));
	memset(&cfg, 0, sizeof(cfg));
	vol.format = a.format;
	if (a.format == FMT_LAYOUT_V1) {
		/* v1 files are XChaCha20-Poly1305 only; the description then names no cipher. */
		if (a.cipher && !fmt_cipher_valid(fmt_cipher_by_name(a.cipher), FMT_LAYOUT_V1))
			return cli_usage_error("init", "--cipher %s needs --format 2", a.cipher);
	} else {
		uint8_t cipher = a.cipher ? fmt_cipher_by_name(a.cipher) : fmt_cipher_default();

		if (!fmt_cipher_available(cipher)) {
			fprintf(stderr, "keyfsctl init: cipher %s is not available: libcrypto has no AES-256-GCM here\n",
				fmt_cipher_name(cipher));
			return KEYFS_EXIT_CONFIG;
		}
		snprintf(vol.cipher, sizeof(vol.cipher), "%s", fmt_cipher_name(cipher));
	}
	if (a.shared)
		strcpy(vol.shared, "1");
	if (!kp) {
		const char *kp_only = a.endpoint ? "--endpoint" : a.instance ? "--instance"
				      : a.iam_endpoint ? "--iam-endpoint" : a.apikey_file ? "--apikey-file"
				      : a.ca_file ? "--ca-file" : NULL;

		if (kp_only)
			return cli_usage_error("init", "%s works only with --kms keyprotect", kp_only);
		if (keystore_name_valid(a.key) < 0)
			return cli_usage_error("init", "'%s' is not a valid key name: use 1-%d letters, digits, '.', '_' or '-', starting with a letter or digit",
					       a.key, KEYSTORE_NAME_MAX);
		rc = cli_keystore_dir(a.keystore, keystore, sizeof(keystore));
		if (rc)
			return rc;
	} else {
		if (a.create_key || a.keystore)
			return cli_usage_error("init", "%s works only with --kms local",
					       a.create_key ? "--create-key" : "--keystore");
		keystore[0] = '\0';
		rc = kp_setup(&a, &vol, &cfg, apikey_file, sizeof(apikey_file));
		if (rc)
			return rc;
	}
	r = cli_abs_path(a.backing, backing, sizeof(backing));
	if (r < 0) {
		log_err("backing dir '%s': %s", a.backing, strerror(-r));
		return KEYFS_EXIT_USAGE;
	}
	if (sodium_init() < 0) {
		log_err("libsodium cannot be initialised");
		return KEYFS_EXIT_FAILURE;
	}

	rc = check_backing(backing, &missing);
	if (rc)
		return rc;

	if (a.create_key) {
		struct keystore_info info;

		r = keystore_create(keystore, a.key, &info);
		if (r < 0)
			return cli_keystore_error(r, keystore, a.key);
		printf("created key '%s' (id %s) in keystore '%s'\n", a.key, info.id, keystore);
	}

	util_uuid4(vol.volume);
	util_now_rfc3339(vol.created);
	if (cli_copy(vol.kms, sizeof(vol.kms), a.kms) < 0 || cli_copy(vol.key, sizeof(vol.key), a.key) < 0 ||
	    cli_copy(vol.keystore, sizeof(vol.keystore), keystore) < 0)
		return cli_usage_error("init", "key name or keystore path too long");
	{
		const char *apikey = cfg.apikey_file;   /* the host's: kp_setup took it */

		vol_kms_config(&vol, &cfg);
		cfg.apikey_file = apikey;
	}
	r = kms_open(&cfg, &k, &err);
	if (r < 0) {
		log_err("%s", err.msg);
		return kms_exit(r);
	}
	/* Messages name the key id from here on, as the service knows it. */
	if (cli_copy(vol.key_id, sizeof(vol.key_id), kms_key_id(k)) < 0) {
		log_err("key id of '%s' is too long", a.key);
		kms_free(k);
		return KEYFS_EXIT_KMS;
	}
	rc = kp ? kp_resolve(&k, &vol, &cfg) : 0;
	if (rc) {
		kms_free(k);
		return rc;
	}
	rc = kp ? kp_check_state(k, &vol) : check_state(k, a.key, keystore);
	if (rc == 0)
		rc = prove_kms(k, &vol, version, sizeof(version));
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
	/* The host's record first: a volume never exists here without the host trusting its key
	 * service, and a record without a volume is harmless. */
	r = vol_trust_write(&vol, trust_path, sizeof(trust_path), msg, sizeof(msg));
	if (r < 0) {
		if (msg[0])
			log_err("%s: cannot record the volume's key service as trusted there", msg);
		else
			log_err("cannot record the volume's key service as trusted in '%s': %s", trust_path, strerror(-r));
		return r == -EPERM ? KEYFS_EXIT_UNTRUSTED : KEYFS_EXIT_IO;
	}
	rc = write_voldesc(backing, &vol);
	if (rc) {
		vol_trust_forget(vol.volume, trust_path, sizeof(trust_path));
		return rc;
	}

	printf("created keyfs volume '%s'\n"
	       "  volume:   %s\n"
	       "  format:   %d\n"
	       "  cipher:   %s\n"
	       "  kms:      %s\n",
	       backing, vol.volume, vol.format, fmt_cipher_name(voldesc_cipher(&vol)), vol.kms);
	if (kp && strcmp(vol.key, vol.key_id) == 0)
		printf("  key:      %s\n", vol.key);
	else
		printf("  key:      %s (id %s)\n", vol.key, vol.key_id);
	if (vol.key_crn[0])
		printf("  key crn:  %s\n", vol.key_crn);
	if (keystore[0])
		printf("  keystore: %s\n", keystore);
	if (!kp) {
		printf("  trusted:  %s\n", trust_path);
		printf("mount it with: keyfs %s MOUNTPOINT\n", backing);
		return KEYFS_EXIT_OK;
	}
	printf("  version:  %s\n"
	       "  endpoint: %s\n"
	       "  instance: %s\n",
	       version, vol.endpoint, vol.instance);
	if (vol.iam_endpoint[0])
		printf("  iam:      %s\n", vol.iam_endpoint);
	if (vol.ca_file[0])
		printf("  ca file:  %s (the mount trusts it; -o ca_file= overrides)\n", vol.ca_file);
	printf("  trusted:  %s\n", trust_path);
	print_mount_command(backing, cfg.apikey_file);
	return KEYFS_EXIT_OK;
}
