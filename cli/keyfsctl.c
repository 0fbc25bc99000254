/* keyfsctl.c: the admin CLI's entry: the subcommand table, help, and helpers the subcommands share */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "keyfs-config.h"
#include "keyfs/audit.h"
#include "keyfs/exitcode.h"
#include "keyfs/keystore.h"
#include "keyfs/kms.h"
#include "keyfs/log.h"
#include "keyfs/secmem.h"
#include "cli.h"

static int cmd_help(int argc, char **argv);

static const struct cli_cmd commands[] = {
	{ "init", cmd_init, "BACKING --kms local [--keystore DIR] [--key NAME] [--create-key] [--shared] [--format 1|2] [--cipher C]",
	  "BACKING --kms keyprotect --endpoint URL [--instance GUID] --key ID|CRN [--iam-endpoint URL] [--apikey-file F] [--ca-file F] [--shared] [--format 1|2] [--cipher C]",
	  "make an empty or missing dir a keyfs volume bound to a key; records its key service\n"
	  "            as trusted on this host; --format: file layout, 2 (default) or 1; --cipher: of\n"
	  "            the files, xaes-256-gcm (default where the CPU has AES) or xchacha20-poly1305" },
	{ "trust", cmd_trust, "BACKING [--yes]", "--forget BACKING|UUID | --resolve-key [--apikey-file F] [--ca-file F] BACKING [--yes]",
	  "show the key service a volume names and trust it on this host (once per volume made\n"
	  "            elsewhere or by an older keyfs); --forget: trust it no more; --resolve-key: a volume\n"
	  "            that names its key by alias records the key's uuid and CRN instead" },
	{ "inspect", cmd_inspect, "[-r] [--json] PATH...", NULL,
	  "show the keyfs header of files (backing files or paths in a mount), no key needed;\n"
	  "            -r: every file under a directory, with a summary" },
	{ "fsck", cmd_fsck, "[--json] [--keystore DIR] [--apikey-file F] [--ca-file F] BACKING", NULL,
	  "check that every chunk of every file authenticates (needs the key);\n"
	  "            exit 0 clean, 7 damaged, other: could not check" },
	{ "rewrap", cmd_rewrap, "[--keystore DIR] [--apikey-file F] [--ca-file F] BACKING", NULL,
	  "after a root key rotation, re-wrap every file key with the newest key version\n"
	  "            (data untouched; resumable; safe alongside a live mount)" },
	{ "status", cmd_status, "[MOUNTPOINT] [--json | --prometheus]", NULL,
	  "show whether a mount is locked, why, and its key's state (exit 0 unlocked, 8 locked);\n"
	  "            without MOUNTPOINT every keyfs mount of the host (--prometheus: node-exporter textfile)" },
	{ "lock", cmd_lock, "MOUNTPOINT", NULL,
	  "lock a mount now: contents unavailable until 'keyfsctl unlock' (root or the mount's owner)" },
	{ "unlock", cmd_unlock, "MOUNTPOINT", NULL,
	  "undo 'keyfsctl lock'; stays locked (exit 8) while the key itself is unusable" },
	{ "key", cmd_key, "create|show|rotate|suspend|enable|destroy NAME [--keystore DIR]", NULL,
	  "manage keys in the local keystore" },
	{ "help", cmd_help, "[COMMAND]", NULL, "show this help, or one command's usage" },
};

#define NCOMMANDS (sizeof(commands) / sizeof(commands[0]))

static const struct cli_cmd *find_command(const char *name)
{
	for (size_t i = 0; i < NCOMMANDS; i++)
		if (strcmp(commands[i].name, name) == 0)
			return &commands[i];
	return NULL;
}

void cli_print_usage(FILE *f, const char *cmd)
{
	const struct cli_cmd *c = find_command(cmd);

	if (c) {
		fprintf(f, "usage: keyfsctl %s %s\n", c->name, c->args);
		if (c->args_more)
			fprintf(f, "       keyfsctl %s %s\n", c->name, c->args_more);
	} else {
		fprintf(f, "usage: keyfsctl COMMAND [ARGS...]; see 'keyfsctl --help'\n");
	}
}

