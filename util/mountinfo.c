/* mountinfo.c: what /proc/self/mountinfo says is mounted at a path (for the daemon's start checks and keyfsctl) */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keyfs/util.h"

void util_mountinfo_unescape(char *s)
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

/* Split one line: id parent maj:min root mountpoint options [optional...] - fstype source
 * superoptions. Returns false for a line without them. */
static bool split_line(char *line, char **mp, char **type, char **src, char **sup)
{
	char *save = NULL, *tok;
	int nf = 0;

	*mp = *type = *src = *sup = NULL;
	line[strcspn(line, "\n")] = '\0';
	for (tok = strtok_r(line, " ", &save); tok; tok = strtok_r(NULL, " ", &save)) {
		if (++nf == 5) {
			*mp = tok;
		} else if (nf > 6 && strcmp(tok, "-") == 0) {
			*type = strtok_r(NULL, " ", &save);
			*src = strtok_r(NULL, " ", &save);
			*sup = strtok_r(NULL, " ", &save);
			break;
		}
	}
	return *mp && *type && *src;
}

int util_mount_at(const char *path, char *fstype, size_t fstype_size, char *source, size_t source_size,
		  char *super, size_t super_size)
{
	char *line = NULL;
	size_t cap = 0;
	int r = -ENOENT;
	FILE *f;

	f = fopen("/proc/self/mountinfo", "re");
	if (!f)
		return -errno;
	while (getline(&line, &cap, f) > 0) {
		char *mp, *type, *src, *sup;

		if (!split_line(line, &mp, &type, &src, &sup))
			continue;
		util_mountinfo_unescape(mp);
		if (strcmp(mp, path) != 0)
			continue;
		/* The last one listed is on top. */
		util_mountinfo_unescape(src);
		snprintf(fstype, fstype_size, "%s", type);
		snprintf(source, source_size, "%s", src);
		if (super)
			snprintf(super, super_size, "%s", sup ? sup : "");
		r = 0;
	}
	free(line);
	fclose(f);
	return r;
}

int util_mounted_from(const char *fstype, const char *source)
{
	char *line = NULL;
	size_t cap = 0;
	int r = 0;
	FILE *f;

	f = fopen("/proc/self/mountinfo", "re");
	if (!f)
		return -errno;
	while (r == 0 && getline(&line, &cap, f) > 0) {
		char *mp, *type, *src, *sup;

		if (!split_line(line, &mp, &type, &src, &sup) || strcmp(type, fstype) != 0)
			continue;
		util_mountinfo_unescape(src);
		if (strcmp(src, source) == 0)
			r = 1;
	}
	free(line);
	fclose(f);
	return r;
}
