/* log.h: one logging sink for daemon and CLI: stderr, or syslog once the daemon runs in the background */
#ifndef KEYFS_LOG_H
#define KEYFS_LOG_H

#include <stdbool.h>

enum log_level { LOG_LEVEL_ERR = 3, LOG_LEVEL_WARN = 4, LOG_LEVEL_INFO = 6, LOG_LEVEL_DEBUG = 7 };

/* ident prefixes every line ("keyfs", "keyfsctl"). */
void log_init(const char *ident, enum log_level max_level);
/* After daemonizing: send lines to syslog (LOG_DAEMON) instead of stderr. */
void log_to_syslog(bool on);

void log_msg(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_err(...)   log_msg(LOG_LEVEL_ERR, __VA_ARGS__)
#define log_warn(...)  log_msg(LOG_LEVEL_WARN, __VA_ARGS__)
#define log_info(...)  log_msg(LOG_LEVEL_INFO, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_LEVEL_DEBUG, __VA_ARGS__)

#endif