static void print_help(FILE *f)
{
	fprintf(f, "usage: keyfsctl COMMAND [ARGS...]\n"
		   "       keyfsctl --version | --help\n"
		   "\n"
		   "commands:\n");
	for (size_t i = 0; i < NCOMMANDS; i++) {
		fprintf(f, "  %-8s  %s\n  %-8s    keyfsctl %s %s\n", commands[i].name, commands[i].help, "",
			commands[i].name, commands[i].args);
		if (commands[i].args_more)
			fprintf(f, "  %-8s    keyfsctl %s %s\n", "", commands[i].name, commands[i].args_more);
	}
	fprintf(f, "\n"
		   "exit codes: 0 ok, 1 failure, 2 usage, 3 config, 4 kms, 5 mount, 6 io, 7 damaged,\n"
		   "8 locked (key suspended or destroyed; 'status' of a locked mount), 9 exists,\n"
		   "10 denied (the control socket is for root and the mount's owner),\n"
		   "11 untrusted (this host does not trust the key service the volume names: 'keyfsctl trust')\n");
}

int cli_usage_error(const char *cmd, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	log_err("%s", msg);
	cli_print_usage(stderr, cmd);
	return KEYFS_EXIT_USAGE;
}

int cli_option_error(const char *cmd, int c, char **argv)
{
	const char *opt = optind > 0 ? argv[optind - 1] : "";
	size_t n = strcspn(opt, "=");

	if (c == ':')
		return cli_usage_error(cmd, "option '%.*s' needs a value", (int)n, opt);
	if (optopt >= CLI_OPT_BASE)
		return cli_usage_error(cmd, "option '%.*s' takes no value", (int)n, opt);
	if (optopt > 0)
		return cli_usage_error(cmd, "unknown option '-%c'", optopt);
	return cli_usage_error(cmd, "unknown option '%.*s'", (int)n, opt);
}

int cli_copy(char *dst, size_t size, const char *src)
{
	size_t n = strlen(src);

	if (n >= size)
		return -ENAMETOOLONG;
	memcpy(dst, src, n + 1);
	return 0;
}

int cli_abs_path(const char *path, char *buf, size_t size)
{
	char tmp[PATH_MAX * 2];
	size_t len = 0, pos = 0;
	int n;

	if (!path[0])
		return -ENOENT;
	if (path[0] == '/') {
		n = snprintf(tmp, sizeof(tmp), "%s", path);
	} else {
		char cwd[PATH_MAX];

		if (!getcwd(cwd, sizeof(cwd)))
			return -errno;
		n = snprintf(tmp, sizeof(tmp), "%s/%s", cwd, path);
	}
	if (n < 0 || (size_t)n >= sizeof(tmp))
		return -ENAMETOOLONG;
	/* Rebuild component by component into tmp itself: the output never outruns the input. */
	while (tmp[pos]) {
		size_t start, clen;

		while (tmp[pos] == '/')
			pos++;
		start = pos;
		while (tmp[pos] && tmp[pos] != '/')
			pos++;
		clen = pos - start;
		if (clen == 0 || (clen == 1 && tmp[start] == '.'))
			continue;
		if (clen == 2 && tmp[start] == '.' && tmp[start + 1] == '.') {
			while (len > 0 && tmp[len - 1] != '/')
				len--;
			if (len > 0)
				len--;
			continue;
		}
		tmp[len++] = '/';
		memmove(tmp + len, tmp + start, clen);
		len += clen;
	}
	if (len == 0)
		tmp[len++] = '/';
	tmp[len] = '\0';
	if (len >= size)
		return -ENAMETOOLONG;
	memcpy(buf, tmp, len + 1);
	return 0;
}

