/* options.c: parse the keyfs command line and sort mount options into ours, FUSE's and fstab's */
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "keyfs/log.h"
#include "keyfs/util.h"

#include "dekpool.h"
#include "options.h"
#include "keystate.h"
#include "prefetch.h"

/* Mount options handed to the kernel mount through libfuse unchanged. */
static const char *const fuse_passed[] = {
	"allow_other", "allow_root", "default_permissions", "ro", "rw", "suid", "nosuid", "dev", "nodev",
	"exec", "noexec", "atime", "noatime", "sync", "async", "dirsync", "auto_unmount", NULL,
};

/*
 * Access-time policies libfuse 3.14 does not know. They would change nothing: the kernel does
 * not write back FUSE atimes without the writeback cache, so the atime of a keyfs file is its
 * backing file's, governed by the backing mount's options.
 */
static const char *const atime_ignored[] = {
	"relatime", "strictatime", "diratime", "nodiratime", NULL,
};

/* fstab-only options, meaningful to mount(8) and systemd, not to us. */
static const char *const fstab_ignored[] = {
	"defaults", "nofail", "_netdev", "auto", "noauto", "user", "nouser", "users", "owner", "group", NULL,
};

static bool in_list(const char *const *list, const char *s)
{
	for (; *list; list++)
		if (strcmp(*list, s) == 0)
			return true;
	return false;
}

void options_usage(FILE *f)
{
	fputs("usage: keyfs BACKING MOUNTPOINT [-f] [-d] [-o opt[,opt...]]\n"
	      "       keyfs --version | --help\n", f);
}

void options_help(FILE *f)
{
	options_usage(f);
	fputs("\nMount the keyfs volume in BACKING (made by 'keyfsctl init') on MOUNTPOINT.\n"
	      "\n"
	      "  -f                  stay in the foreground\n"
	      "  -d                  debug: log every FUSE request (implies -f)\n"
	      "  -o keystore=DIR     local key store to use instead of the one recorded at init\n"
	      "  -o apikey_file=F    Key Protect API key file (else $CREDENTIALS_DIRECTORY/apikey)\n"
	      "  -o ca_file=F        extra trusted CA bundle for the key service\n"
	      "  -o kms=KMS          state where the key service is instead of the host's trust\n"
	      "                      record (keyfsctl trust): local or keyprotect, with\n"
	      "  -o key=KEY          the key (name, id or CRN), and keystore= (local) or\n"
	      "  -o endpoint=URL     the Key Protect endpoint,\n"
	      "  -o instance=GUID    instance,\n"
	      "  -o iam_endpoint=URL IAM endpoint (if the volume names one) and ca_file=\n"
	      "  -o poll=SEC         read the root key's state every SEC seconds, +-10 % (default 30)\n"
	      "  -o grace=SEC        lock after SEC seconds without an answer from the key service\n"
	      "                      (default 300; 0: at once)\n"
	      "  -o dek_pool=N       keys for new files wrapped ahead, at most (0-1024; default 128\n"
	      "                      for Key Protect, 0 for the local keystore)\n"
	      "  -o prefetch=N       after a directory listing, unwrap ahead the keys of up to N\n"
	      "                      of its files (0-1024; default 256 for Key Protect, 0 local)\n"
	      "  -o kms_concurrency=N  wraps and unwraps in flight at once (1-128; default 64)\n"
	      "  -o shared           mount a volume other hosts mount too (every mount of it shared;\n"
	      "                      the default for a volume made with 'keyfsctl init --shared');\n"
	      "                      -o noshared: mount it alone\n"
	      "  -o shared_timeout=SEC  shared: another host's changes show within SEC s (0-3600;\n"
	      "                      default 1)\n"
	      "  -o nonempty         allow a non-empty mountpoint\n"
	      "  -o nowriteback      every write reaches keyfs at once; the default, -o writeback,\n"
	      "                      lets the kernel cache writes (a lock writes them back, keyfs(8))\n"
	      "  -o allow_other      let every user in (the kernel always checks permissions:\n"
	      "                      default_permissions is implied)\n"
	      "\n"
	      "FUSE options passed through: allow_other, allow_root, default_permissions, ro, rw, suid,\n"
	      "nosuid, dev, nodev, exec, noexec, atime, noatime, relatime, strictatime, diratime,\n"
	      "nodiratime, sync, async, dirsync, auto_unmount. fstab-only options are accepted and\n"
	      "ignored: defaults, nofail, _netdev, auto, noauto, user, nouser, users, owner, group,\n"
	      "comment=..., x-...\n"
	      "\n"
	      "Exit codes: 0 ok, 1 failure, 2 usage, 3 not a volume or bad .keyfs, 4 key service,\n"
	      "5 mountpoint or mount, 8 key suspended or destroyed, 11 the host does not trust the\n"
	      "key service the volume names (keyfsctl trust).\n", f);
}

