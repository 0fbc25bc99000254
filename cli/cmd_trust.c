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
#include "keyfs/log.h"
#include "keyfs/util.h"
#include "keyfs/volume.h"
#include "cli.h"

enum { OPT_YES = CLI_OPT_BASE, OPT_FORGET, OPT_HELP };

static const struct option trust_options[] = {
	{ "yes", no_argument, NULL, OPT_YES },
	{ "forget", no_argument, NULL, OPT_FORGET },
	{ "help", no_argument, NULL, OPT_HELP },
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

int cmd_trust(int argc, char **argv)
{
	const char *arg = NULL;
	bool yes = false, do_forget = false;
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
		case 'h':
		case OPT_HELP:
			cli_print_usage(stdout, "trust");
			return KEYFS_EXIT_OK;
		default:
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
	return do_forget ? forget(arg) : trust(arg, yes);
}