int cli_keystore_dir(const char *given, char *buf, size_t size)
{
	int r;

	if (given) {
		if (!given[0]) {
			log_err("--keystore needs a dir");
			return KEYFS_EXIT_USAGE;
		}
		r = cli_abs_path(given, buf, size);
		if (r < 0) {
			log_err("keystore '%s': %s", given, strerror(-r));
			return KEYFS_EXIT_USAGE;
		}
		return 0;
	}
	r = keystore_default_dir(buf, size);
	if (r < 0) {
		log_err("no default keystore (no home dir): pass --keystore DIR");
		return KEYFS_EXIT_KMS;
	}
	return 0;
}

/* Why a keystore refused us with -EPERM: its checks are the keystore's, the words are ours. */
static void explain_unsafe(const char *dir, const char *name)
{
	char path[PATH_MAX + 80];
	struct stat st;
	int n;

	if (stat(dir, &st) == 0 && st.st_uid != geteuid() && st.st_uid != 0) {
		log_err("keystore '%s' is owned by uid %u, not by you or root: refusing to use it", dir,
			(unsigned)st.st_uid);
		return;
	}
	if (stat(dir, &st) == 0 && (st.st_mode & (S_IWGRP | S_IWOTH))) {
		log_err("keystore '%s' is writable by group or others (mode %04o): refusing to use it; run chmod 700 '%s'",
			dir, (unsigned)(st.st_mode & 07777), dir);
		return;
	}
	n = snprintf(path, sizeof(path), "%s/%s.key", dir, name);
	if (n > 0 && (size_t)n < sizeof(path) && lstat(path, &st) == 0) {
		if (S_ISLNK(st.st_mode) || !S_ISREG(st.st_mode)) {
			log_err("key file '%s' is not a regular file: refusing to use it", path);
			return;
		}
		if (st.st_uid != geteuid() && st.st_uid != 0) {
			log_err("key file '%s' is owned by uid %u, not by you or root: refusing to use it", path,
				(unsigned)st.st_uid);
			return;
		}
		if (st.st_mode & 077) {
			log_err("key file '%s' is accessible by group or others (mode %04o): refusing to use it; run chmod 600 '%s'",
				path, (unsigned)(st.st_mode & 07777), path);
			return;
		}
	}
	log_err("keystore '%s' or its key file for '%s' has unsafe ownership or permissions: the dir must be owned by you or root and not writable by group or others, key files mode 0600",
		dir, name);
}

int cli_keystore_error(int r, const char *dir, const char *name)
{
	struct keystore_info info;
	struct stat st;

	switch (r) {
	case -EINVAL:
		log_err("'%s' is not a valid key name: use 1-%d letters, digits, '.', '_' or '-', starting with a letter or digit",
			name, KEYSTORE_NAME_MAX);
		return KEYFS_EXIT_USAGE;
	case -ENOENT:
		if (stat(dir, &st) < 0)
			log_err("keystore '%s' does not exist: create a key with 'keyfsctl key create NAME --keystore %s'",
				dir, dir);
		else
			log_err("key '%s' not found in keystore '%s'", name, dir);
		return KEYFS_EXIT_KMS;
	case -ENOTDIR:
		log_err("keystore '%s' is not a directory", dir);
		return KEYFS_EXIT_KMS;
	case -EACCES:
		log_err("keystore '%s' or key '%s' is not accessible: permission denied (run as its owner or root)",
			dir, name);
		return KEYFS_EXIT_KMS;
	case -EPERM:
		explain_unsafe(dir, name);
		return KEYFS_EXIT_KMS;
	case -EEXIST:
		if (keystore_show(dir, name, &info) == 0 && info.state == KMS_STATE_DESTROYED)
			log_err("the name '%s' was used by a key destroyed on %s (id %s); its tombstone in keystore '%s' keeps the name from being reused: choose another name",
				name, info.updated, info.id, dir);
		else
			log_err("key '%s' already exists in keystore '%s'", name, dir);
		return KEYFS_EXIT_EXISTS;
	case -EKEYREVOKED:
		log_err("key '%s' in keystore '%s' is destroyed", name, dir);
		return KEYFS_EXIT_LOCKED;
	case -EUCLEAN:
		log_err("key file for '%s' in keystore '%s' is damaged (not a valid keyfs key file)", name, dir);
		return KEYFS_EXIT_KMS;
	case -EPROTONOSUPPORT:
		log_err("key file for '%s' in keystore '%s' has a newer format than this keyfsctl understands", name, dir);
		return KEYFS_EXIT_KMS;
	case -ETIMEDOUT:
		log_err("keystore '%s' is busy: another keyfsctl holds its lock", dir);
		return KEYFS_EXIT_KMS;
	default:
		log_err("key '%s' in keystore '%s': %s", name, dir, strerror(-r));
		return KEYFS_EXIT_FAILURE;
	}
}