/* An absolute copy of path, so that it still names the same file after the daemon's chdir("/"). */
static char *absolute(const char *path)
{
	char cwd[PATH_MAX], *out;
	size_t lc, lp;

	if (path[0] == '/')
		return strdup(path);
	if (!getcwd(cwd, sizeof(cwd)))
		return NULL;
	lc = strlen(cwd);
	lp = strlen(path);
	if (lc + 1 + lp + 1 > PATH_MAX)
		return NULL;
	out = malloc(lc + 1 + lp + 1);
	if (!out)
		return NULL;
	memcpy(out, cwd, lc);
	out[lc] = '/';
	memcpy(out + lc + 1, path, lp + 1);
	return out;
}

/* A text option's value: as given, or made absolute when path (the daemon leaves its cwd). */
static int set_text(char **dst, const char *name, const char *value, bool path)
{
	if (!*value) {
		log_err("mount option '%s' needs a value", name);
		return -EINVAL;
	}
	free(*dst);
	*dst = path ? absolute(value) : strdup(value);
	if (!*dst && path) {
		log_err("mount option '%s': path too long", name);
		return -EINVAL;
	}
	if (!*dst) {
		log_err("out of memory");
		return -ENOMEM;
	}
	return 0;
}

static int set_path(char **dst, const char *name, const char *value)
{
	return set_text(dst, name, value, true);
}

static int add_fuse(struct keyfs_options *o, const char *opt)
{
	size_t len = strlen(o->fuse);
	int n = snprintf(o->fuse + len, sizeof(o->fuse) - len, "%s%s", len ? "," : "", opt);

	if (n < 0 || (size_t)n >= sizeof(o->fuse) - len) {
		o->fuse[len] = '\0';
		log_err("mount options too long");
		return -EINVAL;
	}
	return 0;
}

static int set_string(char **dst, const char *name, const char *value)
{
	return set_text(dst, name, value, false);
}

static int set_count(int *dst, const char *name, const char *value, unsigned max)
{
	uint64_t v;

	if (util_parse_u64(value, 0, max, &v) < 0) {
		log_err("mount option '%s': '%s' is not a number from 0 to %u", name, value, max);
		return -EINVAL;
	}
	*dst = (int)v;
	return 0;
}

static int one_option(struct keyfs_options *o, const char *opt)
{
	if (strncmp(opt, "poll=", 5) == 0) {
		if (strcmp(opt + 5, "0") == 0) {
			log_err("mount option 'poll': '0' is not a number of seconds from 1 to %u", KS_POLL_MAX);
			return -EINVAL;
		}
		return set_count(&o->poll, "poll", opt + 5, KS_POLL_MAX);
	}
	if (strncmp(opt, "grace=", 6) == 0)
		return set_count(&o->grace, "grace", opt + 6, KS_GRACE_MAX);
	if (strncmp(opt, "dek_pool=", 9) == 0)
		return set_count(&o->dek_pool, "dek_pool", opt + 9, DEKPOOL_MAX);
	if (strncmp(opt, "prefetch=", 9) == 0)
		return set_count(&o->prefetch, "prefetch", opt + 9, PREFETCH_MAX);
	if (strncmp(opt, "kms_concurrency=", 16) == 0) {
		if (strcmp(opt + 16, "0") == 0) {
			log_err("mount option 'kms_concurrency': '0' is not a number from 1 to %u", KMS_CONCURRENCY_MAX);
			return -EINVAL;
		}
		return set_count(&o->kms_concurrency, "kms_concurrency", opt + 16, KMS_CONCURRENCY_MAX);
	}
	if (strncmp(opt, "keystore=", 9) == 0)
		return set_path(&o->keystore, "keystore", opt + 9);
	if (strncmp(opt, "apikey_file=", 12) == 0)
		return set_path(&o->apikey_file, "apikey_file", opt + 12);
	if (strncmp(opt, "ca_file=", 8) == 0)
		return set_path(&o->ca_file, "ca_file", opt + 8);
	if (strncmp(opt, "kms=", 4) == 0) {
		if (strcmp(opt + 4, "local") != 0 && strcmp(opt + 4, "keyprotect") != 0) {
			log_err("mount option 'kms': '%s' is not local or keyprotect", opt + 4);
			return -EINVAL;
		}
		return set_string(&o->kms, "kms", opt + 4);
	}
	if (strncmp(opt, "key=", 4) == 0)
		return set_string(&o->key, "key", opt + 4);
	if (strncmp(opt, "endpoint=", 9) == 0)
		return set_string(&o->endpoint, "endpoint", opt + 9);
	if (strncmp(opt, "instance=", 9) == 0)
		return set_string(&o->instance, "instance", opt + 9);
	if (strncmp(opt, "iam_endpoint=", 13) == 0)
		return set_string(&o->iam_endpoint, "iam_endpoint", opt + 13);
	if (strcmp(opt, "nonempty") == 0) {
		o->nonempty = true;
		return 0;
	}
	if (strcmp(opt, "shared") == 0 || strcmp(opt, "noshared") == 0) {
		o->shared = opt[0] == 's';
		return 0;
	}
	if (strncmp(opt, "shared_timeout=", 15) == 0)
		return set_count(&o->shared_timeout, "shared_timeout", opt + 15, OPTIONS_SHARED_TIMEOUT_MAX);
	if (strcmp(opt, "writeback") == 0 || strcmp(opt, "nowriteback") == 0) {
		o->writeback = opt[0] == 'w';
		return 0;
	}
	if (in_list(fuse_passed, opt))
		return add_fuse(o, opt);
	if (in_list(fstab_ignored, opt) || in_list(atime_ignored, opt) || strncmp(opt, "comment=", 8) == 0 || strncmp(opt, "x-", 2) == 0)
		return 0;
	log_err("unknown mount option '%s'", opt);
	return -EINVAL;
}

