/* walk.h: a depth-first walk of a backing tree (private to cli/) */
#ifndef KEYFS_CLI_WALK_H
#define KEYFS_CLI_WALK_H

#include <stdbool.h>
#include <sys/stat.h>

/* One entry met by the walk: open it with openat(dirfd, name, ... O_NOFOLLOW) and compare
 * fstat with st, since the tree may change under the walk. */
struct walk_entry {
	int dirfd;                      /* its directory */
	const char *name;               /* its name there */
	const char *path;               /* relative to the walk's root: "a/b/name" */
	const struct stat *st;          /* lstat of it */
};

/* Called for every entry, directories before what they hold. Return 0 to go on, -errno to stop
 * the walk with that error. */
typedef int (*walk_fn)(const struct walk_entry *e, void *arg);

/* Called for what the walk cannot visit: err is a positive errno for path (relative; "" for
 * the root): EXDEV another filesystem mounted there, ELOOP too deep, ENAMETOOLONG, or what
 * opening or listing a directory answered. Return 0 to go on, -errno to stop. */
typedef int (*walk_err_fn)(const char *path, int err, void *arg);

/*
 * Walk everything under the directory root_fd in name order. Symlinks are reported, never
 * followed; nothing on another filesystem is entered (a keyfs mountpoint inside its own
 * backing dir would show plaintext). When volume_root is true the volume description at the
 * top is skipped. Returns 0, the first -errno a callback returned, -ENOMEM, or -ENOTDIR.
 */
int walk_tree(int root_fd, bool volume_root, walk_fn fn, walk_err_fn on_error, void *arg);

#endif
