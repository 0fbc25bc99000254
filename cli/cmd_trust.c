/* cmd_trust.c: keyfsctl trust: the host accepts, once, the key service a volume from elsewhere names */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "keyfs/exitcode.h"
#include "keyfs/kms.h"
#include "keyfs/log.h"
#include "keyfs/util.h"
#include "keyfs/voldesc.h"
#include "keyfs/volume.h"
#include "cli.h"
#include "volume.h"

enum { OPT_YES = CLI_OPT_BASE, OPT_FORGET, OPT_RESOLVE_KEY, OPT_HELP };

static const struct option trust_options[] = {
	{ "yes", no_argument, NULL, OPT_YES },
	{ "forget", no_argument, NULL, OPT_FORGET },
	{ "resolve-key", no_argument, NULL, OPT_RESOLVE_KEY },
	{ "help", no_argument, NULL, OPT_HELP },
	CLI_KMS_OPTIONS,
	{ NULL, 0, NULL, 0 },
};

/* "  name          value" for every location field of the volume's kind. */
static void print_location(const struct voldesc *d)
{
	for (size_t i = 0; i < VOL_LOCATION_FIELDS; i++) {
		const char *val = vol_location_value(d, i);

		if (!vol_location_applies(d, i))
			continue;
		printf("  %-13s ", vol_location_name(i));
		if (val[0])
			cli_fputs_safe(stdout, val);
		else
			fputs("(none)", stdout);
		putchar('\n');
	}
}

/* A y/N answer from the terminal; anything else (EOF included) is no. */
static bool ask(const char *question)
{
	char line[16];

	fputs(question, stdout);
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin))
		return false;
	return strcmp(line, "y\n") == 0 || strcmp(line, "Y\n") == 0 || strcmp(line, "yes\n") == 0;
}

static int forget(const char *arg)
{
	char path[PATH_MAX + 64];
	const char *uuid = arg;
	struct vol v;
	struct stat st;
	int r, rc;

	/* A uuid names a volume whose backing dir may be long gone. */
	if (!(util_uuid_valid(arg) && stat(arg, &st) < 0)) {
		rc = vol_open(arg, NULL, VOL_SKIP_TRUST, &v);
		if (rc) {
			vol_close(&v);
			return rc;
		}
		uuid = v.vol.volume;
		vol_close(&v);
	}
	r = vol_trust_forget(uuid, path, sizeof(path));
	if (r == -ENOENT) {
		log_err("volume %s is not trusted on this host: no record '%s'", uuid, path);
		return KEYFS_EXIT_UNTRUSTED;
	}
	if (r < 0) {
		log_err("trust record of volume %s: %s", uuid, strerror(-r));
		return r == -EACCES || r == -EPERM ? KEYFS_EXIT_DENIED : KEYFS_EXIT_IO;
	}
	printf("volume %s is no longer trusted on this host (removed '%s')\n", uuid, path);
	return KEYFS_EXIT_OK;
}

static int trust(const char *arg, bool yes)
{
	char path[PATH_MAX + 64], msg[PATH_MAX + 128];
	struct voldesc rec;
	struct vol v;
	bool had = false, same = true;
	int r, rc;

	rc = vol_open(arg, NULL, VOL_SKIP_TRUST, &v);
	if (rc)
		goto out;
	r = vol_trust_read(v.vol.volume, &rec, path, sizeof(path), msg, sizeof(msg));
	if (r == 0) {
		had = true;
		for (size_t i = 0; i < VOL_LOCATION_FIELDS; i++)
			if (strcmp(vol_location_value(&v.vol, i), vol_location_value(&rec, i)) != 0)
				same = false;
	} else if (r == -EPERM || r == -EINVAL) {
		/* An unsafe or unreadable record is replaced, as the user is about to confirm. */
		log_warn("%s: it will be replaced", msg);
	} else if (r != -ENOENT) {
		log_err("trust record of volume %s: %s", v.vol.volume, strerror(-r));
		rc = KEYFS_EXIT_IO;
		goto out;
	}
	if (had && same) {
		printf("volume '%s' (uuid %s) is already trusted on this host ('%s'):\n", v.backing, v.vol.volume,
		       path);
		print_location(&v.vol);
		goto out;
	}
	printf("volume '%s' (uuid %s) names this key service:\n", v.backing, v.vol.volume);
	print_location(&v.vol);
	if (had) {
		printf("WARNING: this host trusts another key service for this volume ('%s'):\n", path);
		print_location(&rec);
	}
	printf("Trusting it lets keyfs, fsck and rewrap send this volume's file keys%s there.\n"
	       "Trust it only if you know this is where the volume's key lives.\n",
	       strcmp(v.vol.kms, VOLDESC_KMS_KEYPROTECT) == 0 ? " and this host's API key" : "");
	if (!yes) {
		if (!isatty(STDIN_FILENO)) {
			fflush(stdout);
			rc = cli_usage_error("trust", "stdin is not a terminal: give --yes to trust it");
			goto out;
		}
		if (!ask("Trust it? [y/N] ")) {
			log_err("volume '%s' not trusted: nothing recorded", v.backing);
			rc = KEYFS_EXIT_UNTRUSTED;
			goto out;
		}
	}
	r = vol_trust_write(&v.vol, path, sizeof(path), msg, sizeof(msg));
	if (r < 0) {
		if (msg[0])
			log_err("%s: cannot record the trust there", msg);
		else
			log_err("cannot record the trust in '%s': %s", path, strerror(-r));
		rc = r == -EPERM ? KEYFS_EXIT_UNTRUSTED : r == -EACCES ? KEYFS_EXIT_DENIED : KEYFS_EXIT_IO;
		goto out;
	}
	printf("trusted: recorded in '%s'\n", path);
out:
	vol_close(&v);
	return rc;
}

