/* walk.c: a depth-first walk of a backing tree for inspect -r, fsck and rewrap: no symlinks, one filesystem */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "keyfs/voldesc.h"
#include "walk.h"

/* Deeper than this is a loop or a hostile tree: PATH_MAX allows about 2048 levels. */
#define WALK_DEPTH_MAX 1024

struct walker {
	dev_t dev;                      /* the root's filesystem: the walk never leaves it */
	bool skip_voldesc;              /* the root is a volume's backing root */
	walk_fn fn;
	walk_err_fn on_error;
	void *arg;
	char path[PATH_MAX];            /* relative path of the entry being visited */
};

static int cmp_names(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static void names_free(char **names, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(names[i]);
	free(names);
}

/* Every name in the directory dirfd (dup'd for fdopendir), sorted, "." and ".." left out. */
static int read_names(int dirfd, char ***ret_names, size_t *ret_n)
{
	char **names = NULL, **v;
	size_t n = 0, cap = 0;
	struct dirent *de;
	DIR *d;
	int fd, r = 0;

	fd = dup(dirfd);
	if (fd < 0)
		return -errno;
	d = fdopendir(fd);
	if (!d) {
		r = -errno;
		close(fd);
		return r;
	}
	for (;;) {
		errno = 0;
		de = readdir(d);
		if (!de) {
			r = -errno;
			break;
		}
		if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
			continue;
		if (n == cap) {
			cap = cap ? 2 * cap : 64;
			v = realloc(names, cap * sizeof(*names));
			if (!v) {
				r = -ENOMEM;
				break;
			}
			names = v;
		}
		names[n] = strdup(de->d_name);
		if (!names[n]) {
			r = -ENOMEM;
			break;
		}
		n++;
	}
	closedir(d);
	if (r < 0) {
		names_free(names, n);
		return r;
	}
	if (n > 1)
		qsort(names, n, sizeof(*names), cmp_names);
	*ret_names = names;
	*ret_n = n;
	return 0;
}

/* Visit the entries of dirfd, whose relative path is w->path[0..len). */
static int walk_dir(struct walker *w, int dirfd, size_t len, unsigned depth)
{
	char **names = NULL;
	size_t n = 0;
	int r;

	r = read_names(dirfd, &names, &n);
	if (r == -ENOMEM)
		return r;
	if (r < 0)
		return w->on_error(w->path, -r, w->arg);
	for (size_t i = 0; i < n; i++) {
		struct walk_entry e = { .dirfd = dirfd, .name = names[i], .path = w->path };
		size_t nlen = strlen(names[i]);
		struct stat st;

		if (len + (len ? 1 : 0) + nlen >= sizeof(w->path)) {
			r = w->on_error(w->path, ENAMETOOLONG, w->arg);
			if (r < 0)
				break;
			continue;
		}
		if (len)
			w->path[len] = '/';
		memcpy(w->path + len + (len ? 1 : 0), names[i], nlen + 1);
		/* The volume description is not a file of the volume. */
		if (depth == 0 && w->skip_voldesc && strcmp(names[i], VOLDESC_NAME) == 0)
			goto next;
		if (fstatat(dirfd, names[i], &st, AT_SYMLINK_NOFOLLOW) < 0) {
			/* Gone since the listing: not an error of the tree. */
			r = errno == ENOENT ? 0 : w->on_error(w->path, errno, w->arg);
			if (r < 0)
				break;
			goto next;
		}
		e.st = &st;
		if (st.st_dev != w->dev) {
			r = w->on_error(w->path, EXDEV, w->arg);
			if (r < 0)
				break;
			goto next;
		}
		r = w->fn(&e, w->arg);
		if (r < 0)
			break;
		if (S_ISDIR(st.st_mode)) {
			struct stat dst;
			int fd;

			if (depth + 1 >= WALK_DEPTH_MAX) {
				r = w->on_error(w->path, ELOOP, w->arg);
				if (r < 0)
					break;
				goto next;
			}
			fd = openat(dirfd, names[i], O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_NOCTTY | O_CLOEXEC);
			if (fd < 0) {
				r = errno == ENOENT ? 0 : w->on_error(w->path, errno, w->arg);
			} else if (fstat(fd, &dst) < 0 || dst.st_dev != st.st_dev || dst.st_ino != st.st_ino) {
				/* Replaced between the stat and the open: not the directory we listed. */
				r = 0;
				close(fd);
			} else {
				r = walk_dir(w, fd, strlen(w->path), depth + 1);
				close(fd);
			}
			if (r < 0)
				break;
		}
next:
		w->path[len] = '\0';
		r = 0;
	}
	w->path[len] = '\0';
	names_free(names, n);
	return r;
}

int walk_tree(int root_fd, bool volume_root, walk_fn fn, walk_err_fn on_error, void *arg)
{
	struct walker *w;
	struct stat st;
	int r;

	if (fstat(root_fd, &st) < 0)
		return -errno;
	if (!S_ISDIR(st.st_mode))
		return -ENOTDIR;
	w = calloc(1, sizeof(*w));
	if (!w)
		return -ENOMEM;
	w->dev = st.st_dev;
	w->skip_voldesc = volume_root;
	w->fn = fn;
	w->on_error = on_error;
	w->arg = arg;
	r = walk_dir(w, root_fd, 0, 0);
	free(w);
	return r;
}
