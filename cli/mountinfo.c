/* mountinfo.c: reading /proc/self/mountinfo fields, shared by inspect and status/lock/unlock */
#include "cli.h"

/* mountinfo escapes space, tab, newline and backslash as \ooo. */
void cli_mountinfo_unescape(char *s)
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