/* Split an -o argument at commas; "\," is a comma inside a value. Empty items are skipped. */
static int option_list(struct keyfs_options *o, const char *list)
{
	size_t len = strlen(list);
	char *item = malloc(len + 1);
	size_t n = 0;
	int r = 0;

	if (!item)
		return -ENOMEM;
	for (size_t k = 0; k <= len && r == 0; k++) {
		if (list[k] == '\\' && (list[k + 1] == ',' || list[k + 1] == '\\')) {
			item[n++] = list[++k];
		} else if (list[k] == ',' || list[k] == '\0') {
			item[n] = '\0';
			if (n > 0)
				r = one_option(o, item);
			n = 0;
		} else {
			item[n++] = list[k];
		}
	}
	free(item);
	return r;
}

int options_parse(int argc, char *argv[], struct keyfs_options *ret)
{
	struct keyfs_options o;
	bool dashdash = false;
	int r;

	memset(&o, 0, sizeof(o));
	o.dek_pool = o.prefetch = o.kms_concurrency = -1;
	o.shared = -1;
	o.shared_timeout = OPTIONS_SHARED_TIMEOUT_DEFAULT;
	o.poll = KS_POLL_DEFAULT;
	o.grace = KS_GRACE_DEFAULT;
	o.writeback = true;
	for (int k = 1; k < argc; k++) {
		const char *a = argv[k];

		if (dashdash || a[0] != '-' || a[1] == '\0') {
			if (!o.backing) {
				o.backing = a;
			} else if (!o.mountpoint) {
				o.mountpoint = a;
			} else {
				log_err("unexpected argument '%s'", a);
				goto usage;
			}
		} else if (strcmp(a, "--") == 0) {
			dashdash = true;
		} else if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
			o.help = true;
		} else if (strcmp(a, "--version") == 0 || strcmp(a, "-V") == 0) {
			o.version = true;
		} else if (a[1] == '-') {
			log_err("unknown option '%s'", a);
			goto usage;
		} else {
			/* Short options, bundled as "-fd" or "-oallow_other". */
			for (const char *c = a + 1; *c; c++) {
				if (*c == 'f') {
					o.foreground = true;
				} else if (*c == 'd') {
					o.debug = o.foreground = true;
				} else if (*c == 'o') {
					const char *list = c[1] ? c + 1 : k + 1 < argc ? argv[++k] : NULL;

					if (!list) {
						log_err("option '-o' needs a value");
						goto usage;
					}
					r = option_list(&o, list);
					if (r < 0)
						goto fail;
					break;
				} else {
					log_err("unknown option '-%c'", *c);
					goto usage;
				}
			}
		}
	}
	if (!o.kms && (o.key || o.endpoint || o.instance || o.iam_endpoint)) {
		log_err("mount option '%s' states where the key service is: give kms= with it",
			o.key ? "key" : o.endpoint ? "endpoint" : o.instance ? "instance" : "iam_endpoint");
		goto usage;
	}
	if (o.kms && !o.key) {
		log_err("mount option 'kms' states where the key service is: give key= with it");
		goto usage;
	}
	if (!o.help && !o.version && !o.mountpoint) {
		log_err(o.backing ? "missing MOUNTPOINT" : "missing BACKING and MOUNTPOINT");
		goto usage;
	}
	*ret = o;
	return 0;
usage:
	options_usage(stderr);
fail:
	options_free(&o);
	return -EINVAL;
}

void options_free(struct keyfs_options *o)
{
	free(o->keystore);
	free(o->apikey_file);
	free(o->ca_file);
	o->keystore = o->apikey_file = o->ca_file = NULL;
	free(o->kms);
	free(o->key);
	free(o->endpoint);
	free(o->instance);
	free(o->iam_endpoint);
	o->kms = o->key = o->endpoint = o->instance = o->iam_endpoint = NULL;
}