/* "  name     old -> new" of one field being rewritten. */
static void print_change(const char *name, const char *old, const char *now)
{
	printf("  %-8s ", name);
	cli_fputs_safe(stdout, old[0] ? old : "(none)");
	fputs(" -> ", stdout);
	cli_fputs_safe(stdout, now[0] ? now : "(none)");
	putchar('\n');
}

/*
 * keyfsctl trust --resolve-key: a volume made before init resolved the key recorded the alias it
 * was given as key_id, so moving the alias moves the volume to another key. Ask the key service
 * the host trusts, once, which key the alias names now, and record its uuid and CRN in the
 * description and the trust record, as init does today. The trust record is the host's word:
 * the alias resolved is the record's, and the description must agree with the record but for
 * key_id and key_crn. The record is written first: a run cut short between the two writes is
 * finished by running it again (the record then names the uuid, which resolves to itself).
 */
static int resolve_key(const char *arg, const struct cli_kms_args *ka, bool yes)
{
	char path[PATH_MAX + 64], msg[PATH_MAX + 128], buf[VOLDESC_MAX], old_id[sizeof(((struct voldesc *)0)->key_id)],
		old_crn[sizeof(((struct voldesc *)0)->key_crn)];
	struct kms_err err = { .msg = "" };
	struct kms_key_info info;
	struct voldesc rec;
	struct vol v;
	int n, r, rc;

	rc = cli_volume_open_untrusted(arg, ka, "trust", &v);
	if (rc)
		goto out;
	if (strcmp(v.vol.kms, VOLDESC_KMS_KEYPROTECT) != 0) {
		printf("volume '%s' (uuid %s) uses a local key: its key_id is the key's uuid already; nothing to resolve\n",
		       v.backing, v.vol.volume);
		goto out;
	}
	r = vol_trust_read(v.vol.volume, &rec, path, sizeof(path), msg, sizeof(msg));
	if (r == -ENOENT && !msg[0]) {
		log_err("volume '%s' (uuid %s) is not trusted on this host: run 'keyfsctl trust %s' first", v.backing,
			v.vol.volume, v.backing);
		rc = KEYFS_EXIT_UNTRUSTED;
		goto out;
	}
	if (r < 0) {
		if (msg[0])
			log_err("%s: refusing to trust it", msg);
		else
			log_err("trust record of volume %s ('%s'): %s", v.vol.volume, path, strerror(-r));
		rc = KEYFS_EXIT_UNTRUSTED;
		goto out;
	}
	for (size_t i = 0; i < VOL_LOCATION_FIELDS; i++) {
		const char *name = vol_location_name(i);

		if (strcmp(name, "key_id") == 0 || strcmp(name, "key_crn") == 0 ||
		    (strcmp(name, "ca_file") == 0 && ka->ca_file))
			continue;
		if (strcmp(vol_location_value(&v.vol, i), vol_location_value(&rec, i)) == 0)
			continue;
		log_err("volume '%s': its %s says %s '%s' but this host trusts '%s' ('%s'): nothing resolved; run 'keyfsctl trust %s' first if the key service really moved",
			v.backing, VOLDESC_NAME, name, vol_location_value(&v.vol, i), vol_location_value(&rec, i), path,
			v.backing);
		rc = KEYFS_EXIT_UNTRUSTED;
		goto out;
	}
	snprintf(old_id, sizeof(old_id), "%s", v.vol.key_id);
	snprintf(old_crn, sizeof(old_crn), "%s", v.vol.key_crn);
	/* The name asked about is the host's; a mount of the volume now would race the rewrite. */
	memcpy(v.vol.key_id, rec.key_id, sizeof(v.vol.key_id));
	memcpy(v.vol.key_crn, rec.key_crn, sizeof(v.vol.key_crn));
	rc = vol_lock(&v, false);
	if (rc == 0)
		rc = vol_kms_open(&v, "trust");
	if (rc)
		goto out;
	r = kms_key_info(v.kms, &info, &err);
	if (r < 0) {
		log_err("key '%s' of volume '%s' cannot be resolved: %s", rec.key_id, v.backing,
			err.msg[0] ? err.msg : strerror(-r));
		rc = KEYFS_EXIT_KMS;
		goto out;
	}
	if (strcmp(old_id, rec.key_id) != 0 && strcmp(old_id, info.id) != 0) {
		log_err("volume '%s': its %s says key_id '%s' but this host trusts '%s' ('%s'), which is key %s: nothing resolved",
			v.backing, VOLDESC_NAME, old_id, rec.key_id, path, info.id);
		rc = KEYFS_EXIT_UNTRUSTED;
		goto out;
	}
	if (strlen(info.id) >= sizeof(v.vol.key_id) || strlen(info.crn) >= sizeof(v.vol.key_crn)) {
		log_err("key '%s': its id or CRN is too long", rec.key_id);
		rc = KEYFS_EXIT_KMS;
		goto out;
	}
	if (strcmp(old_id, info.id) == 0 && strcmp(old_crn, info.crn) == 0 && strcmp(rec.key_id, info.id) == 0 &&
	    strcmp(rec.key_crn, info.crn) == 0) {
		printf("volume '%s' (uuid %s) records its key's uuid already: key_id %s\n", v.backing, v.vol.volume,
		       info.id);
		goto out;
	}
	snprintf(v.vol.key_id, sizeof(v.vol.key_id), "%s", info.id);
	snprintf(v.vol.key_crn, sizeof(v.vol.key_crn), "%s", info.crn);
	printf("volume '%s' (uuid %s) names key '%s'; the key service resolves it now:\n", v.backing, v.vol.volume,
	       rec.key_id);
	print_change("key_id", old_id, info.id);
	print_change("key_crn", old_crn, info.crn);
	printf("Recording it binds the volume to this key: moving the alias '%s' no longer moves the volume.\n"
	       "Record it only if this is the key the volume's files are wrapped with ('keyfsctl fsck' checks).\n",
	       v.vol.key);
	if (!yes) {
		if (!isatty(STDIN_FILENO)) {
			fflush(stdout);
			rc = cli_usage_error("trust", "stdin is not a terminal: give --yes to record it");
			goto out;
		}
		if (!ask("Record it? [y/N] ")) {
			log_err("volume '%s': nothing recorded", v.backing);
			rc = KEYFS_EXIT_UNTRUSTED;
			goto out;
		}
	}
	n = voldesc_format(&v.vol, buf, sizeof(buf));
	if (n < 0) {
		log_err("volume description for '%s' cannot be written: %s", v.backing, strerror(-n));
		rc = KEYFS_EXIT_FAILURE;
		goto out;
	}
	r = vol_trust_write(&v.vol, path, sizeof(path), msg, sizeof(msg));
	if (r < 0) {
		if (msg[0])
			log_err("%s: cannot record the key there", msg);
		else
			log_err("cannot record the key in '%s': %s", path, strerror(-r));
		rc = r == -EPERM ? KEYFS_EXIT_UNTRUSTED : r == -EACCES ? KEYFS_EXIT_DENIED : KEYFS_EXIT_IO;
		goto out;
	}
	/* As init writes it: a temporary file renamed over it, never a half-written description. */
	r = util_write_file_atomic(v.root_fd, VOLDESC_NAME, buf, (size_t)n, 0644);
	if (r < 0) {
		log_err("writing '%s/%s': %s (the trust record names the key's uuid already: run this again)", v.backing,
			VOLDESC_NAME, strerror(-r));
		rc = r == -EACCES || r == -EPERM ? KEYFS_EXIT_DENIED : KEYFS_EXIT_IO;
		goto out;
	}
	printf("recorded: key_id %s in '%s/%s' and '%s'\n", info.id, v.backing, VOLDESC_NAME, path);
out:
	vol_close(&v);
	return rc;
}