const char *cli_escape(const char *s, bool c1, char *buf, size_t size)
{
	size_t n = 0;

	for (; *s && n + (c1 ? 9 : 5) <= size; s++) {
		unsigned char c = (unsigned char)*s;

		if (c1 && c == 0xc2 && (unsigned char)s[1] >= 0x80 && (unsigned char)s[1] <= 0x9f) {
			n += (size_t)snprintf(buf + n, size - n, "\\%03o\\%03o", c, (unsigned char)s[1]);
			s++;
		} else if (c < 0x20 || c == 0x7f || c == '\\') {
			n += (size_t)snprintf(buf + n, size - n, "\\%03o", c);
		} else {
			buf[n++] = (char)c;
		}
	}
	buf[n] = '\0';
	return buf;
}

void cli_fputs_safe(FILE *f, const char *s)
{
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;

		if (c < 0x20 || c == 0x7f || c == '\\')
			fprintf(f, "\\%03o", c);
		else
			fputc(c, f);
	}
}

static int cmd_help(int argc, char **argv)
{
	if (argc > 2)
		return cli_usage_error("help", "too many arguments");
	if (argc == 2) {
		if (!find_command(argv[1]))
			return cli_usage_error("help", "unknown command '%s'", argv[1]);
		cli_print_usage(stdout, argv[1]);
		return KEYFS_EXIT_OK;
	}
	print_help(stdout);
	return KEYFS_EXIT_OK;
}

int main(int argc, char **argv)
{
	const struct rlimit no_core = { 0, 0 };
	const struct cli_cmd *c;
	int rc;

	/* fsck, rewrap and init hold DEKs, and Key Protect calls an API key and a bearer token
	 * that libcurl copies into memory keyfsctl cannot wipe: never in a core dump. */
	prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
	setrlimit(RLIMIT_CORE, &no_core);
	log_init("keyfsctl", LOG_LEVEL_INFO);
	audit_init("keyfsctl");
	/* Before libcurl, OpenSSL or cJSON is used: their heaps wipe on free. Memory is locked
	 * where the limits allow every page to be (a short-lived command: no message otherwise). */
	if (secmem_init() < 0) {
		log_err("libcurl cannot be initialised");
		return KEYFS_EXIT_FAILURE;
	}
	secmem_lock_all();
	if (argc < 2) {
		log_err("no command given");
		print_help(stderr);
		return KEYFS_EXIT_USAGE;
	}
	if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-V") == 0) {
		if (argc > 2)
			return cli_usage_error("", "--version takes no arguments");
		printf("keyfsctl %s\n", KEYFS_VERSION);
		rc = KEYFS_EXIT_OK;
	} else if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
		rc = cmd_help(argc - 1, argv + 1);
	} else if (argv[1][0] == '-') {
		size_t n = strcspn(argv[1], "=");

		return cli_usage_error("", "unknown option '%.*s'", (int)n, argv[1]);
	} else if (!(c = find_command(argv[1]))) {
		return cli_usage_error("", "unknown command '%s'", argv[1]);
	} else {
		rc = c->run(argc - 1, argv + 1);
	}
	if (fflush(stdout) != 0 || ferror(stdout)) {
		log_err("writing output: %s", strerror(errno));
		if (rc == KEYFS_EXIT_OK)
			rc = KEYFS_EXIT_IO;
	}
	return rc;
}
