/* cli.h: the keyfsctl subcommands and the few helpers they share, private to cli/ */
#ifndef KEYFS_CLI_H
#define KEYFS_CLI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

/* Long-only option values start here, so getopt's optopt tells them from short options. */
#define CLI_OPT_BASE 256

struct cli_cmd {
	const char *name;
	int (*run)(int argc, char **argv);      /* argv[0] is the subcommand; returns a KEYFS_EXIT_* */
	const char *args;
	const char *args_more;                  /* a second form of the command, or NULL */
	const char *help;
};

int cmd_init(int argc, char **argv);
int cmd_inspect(int argc, char **argv);
int cmd_key(int argc, char **argv);
int cmd_fsck(int argc, char **argv);
int cmd_rewrap(int argc, char **argv);
int cmd_status(int argc, char **argv);
int cmd_lock(int argc, char **argv);
int cmd_unlock(int argc, char **argv);
int cmd_trust(int argc, char **argv);

/* Ask the daemon of the keyfs mount at mp (absolute, as in mountinfo) for its state within
 * timeout_s: "locked" or "unlocked" into state, the reason ("" when none) into reason.
 * Returns 0 or -errno (-ENOENT: not a keyfs mount; -EACCES: not root or the owner). */
int cli_mount_state(const char *mp, int timeout_s, char *state, size_t ssize, char *reason, size_t rsize);

/* "usage: keyfsctl CMD ARGS" for one subcommand. */
void cli_print_usage(FILE *f, const char *cmd);

/* Print "keyfsctl: error: ..." and the subcommand's usage; returns KEYFS_EXIT_USAGE. */
int cli_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Turn getopt_long's ':' or '?' (c) into a usage error. */
int cli_option_error(const char *cmd, int c, char **argv);

/* Copy src into dst of size bytes. Returns 0 or -ENAMETOOLONG (dst untouched). */
int cli_copy(char *dst, size_t size, const char *src);

/* An absolute form of path without resolving symlinks in it: cwd joined, '.', '..' and
 * repeated or trailing slashes removed. Returns 0 or -errno. */
int cli_abs_path(const char *path, char *buf, size_t size);

/* The keystore dir to use: given (made absolute) or the default. Returns 0, or an exit code
 * after printing the error. */
int cli_keystore_dir(const char *given, char *buf, size_t size);

/* Print the error of a keystore_* call on key name in dir; returns the exit code. */
int cli_keystore_error(int r, const char *dir, const char *name);

/* Write s to f with control bytes and backslash as \ooo: file names are anyone's bytes and
 * must not drive the terminal that shows them. */
void cli_fputs_safe(FILE *f, const char *s);

/* s as cli_fputs_safe writes it, into buf, cut to size; with c1 also the C1 controls
 * U+0080..U+009F in their UTF-8 form (C2 80..C2 9F: 9B is CSI), for words of another process. */
const char *cli_escape(const char *s, bool c1, char *buf, size_t size);

#endif