int cmd_trust(int argc, char **argv)
{
	struct cli_kms_args ka = { NULL };
	const char *arg = NULL;
	bool yes = false, do_forget = false, do_resolve = false, kms_opts = false;
	int c;

	optind = 0;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "-:hy", trust_options, NULL)) != -1) {
		switch (c) {
		case 1:
			if (arg)
				return cli_usage_error("trust", "unexpected argument '%s'", optarg);
			arg = optarg;
			break;
		case 'y':
		case OPT_YES: yes = true; break;
		case OPT_FORGET: do_forget = true; break;
		case OPT_RESOLVE_KEY: do_resolve = true; break;
		case 'h':
		case OPT_HELP:
			cli_print_usage(stdout, "trust");
			return KEYFS_EXIT_OK;
		default:
			if (cli_kms_option(&ka, c, optarg)) {
				kms_opts = true;
				break;
			}
			return cli_option_error("trust", c, argv);
		}
	}
	for (; optind < argc; optind++) {
		if (arg)
			return cli_usage_error("trust", "unexpected argument '%s'", argv[optind]);
		arg = argv[optind];
	}
	if (!arg || !arg[0])
		return cli_usage_error("trust", do_forget ? "missing BACKING or UUID" : "missing BACKING");
	if (do_forget && yes)
		return cli_usage_error("trust", "--forget takes no --yes");
	if (do_forget && do_resolve)
		return cli_usage_error("trust", "--forget and --resolve-key exclude each other");
	if (kms_opts && !do_resolve)
		return cli_usage_error("trust", "--keystore, --apikey-file and --ca-file go with --resolve-key only");
	if (do_resolve)
		return resolve_key(arg, &ka, yes);
	return do_forget ? forget(arg) : trust(arg, yes);
}
