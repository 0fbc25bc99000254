/* mountinfo.c: reading /proc/self/mountinfo fields, shared by inspect and status/lock/unlock */
#include "keyfs/util.h"
#include "cli.h"

void cli_mountinfo_unescape(char *s)
{
	util_mountinfo_unescape(s);
}
