/* mountinfo.c: the one reader of /proc/self/mountinfo (the daemon's start checks, keyfsctl status and inspect) */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sysmacros.h>

#include "keyfs/util.h"

/* Undo the \ooo escapes the kernel writes for space, tab, newline and backslash, in place. */
static void unescape(char *s)
{
	char *w = s;

	for (char *p = s; *p; p++) {
		if (p[0] == '\\' && p[1] >= '0' && p[1] <= '3' && p[2] >= '0' && p[2] <= '7' && p[3] >= '0' &&
		    p[3] <= '7') {
			*w++ = (char)((p[1] - '0') << 6 | (p[2] - '0') << 3 | (p[3] - '0'));
			p += 3;
		} else {
			*w++ = *p;
		}
	}
	*w = '\0';
}

/* Split one line (modified in place) into m. Returns 0, or -EINVAL for a line of another shape. */
static int parse_line(char *line, struct util_mount *m)
{
	/* id parent maj:min root mountpoint options [optional...] - fstype source superoptions */
	char *fields[6] = { NULL }, *save = NULL, *tok, *fstype = NULL, *source = NULL, *super = NULL;
	unsigned maj, min;
	int nf = 0;

	line[strcspn(line, "\n")] = '\0';
	for (tok = strtok_r(line, " ", &save); tok; tok = strtok_r(NULL, " ", &save)) {
		if (nf < 6) {
			fields[nf++] = tok;
		} else if (strcmp(tok, "-") == 0) {
			fstype = strtok_r(NULL, " ", &save);
			source = strtok_r(NULL, " ", &save);
			super = strtok_r(NULL, " ", &save);
			break;
		}
	}
	if (nf < 6 || !fstype || !source || sscanf(fields[2], "%u:%u", &maj, &min) != 2)
		return -EINVAL;
	unescape(fields[3]);
	unescape(fields[4]);
	unescape(source);
	*m = (struct util_mount){
		.root = fields[3],
		.mountpoint = fields[4],
		.fstype = fstype,
		.source = source,
		.super = super ? super : "",
		.dev = makedev(maj, min),
	};
	return 0;
}

int util_mountinfo_each(int (*fn)(const struct util_mount *m, void *ctx), void *ctx)
{
	char *line = NULL;
	size_t cap = 0;
	int r = 0;
	FILE *f;

	f = fopen("/proc/self/mountinfo", "re");
	if (!f)
		return -errno;
	while (r == 0 && getline(&line, &cap, f) > 0) {
		struct util_mount m;

		if (parse_line(line, &m) == 0)
			r = fn(&m, ctx);
	}
	free(line);
	fclose(f);
	return r;
}


struct mounted_from {
	const char *fstype, *source;
};

static int mounted_from_one(const struct util_mount *m, void *ctx)
{
	const struct mounted_from *a = ctx;

	return strcmp(m->fstype, a->fstype) == 0 && strcmp(m->source, a->source) == 0;
}

int util_mounted_from(const char *fstype, const char *source)
{
	struct mounted_from a = { .fstype = fstype, .source = source };

	return util_mountinfo_each(mounted_from_one, &a);
}

struct mount_at {
	const char *path;
	char *fstype, *source, *super;
	size_t fstype_size, source_size, super_size;
	bool found;
};

static int mount_at_one(const struct util_mount *m, void *ctx)
{
	struct mount_at *a = ctx;

	if (strcmp(m->mountpoint, a->path) != 0)
		return 0;
	/* The last one listed is on top: keep going. */
	snprintf(a->fstype, a->fstype_size, "%s", m->fstype);
	snprintf(a->source, a->source_size, "%s", m->source);
	if (a->super)
		snprintf(a->super, a->super_size, "%s", m->super);
	a->found = true;
	return 0;
}

int util_mount_at(const char *path, char *fstype, size_t fstype_size, char *source, size_t source_size,
		  char *super, size_t super_size)
{
	struct mount_at a = {
		.path = path, .fstype = fstype, .source = source, .super = super,
		.fstype_size = fstype_size, .source_size = source_size, .super_size = super_size,
	};
	int r = util_mountinfo_each(mount_at_one, &a);

	if (r < 0)
		return r;
	return a.found ? 0 : -ENOENT;
}
