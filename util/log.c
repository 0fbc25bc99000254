/* log.c: the log sink: stderr with an ident prefix, or syslog once the daemon is in the background */
#include <stdarg.h>
#include <stdio.h>
#include <syslog.h>

#include "keyfs/log.h"

static const char *log_ident = "keyfs";
static enum log_level log_max = LOG_LEVEL_INFO;
static bool log_syslog;

void log_init(const char *ident, enum log_level max_level)
{
	log_ident = ident;
	log_max = max_level;
}

void log_to_syslog(bool on)
{
	if (on && !log_syslog)
		openlog(log_ident, LOG_PID | LOG_NDELAY, LOG_DAEMON);
	log_syslog = on;
}

void log_msg(enum log_level level, const char *fmt, ...)
{
	va_list ap;

	if (level > log_max)
		return;
	va_start(ap, fmt);
	if (log_syslog) {
		vsyslog((int)level, fmt, ap);
	} else {
		char line[1024];

		/* One write per line, so lines of concurrent threads do not interleave. */
		vsnprintf(line, sizeof(line), fmt, ap);
		fprintf(stderr, "%s: %s%s\n", log_ident,
			level <= LOG_LEVEL_ERR ? "error: " : level == LOG_LEVEL_WARN ? "warning: " : "", line);
	}
	va_end(ap);
}
